"""Numba kernels. Each keeps a plain numpy twin (named in its docstring) that defines it; tests prove
them equal (bit-exact where the arithmetic allows it, else within a stated tolerance).

All kernels are compiled through `jit` below: caching and fastmath are set in one place.
  TINYOSS_NUMBA_CACHE=0   don't cache compiled kernels on disk (default: cache)
fastmath, where a kernel asks for it, is the safe subset {nsz, arcp, contract, afn, reassoc}:
never the no-inf/no-nan flags, which would break the -inf masks of attention and the sinks.
"""

from __future__ import annotations

import os

import numba
import numpy as np

from . import mxfp4

CACHE = os.environ.get("TINYOSS_NUMBA_CACHE", "1") != "0"
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


def jit(parallel: bool = False, fastmath: bool = False):
    """The one decorator of every kernel: nopython, cached, optionally parallel / safe fastmath."""
    return numba.njit(cache=CACHE, parallel=parallel, fastmath=FASTMATH if fastmath else False,
                      nogil=True)


# lookup tables (numba freezes global arrays into the compiled code)
_FP4 = mxfp4.FP4_VALUES  # nibble -> E2M1 value
_E8M0 = mxfp4.scale_to_f32(np.arange(256, dtype=np.uint8))  # scale byte -> 2**(s-127), exact


@jit(parallel=True)
def mxfp4_decode(blocks, scales):
    """blocks [rows, n_blocks, 16] u8, scales [rows, n_blocks] u8 -> [rows, n_blocks*32] f32.

    Twin: mxfp4.decode. Bit-exact: each value is one E2M1 value times a power of two.
    """
    rows, nb, _ = blocks.shape
    out = np.empty((rows, nb * 32), dtype=np.float32)
    for r in numba.prange(rows):
        for b in range(nb):
            scale = _E8M0[scales[r, b]]
            for j in range(16):
                byte = blocks[r, b, j]
                out[r, b * 32 + 2 * j] = _FP4[byte & 0x0F] * scale  # low nibble: even element
                out[r, b * 32 + 2 * j + 1] = _FP4[byte >> 4] * scale  # high nibble: odd element
    return out
