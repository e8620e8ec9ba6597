"""Where a prefill's time goes, and how much of it threads don't shorten.

    python benchmarks/profile_prefill.py MODEL [--dense q8] [--expert-input q8] [--prompt 512]
                                               [--threads 1,2] [--rounds 3]

Runs the same prompt with each thread count in turn (numba.set_num_threads: the kernels'
parallel loops and prefill's tile pool follow it), `--rounds` times, alternating, in one process.
Every kernel and every step of fast.py is timed from the main thread, exclusive of the steps it
calls (a kernel's time is its own; "fast.moe" is the routing and numpy glue around the expert
calls; "(forward)" what _forward itself does: residual adds, embedding, the NaN check).

For each part it prints the median ms per prefill at each thread count and a fit of
t(threads) = serial + parallel / threads over all of them (least squares): "serial" is the time
no number of threads shortens. With one and two threads, serial = 2 t2 - t1. The fit is noisy
for small parts on a shared machine; the totals are what to compare.
"""

from __future__ import annotations

import argparse
import collections
import functools
import threading
import time

import numba
import numpy as np

import tinyoss
from tinyoss import amx, fast, kernels

FAST_STEPS = ["rmsnorm", "apply_rope", "attention", "moe", "experts_grouped", "expert_few",
              "expert_tiles", "experts_prefill", "experts_tiles", "_mxfp4_matmul", "swiglu",
              "x8_round_trip", "bf16_to_f32", "rope_cos_sin", "_forward"]


class Timer:
    """Exclusive wall time per name, measured on the main thread only (the tile pool's workers
    call kernels too: their time is inside the main thread's wait)."""

    def __init__(self):
        self.spent = collections.Counter()  # wall seconds, main thread, exclusive
        self.cpu = collections.Counter()  # the main thread's CPU seconds, exclusive
        self.pool_cpu = collections.Counter()  # CPU seconds of kernels called by other threads
        self.stack: list[list] = []
        self.main = threading.main_thread()
        self.lock = threading.Lock()

    def wrap(self, name, fn, name_of=None):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            label = name_of(*args) if name_of else name
            if threading.current_thread() is not self.main:
                c = time.thread_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    with self.lock:
                        self.pool_cpu[label] += time.thread_time() - c
            frame = [label, 0.0, 0.0]
            self.stack.append(frame)
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed, cpu = time.perf_counter() - t, time.thread_time() - c
                self.stack.pop()
                self.spent[label] += elapsed - frame[1]
                self.cpu[label] += cpu - frame[2]
                if self.stack:
                    self.stack[-1][1] += elapsed
                    self.stack[-1][2] += cpu
        return wrapper


def install(timer: Timer) -> list:
    """Wrap every kernel and fast.py step; returns what to put back."""
    undo = []

    def patch(owner, attr, wrapped):
        undo.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, wrapped)

    for name in dir(kernels):
        fn = getattr(kernels, name)
        if hasattr(fn, "py_func") and not name.startswith("_"):  # (helpers called from other
            patch(kernels, name, timer.wrap(name, fn))  # kernels must stay numba functions)
    for name in ("pack_x", "bf16_matmul", "mxfp4_matmul"):  # the AMX kernels (amx.AVAILABLE)
        if hasattr(amx, name):
            patch(amx, name, timer.wrap(name, getattr(amx, name)))
    for name in FAST_STEPS:
        if hasattr(fast, name):
            label = "(forward)" if name == "_forward" else f"fast.{name}"
            patch(fast, name, timer.wrap(label, getattr(fast, name)))
    patch(fast.Dense, "__call__", timer.wrap(
        "dense", fast.Dense.__call__, lambda self, x: f"Dense {self.rows}x{self.cols}"))
    for name in ("run", "__call__"):  # the tile pool (`run`; before 2026-12-07 `__call__`)
        if hasattr(fast.TileMatmul, name):
            pool = getattr(fast.TileMatmul, name)
            patch(fast.TileMatmul, name, timer.wrap("TileMatmul (pool)", pool))
    return undo


def fit(threads: list[int], times: list[float]) -> tuple[float, float]:
    """Least squares t = serial + parallel / threads -> (serial, parallel)."""
    a = np.stack([np.ones(len(threads)), 1.0 / np.array(threads, float)], axis=1)
    (serial, parallel), *_ = np.linalg.lstsq(a, np.array(times), rcond=None)
    return float(serial), float(parallel)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dense", default="bf16")
    ap.add_argument("--kv", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--expert-input", default="f32", choices=["f32", "q8"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--threads", default=f"1,{numba.config.NUMBA_NUM_THREADS}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    thread_counts = [int(s) for s in a.threads.split(",")]

    model = tinyoss.load(a.model, dense=a.dense, kv=a.kv, expert_input=a.expert_input)
    fast.warm_up(a.dense, a.kv, a.expert_input)
    model.prefault()
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, min(model.config.vocab_size, 199998), a.prompt)
    for n in thread_counts:  # first-call costs (BLAS, buffers, the pool) outside the timing
        numba.set_num_threads(n)
        model.forward(prompt[:16], model.new_cache(16), last_only=True)

    parallel_parts = {name for name in dir(kernels)
                      if getattr(getattr(kernels, name), "targetoptions", {}).get("parallel")}
    parallel_parts.add("TileMatmul (pool)")
    runs = {n: [] for n in thread_counts}  # (wall ms, main-thread CPU ms, pool CPU ms, total ms)
    for r in range(a.rounds):
        for n in thread_counts:
            numba.set_num_threads(n)
            cache = model.new_cache(a.prompt)
            timer = Timer()
            undo = install(timer)
            t = time.perf_counter()
            try:
                model.forward(prompt, cache, last_only=True)
            finally:
                total = time.perf_counter() - t
                for owner, attr, fn in reversed(undo):
                    setattr(owner, attr, fn)
            def ms(counter):
                return collections.Counter({k: 1e3 * v for k, v in counter.items()})

            spent = ms(timer.spent)
            spent["(outside _forward)"] = 1e3 * total - sum(timer.spent.values()) * 1e3
            runs[n].append((spent, ms(timer.cpu), ms(timer.pool_cpu), 1e3 * total))
            print(f"round {r + 1}, {n} threads: {1e3 * total:8.0f} ms "
                  f"({a.prompt / total:.2f} tok/s)", flush=True)

    def median(n, part, i=0):
        return float(np.median([run[i][part] for run in runs[n]]))

    parts = set().union(*(run[0].keys() for n in thread_counts for run in runs[n]))
    rows = []
    for part in parts:
        times = [median(n, part) for n in thread_counts]
        cpu = median(thread_counts[-1], part, 1)
        rows.append((part, times, cpu, *fit(thread_counts, times)))
    rows.sort(key=lambda row: -row[1][0])
    totals = [float(np.median([run[3] for run in runs[n]])) for n in thread_counts]
    serial, parallel = fit(thread_counts, totals)

    last = thread_counts[-1]
    print(f"\n{a.model}  dense {a.dense}  kv {a.kv}  expert input {a.expert_input}  prompt "
          f"{a.prompt}: ms per prefill (wall, exclusive), median of {a.rounds} rounds; cpu: the "
          f"main thread's CPU ms at {last} threads; fit: t = serial + parallel / threads")
    head = "".join(f"{f'{n} thr':>9s}" for n in thread_counts)
    print(f"  {'part':30s} {'kind':8s}{head} {'cpu':>8s}  {'serial':>8s} {'parallel':>9s}")
    for part, times, cpu, s, p in rows[:a.top]:
        kind = "parallel" if part in parallel_parts else "serial"
        print(f"  {part:30s} {kind:8s}" + "".join(f"{t:9.1f}" for t in times) +
              f" {cpu:8.1f}  {s:8.1f} {p:9.1f}")
    print(f"  {'total':30s} {'':8s}" + "".join(f"{t:9.1f}" for t in totals) +
          f" {'':8s}  {serial:8.1f} {parallel:9.1f}")
    pool = collections.Counter()
    for run in runs[last]:
        pool.update(run[2])
    print(f"CPU ms of the kernels the pool's workers ran at {last} threads (all workers, mean of "
          "rounds; the rest of the pool's time is BLAS): " +
          ", ".join(f"{k} {v / len(runs[last]):.0f}" for k, v in pool.most_common()))
    for i, n in enumerate(thread_counts):
        serial_ms = sum(median(n, part, 1) for part, *_ in rows if part not in parallel_parts)
        print(f"{n} threads: serial parts (main thread's CPU time outside parallel kernels and "
              f"the pool) {serial_ms:.0f} ms of {totals[i]:.0f} ms wall "
              f"({serial_ms / totals[i]:.1%})")
    print(f"fit over the totals: serial {serial:.0f} ms, {serial / (serial + parallel):.1%} of the "
          "one-thread time; predicted " +
          ", ".join(f"{n} threads {a.prompt / (1e-3 * (serial + parallel / n)):.1f} tok/s"
                    for n in (2, 4, 8, 16)))

if __name__ == "__main__":
    main()
