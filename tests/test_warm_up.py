"""Readying the kernels before a command runs (fast.warm_up): the status line of a first run
on this CPU, and `run`'s smaller scope. Each test starts a fresh Python process: kernels compiled
by other tests in this one would hide what a command compiles. (test_kernels checks the "all"
scope of `serve`, `chat` and `bench`.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

COMPILING = "compiling kernels for this CPU (first run only) ..."


def _env(**changes) -> dict:
    env = dict(os.environ, **changes)
    for name in ("TINYOSS_KERNELS", "TINYOSS_PORTABLE_KERNELS", "TINYOSS_NUMBA_CACHE"):
        env.pop(name, None)  # (a forced kernel path, or no cache, would compile every time)
    return env


def test_a_first_run_says_it_is_compiling_then_never_again(tiny_checkpoint, tmp_path):
    """With an empty numba cache, `tinyoss run` says at once that it compiles, then how long it
    took (one line each: stderr is not a terminal here); with the cache filled, nothing."""
    # a fixed --date: the prompt says the current date, and a first run that compiled across
    # midnight UTC once replied to another prompt than the second (CI, 2026-12-06 ~23:59)
    args = [sys.executable, "-m", "tinyoss.cli", "run", "-m", str(tiny_checkpoint), "-n", "2",
            "-t", "0", "--date", "2026-01-01", "Hello"]
    env = _env(NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    first, again = (subprocess.run(args, capture_output=True, text=True, env=env, timeout=900,
                                   check=False) for _ in range(2))
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    lines = first.stderr.splitlines()
    assert lines[0] == COMPILING  # before anything else (nothing was loaded from the cache)
    assert lines[1].startswith("compiled in ") and "numba's cache" in lines[1]
    assert "compil" not in again.stderr
    assert again.stdout == first.stdout


READY = """
import sys
import numpy as np
import tinyoss
from tinyoss import fast, kernels
path, q8_cache, dense, kv, expert_input = sys.argv[1:]
fast.warm_up(dense, kv, expert_input, "run")
jitted = [getattr(kernels, n) for n in dir(kernels) if hasattr(getattr(kernels, n), "signatures")]
before = [len(k.signatures) for k in jitted]
model = tinyoss.load(path, dense=dense, kv=kv, expert_input=expert_input, q8_cache=q8_cache)
cache = model.new_cache()
model.forward(np.arange(12), cache, last_only=True)  # the prompt, as `run` reads it
for token in range(3):
    model.forward([token], cache, last_only=True)  # then one token at a time
print(sorted(k.__name__ for k, n in zip(jitted, before) if len(k.signatures) != n))
print(sorted(k.__name__ for k in (kernels.f32_bf16w_matmul, kernels.f32_mf4w_moe_matmul,
                                  kernels.f32_q8w_matmul) if k.signatures))
"""


@pytest.mark.parametrize("dense,kv,expert_input", [
    ("bf16", "f32", "f32"), ("q8", "f32", "f32"), ("bf16", "bf16", "f32"), ("bf16", "f32", "q8")])
def test_run_scope_readies_every_kernel_run_uses(make_checkpoint, tmp_path, dense, kv,
                                                 expert_input):
    """warm_up(scope="run") compiles what `tinyoss run` then uses (a prompt, then a token at a
    time; int8 copies mapped from the cache file), and nothing of the few-token paths."""
    path = make_checkpoint("both", seed=2, vocab_size=300, hidden_size=256)
    r = subprocess.run([sys.executable, "-c", READY, str(path), str(tmp_path), dense, kv,
                        expert_input], capture_output=True, text=True, env=_env(), timeout=900,
                       check=False)
    assert r.returncode == 0, r.stderr
    after_warm_up, few_token_kernels = r.stdout.splitlines()
    assert after_warm_up == "[]"  # no kernel compiled (or loaded) after warm_up
    assert few_token_kernels == "[]"  # (those of 2-8 tokens at a time never ran)
