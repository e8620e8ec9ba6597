"""Shared fixtures: small synthetic checkpoints written once per test session."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# kernels compile into a cache beside the tests, never into the source tree of a CI clone; one
# folder per version of simd.py (numba notices edits to kernels.py only, not to the IR it
# inlines from simd.py: an edit there would otherwise test the old kernels)
_SIMD = hashlib.sha256((Path(__file__).parent.parent / "tinyoss" / "simd.py").read_bytes())
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).parent.parent / ".numba_cache" /
                                             _SIMD.hexdigest()[:12]))
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


@pytest.fixture(scope="session")
def oh():
    """openai-harmony, the oracle of the chat format (skips where it is not installed)."""
    return pytest.importorskip("openai_harmony")


@pytest.fixture(scope="session")
def reference(oh, tmp_path_factory):
    """openai-harmony's gpt-oss encoding, reading the verified o200k_base from a temp folder."""
    from tinyoss.tokenizer import load_verified_ranks_file

    folder = tmp_path_factory.mktemp("harmony_encodings")
    (folder / "o200k_base.tiktoken").write_bytes(load_verified_ranks_file())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_ENCODINGS_BASE", str(folder))
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
