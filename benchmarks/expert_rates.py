"""How fast the routed-expert matvecs read, with their weights in L2, in L3 and in RAM.

    python benchmarks/expert_rates.py [--threads 2] [--rounds 5]

Random MXFP4 experts of the 20b's mlp1 shape (5760 x 2880), 4 at a time as a decoded token takes
them: the exact kernel (float32 inputs, `f32_mf4w_moe_matvec`) and the int8-input one
(`f32_mf4w_q8x_moe_matvec`), taking turns in one process. GB/s counts the blocks and scales read.
"L2": one small expert again and again; "L3": 4 experts of 2048 rows (12.5 MB); "RAM": 4 new
experts each call, from 32 (282 MB). A kernel as fast from RAM as from L3 is held by its
arithmetic; one slower from RAM, by how it asks for memory (prefetching).
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from tinyoss import kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    C = 2880
    nb = C // 32
    print(f"{args.threads} threads, GB/s (best of {args.rounds} rounds)")
    for label, E, R, reps in (("L2", 1, 256, 200), ("L3", 4, 2048, 30), ("RAM", 32, 5760, 8)):
        blocks = rng.integers(0, 256, (E, R, nb, 16), dtype=np.uint8)
        scales = rng.integers(118, 130, (E, R, nb), dtype=np.uint8)
        bias = np.zeros((E, R), np.uint16)
        xl = kernels.to_lane_order(rng.standard_normal((1, C)).astype(np.float32))
        xq = rng.integers(-127, 128, (1, C), dtype=np.int8)
        xd = np.full((1, nb), 1e-3, np.float32)
        k = min(4, E)
        out = np.zeros((k, R), np.float32)
        sides = {"exact": lambda ex: kernels.f32_mf4w_moe_matvec(blocks, scales, bias, ex, xl, out),
                 "int8 inputs": lambda ex: kernels.f32_mf4w_q8x_moe_matvec(blocks, scales, bias, ex,
                                                                          xq, xd, out)}
        nbytes = k * R * nb * 17  # 16 bytes of nibbles and a scale a block
        best = dict.fromkeys(sides, 0.0)
        for _ in range(args.rounds):
            for name, run in sides.items():
                run(np.arange(k) % E)  # compiled, and the L2 / L3 cases' weights cached
                t = time.perf_counter()
                for i in range(reps):
                    run((np.arange(k) + (k * i if label == "RAM" else 0)) % E)
                best[name] = max(best[name], nbytes * reps / (time.perf_counter() - t) / 1e9)
        print(f"  {label:4s}" + "".join(f"  {name} {rate:5.1f}" for name, rate in best.items()))


if __name__ == "__main__":
    main()
