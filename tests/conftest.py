"""Shared fixtures: small synthetic checkpoints written once per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# kernels compile once per session into a temp cache, never into the source tree of a CI clone
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".numba_cache"))
# dense="q8" keeps int8 copies in a cache folder: a fresh one per session, never the user's
os.environ["TINYOSS_CACHE_DIR"] = tempfile.mkdtemp(prefix="tinyoss-test-cache-")
atexit.register(shutil.rmtree, os.environ["TINYOSS_CACHE_DIR"], ignore_errors=True)

from tinyoss.synth import preset_config, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(layout='both', seed=0, preset='tiny', **config overrides) -> folder (cached)."""
    made: dict = {}

    def make(layout: str = "both", seed: int = 0, preset: str = "tiny", **overrides):
        key = (layout, seed, preset, tuple(sorted(overrides.items())))
        if key not in made:
            config = preset_config(preset, **overrides)
            out = tmp_path_factory.mktemp("ckpt") / "model"
            made[key] = write_checkpoint(out, config, layout, preset, seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint):
    """The tiny preset (full vocabulary), HF root with original/ beside it."""
    return make_checkpoint("both", seed=0)
