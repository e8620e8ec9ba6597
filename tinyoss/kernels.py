"""Numba kernels. Each names its plain numpy twin (the readable definition) and is tested equal to it:
bit-exact where the arithmetic allows, else within a stated tolerance (sums in another order).

Kernel names carry their dtypes, as in the official Metal kernels: `f32_bf16w_matvec` takes float32
activations and bf16 weights. All kernels compile through `jit` below, so caching and fastmath are
set in one place:
  TINYOSS_NUMBA_CACHE=0   don't cache compiled kernels on disk (default: cache)
fastmath is the safe subset {nsz, arcp, contract, reassoc}: never no-inf/no-nan (they would break
the -inf masks and the sinks of attention), never afn (approximate exp).
Parallel kernels split only their outer, independent loop (rows, heads), with disjoint writes.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np

from . import mxfp4
from .simd import (HAVE_AVX2, HAVE_AVX512, HAVE_SIMD, KERNELS, MAX_GROUP, MXFP4_LANE_ORDER,
                   MXFP4_PAIR_ORDER, MXFP4_Q8_GROUP, MXFP4_Q8_ROWS, MXFP4_QUAD_ORDER, MXFP4_ROWS,
                   Q8_OFFSETS,
                   Q8_TILE_ROWS, Q8_TILE_TOKENS, QK_DIM, QK_HEADS, VALUE_QUERIES, X8_TILES,
                   BF16_SPLIT_ORDER, PANEL_LANES, PANEL_ROWS, PANEL_STEP, as_float32,
                   bf16_row_dots, bf16_split_row_dots,
                   exp_shifted_sum, float32_bits,
                   kv_float, max_nan, mxfp4_block_decode_simd, mxfp4_matvec_rows, pointer_to,
                   mxfp4_matvec_rows_two, mxfp4_q8_row_dots, mxfp4_q8_tile_dots, mxfp4_row_dots,
                   panel_block, panel_block_8, panel_block_16, panel_block_24,
                   q8_row_dot, q8_row_dots, q8_row_pair_dots, qk8_scores, weighted_rows64,
                   xor_lines)

# a forced kernel path (simd.KERNELS) compiles afresh: the disk cache can't tell the builds apart
CACHE = os.environ.get("TINYOSS_NUMBA_CACHE", "1") != "0" and KERNELS == "auto"

FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
ROWS_PER_TASK = 16  # rows a parallel task handles: enough work to amortize the scheduling
# NOALIAS: numba passes every array of a parallel loop to its worker function as `noalias`, a
# flat view (`out.reshape(-1)`, handed to an intrinsic) and the array it views included. So LLVM
# may reorder a write through one with a read through the other: a kernel touches an output
# through one of them only. (Found when a variant read out[k, r] before the intrinsic's store.)


def jit(parallel: bool = False, fastmath: bool = False):
    """The one decorator of every kernel: nopython, cached, optionally parallel / safe fastmath."""
    return numba.njit(cache=CACHE, parallel=parallel, fastmath=FASTMATH if fastmath else False,
                      nogil=True, error_model="numpy")


# lookup tables (numba freezes global arrays into the compiled code)
_FP4 = mxfp4.FP4_VALUES  # nibble -> E2M1 value
_E8M0 = mxfp4.scale_to_f32(np.arange(256, dtype=np.uint8))  # scale byte -> 2**(s-127), exact


# ---------------------------------------------------------------------------------------------
# MXFP4


_ONE = np.array(MXFP4_LANE_ORDER, np.int64)
_PAIR = np.array(MXFP4_PAIR_ORDER, np.int64)
_QUAD = np.array(MXFP4_QUAD_ORDER, np.int64)


@jit()
def lane_element(c, nb):
    """The element of a row of nb blocks that simd.mxfp4_row_dots reads in lane c (0 .. 32 nb
    - 1): where the CPU has AVX-512, blocks go four at a time (MXFP4_QUAD_ORDER), a leftover
    pair as a pair (MXFP4_PAIR_ORDER), the last of an odd count alone; else one by one
    (MXFP4_LANE_ORDER)."""
    if HAVE_AVX512:
        quads = 128 * (nb // 4)
        if c < quads:
            return 128 * (c // 128) + _QUAD[c % 128]
        if c < quads + 64 * ((nb % 4) // 2):
            return quads + _PAIR[c - quads]
    if not HAVE_AVX2:  # plain numba and NEON: a block's low nibbles (even elements), then its
        # high ones
        lane = c % 32
        return 32 * (c // 32) + (2 * lane if lane < 16 else 2 * (lane - 16) + 1)
    return 32 * (c // 32) + _ONE[c % 32]


@jit()
def lane_order(nb):
    """`lane_element` of every lane: int64 [32 nb]."""
    order = np.empty(32 * nb, np.int64)
    for c in range(32 * nb):
        order[c] = lane_element(c, nb)
    return order


@numba.njit(cache=CACHE, inline="always")
def e2m1(nibble):
    """An MXFP4 element (E2M1: sign, 2 exponent bits, 1 mantissa bit) as float32, built from its
    bits rather than looked up in FP4_VALUES: a few integer ops and a select, which LLVM
    vectorizes on any CPU (a table lookup it leaves scalar). The magnitude code c = n & 7 is
    (exponent, mantissa) = (c >> 1, c & 1): for c >= 2 the value 2**((c >> 1) - 1) * (1 + (c & 1)
    / 2) has float32 bits (c + 252) << 22; c = 1 is 0.5 (252 << 22), c = 0 is 0."""
    n = np.uint32(nibble)
    c = n & np.uint32(7)
    bits = (c + np.uint32(252)) << np.uint32(22) if c >= np.uint32(2) else c * np.uint32(252 << 22)
    return as_float32(bits | ((n & np.uint32(8)) << np.uint32(28)))  # bit 3: the sign


@numba.njit(cache=CACHE, fastmath=FASTMATH, inline="always")
def _block_dot_plain(blocks, b_off, xl, x_off):
    """One MXFP4 block (16 bytes at b_off) against its 32 lanes of x (xl[x_off:]: the block's even
    elements, then its odd ones), unscaled. Through slices, not flat[offset + j]: a signed index
    gets a wrap-around check that keeps LLVM from vectorizing (1.6 against 3.2 GB/s through an
    expert's rows here)."""
    w = blocks[b_off:b_off + 16]
    lo, hi = xl[x_off:x_off + 16], xl[x_off + 16:x_off + 32]
    part = np.float32(0.0)
    for j in range(16):
        byte = w[j]
        part += e2m1(byte & 15) * lo[j] + e2m1(byte >> 4) * hi[j]
    return part


@jit(fastmath=True)
def mxfp4_row_dot_plain(blocks, b_off, scales, s_off, scale_table, xl, x_off, nb):
    """One row against one vector, as simd.mxfp4_row_dots with g = 1 (returning the sum), for
    CPUs without AVX2: x = xl[x_off:] in lane order (`lane_element`: each block's even elements,
    then its odd ones), so that a block is a loop LLVM vectorizes."""
    total = np.float32(0.0)
    for b in range(nb):
        total += _block_dot_plain(blocks, b_off + 16 * b, xl, x_off + 32 * b) * \
            scale_table[scales[s_off + b]]
    return total


@jit(fastmath=True)
def mxfp4_row_dots_plain2(blocks, b_off, scales, s_off, scale_table, xl, x_off, nb, out, o):
    """`mxfp4_row_dot_plain` of two consecutive rows (row b_off, row b_off + 16 nb) against one
    x, into out[o] and out[o + 1]: two streams of weights a loop (measured 1.2x one row at a
    time through an expert's rows here)."""
    t0, t1, rb = np.float32(0.0), np.float32(0.0), 16 * nb
    for b in range(nb):
        t0 += _block_dot_plain(blocks, b_off + 16 * b, xl, x_off + 32 * b) * \
            scale_table[scales[s_off + b]]
        t1 += _block_dot_plain(blocks, b_off + rb + 16 * b, xl, x_off + 32 * b) * \
            scale_table[scales[s_off + nb + b]]
    out[o] = t0
    out[o + 1] = t1


_ORDERS: dict[int, np.ndarray] = {}


def row_order(nb: int) -> np.ndarray:
    """`lane_order(nb)`, made once per block count."""
    if nb not in _ORDERS:
        _ORDERS[nb] = lane_order(nb)
    return _ORDERS[nb]


def to_lane_order(x: np.ndarray) -> np.ndarray:
    """x [k, n_blocks*32] -> the same values in `row_order(n_blocks)`, the order in which the
    matvec kernels read a row's elements (contiguous, float32)."""
    if x.ndim != 2 or x.shape[1] % 32:
        raise ValueError(f"to_lane_order: x must be [k, n_blocks*32], got {x.shape}")
    return np.ascontiguousarray(x[:, row_order(x.shape[1] // 32)], np.float32)


@jit()
def mxfp4_block_decode_plain(blocks, b_off, scale, out, o_off):
    """Same contract as simd.mxfp4_block_decode_simd, in plain numba (any CPU)."""
    w, o = blocks[b_off:b_off + 16], out[o_off:o_off + 32]  # (slices: see _block_dot_plain)
    for j in range(16):
        byte = w[j]
        o[2 * j] = e2m1(byte & 0x0F) * scale  # low nibble: element 2j
        o[2 * j + 1] = e2m1(byte >> 4) * scale


_block_decode = mxfp4_block_decode_simd if HAVE_SIMD else mxfp4_block_decode_plain


@jit()
def _mxfp4_decode_row(flat_b, flat_s, out, r, nb):
    for b in range(nb):
        i = r * nb + b
        _block_decode(flat_b, i * 16, _E8M0[flat_s[i]], out, i * 32)


@jit(parallel=True)
def mxfp4_decode(blocks, scales, out):
    """blocks [rows, n_blocks, 16] u8, scales [rows, n_blocks] u8 -> out [rows, n_blocks*32] f32.

    Twin: mxfp4.decode. Exact: each value is one E2M1 value times a power of two (only -0.0
    comes out as +0.0).
    """
    rows, nb, _ = blocks.shape
    flat_b, flat_s, flat_out = blocks.reshape(-1), scales.reshape(-1), out.reshape(-1)
    for r in numba.prange(rows):
        _mxfp4_decode_row(flat_b, flat_s, flat_out, r, nb)


# A serial twin of a parallel kernel is its own function: numba's disk cache keys entries by
# function name and line, so two dispatchers of one function would load each other's code
# (a "parallel" kernel then silently runs on one core). tests/test_kernels checks it.
@jit()
def mxfp4_decode_serial(blocks, scales, out):
    """`mxfp4_decode` on the calling thread: prefill's worker threads decode a tile of rows at
    a time into their own reused buffer, for BLAS."""
    rows, nb, _ = blocks.shape
    flat_b, flat_s, flat_out = blocks.reshape(-1), scales.reshape(-1), out.reshape(-1)
    for r in range(rows):
        _mxfp4_decode_row(flat_b, flat_s, flat_out, r, nb)


@jit(parallel=True, fastmath=True)
def f32_mf4w_moe_matvec(blocks, scales, bias, experts, xl, out):
    """out[k, r] = sum_c W_e[r, c] x_k[c] + bias[e, r] for e = experts[k]; W_e in MXFP4.

    blocks [E, R, nb, 16] u8, scales [E, R, nb] u8, bias [E, R] bf16, experts [K] int,
    xl [K, nb*32] or [1, nb*32] (one x for all K) f32 in lane order (`to_lane_order(x)`),
    out [K, R] f32.
    Reads only the K experts' rows, decoding on the fly: no expert is ever materialized in float.
    Twin: model.moe_block's `x @ mxfp4.decode(...).T + bias` (sums reordered: rtol 1e-5).
    """
    E, R, nb, _ = blocks.shape
    K = experts.shape[0]
    flat_b = blocks.reshape(-1)
    flat_s = scales.reshape(-1)
    flat_x, flat_out = xl.reshape(-1), out.reshape(-1)
    x_step = nb * 32 if xl.shape[0] > 1 else 0  # from one expert's x to the next's
    tasks_per_expert = (R + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in numba.prange(K * tasks_per_expert):
        k = task // tasks_per_expert
        e = experts[k]
        r0 = (task % tasks_per_expert) * ROWS_PER_TASK
        r1 = min(r0 + ROWS_PER_TASK, R)
        if HAVE_SIMD:  # MXFP4_ROWS rows a call (two share x's loads with AVX-512), a lone last
            for r in range(r0, r1, MXFP4_ROWS):  # one alone
                row = e * R + r
                if r + MXFP4_ROWS <= r1:
                    mxfp4_matvec_rows(flat_b, row * nb * 16, flat_s, row * nb, _E8M0, flat_x,
                                      k * x_step, nb, flat_out, k * R + r)
                else:
                    mxfp4_row_dots(1, flat_b, row * nb * 16, flat_s, row * nb, _E8M0, flat_x,
                                   k * x_step, 0, nb, flat_out, k * R + r, 1)
            for r in range(r0, r1):  # through the view the intrinsics wrote (see NOALIAS)
                flat_out[k * R + r] += as_float32(np.uint32(bias[e, r]) << np.uint32(16))
        else:
            for r in range(r0, r1 - 1, 2):  # two rows a step, a lone last one alone
                row = e * R + r
                mxfp4_row_dots_plain2(flat_b, row * nb * 16, flat_s, row * nb, _E8M0, flat_x,
                                      k * x_step, nb, flat_out, k * R + r)
            if (r1 - r0) % 2 == 1:
                row = e * R + r1 - 1
                flat_out[k * R + r1 - 1] = mxfp4_row_dot_plain(
                    flat_b, row * nb * 16, flat_s, row * nb, _E8M0, flat_x, k * x_step, nb)
            for r in range(r0, r1):
                flat_out[k * R + r] += as_float32(np.uint32(bias[e, r]) << np.uint32(16))


@jit(parallel=True, fastmath=True)
def f32_mf4w_matmul(blocks, scales, bias, xl, out):
    """out[j, r] = sum_c W[r, c] x_j[c] + bias[r] for one expert W in MXFP4, a few tokens.

    blocks [R, nb, 16] u8, scales [R, nb] u8, bias [R] bf16, xl [m, nb*32] f32 (lane order),
    out [m, R] f32. Each block is decoded once per four tokens (prefill's experts that few
    tokens chose). Twin: x @ mxfp4.decode(blocks, scales).T + bias (rtol 1e-5).
    """
    R, nb, _ = blocks.shape
    m = xl.shape[0]
    flat_b, flat_s, flat_x, flat_out = blocks.reshape(-1), scales.reshape(-1), xl.reshape(-1), \
        out.reshape(-1)
    n_tasks = (R + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in numba.prange(n_tasks):
        for r in range(task * ROWS_PER_TASK, min((task + 1) * ROWS_PER_TASK, R)):
            if HAVE_SIMD:  # tokens four at a time: each block decoded once per four
                for j0 in range(0, m, MAX_GROUP):
                    mxfp4_row_dots(min(MAX_GROUP, m - j0), flat_b, r * nb * 16, flat_s, r * nb,
                                   _E8M0, flat_x, j0 * nb * 32, nb * 32, nb, flat_out,
                                   j0 * R + r, R)
            else:
                for j in range(m):
                    flat_out[j * R + r] = mxfp4_row_dot_plain(flat_b, r * nb * 16, flat_s,
                                                              r * nb, _E8M0, flat_x, j * nb * 32, nb)
            b = as_float32(np.uint32(bias[r]) << np.uint32(16))
            for j in range(m):
                flat_out[j * R + r] += b  # through the view the intrinsic wrote (see NOALIAS)


@jit()
def _workers(threads, R, align):
    """Shares a row-shared parallel loop (`_row_share`) splits R rows into: one per thread
    (numba.get_num_threads(), passed in: read inside, it keeps a kernel from numba's disk
    cache), at most one per `align` rows."""
    return max(1, min(threads, (R + align - 1) // align))


@jit()
def _row_share(R, w, workers, align):
    """Rows r0..r1 of R that worker w of `workers` takes: equal shares in whole runs of `align`
    rows (the last may be shorter). A parallel loop of workers * G tasks (task // G the share,
    task % G the expert) gives, under numba's static schedule, each thread its share of every
    expert's rows, whatever each expert costs."""
    units = (R + align - 1) // align
    return min(R, align * (units * w // workers)), min(R, align * (units * (w + 1) // workers))


@jit(parallel=True, fastmath=True)
def f32_mf4w_moe_matmul(blocks, scales, bias, experts, starts, xl, out, threads):
    """out[t, r] = sum_c W_e[r, c] x_t[c] + bias[e, r] for each routed expert e = experts[g] and
    the tokens t in starts[g]..starts[g+1]-1 that chose it: a few tokens' experts in one launch,
    each expert's rows read once for all its tokens (batched decode, few-token prefill).

    blocks [E, R, nb, 16] u8, scales [E, R, nb] u8, bias [E, R] bf16, experts [G] int (distinct),
    starts [G+1] int (xl's rows grouped by expert), xl [T, nb*32] f32 (lane order), out [T, R],
    threads: numba.get_num_threads(). Tokens go two at a time through decode's matvec
    (simd.mxfp4_matvec_rows_two): the group row dots (no prefetch, one row) measured 1.7x (two
    tokens) and 3.7x (four) one token's time.
    Each thread takes the same share of every expert's rows (`_row_share`): an expert's cost
    grows with its tokens, and equal runs of (expert, rows) tasks left the thread holding a
    two- or three-token expert working after the others.
    Twin: per group, xl[t0:t1] @ mxfp4.decode(W_e).T + bias[e] (sums reordered: rtol 1e-5).
    """
    E, R, nb, _ = blocks.shape
    G = experts.shape[0]
    flat_b, flat_s, flat_x, flat_out = blocks.reshape(-1), scales.reshape(-1), xl.reshape(-1), \
        out.reshape(-1)
    workers = _workers(threads, R, MXFP4_ROWS)
    for task in numba.prange(workers * G):
        g = task % G
        e, t0, m = experts[g], starts[g], starts[g + 1] - starts[g]
        r0, r1 = _row_share(R, task // G, workers, MXFP4_ROWS)
        if HAVE_SIMD:  # decode's matvec, tokens two at a time (each block decoded once for
            for r in range(r0, r1, MXFP4_ROWS):  # both, the prefetch kept), an odd last alone
                row = e * R + r
                if r + MXFP4_ROWS <= r1:
                    for j in range(0, m - 1, 2):
                        mxfp4_matvec_rows_two(flat_b, row * nb * 16, flat_s, row * nb, _E8M0,
                                              flat_x, (t0 + j) * nb * 32, nb * 32, nb, flat_out,
                                              (t0 + j) * R + r, R)
                    if m % 2 == 1:
                        mxfp4_matvec_rows(flat_b, row * nb * 16, flat_s, row * nb, _E8M0, flat_x,
                                          (t0 + m - 1) * nb * 32, nb, flat_out, (t0 + m - 1) * R + r)
                else:  # a lone last row of the task
                    for j in range(0, m, MAX_GROUP):
                        mxfp4_row_dots(min(MAX_GROUP, m - j), flat_b, row * nb * 16, flat_s,
                                       row * nb, _E8M0, flat_x, (t0 + j) * nb * 32, nb * 32, nb,
                                       flat_out, (t0 + j) * R + r, R)
        else:
            for r in range(r0, r1):
                row = e * R + r
                for j in range(m):
                    flat_out[(t0 + j) * R + r] = mxfp4_row_dot_plain(
                        flat_b, row * nb * 16, flat_s, row * nb, _E8M0, flat_x, (t0 + j) * nb * 32, nb)
        for r in range(r0, r1):  # through the view the intrinsics wrote (see NOALIAS)
            b = as_float32(np.uint32(bias[e, r]) << np.uint32(16))
            for j in range(m):
                flat_out[(t0 + j) * R + r] += b


# --- int8 activations into the experts (expert_input="q8": an approximation, see quant.py) -----

@jit()
def x8_position(e, nb):
    """Where element e of a row of nb blocks goes in the int8 x that simd.mxfp4_q8_row_dots
    reads: blocks in groups of MXFP4_Q8_GROUP (4 with AVX-512 VNNI, else 1; the nb % 4 last
    blocks one by one), a group's even elements first (element 2j of its block k at 16k + j),
    then its odd ones."""
    b, i = e // 32, e % 32
    n = MXFP4_Q8_GROUP if b < MXFP4_Q8_GROUP * (nb // MXFP4_Q8_GROUP) else 1
    first = n * (b // n)
    return 32 * first + 16 * n * (i % 2) + 16 * (b - first) + i // 2


@jit()
def x8_order(nb):
    """The element at each position of that x: int64 [32 nb] (the inverse of x8_position)."""
    order = np.empty(32 * nb, np.int64)
    for e in range(32 * nb):
        order[x8_position(e, nb)] = e
    return order


@jit()
def _x8_scale(vals):
    """The 32 float32 vals' Q8_0 scale (max |val| / 127; NaN wins, as numpy's max), its inverse
    and whether it is usable (`_q8_inverse`: else every q is 0, as quant._q8_blocks)."""
    amax = np.float32(0.0)
    for i in range(32):
        a = abs(vals[i])
        if a > amax or a != a:  # NaN wins, as numpy's max
            amax = a
        if amax != amax:
            break
    scale = amax / np.float32(127.0)
    inv = _q8_inverse(scale)
    return scale, inv, inv > 0


@jit()
def _q8_inverse(scale):
    """1 / scale of a Q8_0 block, or 0 where no q may be taken (q = 0, as quant._q8_blocks): a
    scale of 0, inf or NaN, or so small (every |x| under ~3.7e-37) that 1 / scale overflows
    (rounding inf to int8 is undefined: CPUs differ)."""
    inv = np.float32(1.0) / scale if scale > 0 and scale < np.inf else np.float32(0.0)
    return inv if inv < np.inf else np.float32(0.0)


@jit()
def _x8_block(vals, q, d, k, b, nb):
    """Quantize the 32 float32 vals (block b of row k, natural order) as quant.x8_quantize:
    q[k, x8_position(32b + i, nb)] = round(vals[i] * (1 / scale)), d[k, b] = scale / 2 (the
    kernel's products are of doubled E2M1 values)."""
    scale, inv, ok = _x8_scale(vals)
    base = x8_position(32 * b, nb)  # element 2j at base + j, 2j + 1 at base + odd + j
    odd = x8_position(32 * b + 1, nb) - base
    for i in range(32):
        q[k, base + (i % 2) * odd + i // 2] = np.int8(np.rint(vals[i] * inv)) if ok else np.int8(0)
    d[k, b] = scale * np.float32(0.5)


@jit()
def x8_round_trip_rows(x, out):
    """out = quant.x8_round_trip(x): each block of 32 quantized to int8 and back, float32 [n, C]
    (x and out may be the same array, or strided views). For prefill's int8 expert inputs inside
    the tile pool's threads, which numpy's dozen steps held to the GIL. Twin: quant.x8_round_trip
    (bit-exact)."""
    n, C = x.shape
    for k in range(n):
        for b in range(C // 32):
            scale, inv, ok = _x8_scale(x[k, 32 * b:32 * b + 32])
            for i in range(32 * b, 32 * b + 32):
                q = np.float32(np.int8(np.rint(x[k, i] * inv))) if ok else np.float32(0.0)
                out[k, i] = q * scale


@jit()
def x8_quantize_lanes(x, q, d):
    """x [n, C] f32 -> q [n, C] int8 (in x8_position order), d [n, C/32] f32 (the scales
    halved). Twin: quant.x8_quantize (bit-exact; q permuted, d halved)."""
    n, C = x.shape
    for k in range(n):
        for b in range(C // 32):
            _x8_block(x[k, 32 * b:32 * b + 32], q, d, k, b, C // 32)


@jit()
def f32_route(w, bias, t, experts, weights):
    """model.route for a few tokens on the calling thread: t [n, D] (normed) -> experts [n, k]
    int64 (the k largest router logits, best first; ties: the lower expert first, NaN last, as
    a stable argsort of -logits) and weights [n, k] f32 (softmax over those k logits). w [E, D]
    bf16, bias [E] bf16. One call instead of a matvec and five numpy steps a decoded layer.
    Twin: model.route (the same experts; the weights to the logits' rounding)."""
    n, k = experts.shape
    E = w.shape[0]
    logits = np.empty((n, E), np.float32)
    _bf16_rows(w, t, bias, logits, 0, E, False)  # every row the same code: equal rows tie exactly
    for i in range(n):
        for j in range(k):
            best = -1
            for e in range(E):
                taken = False
                for s in range(j):
                    taken = taken or experts[i, s] == e
                if taken:
                    continue
                if best < 0 or logits[i, e] > logits[i, best] or \
                        (np.isnan(logits[i, best]) and not np.isnan(logits[i, e])):
                    best = e
            experts[i, j] = best
        top = logits[i, experts[i, 0]]
        total = np.float32(0.0)
        for j in range(k):
            weights[i, j] = np.exp(logits[i, experts[i, j]] - top)
            total += weights[i, j]
        for j in range(k):
            weights[i, j] /= total


@jit()
def f32_weighted_rows_add(x, y, w, out):
    """out[d] = x[d] + sum_j w[j] y[j, d], the k terms added in order to 0 first: a decoded
    token's k expert outputs weighted onto the residual. x, out [D], y [k, D], w [k].
    Twin: x + w @ y (rtol 1e-6)."""
    k, D = y.shape
    for d in range(D):
        acc = np.float32(0.0)
        for j in range(k):
            acc += w[j] * y[j, d]
        out[d] = x[d] + acc



@jit(parallel=True)
def f32_swiglu_x8(h, limit, alpha, q, d, c):
    """x8_quantize_lanes(model.swiglu(h)): the clamped SwiGLU (`_swiglu_block`, as
    f32_swiglu_lanes), quantized block by block for the int8 expert matvec. h [m, 2I], q [m, I]
    int8, d [m, I/32] f32; c [m, x8_lane_slots(I/32)]: the lane offsets as x8_quantize_blocks
    writes them, for the VNNI kernels of a decode batch (c of no columns: none). The blocks split
    across the threads: serial, its scalar exps took 0.2 ms a layer, 12 % of a decoded token on
    16 cores (and x8_quantize_blocks, serial, 8 ms of a 205 ms 4-stream step on the Zen 4)."""
    m, I = q.shape
    nb = I // 32
    offsets = c.shape[1] > 0
    for task in numba.prange(m * nb):
        j, b = task // nb, task % nb
        vals = np.empty(32, np.float32)
        _swiglu_block(h, j, b, False, limit, alpha, vals)
        _x8_block(vals, q, d, j, b, nb)
        if offsets:  # (a block's lanes meet only its own bytes: a task may write them)
            _x8_block_offsets(q, c, j, b, nb)


@jit(fastmath=True)
def mxfp4_q8_row_dot_plain(blocks, b_off, scales, s_off, scale_table, q, q_off, d, d_off, nb):
    """One row of simd.mxfp4_q8_row_dots in plain numba (CPUs without AVX2, a lone last row):
    each block's integer sum, then its one float scale."""
    total = np.float32(0.0)
    for b in range(nb):
        acc = np.int32(0)
        for i in range(32):
            byte = np.int64(blocks[b_off + 16 * b + i // 2])
            nibble = (byte >> 4) if i % 2 else (byte & 15)
            acc += np.int32(2.0 * _FP4[nibble]) * np.int32(q[q_off + x8_position(32 * b + i, nb)])
        total += np.float32(acc) * (scale_table[scales[s_off + b]] * d[d_off + b])
    return total


@jit()
def x8_offset_sums(q, nb):
    """float32 [n, nb]: 12 times the sum of each block of 32 int8 values of q [n, 32 nb] (exact:
    at most 12 * 32 * 128), what simd's AVX2 int8 kernel takes off its sums (Q8_OFFSETS; other
    paths read none: then nothing is summed). Twin: 12 * q.reshape(n, nb, 32).sum(-1)."""
    out = np.empty((q.shape[0], nb), np.float32)
    if Q8_OFFSETS:
        for i in range(q.shape[0]):
            for b in range(nb):
                total = 0
                for j in range(32 * b, 32 * b + 32):
                    total += np.int32(q[i, j])
                out[i, b] = np.float32(12 * total)
    return out


@jit(parallel=True, fastmath=True)
def f32_mf4w_q8x_moe_matvec(blocks, scales, bias, experts, xq, xd, out):
    """`f32_mf4w_moe_matvec` with int8 activations: xq [K or 1, nb*32] int8, xd [K or 1, nb]
    f32 from x8_quantize_lanes or f32_swiglu_x8. Integer dot products a block (exact), one
    float scale each. Twin: quant.x8_round_trip(x) @ mxfp4.decode(...).T + bias (rtol 1e-5)."""
    E, R, nb, _ = blocks.shape
    K = experts.shape[0]
    flat_b, flat_s = blocks.reshape(-1), scales.reshape(-1)
    flat_q, flat_d, flat_out = xq.reshape(-1), xd.reshape(-1), out.reshape(-1)
    flat_c = x8_offset_sums(xq, nb).reshape(-1)
    one_x = xq.shape[0] == 1
    tasks_per_expert = (R + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in numba.prange(K * tasks_per_expert):
        k = task // tasks_per_expert
        e = experts[k]
        xk = 0 if one_x else k
        r0 = (task % tasks_per_expert) * ROWS_PER_TASK
        r1 = min(r0 + ROWS_PER_TASK, R)
        for r in range(r0, r1, MXFP4_Q8_ROWS if HAVE_SIMD else 1):
            row = e * R + r
            if HAVE_SIMD and r + MXFP4_Q8_ROWS <= r1:
                mxfp4_q8_row_dots(flat_b, row * nb * 16, flat_s, row * nb, _E8M0, flat_q,
                                  xk * nb * 32, flat_d, xk * nb, flat_c, xk * nb, nb, flat_out,
                                  k * R + r)
            else:
                flat_out[k * R + r] = mxfp4_q8_row_dot_plain(
                    flat_b, row * nb * 16, flat_s, row * nb, _E8M0, flat_q, xk * nb * 32,
                    flat_d, xk * nb, nb)
        for r in range(r0, r1):  # through the view the intrinsics wrote (see NOALIAS)
            flat_out[k * R + r] += as_float32(np.uint32(bias[e, r]) << np.uint32(16))


# --- prefill's int8 expert matmul (simd.mxfp4_q8_tile_dots: AVX-512 VNNI) ----------------------
def x8_lane_slots(nb):
    """Lane offsets a token of nb blocks has (x8_quantize_blocks): 16 a group of 4 blocks, 8 a block
    of the nb % 4 last."""
    return 16 * (nb // 4) + 8 * (nb % 4)


@jit()
def _x8_block_offsets(q, c, k, b, nb):
    """Block b's lane offsets of row k: -12 * the sum of the int8 x bytes each 32-bit lane of
    the VNNI kernel meets in it (simd._x8_tile: in a group of 4 blocks, lane L of 16 meets bytes
    4L..4L+3 of the group's evens and of its odds, and block b % 4 owns lanes 4 (b % 4)..+3; a
    block of the nb % 4 last alone: lane L of 8 meets its bytes 4L..4L+3)."""
    quads = nb // 4
    if b < 4 * quads:
        base, slot = 128 * (b // 4), 16 * (b // 4)
        for L in range(4 * (b % 4), 4 * (b % 4) + 4):
            total = np.int32(0)
            for i in range(4):
                total += np.int32(q[k, base + 4 * L + i]) + np.int32(q[k, base + 64 + 4 * L + i])
            c[k, slot + L] = np.int32(-12) * total
    else:
        slot = 16 * quads + 8 * (b - 4 * quads)
        for L in range(8):
            total = np.int32(0)
            for i in range(4):
                total += np.int32(q[k, 32 * b + 4 * L + i])
            c[k, slot + L] = np.int32(-12) * total


@jit()
def x8_quantize_blocks(x, q, d, c, b0):
    """x [n, 32 m] f32 -> blocks b0 .. b0 + m of q [n, C] int8 (x8_position order), d [n, C/32]
    (halved scales) and c [n, x8_lane_slots(C/32)] (lane offsets, where X8_TILES): x8_quantize_lanes
    of those columns, written where the whole row's would go (a tile pool task quantizes its
    columns)."""
    n, nb = x.shape[0], q.shape[1] // 32
    for k in range(n):
        for b in range(x.shape[1] // 32):
            _x8_block(x[k, 32 * b:32 * b + 32], q, d, k, b0 + b, nb)
            if X8_TILES:  # (only the VNNI kernel reads them; the lanes are those of its order)
                _x8_block_offsets(q, c, k, b0 + b, nb)


@jit()
def mxfp4_q8_matmul_rows(blocks, scales, bias, e, r0, r1, q, d, c, t0, t1, out):
    """out[t - t0, r - r0] = expert e's MXFP4 row r . token t's int8 x (+ bias[e, r], bf16 bits;
    bias [0, 0]: none), for r0 <= r < r1 and t0 <= t < t1, the tokens' rows of q [T, 32 nb]
    (int8, x8_position order), d [T, nb] (halved scales), c [T, x8_lane_slots(nb)] (lane
    offsets): x8_quantize_blocks'. Serial (a task of the tile pool). With AVX-512 VNNI four rows
    and up to four tokens a call, each block decoded once for them (simd.mxfp4_q8_tile_dots);
    one token through decode's matvec; else, and for the (r1 - r0) % 4 last rows, one row and
    token at a time. Twin: quant.x8_round_trip(x) @ mxfp4.decode(...)[e, r0:r1].T + bias."""
    E, R, nb, _ = blocks.shape
    flat_b, flat_s = blocks.reshape(-1), scales.reshape(-1)
    flat_q, flat_d, flat_c = q.reshape(-1), d.reshape(-1), c.reshape(-1)
    slots = c.shape[1]
    o_tok, o_row = out.strides[0] // 4, out.strides[1] // 4
    if t1 - t0 == 1 and HAVE_SIMD:  # one token: decode's matvec (batched decode's experts
        # mostly have one; the tile kernel reads one token's rows slower: on the Zen 4, a 4-stream
        # step's experts (profile_decode --batch 4) 165-224 ms with the tiles, 172 so)
        done = r0 + (r1 - r0) // MXFP4_Q8_ROWS * MXFP4_Q8_ROWS
        offsets = x8_offset_sums(q[t0:t1], nb).reshape(-1)
        for r in range(r0, done, MXFP4_Q8_ROWS):
            mxfp4_q8_row_dots(flat_b, (e * R + r) * nb * 16, flat_s, (e * R + r) * nb, _E8M0,
                              flat_q, t0 * nb * 32, flat_d, t0 * nb, offsets, 0, nb, out,
                              (r - r0) * o_row)
    else:
        done = r0 + (r1 - r0) // Q8_TILE_ROWS * Q8_TILE_ROWS if X8_TILES else r0
        for r in range(r0, done, Q8_TILE_ROWS):
            row = e * R + r
            for t in range(t0, t1, Q8_TILE_TOKENS):
                mxfp4_q8_tile_dots(min(Q8_TILE_TOKENS, t1 - t), flat_b, row * nb * 16, flat_s,
                                   row * nb, _E8M0, flat_q, t * nb * 32, nb * 32, flat_d, t * nb,
                                   nb, flat_c, t * slots, slots, nb, out,
                                   (t - t0) * o_tok + (r - r0) * o_row, o_row, o_tok)
    for r in range(done, r1):
        row = e * R + r
        for t in range(t0, t1):
            out[t - t0, r - r0] = mxfp4_q8_row_dot_plain(flat_b, row * nb * 16, flat_s, row * nb,
                                                         _E8M0, flat_q, t * nb * 32, flat_d, t * nb,
                                                         nb)
    for r in range(r0, r1 if bias.shape[0] > 0 else r0):
        b = as_float32(np.uint32(bias[e, r]) << np.uint32(16))
        for t in range(t1 - t0):
            out[t, r - r0] += b


@jit(parallel=True)
def f32_mf4w_q8x_moe_matmul(blocks, scales, bias, experts, starts, q, d, c, out, threads):
    """A few tokens' experts with int8 inputs in one launch (batched decode, expert_input="q8"):
    out[t] = expert experts[g]'s rows . token t's x + bias for the tokens t in starts[g] ..
    starts[g+1]-1 that chose it (q, d, c: x8_quantize_blocks of x [T, C]), mxfp4_q8_matmul_rows
    on each thread's share of every expert's rows (as f32_mf4w_moe_matmul): each block decoded
    once for up to four tokens. out [T, R]; threads: numba.get_num_threads().
    Twin: per group, quant.x8_round_trip(x[t0:t1]) @ mxfp4.decode(W_e).T + bias[e]."""
    R, G = blocks.shape[1], experts.shape[0]
    workers = _workers(threads, R, Q8_TILE_ROWS)
    for task in numba.prange(workers * G):
        g = task % G
        t0, t1 = starts[g], starts[g + 1]
        r0, r1 = _row_share(R, task // G, workers, Q8_TILE_ROWS)
        mxfp4_q8_matmul_rows(blocks, scales, bias, experts[g], r0, r1, q, d, c, t0, t1,
                             out[t0:t1, r0:r1])


@jit(parallel=True)
def f32_swiglu_lanes(h, limit, alpha, out):
    """out = to_lane_order(model.swiglu(h)): gpt-oss's clamped SwiGLU written straight in the
    order the next MXFP4 matvec reads (`lane_element`). h [m, 2I] (gate = even columns, up =
    odd), out [m, I], I a multiple of 32 (the matvec's blocks). NaN stays NaN through the clamps,
    as in numpy. Twin: to_lane_order(model.swiglu(h)) (rtol 2e-6: libm's expf against numpy's)."""
    m, I = out.shape
    for task in numba.prange(m * (I // 32)):  # a block of 32 lanes a task, on every thread
        j, b = task // (I // 32), task % (I // 32)
        _swiglu_block(h, j, b, True, limit, alpha, out[j, 32 * b:32 * b + 32])


@jit()
def _swiglu_block(h, j, b, lanes, limit, alpha, out):
    """out[i] = model.swiglu of block b's element i of row j of h (i < 32), or with lanes, of the
    element in its lane i (`lane_element(32 b + i)`): the 32 exps at once (simd's vector expf,
    as f32_bias_swiglu; one at a time they were most of a decode batch's SwiGLU)."""
    nb = h.shape[1] // 64
    z, cols = np.empty(32, np.float32), np.empty(32, np.int64)
    for i in range(32):
        c = cols[i] = lane_element(32 * b + i, nb) if lanes else 32 * b + i
        g = h[j, 2 * c]
        if g > limit:  # (a NaN gate stays NaN: the comparison is false)
            g = limit
        z[i] = min(-alpha * g, np.float32(89.0))
    exp_shifted_sum(z, 0, 32, np.float32(0.0))  # z <- exp(z)
    for i in range(32):
        out[i] = _swiglu_given(h[j, 2 * cols[i]], h[j, 2 * cols[i] + 1], limit, z[i])


@jit()
def _swiglu_given(g, u, limit, e):
    """model.swiglu of one (gate, up) pair, the gate clamped above only, up both ways, given
    e = exp(-alpha * the clamped gate) (the kernels take their exps as vectors:
    simd.exp_shifted_sum)."""
    if g > limit:
        g = limit
    if u > limit:
        u = limit
    elif u < -limit:
        u = -limit
    return g / (np.float32(1.0) + e) * (u + np.float32(1.0))


# ---------------------------------------------------------------------------------------------
# the small steps of a layer (numpy's per-call overhead is most of their cost in decode)


@jit(fastmath=True)
def f32_rmsnorm(x, scale, eps, out):
    """out[i] = x[i] / sqrt(mean(x[i]**2) + eps) * bf16(scale): x [n, D] f32, scale [D] bf16.
    Twin: model.rmsnorm (rtol 1e-5: the sum of squares in another order)."""
    for i in range(x.shape[0]):
        _rmsnorm_token(x, scale, eps, out, i)


@numba.njit(cache=CACHE, fastmath=FASTMATH, inline="always")
def _rmsnorm_token(x, scale, eps, out, i):
    """Token i of f32_rmsnorm (and of f32_rmsnorm_rows: the serial and parallel kernels are
    dispatchers of their own: DEVELOPERS.md, one Python function a dispatcher)."""
    D = x.shape[1]
    squares = np.float32(0.0)
    for d in range(D):
        squares += x[i, d] * x[i, d]
    root = np.sqrt(squares / np.float32(D) + np.float32(eps))
    for d in range(D):
        out[i, d] = x[i, d] / root * as_float32(np.uint32(scale[d]) << np.uint32(16))


@jit()  # not fastmath: the same products and differences as numpy, bit for bit
def f32_rope(x, cos, sin, out):
    """Half-split rotation: x [n, H, dh] f32, cos/sin [n, dh/2] -> out [n, H, dh].
    Twin: model.apply_rope (bit-exact)."""
    for i in range(x.shape[0]):
        _rope_token(x, cos, sin, out, i)


@numba.njit(cache=CACHE, inline="always")
def _rope_token(x, cos, sin, out, i):
    """Token i of f32_rope and f32_rope_rows (not fastmath: numpy's products, bit for bit)."""
    _, H, dh = x.shape
    half = dh // 2
    for h in range(H):
        for j in range(half):
            x1, x2 = x[i, h, j], x[i, h, j + half]
            out[i, h, j] = x1 * cos[i, j] - x2 * sin[i, j]
            out[i, h, j + half] = x2 * cos[i, j] + x1 * sin[i, j]


# ---------------------------------------------------------------------------------------------
# dense bf16 and int8 weights


BF16_QUADS = HAVE_AVX512  # f32_bf16w_matmul (2+ tokens) takes four rows a call, x in
# BF16_SPLIT_ORDER (simd.bf16_split_row_dots; 32 vector registers). Against the step before it
# (two rows a call, each x load serving both), one process alternating (2026-12-07, Zen 4, 2
# threads, 2880 columns, 4 tokens): 4096 rows from L3 686 -> 587 us; the 20b's unembedding from
# RAM 37.3 -> 32.6 ms (one token's matvec: 30.8). Without AVX-512, one row a call.
_SPLIT = np.array(BF16_SPLIT_ORDER, np.int64)
X_CHUNK_BYTES = 8192  # the few-token row dots go through the columns in chunks whose inputs (all
# tokens' x) take at most this much L1: four tokens' whole 2880-float rows (46 KB) were evicted by
# the weights streaming through, so every FMA waited on L2 (the 20b's unembedding, 4 tokens, in
# one process alternating: 62-64 ms whole rows, 50-52 ms in 480-column chunks, 46 ms one token's
# matvec; 288-480 columns alike, 96 slower)


@jit(fastmath=True)
def _bf16_split_rows(flat, C, flat_x, m, flat_out, R, main, r0, r1):
    """The main columns of `_bf16_rows` with `split`: four rows a call (then two, one)."""
    chunk = max(32, X_CHUNK_BYTES // (4 * min(m, MAX_GROUP)) // 32 * 32)
    part = np.empty(4 * MAX_GROUP, np.float32)
    for c0 in range(0, main, chunk):
        n = min(chunk, main - c0)
        r = r0
        while r < r1:
            rows = 4 if r + 4 <= r1 else (2 if r + 2 <= r1 else 1)
            for j0 in range(0, m, MAX_GROUP):
                g = min(MAX_GROUP, m - j0)
                w_at, x_at = r * C + c0, j0 * C + c0
                if rows == 4:
                    bf16_split_row_dots(4, g, flat, w_at, flat_x, x_at, C, n, part, 0, 4)
                elif rows == 2:
                    bf16_split_row_dots(2, g, flat, w_at, flat_x, x_at, C, n, part, 0, 4)
                else:
                    bf16_split_row_dots(1, g, flat, w_at, flat_x, x_at, C, n, part, 0, 4)
                for j in range(g):
                    for rr in range(rows):
                        o = (j0 + j) * R + r + rr
                        flat_out[o] = part[4 * j + rr] if c0 == 0 else flat_out[o] + part[4 * j + rr]
            r += rows
    if main == 0:
        for j in range(m):
            for r in range(r0, r1):
                flat_out[j * R + r] = 0.0


@jit()
def bf16_split_x(xs):
    """A copy of xs [m, C] with each whole 32 columns in BF16_SPLIT_ORDER (the last C % 32 as
    they are): the x of `_bf16_rows(..., split=True)`. Twin: numpy indexing by the permutation
    (test_kernels)."""
    m, C = xs.shape
    out = np.empty((m, C), np.float32)
    main = C - C % 32
    for j in range(m):
        for b in range(0, main, 32):
            for i in range(32):
                out[j, b + i] = xs[j, b + _SPLIT[i]]
        for c in range(main, C):
            out[j, c] = xs[j, c]
    return out


@jit(fastmath=True)
def _bf16_rows(w, xs, bias, out, r0, r1, split=False):
    """Rows r0..r1 of out[j, r] = sum_c bf16(w[r, c]) xs[j, c] (+ bf16(bias[r])) for every
    token j: 32 columns a step in vector IR (simd.bf16_row_dots, each row widened once per
    four tokens), the last C % 32 one by one. Several tokens go through the columns in chunks
    (X_CHUNK_BYTES), all rows of one chunk before the next, each chunk's sums added to the last.
    `split` (2+ tokens, xs from `bf16_split_x`, BF16_QUADS): four rows a call
    (simd.bf16_split_row_dots), then two, then one. A row's sums may round apart with and
    without `split` (different loops of vector code): the router's ties need every row through
    one code, so it passes none."""
    R, C = w.shape
    m = xs.shape[0]
    flat, flat_x, flat_out = w.reshape(-1), xs.reshape(-1), out.reshape(-1)
    main = C - C % 32
    if m == 1:  # decode: a constant group, so the intrinsic's switch folds to one loop
        for r in range(r0, r1):
            bf16_row_dots(1, flat, r * C, flat_x, 0, C, main, flat_out, r, R)
    elif split:
        _bf16_split_rows(flat, C, flat_x, m, flat_out, R, main, r0, r1)
    else:
        chunk = max(32, X_CHUNK_BYTES // (4 * min(m, MAX_GROUP)) // 32 * 32)
        part = np.empty(MAX_GROUP, np.float32)
        for c0 in range(0, max(main, 1), chunk):  # (C < 32: one pass of none, storing zeros)
            n = min(chunk, main - c0)
            for r in range(r0, r1):
                for j0 in range(0, m, MAX_GROUP):
                    g = min(MAX_GROUP, m - j0)
                    if c0 == 0:
                        bf16_row_dots(g, flat, r * C, flat_x, j0 * C, C, n, flat_out, j0 * R + r, R)
                    else:
                        bf16_row_dots(g, flat, r * C + c0, flat_x, j0 * C + c0, C, n, part, 0, 1)
                        for j in range(g):  # through the view the intrinsic wrote (see NOALIAS)
                            flat_out[(j0 + j) * R + r] += part[j]
    for r in range(r0, r1):
        for j in range(m):
            acc = flat_out[j * R + r]  # through the view the intrinsic wrote (see NOALIAS)
            for c in range(main, C):
                acc += as_float32(np.uint32(flat[r * C + c]) << np.uint32(16)) * flat_x[j * C + c]
            if bias.shape[0] > 0:
                acc += as_float32(np.uint32(bias[r]) << np.uint32(16))
            flat_out[j * R + r] = acc


STREAM_STEP = 16  # lines (1 KiB) read from one stream before the next (read_streams)


@jit(parallel=True)
def read_streams(words, tasks, streams, ahead, out):
    """out[t] = the XOR of task t's lines of words (uint64, 8 a 64-byte line): lines t * L ..
    t * L + streams * S - 1, L = lines // tasks, S = L // streams. The task reads them as
    `streams` interleaved sequential streams (S lines each, STREAM_STEP lines of one, then of the
    next), asking for lines `ahead` ahead (0: none): the probe of `tinyoss bench`'s bandwidth
    ceiling tries a few such ways and keeps the fastest. Twin: numpy's bitwise_xor.reduce."""
    per_task = words.shape[0] // 8 // tasks
    per_stream = per_task // streams
    for t in numba.prange(tasks):
        acc = np.uint64(0)
        for j in range(0, per_stream, STREAM_STEP):
            n = min(STREAM_STEP, per_stream - j)
            for s in range(streams):
                acc ^= xor_lines(words, 8 * (t * per_task + s * per_stream + j), n, ahead)
        out[t] = acc


@jit(parallel=True, fastmath=True)
def f32_bf16w_matvec(w, x, bias, out):
    """out[r] = sum_c bf16(w[r, c]) x[c] (+ bf16(bias[r]) if bias is non-empty).

    w [R, C] uint16, x [C] f32, out [R] f32. Twin: model.linear (rtol 1e-5).
    """
    R = w.shape[0]
    xs, outs = x.reshape(1, -1), out.reshape(1, -1)
    n_tasks = (R + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in numba.prange(n_tasks):
        _bf16_rows(w, xs, bias, outs, task * ROWS_PER_TASK, min((task + 1) * ROWS_PER_TASK, R))


@jit(parallel=True, fastmath=True)
def f32_bf16w_matmul(w, xs, bias, out):
    """out[j] = `f32_bf16w_matvec`(w, xs[j]) for a few tokens: xs [m, C] f32, out [m, R] f32;
    each weight is read and widened once per four tokens (prefill of a short prompt).
    Twin: model.linear (rtol 1e-5)."""
    R = w.shape[0]
    split = BF16_QUADS and xs.shape[0] > 1
    xp = bf16_split_x(xs) if split else xs  # (one token, each decode step: no copy)
    n_tasks = (R + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in numba.prange(n_tasks):
        _bf16_rows(w, xp, bias, out, task * ROWS_PER_TASK, min((task + 1) * ROWS_PER_TASK, R),
                   split)


@jit(fastmath=True)
def f32_bf16w_matvec_serial(w, x, bias, out):
    """`f32_bf16w_matvec` on the calling thread: for small matrices (the router: E rows), which
    cost less than waking the worker threads."""
    _bf16_rows(w, x.reshape(1, -1), bias, out.reshape(1, -1), 0, w.shape[0])


@jit(parallel=True, fastmath=True)
def f32_bf16w_qkv_matmul(wq, bq, oq, wk, bk, ok, wv, bv, ov, xs):
    """q, k and v projections of one or a few tokens in one parallel launch: three
    `f32_bf16w_matmul`s. xs [m, C], oq/ok/ov [m, rows of wq/wk/wv]."""
    tq = (wq.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    tk = (wk.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    tv = (wv.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    split = BF16_QUADS and xs.shape[0] > 1
    xp = bf16_split_x(xs) if split else xs  # (one token, each decode step: no copy)
    for task in numba.prange(tq + tk + tv):
        if task < tq:
            r0 = task * ROWS_PER_TASK
            _bf16_rows(wq, xp, bq, oq, r0, min(r0 + ROWS_PER_TASK, wq.shape[0]), split)
        elif task < tq + tk:
            r0 = (task - tq) * ROWS_PER_TASK
            _bf16_rows(wk, xp, bk, ok, r0, min(r0 + ROWS_PER_TASK, wk.shape[0]), split)
        else:
            r0 = (task - tq - tk) * ROWS_PER_TASK
            _bf16_rows(wv, xp, bv, ov, r0, min(r0 + ROWS_PER_TASK, wv.shape[0]), split)


def bf16_to_q8(w):
    """bf16 [R, C] -> (int8 [R, C], bf16 scales [R, C/32]): `bf16_to_q8_into` new arrays."""
    q = np.empty(w.shape, np.int8)
    s = np.empty((w.shape[0], w.shape[1] // 32), np.uint16)
    bf16_to_q8_into(w, q, s)
    return q, s


@jit(parallel=True)
def bf16_to_q8_into(w, q, s):
    """q [R, C] int8, s [R, C/32] bf16 bits <- bf16 w [R, C]: per 32 values, scale = max|w|/127
    rounded to bf16, q = round(w / scale) within +-127 (llama.cpp's Q8_0, its float16 scale a
    bf16 here). Twin: quant.q8_quantize."""
    R, C = w.shape
    nb = C // 32
    for r in numba.prange(R):
        for b in range(nb):
            amax = np.float32(0.0)
            for j in range(32):
                v = abs(as_float32(np.uint32(w[r, b * 32 + j]) << np.uint32(16)))
                if v > amax or v != v:  # a NaN stays (numpy's max; the builtin drops it)
                    amax = v
            bits = _to_bf16(amax / np.float32(127.0))
            s[r, b] = bits
            inv = _q8_inverse(as_float32(np.uint32(bits) << np.uint32(16)))
            for j in range(32):
                v = as_float32(np.uint32(w[r, b * 32 + j]) << np.uint32(16))
                # (inv 0: a block of NaN / inf or too small: q = 0, as quant._q8_blocks)
                q[r, b * 32 + j] = np.int8(max(-127.0, min(127.0, np.rint(v * inv)))) if inv > 0 else 0


@jit()
def _to_bf16(v):
    """float32 -> bf16 bits, rounded to nearest even; NaN stays NaN (store.f32_to_bf16)."""
    u = np.uint64(float32_bits(v))
    if v != v:
        return np.uint16((u >> np.uint64(16)) | np.uint64(0x40))
    return np.uint16((u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16))


@jit(parallel=True, fastmath=True)
def f32_q8w_matvec(q, s, x, bias, out):
    """out[r] = sum_b s[r, b] * sum_j q[r, 32b + j] x[32b + j] (+ bf16(bias[r])).

    q [R, C] int8, s [R, C/32] bf16 bits. Twin: quant.q8_dequantize(q, s) @ x (rtol 1e-5)."""
    n_tasks = (q.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in numba.prange(n_tasks):
        _q8_rows(q, s, bias, out, x, task * ROWS_PER_TASK)


@jit(parallel=True, fastmath=True)
def f32_q8w_qkv_matvec(qq, sq, bq, oq, qk, sk, bk, ok, qv, sv, bv, ov, x):
    """The q, k and v projections of one token from their int8 copies in one parallel launch:
    three `f32_q8w_matvec`s (decode's 24 layers: 48 launches a token fewer). x [C]."""
    tq = (qq.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    tk = (qk.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    tv = (qv.shape[0] + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in numba.prange(tq + tk + tv):
        if task < tq:
            _q8_rows(qq, sq, bq, oq, x, task * ROWS_PER_TASK)
        elif task < tq + tk:
            _q8_rows(qk, sk, bk, ok, x, (task - tq) * ROWS_PER_TASK)
        else:
            _q8_rows(qv, sv, bv, ov, x, (task - tq - tk) * ROWS_PER_TASK)


@numba.njit(cache=CACHE, fastmath=FASTMATH, inline="always")
def _q8_rows(q, s, bias, out, x, r0):
    """Rows r0 .. r0 + ROWS_PER_TASK (or the last) of f32_q8w_matvec."""
    R, C = q.shape
    nb = C // 32
    flat_q, flat_s = q.reshape(-1), s.reshape(-1)
    for r in range(r0, min(r0 + ROWS_PER_TASK, R)):
        acc = q8_row_dot(flat_q, r * C, flat_s, r * nb, x, nb)
        if bias.shape[0] > 0:
            acc += as_float32(np.uint32(bias[r]) << np.uint32(16))
        out[r] = acc


@jit(parallel=True, fastmath=True)
def f32_q8w_matmul(q, s, xs, bias, out):
    """out[j, r] = f32_q8w_matvec's row r against xs[j], for a few tokens j (batched decode): each
    row read from memory once, each block converted once for four tokens and two rows a call
    (simd.q8_row_pair_dots: each x load serves both). Whole rows, the tokens' x from L2: on the
    Zen 4, 60000 rows of 2880 from RAM, 4 tokens 8.5 ms (in L1-sized column chunks as
    _bf16_rows: 16.1; one row a call: 17.6; the kernel before, one token at a time: 19.5; one
    token's matvec 5.9), 2 tokens 6.9 (10.2 before); restricted to AVX2 (16 vector registers:
    the pair's sums spill) 4 tokens 8.9-9.8 ms against 17.2-19.2 before. xs [m, C], out [m, R]
    contiguous.
    Twin: xs @ quant.q8_dequantize(q, s).T (rtol 1e-5)."""
    R, C = q.shape
    nb = C // 32
    m = xs.shape[0]
    flat_q = q.reshape(-1)
    flat_s = s.reshape(-1)
    n_tasks = (R + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    flat_x, flat_out = xs.reshape(-1), out.reshape(-1)
    for task in numba.prange(n_tasks):
        r0, r1 = task * ROWS_PER_TASK, min((task + 1) * ROWS_PER_TASK, R)
        r = r0
        while r < r1:
            pair = r + 1 < r1
            for j0 in range(0, m, MAX_GROUP):  # each block converted once for four tokens
                g = min(MAX_GROUP, m - j0)
                if pair:  # two rows a call: each x load serves both
                    q8_row_pair_dots(g, flat_q, r * C, flat_s, r * nb, flat_x, j0 * C, C, nb,
                                     flat_out, j0 * R + r, R)
                else:
                    q8_row_dots(g, flat_q, r * C, flat_s, r * nb, flat_x, j0 * C, C, nb, flat_out,
                                j0 * R + r, R)
            r += 2 if pair else 1
        for r in range(r0, r1):  # through the view the intrinsics wrote (see NOALIAS)
            b = as_float32(np.uint32(bias[r]) << np.uint32(16)) if bias.shape[0] > 0 else np.float32(0)
            for j in range(m):
                flat_out[j * R + r] += b


# --- prefill's float32 matmul on our own register blocks (simd.panel_block) -------------------
PANEL_K = 128  # steps of k a pass: a panel's 128 x 32 tokens (16 KB) stay in L1 for every row
PANEL_M = 192  # rows a pass: their 128 columns (96 KB) stay in L2 for every panel
# (Zen 4, [512, 2880] @ [2880, n], two threads at once: 16-192 rows x 128-512 k
# measured 84-105 GFLOP/s for n = 16-128; 512 k and 48 rows 74-93)


def panel_tokens(n: int) -> int:
    """The tokens pack_panels lays out for n: n rounded up to a multiple of PANEL_STEP."""
    return -(-n // PANEL_STEP) * PANEL_STEP


@jit()
def pack_panels(x, p):
    """x [n, K] f32 -> p [K * N] f32, N = panel_tokens(n), as f32_panel_matmul reads it: for
    each PANEL_K steps of k, the tokens in panels of 2 * PANEL_LANES (the last may be fewer:
    8, 16 or 24), each panel k-major (a step's tokens side by side); tokens n..N-1 are zeros."""
    n, K = x.shape
    N = p.shape[0] // K
    for k0 in range(0, K, PANEL_K):
        kc = min(PANEL_K, K - k0)
        for t0 in range(0, N, 2 * PANEL_LANES):
            width = min(2 * PANEL_LANES, N - t0)
            base = k0 * N + kc * t0
            for t in range(t0, t0 + width):
                if t < n:
                    for k in range(kc):
                        p[base + k * width + t - t0] = x[t, k0 + k]
                else:
                    for k in range(kc):
                        p[base + k * width + t - t0] = 0.0


@jit()
def _panel_rows(fa, a_off, lda, rows, p, off, kc, fo, o_off, N, add, width):
    """rows rows of a against the panel of `width` tokens at p[off]: blocks of PANEL_ROWS, the
    leftover rows one at a time (the intrinsic for that width)."""
    i = 0
    while i < rows:
        block = PANEL_ROWS if rows - i >= PANEL_ROWS else 1
        a_i, o_i = a_off + i * lda, o_off + i * N
        if width == 2 * PANEL_LANES:
            panel_block(block, fa, a_i, lda, p, off, kc, fo, o_i, N, add)
        elif width == 8:
            panel_block_8(block, fa, a_i, lda, p, off, kc, fo, o_i, N, add)
        elif width == 16:
            panel_block_16(block, fa, a_i, lda, p, off, kc, fo, o_i, N, add)
        else:
            panel_block_24(block, fa, a_i, lda, p, off, kc, fo, o_i, N, add)
        i += block


@jit()
def _panels(fa, a_off, lda, rows, p, k0, kc, N, fo, o_off, add):
    """One pass of k0..k0+kc: rows rows of a (fa[a_off:], lda apart) against every panel of
    tokens packed in p (pack_panels) into out rows (fo[o_off:], N apart), added to the sums
    there if `add`."""
    for t0 in range(0, N, 2 * PANEL_LANES):
        _panel_rows(fa, a_off, lda, rows, p, k0 * N + kc * t0, kc, fo, o_off + t0, N, add,
                    min(2 * PANEL_LANES, N - t0))


@jit()
def f32_panel_matmul(a, p, out):
    """out [M, N] = a [M, K] @ x.T for x packed by pack_panels into p (N = panel_tokens(n); the
    columns past n hold zeros' products): passes of PANEL_K steps of k over PANEL_M rows at a
    time, every later pass adding to the sums. Serial: prefill's tile pool runs one a core.
    Twin: a @ x.T (sums reordered: rtol 1e-5)."""
    M, K = a.shape
    N = out.shape[1]
    fa, fo = a.reshape(-1), out.reshape(-1)
    for k0 in range(0, K, PANEL_K):
        kc = min(PANEL_K, K - k0)
        for m0 in range(0, M, PANEL_M):
            _panels(fa, m0 * K + k0, K, min(PANEL_M, M - m0), p, k0, kc, N, fo, m0 * N, k0 > 0)


@jit()
def f32_mf4_panel_matmul(blocks, scales, p, out, a):
    """out [M, N] = mxfp4.decode(blocks, scales) @ x.T, blocks [M, nb, 16] u8, scales [M, nb]
    u8, x packed into p as for f32_panel_matmul; a: a float32 buffer of PANEL_M * PANEL_K. Each
    pass's PANEL_K columns of PANEL_M rows are decoded into a (in L2) right before their
    products, so the decoded weights never leave the cache. Twin: mxfp4.decode(blocks,
    scales) @ x.T (sums reordered: rtol 1e-5)."""
    M, nb, _ = blocks.shape
    N = out.shape[1]
    fb, fs, fo = blocks.reshape(-1), scales.reshape(-1), out.reshape(-1)
    for k0 in range(0, nb * 32, PANEL_K):
        b0, bc = k0 // 32, min(PANEL_K // 32, nb - k0 // 32)
        for m0 in range(0, M, PANEL_M):
            rows = min(PANEL_M, M - m0)
            for r in range(rows):
                for b in range(bc):
                    i = (m0 + r) * nb + b0 + b
                    _block_decode(fb, i * 16, _E8M0[fs[i]], a, (r * bc + b) * 32)
            _panels(a, 0, bc * 32, rows, p, k0, bc * 32, N, fo, m0 * N, k0 > 0)


@jit()
def bf16_widen(w, out):
    """bf16 [R, C] -> out float32 [R, C] (for prefill's BLAS tiles; serial: each worker thread
    widens its own tile). Twin: store.bf16_to_f32."""
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            out[r, c] = as_float32(np.uint32(w[r, c]) << np.uint32(16))


@jit()
def q8_dequantize(q, s, out):
    """int8 [R, C] + bf16 scales [R, C/32] -> out float32 [R, C] (for prefill's BLAS tiles;
    serial, like bf16_widen). Twin: quant.q8_dequantize."""
    for r in range(q.shape[0]):
        for b in range(q.shape[1] // 32):
            scale = as_float32(np.uint32(s[r, b]) << np.uint32(16))
            for c in range(32 * b, 32 * b + 32):
                out[r, c] = np.float32(q[r, c]) * scale


# ---------------------------------------------------------------------------------------------
# attention


@jit(parallel=True, fastmath=True)
def f32_attention(q, k_buf, v_buf, sinks, q_pos0, first_pos, ring, k_pos0, window, out):
    """Attention with sinks, GQA and an optional band, reading keys straight from the KV cache.

    q [n, Hq, dh] (roped), k_buf/v_buf [Hkv, S, dh] (head-major; float32 or bf16 bits, as the
    KVCache holds them), sinks [Hq] f32, out [n, Hq*dh].
    Query i sits at position q_pos0 + i and sees positions max(first_pos, pos - window + 1)..pos
    (window 0 = full causal); only those keys are touched. The key of position p is in slot
    p % ring of a ring buffer (ring > 0), else in slot p - k_pos0.
    gpt-oss's shape (8 queries of 64 per KV head) over slots in order (ring 0: what prefill
    passes) runs decode's kernels for each (token, KV head): simd.qk8_scores, the softmax,
    simd.weighted_rows64 (`_attend_rows`); others plain loops.
    Twin: model.sdpa with model.attention_scores_mask (rtol 1e-5).
    """
    n, Hq, dh = q.shape
    Hkv, S = k_buf.shape[0], k_buf.shape[1]
    q_mult = Hq // Hkv
    scale = np.float32(1.0 / math.sqrt(dh))
    rows = ring == 0 and q_mult == QK_HEADS and dh == QK_DIM
    flat_k, flat_v, flat_out = k_buf.reshape(-1), v_buf.reshape(-1), out.reshape(-1)
    for task in numba.prange(n * Hkv):
        i = task // Hkv
        h = task % Hkv
        pos = q_pos0 + i
        lo = first_pos
        if window > 0:
            lo = max(lo, pos - window + 1)
        T = pos - lo + 1
        scores = np.empty(q_mult * T, np.float32)
        if rows:
            _attend_rows(q, i, h, flat_k, flat_v, (h * S + lo - k_pos0) * dh, T, scale, sinks,
                         scores, flat_out, (i * Hq + h * q_mult) * dh)
        else:
            _attend_plain(q, i, h, q_mult, flat_k, flat_v, S, lo, T, ring, k_pos0, scale, sinks,
                          scores, out)


@jit()
def _attend_plain(q, i, h, q_mult, flat_k, flat_v, S, lo, T, ring, k_pos0, scale, sinks, scores,
                  out):
    """The plain loops of f32_attention and f32_decode_attention_batch (head shapes other than
    gpt-oss's): token i's q_mult queries of KV head h (q [n, Hq, dh]) against positions lo ..
    lo + T - 1, the key of position p in slot p % ring (ring > 0) else p - k_pos0 of the flat
    [Hkv, S, dh] buffers; out[i, (h q_mult + m) dh + d]. scores: room for [q_mult, T]."""
    dh = q.shape[2]
    for t in range(T):
        p = lo + t
        row = p % ring if ring > 0 else p - k_pos0
        for m in range(q_mult):
            s = np.float32(0.0)
            for d in range(dh):
                s += q[i, h * q_mult + m, d] * kv_float(flat_k[(h * S + row) * dh + d])
            scores[m * T + t] = s * scale
    acc = np.empty(dh, np.float32)
    for m in range(q_mult):
        hq = h * q_mult + m
        denom = _softmax_row(scores, m * T, T, sinks[hq])  # the exps 16 lanes a step
        acc[:] = 0.0
        for t in range(T):
            p = lo + t
            row = p % ring if ring > 0 else p - k_pos0
            w = scores[m * T + t]
            for d in range(dh):
                acc[d] += w * kv_float(flat_v[(h * S + row) * dh + d])
        for d in range(dh):
            out[i, hq * dh + d] = acc[d] / denom


# ---------------------------------------------------------------------------------------------
# decode attention: one query token, every cached key visible (fast.attend_one runs the three)


@jit(parallel=True, fastmath=True)
def f32_decode_scores(q, k_buf, count, out):
    """out[h, m, t] = q[h, m] . k_buf[h, t] / sqrt(dh) for the first `count` slots.

    q [Hkv, q_mult, dh] (roped), k_buf [Hkv, S, dh] (the cache buffer: float32 or bf16 bits),
    out [Hkv, q_mult, count].
    gpt-oss's shape (8 queries of 64 per KV head) runs simd.qk8_scores; others (small test
    models) plain loops on one thread: a second parallel loop took 0.8 s more to compile.
    Twin: the scores of model.sdpa (rtol 1e-5).
    """
    Hkv, qm, dh = q.shape
    S = k_buf.shape[1]
    scale = np.float32(1.0 / math.sqrt(dh))
    flat_k, flat_out = k_buf.reshape(-1), out.reshape(-1)
    if qm == QK_HEADS and dh == QK_DIM:
        qt = np.empty(Hkv * dh * qm, np.float32)  # q transposed: [Hkv, dh, qm], flat
        for h in range(Hkv):  # (a loop: numba's transpose + ascontiguousarray took 3-4 s to
            for d in range(dh):  # compile, half of this kernel's time, on a Rocket Lake)
                for m in range(qm):
                    qt[(h * dh + d) * qm + m] = q[h, m, d]
        chunk = 512  # keys a task: tasks enough to share between the threads
        chunks = (count + chunk - 1) // chunk
        for task in numba.prange(Hkv * chunks):
            h, t0 = task // chunks, (task % chunks) * chunk
            n = min(chunk, count - t0)
            qk8_scores(qt, h * dh * qm, flat_k, (h * S + t0) * dh, n, scale, flat_out,
                       h * qm * count + t0, count)
        return
    for h in range(Hkv):
        for t in range(count):
            for m in range(qm):
                s = np.float32(0.0)
                for d in range(dh):
                    s += q[h, m, d] * kv_float(k_buf[h, t, d])
                out[h, m, t] = s * scale


@jit(parallel=True, fastmath=True)
def f32_decode_values(w, v_buf, count, denom, out):
    """out[h, m] = sum_t w[h, m, t] v_buf[h, t] / denom[h * q_mult + m], over the first `count`
    slots: attention's output from its unnormalized softmax weights and their sums.

    w [Hkv, q_mult, count], v_buf [Hkv, S, dh] (float32 or bf16 bits), denom [Hkv * q_mult],
    out [Hkv, q_mult, dh].
    dh = 64 runs simd.weighted_rows64; others (small test models) plain loops on one thread, as
    f32_decode_scores. Twin: weights @ values / denom (rtol 1e-5).
    """
    Hkv, S, dh = v_buf.shape
    qm = w.shape[1]
    flat_w, flat_v, flat_out = w.reshape(-1), v_buf.reshape(-1), out.reshape(-1)
    if dh == QK_DIM:
        for h in numba.prange(Hkv):
            flat_out[h * qm * dh:(h + 1) * qm * dh] = 0.0
            _weighted_values64(flat_w, h * qm * count, count, qm, flat_v, h * S * dh, flat_out,
                               h * qm * dh)
            for hm in range(h * qm, (h + 1) * qm):
                for d in range(dh):
                    flat_out[hm * dh + d] /= denom[hm]
        return
    for task in range(Hkv * qm):
        h, m = task // qm, task % qm
        for d in range(dh):
            acc = np.float32(0.0)
            for t in range(count):
                acc += w[h, m, t] * kv_float(v_buf[h, t, d])
            out[h, m, d] = acc / denom[task]


@jit(parallel=True)  # not fastmath, as f32_attention: the softmax's exp keeps its order
def f32_decode_attention_batch(q, hkv, k_addr, v_addr, slots, counts, like, sinks, out):
    """Decode attention of B streams in one launch: stream i's query token q[i] [Hq, dh] (roped)
    against the first counts[i] slots (every one visible, in any slot order) of its own cache
    buffers, [hkv, slots[i], dh] at the addresses k_addr[i], v_addr[i] (int64 [B]; float32, or
    bf16 bits: the element type of `like`, any array of it); sinks [Hq] f32, out [B, Hq*dh].
    A task per (stream, KV head), each the three steps of fast.attend_one: gpt-oss's shape by
    f32_attention's `_attend_rows`, others its `_attend_plain`. (A batched decode step ran
    attend_one per stream: three launches a stream and layer, each waking every thread.)
    Twin: model.sdpa per stream (rtol 1e-5)."""
    B, Hq, dh = q.shape
    q_mult = Hq // hkv
    scale = np.float32(1.0 / math.sqrt(dh))
    rows = q_mult == QK_HEADS and dh == QK_DIM
    flat_out = out.reshape(-1)
    for task in numba.prange(B * hkv):
        i, h = task // hkv, task % hkv
        S, T = slots[i], counts[i]
        flat_k = numba.carray(pointer_to(k_addr[i], like), hkv * S * dh)
        flat_v = numba.carray(pointer_to(v_addr[i], like), hkv * S * dh)
        scores = np.empty(q_mult * T, np.float32)
        if rows:
            _attend_rows(q, i, h, flat_k, flat_v, h * S * dh, T, scale, sinks, scores, flat_out,
                         (i * Hq + h * q_mult) * dh)
        else:
            _attend_plain(q, i, h, q_mult, flat_k, flat_v, S, 0, T, 0, 0, scale, sinks, scores,
                          out)


@jit(fastmath=True)
def _weighted_values64(flat_w, w_off, count, qm, flat_v, v_off, flat_out, o_off):
    """flat_out[o_off + 64 m + d] += sum_t flat_w[w_off + m count + t] flat_v[v_off + 64 t + d]
    for m < qm queries, t < count value rows (float32 or bf16 bits) of 64: simd.weighted_rows64
    over chunks of rows that stay in L1 while the queries use them."""
    chunk = 16  # value rows (4 KiB) that stay in L1 while the qm queries use them (from L2 the 8
    # loads per FMA step wait on its bandwidth: 256 keys took 1.7x as long)
    passes = -(-qm // VALUE_QUERIES)  # over a chunk: VALUE_QUERIES queries a pass
    ahead = -(-chunk // passes)  # each pass prefetches this many rows of the chunk after next
    # (memory streams in while the chunk in L1 is summed: 17 % less time at 4096 keys than no
    # prefetch with 64-row chunks and the next one asked for; 16 rows and the one after next,
    # 1.09-1.15x that on the Zen 5, in one process: 32 or 64 rows, 8, or 1 or 3-6 ahead were
    # slower)
    for t0 in range(0, count, chunk):
        n = min(chunk, count - t0)
        for p in range(passes):
            first = t0 + 2 * chunk + p * ahead
            weighted_rows64(min(VALUE_QUERIES, qm - p * VALUE_QUERIES), flat_w,
                            w_off + p * VALUE_QUERIES * count + t0, 1, count, flat_v,
                            v_off + t0 * QK_DIM, n, flat_out, o_off + p * VALUE_QUERIES * QK_DIM,
                            v_off + first * QK_DIM, max(0, min(ahead, count - first)))


@jit(fastmath=True)
def _attend_rows(q, i, h, flat_k, flat_v, kv_off, T, scale, sinks, scores, flat_out, o_off):
    """f32_attention's gpt-oss shape: token i's QK_HEADS queries of KV head h (q [n, Hq, dh])
    against the T keys and values from element kv_off of the flat buffers (slots in order), out
    at flat_out[o_off:]: the decode kernels' three steps, per token. scores: room for [8, T]."""
    qm, dh = QK_HEADS, QK_DIM
    qt = np.empty(dh * qm, np.float32)  # the queries transposed: [dh, qm]
    for d in range(dh):
        for m in range(qm):
            qt[d * qm + m] = q[i, h * qm + m, d]
    qk8_scores(qt, 0, flat_k, kv_off, T, scale, scores, 0, T)
    denom = np.empty(qm, np.float32)
    for m in range(qm):
        denom[m] = _softmax_row(scores, m * T, T, sinks[h * qm + m])
    flat_out[o_off:o_off + qm * dh] = 0.0
    _weighted_values64(scores, 0, T, qm, flat_v, kv_off, flat_out, o_off)
    for m in range(qm):
        for d in range(dh):
            flat_out[o_off + m * dh + d] /= denom[m]


@jit()  # not fastmath (nor is what it inlines, called from a fastmath kernel): see below
def _softmax_row(flat, off, T, sink):
    """One row of f32_softmax_rows: flat[off:off + T] <- exp(score - top) in place; returns the
    denominator (their sum + the sink's exp)."""
    top = max_nan(flat, off, T)  # NaN if a score is: as numpy, the whole row is NaN then
    if top == top:  # (a NaN top must stay NaN: the exp's clamp would drop it)
        top = max(top, sink)  # the sink is one more column
    return exp_shifted_sum(flat, off, T, top) + np.exp(sink - top)


@jit(parallel=True)  # not fastmath: the exp's range reduction must keep its order
def f32_softmax_rows(scores, sinks, denom):
    """Softmax with a sink, unnormalized, in place: with top = max(sinks[r], max scores[r]),
    scores[r] <- exp(scores[r] - top) and denom[r] = their sum + exp(sinks[r] - top).

    scores [R, T] f32, sinks [R] f32, denom [R] f32. The exp is simd's vector expf (1 ULP).
    Twin: the softmax of model.sdpa, the sink as one more column (rtol 1e-5).
    """
    R, T = scores.shape
    flat = scores.reshape(-1)
    for r in numba.prange(R):
        denom[r] = _softmax_row(flat, r * T, T, sinks[r])


# ---------------------------------------------------------------------------------------------
# prefill: the steps around the tile pool's matmuls (fast.TileMatmul), on every core; a serial
# step here is what more threads can't shorten


@jit(parallel=True, fastmath=True)
def f32_rmsnorm_rows(x, scale, eps, out):
    """f32_rmsnorm with the tokens split across the threads (prefill). Twin: model.rmsnorm
    (rtol 1e-5: the sum of squares in another order)."""
    for i in numba.prange(x.shape[0]):
        _rmsnorm_token(x, scale, eps, out, i)


@jit(parallel=True)  # not fastmath: the same products and differences as numpy, bit for bit
def f32_rope_rows(x, cos, sin, out):
    """f32_rope with the tokens split across the threads (prefill): x [n, H, dh], cos/sin
    [n, dh/2] -> out [n, H, dh]. Twin: model.apply_rope (bit-exact)."""
    for i in numba.prange(x.shape[0]):
        _rope_token(x, cos, sin, out, i)


@jit(parallel=True)
def f32_gather_rows(x, rows, out):
    """out[i] = x[rows[i]]: x [n, D], rows [m] int64, out [m, D] (prefill: the tokens of each
    routed expert side by side). Twin: x[rows] (exact)."""
    D = x.shape[1]
    for i in numba.prange(rows.shape[0]):
        r = rows[i]
        for d in range(D):
            out[i, d] = x[r, d]


@jit()
def f32_bias_swiglu(h, bias, limit, alpha, out):
    """out = model.swiglu(h + bias): h [m, 2R] (gate = even columns, up = odd), bias [2R] f32,
    out [m, R], which may be a column slice of a wider array (a worker of the tile pool writes
    its tile's columns; serial: that worker is one of the threads). The sigmoid's exp is simd's
    vector expf (1 ULP; libm's, one at a time, took twice numpy's time), its argument capped at
    89, where that exp gives inf as numpy's does (both finite up to 88.72). NaN stays NaN
    through the clamps, as in numpy. Twin: model.swiglu(h + bias) (rtol 2e-6, atol 2e-36)."""
    m, R = out.shape
    z = np.empty(R, np.float32)
    for j in range(m):
        for i in range(R):
            g = h[j, 2 * i] + bias[2 * i]
            if g > limit:  # (a NaN gate stays NaN: the comparison is false)
                g = limit
            z[i] = min(-alpha * g, np.float32(89.0))
        exp_shifted_sum(z, 0, R, np.float32(0.0))  # z <- exp(z), 16 lanes a step
        for i in range(R):
            out[j, i] = _swiglu_given(h[j, 2 * i] + bias[2 * i], h[j, 2 * i + 1] + bias[2 * i + 1],
                                      limit, z[i])


@jit(parallel=True)  # not fastmath: no FMA, the products and sums of numpy's, bit for bit
def f32_moe_combine(x, y, pairs, weights, out):
    """out[i] = x[i] + sum_j weights[i, j] * y[pairs[i, j]], the k terms of token i added in the
    order of their rows of y, to 0 first: x [n, D] (the residual), y [n*k, D] (each (token, slot)
    pair's expert output, the pairs sorted by expert), pairs [n, k] int64 (the row of y of token
    i's slot j), weights [n, k] f32 -> out [n, D]. With y sorted by expert, that is
    model.moe_block's sum (experts in ascending order). Twin: that loop (bit-exact)."""
    n, k = pairs.shape
    D = x.shape[1]
    for i in numba.prange(n):
        rows = np.empty(k, np.int64)
        w = np.empty(k, np.float32)
        for j in range(k):  # insertion sort of the k rows (k = 4 in gpt-oss)
            r, wj = pairs[i, j], weights[i, j]
            s = j
            while s > 0 and rows[s - 1] > r:
                rows[s], w[s] = rows[s - 1], w[s - 1]
                s -= 1
            rows[s], w[s] = r, wj
        for d in range(D):
            acc = np.float32(0.0)
            for j in range(k):
                acc += w[j] * y[rows[j], d]
            out[i, d] = x[i, d] + acc
