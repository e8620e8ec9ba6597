"""Where a decoded token's time goes: every kernel of the fast path timed over N decoded tokens.

    python benchmarks/profile_decode.py MODEL [--dense q8] [--kv bf16] [--expert-input q8]
                                              [--depth 4096] [--tokens 16] [--batch 4]

--batch B decodes B sequences together, one Model.forward_batch a step (what `tinyoss serve` does
with B streams): the times are per step, and a step makes B tokens.

Each kernel call is timed (wall clock, the kernels run on all cores); what is left is Python,
numpy and the rest. The weights are mapped first (Model.prefault), as `tinyoss bench` does;
warm the page cache before (`cat MODEL/*.safetensors > /dev/null`).
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np

import tinyoss
from tinyoss import bench, fast, kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dense", default="bf16")
    ap.add_argument("--kv", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--expert-input", default="f32", choices=["f32", "q8"])
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()

    model = tinyoss.load(a.model, dense=a.dense, kv=a.kv, expert_input=a.expert_input)
    fast.warm_up(a.dense, a.kv, a.expert_input)
    model.prefault()
    caches = [model.new_cache(a.depth + a.tokens + 2) for _ in range(a.batch)]
    for cache in caches:
        bench.fill_cache(model, cache, a.depth)
    for cache in caches:
        model.forward([1], cache, last_only=True)  # first-call costs outside the timing
    if a.batch > 1:
        model.forward_batch(list(range(3, 3 + a.batch)), caches)

    def step(tokens: list[int]) -> list[int]:
        if a.batch == 1:
            return [int(np.argmax(model.forward(tokens, caches[0], last_only=True)[-1]))]
        return [int(t) for t in np.argmax(model.forward_batch(tokens, caches), axis=-1)]

    spent = collections.Counter()
    calls = collections.Counter()
    originals = {name: getattr(kernels, name) for name in dir(kernels)
                 if hasattr(getattr(kernels, name), "py_func")}

    def timed(name, fn):
        def wrapper(*args):
            t = time.perf_counter()
            result = fn(*args)
            spent[name] += time.perf_counter() - t
            calls[name] += 1
            return result
        return wrapper

    for name, fn in originals.items():
        setattr(kernels, name, timed(name, fn))
    token = list(range(2, 2 + a.batch))
    t = time.perf_counter()
    try:
        for _ in range(a.tokens):
            token = step(token)
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)
    total = (time.perf_counter() - t) / a.tokens

    print(f"{a.model}  dense {a.dense}  kv {a.kv}  expert input {a.expert_input}  depth {a.depth}  "
          f"batch {a.batch}: {1e3 * total:.1f} ms per step ({a.batch / total:.2f} tok/s, {a.tokens} steps)")
    for name, s in spent.most_common():
        print(f"  {name:28s} {1e3 * s / a.tokens:7.2f} ms  {calls[name] // a.tokens:4d} calls")
    rest = total - sum(spent.values()) / a.tokens
    print(f"  {'(python, numpy, the rest)':28s} {1e3 * rest:7.2f} ms")


if __name__ == "__main__":
    main()
