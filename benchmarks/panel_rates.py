"""Prefill's float32 products: our register blocks against numpy's BLAS, at an expert's shapes.

    python benchmarks/panel_rates.py [--rows 512] [--cols 2880] [--tokens 16,32,64,128,256,512]
                                     [--threads 1,2] [--repeat 12]

For each token count n: a tile [rows, cols] times n tokens, the way prefill takes it
(fast.TileMatmul): `tile @ x.T` by numpy's BLAS (held to one thread), x packed once and
`kernels.f32_panel_matmul` (the float32 tile), and `kernels.f32_mf4_panel_matmul` (the same
rows as MXFP4, decoded as they are multiplied; its BLAS twin decodes the tile first). With
--threads 2 every thread runs its own copy at once, as the tile pool's workers do. Prints
GFLOP/s a thread (multiply-adds counted as 2; medians; the packing inside the timing).
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
from threadpoolctl import threadpool_limits

from tinyoss import kernels


def rates(rows: int, cols: int, n: int, threads: int, repeat: int) -> dict[str, float]:
    rng = np.random.default_rng(n)
    results: dict[str, list[float]] = {}
    flops = 2 * rows * cols * n

    def one(out: dict) -> None:
        a = rng.standard_normal((rows, cols), dtype=np.float32)
        blocks = rng.integers(0, 256, (rows, cols // 32, 16), dtype=np.uint8)
        scales = rng.integers(120, 134, (rows, cols // 32), dtype=np.uint8)
        x = rng.standard_normal((n, cols), dtype=np.float32)
        N = kernels.panel_tokens(n)
        p, ht = np.empty(cols * N, np.float32), np.empty((rows, N), np.float32)
        abuf = np.empty(kernels.PANEL_M * kernels.PANEL_K, np.float32)
        tile, h = np.empty((rows, cols), np.float32), np.empty((rows, n), np.float32)

        def panels():
            kernels.pack_panels(x, p)
            kernels.f32_panel_matmul(a, p, ht)

        def mxfp4_panels():
            kernels.pack_panels(x, p)
            kernels.f32_mf4_panel_matmul(blocks, scales, p, ht, abuf)

        def mxfp4_blas():
            kernels.mxfp4_decode_serial(blocks, scales, tile)
            np.matmul(tile, x.T, out=h)

        runs = {"f32 BLAS": lambda: np.matmul(a, x.T, out=h), "f32 panels": panels,
                "mxfp4 decode + BLAS": mxfp4_blas, "mxfp4 panels": mxfp4_panels}
        for fn in runs.values():
            fn()  # compile, fault in
        times = {name: [] for name in runs}
        for _ in range(repeat):
            for name, fn in runs.items():  # alternating
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        out.update({name: np.median(ts) for name, ts in times.items()})

    outs = [{} for _ in range(threads)]
    workers = [threading.Thread(target=one, args=(o,)) for o in outs]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for name in outs[0]:
        results[name] = flops / np.median([o[name] for o in outs]) / 1e9
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=2880)
    ap.add_argument("--tokens", default="16,32,64,128,256,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeat", type=int, default=12)
    a = ap.parse_args()
    with threadpool_limits(1):
        for threads in [int(t) for t in a.threads.split(",")]:
            print(f"{threads} thread(s) at once, [{a.rows}, {a.cols}] @ [{a.cols}, n], "
                  "GFLOP/s a thread:")
            for n in [int(t) for t in a.tokens.split(",")]:
                r = rates(a.rows, a.cols, n, threads, a.repeat)
                print(f"  n={n:4d}  " + "  ".join(f"{k} {v:6.1f}" for k, v in r.items()),
                      flush=True)


if __name__ == "__main__":
    main()
