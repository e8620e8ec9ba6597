"""Two ways of decoding compared in one process, their tokens alternating (DEVELOPERS.md: this
VM's speed moves by 2x within seconds, so only variants timed side by side compare).

    python benchmarks/ab_decode.py MODEL [--a dense=q8] [--b dense=q8,expert_input=q8]
                                         [--b-tree ../old] [--tokens 40] [--depth 0] [--batch 1]

--a / --b: keyword arguments of tinyoss.load for each side (dense, kv, expert_input).
--b-tree: side b imports tinyoss from another checkout (`git worktree add ../old HEAD~1`), to
time a kernel change against the code before it; its kernels are compiled afresh (no disk
cache: ~20 s).
Each side decodes `--tokens` tokens after `--depth` cached ones (random keys and values, as
`tinyoss bench` fills them); the order within a pair of tokens alternates. Prints each side's
median ms a token and the median and quartiles of the per-pair ratio a/b. --batch B: each side
decodes B sequences a step through Model.forward_batch (what `tinyoss serve` does with B streams);
the times are per step.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np


def options(text: str) -> dict[str, str]:
    """'dense=q8,expert_input=q8' -> {'dense': 'q8', 'expert_input': 'q8'}."""
    pairs = [p.split("=", 1) for p in text.split(",") if p]
    bad = [p[0] for p in pairs if len(p) != 2 or p[0] not in ("dense", "kv", "expert_input")]
    if bad:
        sys.exit(f"ab_decode: not an option of tinyoss.load: {bad[0]!r} "
                 "(use dense=..., kv=..., expert_input=...)")
    return dict(pairs)


def package(tree: str | None):
    """tinyoss from this checkout, or (tree) from another one, imported as tinyoss_b."""
    if tree is None:
        import tinyoss
        return tinyoss
    init = Path(tree) / "tinyoss" / "__init__.py"
    if not init.is_file():
        sys.exit(f"ab_decode: no tinyoss package in {tree}")
    spec = importlib.util.spec_from_file_location("tinyoss_b", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tinyoss_b"] = module
    # its kernels compiled afresh: numba's disk cache of that checkout may hold code compiled
    # under the module name tinyoss (its tests, a bench), which fails to load as tinyoss_b
    cache, os.environ["TINYOSS_NUMBA_CACHE"] = os.environ.get("TINYOSS_NUMBA_CACHE"), "0"
    try:
        spec.loader.exec_module(module)
        importlib.import_module("tinyoss_b.kernels")
    finally:
        if cache is None:
            del os.environ["TINYOSS_NUMBA_CACHE"]
        else:
            os.environ["TINYOSS_NUMBA_CACHE"] = cache
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--a", default="", help="tinyoss.load options of side a")
    ap.add_argument("--b", default="", help="tinyoss.load options of side b")
    ap.add_argument("--b-tree", help="import side b's tinyoss from this checkout")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together a step")
    args = ap.parse_args()

    sides = {}
    for name, opts, tree in (("a", options(args.a), None), ("b", options(args.b), args.b_tree)):
        pkg = package(tree)
        bench = importlib.import_module(pkg.__name__ + ".bench")
        fast = importlib.import_module(pkg.__name__ + ".fast")
        model = pkg.load(args.model, **opts)
        fast.warm_up(opts.get("dense", "bf16"), opts.get("kv", "f32"),
                     opts.get("expert_input", "f32"))
        model.prefault()
        caches = [model.new_cache(args.depth + args.tokens + 2) for _ in range(args.batch)]
        for i, cache in enumerate(caches):
            bench.fill_cache(model, cache, args.depth, seed=i)
        token = [int(np.argmax(model.forward([1 + i], cache, last_only=True)[-1]))  # untimed
                 for i, cache in enumerate(caches)]
        sides[name] = {"model": model, "caches": caches, "token": token, "times": [],
                       "label": ",".join(f"{k}={v}" for k, v in opts.items()) or "defaults"}
        if tree:
            sides[name]["label"] += f" ({tree})"

    for i in range(args.tokens):
        for name in ("ab" if i % 2 == 0 else "ba"):
            s = sides[name]
            t = time.perf_counter()
            if args.batch == 1:
                logits = s["model"].forward(s["token"], s["caches"][0], last_only=True)
            else:
                logits = s["model"].forward_batch(s["token"], s["caches"])
            s["times"].append(time.perf_counter() - t)
            s["token"] = [int(token) for token in np.argmax(logits, axis=-1)]

    for name, s in sides.items():
        ms = 1e3 * float(np.median(s["times"]))
        print(f"{name}: {s['label']}: {ms:.1f} ms a step of {args.batch} ({1e3 * args.batch / ms:.2f} tok/s)")
    ratio = np.array(sides["a"]["times"]) / np.array(sides["b"]["times"])
    q1, q3 = np.percentile(ratio, [25, 75])
    print(f"a/b time per token: median {np.median(ratio):.3f} (quartiles {q1:.3f}-{q3:.3f}, "
          f"{args.tokens} pairs at depth {args.depth}, batch {args.batch}): b is {np.median(ratio):.3f}x as fast")


if __name__ == "__main__":
    main()
