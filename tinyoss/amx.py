"""Prefill's matmuls on Intel AMX (Xeon since Sapphire Rapids), exact: bf16 tiles, three of x.

AMX multiplies tiles of bf16 into float32 accumulators (`tdpbf16ps`: a 16 x 32 tile of one
operand times a 32 x 16 of the other, 8192 products an instruction), several times the float32
FMAs' rate. Our weights are bf16 already: the dense ones as published, the experts' MXFP4 values
exactly (an E2M1 value times a power of two has two significant bits). The float32 activations
are not, but each is the exact sum of three bf16s: x = hi + mid + lo, each the truncation of what
the one before left (8 + 8 + 8 significant bits, float32's 24). So W @ x.T = W @ hi.T + W @ mid.T
+ W @ lo.T: every product exact, summed in float32, as the float32 path sums them (in another
order). What AMX does differently: bf16 inputs below 2**-126 count as zero (a lo part of an x
under ~2**-110; a weight under 2**-126): far below float32's rounding of any sum they are in.

The kernels, each with a numpy twin in this module or tests/test_amx.py:
  - `pack_x`: x [m, C] float32 -> its three bf16 parts in AMX's tile layout (16 tokens a tile,
    columns in the order of the weights' tiles);
  - `bf16_matmul`: out[t, r] = sum_c W[r, c] x[t, c] (+ bias, + a residual) for bf16 W [R, C]
    (the dense weights, read in place);
  - `mxfp4_matmul`: the same for an expert's MXFP4 rows, decoded 32 rows at a time into bf16
    (`mxfp4_rows_bf16`: four blocks a step with `vpermw`, the scale added to the exponents).
AVAILABLE says whether this process may use them: an x86 CPU with AMX-BF16, numba compiling for
it, Linux granting the tile state (arch_prctl) and TINYOSS_AMX not "0".
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import mxfp4
from .kernels import _E8M0, _FP4, jit
from .simd import (_CODEGEN_FEATURES, ARM, HAVE_AVX512, _data, _e2m1_lookup_quad, as_float32,
                   float32_bits)

TILE = 16  # rows of a tile (weights' rows; tokens)
STEP = 32  # columns of a tile: the bf16 of one tdpbf16ps step
SLAB = 32  # weight rows a step of the matmul kernels: two tiles' worth
CHUNK = 4  # token tiles (64 tokens) a dense matmul keeps in L2 while its rows stream past


def _request_tile_state() -> bool:
    """Linux gives a process AMX's 8 KB of tile registers only when asked (arch_prctl
    ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, Linux 5.16+); without it the first tile
    instruction kills the process. True where granted (for every thread of the process)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl (x86-64), REQ_XCOMP_PERM
    except (OSError, AttributeError):
        return False


AVAILABLE = (not ARM and HAVE_AVX512 and os.environ.get("TINYOSS_AMX", "1") != "0"
             and all(f in _CODEGEN_FEATURES for f in ("+amx-tile", "+amx-bf16"))
             and sys.platform == "linux" and _request_tile_state())

# --- the tile instructions, one intrinsic each (tile numbers are literals) --------------------
# Tiles 0-3 accumulate (two row tiles x two token tiles), 4-5 hold weights, 6-7 x's parts.
# Every tile is 16 rows of 64 bytes: palette 1, as `ldtilecfg` reads it.
_CONFIG = np.zeros(64, np.uint8)
_CONFIG[0] = 1
_CONFIG[16:32].view(np.uint16)[:8] = 64  # bytes a row, tiles 0-7
_CONFIG[48:56] = TILE  # rows, tiles 0-7

_void, _i8, _i64 = ir.VoidType(), ir.IntType(8), ir.IntType(64)
_i8p = _i8.as_pointer()


def _call(builder, name: str, args: list, types_: list) -> None:
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(_void, types_), name)
    builder.call(fn, args)


def _literal(*ts) -> bool:
    return all(isinstance(t, types.IntegerLiteral) and 0 <= t.literal_value < 8 for t in ts)


@intrinsic
def tile_config(typingctx, cfg):
    """ldtilecfg: this thread's tiles as `cfg` (64 bytes) describes them."""
    def codegen(context, builder, signature, args):
        ptr = builder.bitcast(_data(context, builder, signature.args[0], args[0]), _i8p)
        _call(builder, "llvm.x86.ldtilecfg", [ptr], [_i8p])
        return context.get_dummy_value()

    return types.void(cfg), codegen


@intrinsic
def tile_release(typingctx):
    """tilerelease: the tiles back to their initial state (the OS then saves none of them)."""
    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def tile_zero(typingctx, t):
    if not _literal(t):
        return None

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tilezero", [ir.Constant(_i8, t.literal_value)], [_i8])
        return context.get_dummy_value()

    return types.void(t), codegen


def _tile_move(name: str):
    def typer(typingctx, t, arr, offset, stride):
        """Tile t <-> 16 rows of 64 bytes at arr's element `offset`, `stride` bytes apart."""
        if not _literal(t):
            return None

        def codegen(context, builder, signature, args):
            ptr = builder.bitcast(_data(context, builder, signature.args[1], args[1], args[2]),
                                  _i8p)
            _call(builder, name, [ir.Constant(_i8, t.literal_value), ptr, args[3]],
                  [_i8, _i8p, _i64])
            return context.get_dummy_value()

        return types.void(t, arr, types.intp, types.intp), codegen

    return intrinsic(typer)


tile_load = _tile_move("llvm.x86.tileloadd64")
tile_store = _tile_move("llvm.x86.tilestored64")


@intrinsic
def tile_dot(typingctx, c, a, b):
    """tdpbf16ps: C[i, j] += sum_k A[i, 2k] B[k, j, 0] + A[i, 2k+1] B[k, j, 1] (bf16 products,
    float32 sums; A's rows are 32 bf16, B's rows pairs of bf16 for 16 columns)."""
    if not _literal(c, a, b):
        return None

    def codegen(context, builder, signature, args):
        _call(builder, "llvm.x86.tdpbf16ps", [ir.Constant(_i8, t.literal_value) for t in (c, a, b)],
              [_i8] * 3)
        return context.get_dummy_value()

    return types.void(c, a, b), codegen


# --- MXFP4 rows -> bf16 ----------------------------------------------------------------------
# Four blocks (64 bytes) a step, as the AVX-512 matvec decodes them (simd._e2m1_decode_quad), but
# kept in bf16: `vpermw` looks each nibble up in a table of the 16 E2M1 values' bf16 bits, and
# the block's scale 2**(s-127) is added to the exponent field of the nonzero ones (a zero stays
# zero). Exact where the results stay normal numbers, which is every scale byte in 2..252 (the
# E2M1 values' exponents are -1..2); a row with another scale takes the float32 route (the
# product, then its upper half: exact too, zero, subnormal or inf as float32's).
# Word i of lookup k holds element 4i + k of the four blocks: slot 32k + i of the row's 128.
QUAD_ORDER = tuple(4 * (s % 32) + s // 32 for s in range(128))
_SAFE_SCALES = (2, 252)


@intrinsic
def mxfp4_quad_bf16(typingctx, blocks, b_off, scales, s_off, out, o_off):
    """The four blocks at blocks[b_off] (64 bytes) with their scales at scales[s_off] ->
    out[o_off : o_off + 128] bf16 bits in QUAD_ORDER (scales in 2..252: see above)."""
    sig = types.void(blocks, types.intp, scales, types.intp, out, types.intp)

    def codegen(context, builder, signature, args):
        bptr = _data(context, builder, signature.args[0], args[0], args[1])
        sptr = _data(context, builder, signature.args[2], args[2], args[3])
        optr = _data(context, builder, signature.args[4], args[4], args[5])
        v32h = ir.VectorType(ir.IntType(16), 32)
        const = lambda values: ir.Constant(v32h, list(values))  # noqa: E731
        four = builder.load(builder.bitcast(sptr, ir.VectorType(_i8, 4).as_pointer()), align=1)
        v4h = ir.VectorType(ir.IntType(16), 4)
        shift = builder.shl(builder.sub(builder.zext(four, v4h), ir.Constant(v4h, [127] * 4)),
                            ir.Constant(v4h, [7] * 4))  # (s - 127) << 7: the exponent's step
        adds = builder.shuffle_vector(shift, shift, ir.Constant(ir.VectorType(ir.IntType(32), 32),
                                                                [i // 8 for i in range(32)]))
        for k, value in enumerate(_e2m1_lookup_quad(builder, bptr)):
            nonzero = builder.icmp_unsigned("!=", builder.and_(value, const([0x7FFF] * 32)),
                                            const([0] * 32))
            scaled = builder.select(nonzero, builder.add(value, adds), value)
            builder.store(scaled, builder.bitcast(builder.gep(optr, [ir.Constant(_i64, 32 * k)]),
                                                  v32h.as_pointer()), align=2)
        return context.get_dummy_value()

    return sig, codegen


# --- the kernels ------------------------------------------------------------------------------
# A serial kernel each (prefill's tile pool runs one on each core, fast.TileMatmul). Each sets up
# its thread's tiles first (ldtilecfg) and releases them at the end.

_QUAD = np.array(QUAD_ORDER, np.int64)


@functools.lru_cache(maxsize=None)
def order(cols: int, mxfp4_rows: bool) -> np.ndarray:
    """The column in each slot of a weight row as the matmuls read it: natural for bf16 rows; for
    decoded MXFP4 rows QUAD_ORDER within each 128 columns, the cols % 128 last natural."""
    slots = np.arange(cols)
    if mxfp4_rows:
        quads = cols // 128 * 128
        slots[:quads] = (slots[:quads] // 128 * 128 + _QUAD[slots[:quads] % 128])
    slots.flags.writeable = False
    return slots


@jit()
def mxfp4_rows_bf16(blocks, scales, r0, rows, out):
    """Rows r0 .. r0 + rows of an MXFP4 matrix (blocks [R, nb, 16], scales [R, nb]) -> out
    [>= rows, nb * 32] bf16 bits in the slots of order(nb * 32, True). Twin: rows_bf16."""
    nb = blocks.shape[1]
    C, quads = nb * 32, nb // 4
    fb, fs, fo = blocks.reshape(-1), scales.reshape(-1), out.reshape(-1)
    for r in range(rows):
        row = (r0 + r) * nb
        safe = True
        for b in range(quads * 4):
            safe &= _SAFE_SCALES[0] <= fs[row + b] <= _SAFE_SCALES[1]
        for q in range(quads):
            if safe:
                mxfp4_quad_bf16(fb, (row + 4 * q) * 16, fs, row + 4 * q, fo, r * C + 128 * q)
                continue
            for slot in range(128):
                e = _QUAD[slot]
                b = row + 4 * q + e // 32
                fo[r * C + 128 * q + slot] = _bf16_of(fb[b * 16 + e % 32 // 2], e % 2, fs[b])
        for b in range(quads * 4, nb):
            for e in range(32):
                fo[r * C + 32 * b + e] = _bf16_of(fb[(row + b) * 16 + e // 2], e % 2, fs[row + b])


@numba.njit(inline="always")
def _bf16_of(byte, high, scale):
    """An E2M1 nibble (byte's low or high) times 2**(scale-127) as bf16 bits: the float32
    product (exact) cut to its upper half (exact: two significant bits)."""
    b = np.int64(byte)
    nibble = (b >> 4) if high else (b & 15)
    return np.uint16(float32_bits(_FP4[nibble] * _E8M0[np.int64(scale)]) >> np.uint32(16))


@jit()
def pack_x(x, cols, out):
    """x [m, C] float32 -> out [3, J, C/32, 16, 32] bf16 bits (J = ceil(m / 16)): out[p, j, k]
    is AMX's 32 x 16 tile of part p (hi, mid, lo: x = hi + mid + lo exactly) of tokens 16j..
    16j+15 and the columns cols[32k .. 32k+31] (a weight row's slots, `order`): row i holds
    the pairs (2i, 2i+1) of each token. Tokens past m are zero; a NaN's parts are a NaN and two
    zeros, an inf's itself and two zeros. Twin: pack_x_twin."""
    m = x.shape[0]
    for j in range(out.shape[1]):
        for k in range(out.shape[2]):
            for i in range(16):
                for t in range(16):
                    token = 16 * j + t
                    for p in range(2):
                        v = x[token, cols[32 * k + 2 * i + p]] if token < m else np.float32(0)
                        bits = float32_bits(v)
                        hi = bits >> np.uint32(16)
                        mid = lo = np.uint32(0)
                        if v != v:
                            hi = np.uint32(0x7FC0)
                        elif abs(v) != np.inf:
                            rest = v - as_float32(hi << np.uint32(16))
                            mid = float32_bits(rest) >> np.uint32(16)
                            rest -= as_float32(mid << np.uint32(16))
                            lo = float32_bits(rest) >> np.uint32(16)
                        out[0, j, k, i, 2 * t + p] = hi
                        out[1, j, k, i, 2 * t + p] = mid
                        out[2, j, k, i, 2 * t + p] = lo


@numba.njit(inline="always")
def _tiles(a, a_off, C, two, xp, j, pair, stage):
    """stage[2 jj + ii] = rows a_off/C + 16 ii .. of a (bf16 [., C]) against token tile j + jj
    of xp (its three parts summed), for ii < 1 + two, jj < 1 + pair."""
    J, steps = xp.shape[1], xp.shape[2]
    tile_zero(0)
    tile_zero(1)
    tile_zero(2)
    tile_zero(3)
    lda, second = 2 * C, a_off + TILE * C
    for k in range(steps):
        tile_load(4, a, a_off + STEP * k, lda)
        if two:
            tile_load(5, a, second + STEP * k, lda)
        for p in range(3):
            base = ((p * J + j) * steps + k) * 512
            tile_load(6, xp, base, 64)
            tile_dot(0, 4, 6)
            if two:
                tile_dot(1, 5, 6)
            if pair:
                tile_load(7, xp, base + steps * 512, 64)
                tile_dot(2, 4, 7)
                if two:
                    tile_dot(3, 5, 7)
    tile_store(0, stage, 0, 64)
    tile_store(1, stage, 256, 64)
    tile_store(2, stage, 512, 64)
    tile_store(3, stage, 768, 64)


@numba.njit(inline="always")
def _emit(stage, rows, two, j, pair, m, bias, add, out, col):
    """out[t, col + r] = stage's sums (+ bias[r]) (+ add[t, col + r]) for the rows `rows`.. of
    the tiles _tiles filled and their tokens below m."""
    for jj in range(1 + pair):
        for ii in range(1 + two):
            for t in range(16):
                token = 16 * (j + jj) + t
                if token >= m:
                    break
                for r in range(16):
                    row = rows + 16 * ii + r
                    v = stage[2 * jj + ii, r, t]
                    if bias.shape[0]:
                        v += bias[row]
                    if add.shape[0]:
                        v = add[token, col + row] + v
                    out[token, col + row] = v


@jit()
def bf16_matmul(w, xp, m, bias, add, out, col):
    """out[t, col + r] = sum_c w[r, c] x[t, c] (+ bias[r]) (+ add[t, col + r]) for t < m: w
    [R, C] bf16 bits (R a multiple of 16), xp = pack_x(x, order(C, False)); bias [R] float32
    or empty, add [m, .] or empty. CHUNK token tiles at a time (their parts stay in L2) against
    every row, two row tiles x two token tiles a step. Twin: matmul_twin."""
    R, C = w.shape
    J = xp.shape[1]
    stage = np.empty((4, 16, 16), np.float32)
    tile_config(_CONFIG)
    for c0 in range(0, J, CHUNK):
        c1 = min(c0 + CHUNK, J)
        for rows in range(0, R, SLAB):
            two = rows + TILE < R
            for j in range(c0, c1, 2):
                pair = j + 1 < c1
                _tiles(w, rows * C, C, two, xp, j, pair, stage)
                _emit(stage, rows, two, j, pair, m, bias, add, out, col)
    tile_release()


@jit()
def mxfp4_matmul(blocks, scales, r0, r1, xp, m, bias, out, col, rows_bf16):
    """out[t, col + r - r0] = sum_c W[r, c] x[t, c] (+ bias[r - r0]) for rows r0..r1 of an
    MXFP4 matrix W (blocks [R, nb, 16], scales [R, nb]; r1 - r0 a multiple of 16) and t < m:
    xp = pack_x(x, order(nb * 32, True)); rows_bf16: room for the rows in bf16 (uint16
    [>= r1 - r0, nb * 32]). As bf16_matmul, each SLAB rows decoded as the first CHUNK token
    tiles reach them (still in L2 for those), kept for the rest. Twin: matmul_twin."""
    C = blocks.shape[1] * 32
    J = xp.shape[1]
    stage = np.empty((4, 16, 16), np.float32)
    no_add = np.empty((0, 0), np.float32)
    tile_config(_CONFIG)
    for c0 in range(0, J, CHUNK):
        c1 = min(c0 + CHUNK, J)
        for rows in range(0, r1 - r0, SLAB):
            two = rows + TILE < r1 - r0
            if c0 == 0:
                mxfp4_rows_bf16(blocks, scales, r0 + rows, min(SLAB, r1 - r0 - rows),
                                rows_bf16[rows:])
            for j in range(c0, c1, 2):
                pair = j + 1 < c1
                _tiles(rows_bf16, rows * C, C, two, xp, j, pair, stage)
                _emit(stage, rows, two, j, pair, m, bias, no_add, out, col)
    tile_release()


# --- numpy twins ------------------------------------------------------------------------------

def rows_bf16(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """mxfp4_rows_bf16's twin: every row, bf16 bits in the slots of `order`."""
    w = mxfp4.decode(blocks, scales)  # [R, C] float32, exact
    return (w[:, order(w.shape[1], True)].view(np.uint32) >> 16).astype(np.uint16)


def split3(x: np.ndarray) -> np.ndarray:
    """float32 x -> [3, *x.shape] bf16 bits, x = hi + mid + lo exactly (pack_x's parts)."""
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore"):
        hi = x.view(np.uint32) >> 16
        rest = x - (hi << 16).astype(np.uint32).view(np.float32)
        mid = rest.view(np.uint32) >> 16
        lo = (rest - (mid << 16).astype(np.uint32).view(np.float32)).view(np.uint32) >> 16
    special = ~np.isfinite(x)
    hi = np.where(np.isnan(x), 0x7FC0, hi)
    mid, lo = np.where(special, 0, mid), np.where(special, 0, lo)
    return np.stack([hi, mid, lo]).astype(np.uint16)


def pack_x_twin(x: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """pack_x in numpy."""
    m, C = x.shape
    J = -(-m // 16)
    padded = np.zeros((J * 16, C), np.float32)
    padded[:m] = x[:, cols]
    parts = split3(padded).reshape(3, J, 16, C // 32, 16, 2)  # [p, j, t, k, i, pair]
    return np.ascontiguousarray(parts.transpose(0, 1, 3, 4, 2, 5)).reshape(3, J, C // 32, 16, 32)


def matmul_twin(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """What both matmuls compute: x [m, C] @ w.T for float32 w [R, C] (decoded), in float64."""
    return x.astype(np.float64) @ w.astype(np.float64).T


def empty_packed(n: int, cols: int) -> np.ndarray:
    """Room for pack_x's layout of n tokens of `cols` columns."""
    return np.empty((3, -(-n // TILE), cols // STEP, TILE, 2 * TILE), np.uint16)


def packed(x: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """pack_x into a fresh array."""
    out = empty_packed(*x.shape)
    pack_x(x, cols, out)
    return out
