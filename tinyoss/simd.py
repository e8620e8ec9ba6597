"""The few lines numba can't say in Python, in LLVM vector IR: a bitcast, MXFP4 decoding, the
row dot products of the matvec kernels, decode attention's inner loops and a vector exp.

LLVM does not turn a 16-entry table lookup into a SIMD shuffle by itself, and that lookup is the
whole cost of an MXFP4 matvec. Here we write it out for x86 `pshufb` (`_e2m1_decode`: a block at
a time with AVX2, two with AVX-512) and, with AVX-512, for `vpermw` (`_e2m1_decode_quad`: four
blocks a step, the matvecs' main loop); for the matvec of one token, the fused matmul of a few
(`mxfp4_row_dots`) and the block decoder of prefill's tiles (pshufb). On aarch64 the same kernels
take NEON's `tbl` (`_e2m1_decode_neon`; `sdot` for int8 activations where the CPU has dotprod).
On other CPUs (`HAVE_SIMD` False) kernels.py uses its plain-numba twins. The rest is portable
vector IR, which LLVM turns into AVX or NEON as the CPU has:
numba's loops would not keep these sums in registers, or would reassociate them into one long
chain.

Every kernel built on these is tested against its numpy twin in tests/test_kernels.py, on each
path this CPU can build (TINYOSS_KERNELS below).
"""

from __future__ import annotations

import os
from pathlib import Path

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .mxfp4 import FP4_VALUES


def _target() -> tuple[str, list[str]]:
    """The CPU numba compiles for and its features: the host, unless NUMBA_CPU_NAME names another
    (a cache built for a fleet: x86-64-v3, generic, ...) with NUMBA_CPU_FEATURES or, without
    them, the features its name implies (below: the few we pick paths by)."""
    from numba.core import config

    if config.CPU_NAME in (None, "host"):
        return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten().split(",")
    if config.CPU_FEATURES:
        return config.CPU_NAME, config.CPU_FEATURES.split(",")
    name = config.CPU_NAME
    avx512 = name == "x86-64-v4" or name.startswith((
        "znver4", "znver5", "skylake-avx512", "cascadelake", "cooperlake", "icelake",
        "tigerlake", "sapphirerapids", "emeraldrapids", "graniterapids"))
    avx2 = avx512 or name == "x86-64-v3" or name.startswith((
        "haswell", "broadwell", "skylake", "znver", "alderlake", "raptorlake", "meteorlake",
        "arrowlake", "lunarlake"))
    vnni = avx512 and name.startswith((
        "znver4", "znver5", "cascadelake", "cooperlake", "icelake", "tigerlake",
        "sapphirerapids", "emeraldrapids", "graniterapids"))
    return name, ["+avx2"] * avx2 + ["+avx512f", "+avx512bw"] * avx512 + ["+avx512vnni"] * vnni


_CPU, _FEATURES = _target()
ARM = llvm.get_process_triple().startswith(("aarch64", "arm64"))  # 64-bit ARM: NEON is baseline
# TINYOSS_KERNELS=avx2 | neon | portable: build the paths of a smaller CPU than this one (AVX2
# without AVX-512, as Zen 3; NEON without dotprod, as a Pi 4's ARMv8.0; or plain numba, as
# RISC-V), to test them here. The disk cache can't tell the builds apart, so a forced path
# compiles afresh (kernels.CACHE). TINYOSS_PORTABLE_KERNELS=1 is the older spelling of `portable`.
KERNELS = os.environ.get("TINYOSS_KERNELS", "auto")
if os.environ.get("TINYOSS_PORTABLE_KERNELS", "0") == "1":
    KERNELS = "portable"
if KERNELS not in ("auto", "avx2", "neon", "portable"):
    raise ImportError(f"TINYOSS_KERNELS={KERNELS!r}: expected auto, avx2, neon or portable")
if KERNELS in ("avx2", "neon") and (KERNELS == "neon") != ARM:
    raise ImportError(f"TINYOSS_KERNELS={KERNELS}: this is {'an ARM' if ARM else 'an x86'} CPU")
_KNOWN_CPU = _CPU not in ("generic",) and KERNELS != "portable"
HAVE_AVX2 = "+avx2" in _FEATURES and _KNOWN_CPU and not ARM
# AVX-512 (BW for the byte shuffles): the MXFP4 row dots take two blocks a step in 512-bit
# vectors (Zen 4/5, Intel since Skylake-SP / Ice Lake)
HAVE_AVX512 = HAVE_AVX2 and KERNELS == "auto" and all(
    f in _FEATURES for f in ("+avx512f", "+avx512bw"))


def _cpu_has_dotprod() -> bool:
    """Whether this aarch64 CPU has the dot product instructions (sdot), as the OS tells it:
    Linux's hardware capability bits (AT_HWCAP, HWCAP_ASIMDDP), macOS's sysctl. LLVM's own host
    features leave dotprod out (LLVM 20 maps /proc/cpuinfo's asimd to neon, not asimddp)."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(None)
    if hasattr(libc, "getauxval"):  # Linux
        libc.getauxval.restype = ctypes.c_ulong
        return bool(libc.getauxval(16) & (1 << 20))  # AT_HWCAP, HWCAP_ASIMDDP
    value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
    system = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(system, "sysctlbyname") and system.sysctlbyname(
            b"hw.optional.arm.FEAT_DotProd", ctypes.byref(value), ctypes.byref(size), None, 0) == 0:
        return bool(value.value)  # macOS
    return False


def _codegen_features() -> list[str]:
    """The features numba compiles for: on aarch64 with dotprod, _FEATURES and +dotprod, which we
    hand numba (config.CPU_FEATURES) before it sets up its code generator (likewise a named CPU's
    own features, where NUMBA_CPU_NAME comes without NUMBA_CPU_FEATURES), unless told otherwise
    (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) or it is set up already (something compiled before
    tinyoss was imported: then its features stand). Numba's disk cache keys on them: a cached
    function compiled without them compiles once more."""
    from numba.core import config
    from numba.core.registry import cpu_target

    if "_toplevel_target_context" in vars(cpu_target):  # numba's code generator exists
        try:  # (numba internals: without them, say no dotprod rather than fail at import)
            return cpu_target.target_context.codegen()._get_host_cpu_features().split(",")
        except AttributeError:
            return _FEATURES
    if config.CPU_NAME not in (None, "host") and config.CPU_FEATURES is None:
        # a named CPU (NUMBA_CPU_NAME=x86-64-v3: a cache for a fleet, or a smaller CPU's path
        # measured here) gets that CPU's own features, as _target assumes; numba would add this
        # host's (AVX-512 encodings in an "x86-64-v3" build: found in its assembly)
        config.CPU_FEATURES = ""
        return _FEATURES
    if (ARM and KERNELS == "auto" and "+dotprod" not in _FEATURES and config.CPU_FEATURES is None
            and config.CPU_NAME in (None, "host") and _cpu_has_dotprod()):
        config.CPU_FEATURES = ",".join(_FEATURES + ["+dotprod"])
        return _FEATURES + ["+dotprod"]
    return _FEATURES


# NEON: every aarch64 CPU has it, so it does not need the CPU's name (which LLVM may not know:
# "generic" under qemu); dotprod (ARMv8.2+: Pi 5, RK3588, Apple M, Snapdragon X; not a Pi 4)
# takes int8 activations four products a lane (`sdot`).
HAVE_NEON = ARM and KERNELS in ("auto", "neon")
_CODEGEN_FEATURES = _codegen_features()  # (before numba's code generator is set up)
HAVE_DOTPROD = HAVE_NEON and KERNELS == "auto" and "+dotprod" in _CODEGEN_FEATURES
HAVE_SIMD = HAVE_AVX2 or HAVE_NEON  # a hand-written MXFP4 path (else plain numba: kernels.py)

_i8, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16i8 = ir.VectorType(_i8, 16)
# IR-level flags on the adds/muls of dot products: the safe subset of kernels.FASTMATH (sums may
# be reordered and fused; never no-NaN/no-inf or approximate functions)
_FAST = ("reassoc", "contract", "nsz", "arcp")
_FMA = ("contract",)  # mul + add may fuse, but the order of the sums stays as written (only if
# the kernel is not fastmath: numba gives its fastmath flags to every float op without flags)


def _const(n: int):
    return ir.Constant(_i64, n)



def _same_bits(to, frm, ir_to):
    """An intrinsic that reads a `frm` value's bits as a `to` (LLVM's bitcast)."""
    def typer(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir_to)

        return to(frm), codegen

    return intrinsic(typer)


as_float32 = _same_bits(types.float32, types.uint32, _f32)  # bf16 widening: as_float32(u << 16)
float32_bits = _same_bits(types.uint32, types.float32, _i32)  # as_float32's inverse


@intrinsic
def pointer_to(typingctx, address, like):
    """The address of an array's data (an integer: `arr.ctypes.data`) as a pointer to the element
    type of `like` (an array), for numba.carray: one kernel over several arrays of different
    shapes (each stream's KV cache) without a compile for each count of them, as a tuple of
    arrays would take. The caller keeps the arrays alive and passes their true sizes."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@intrinsic
def kv_float(typingctx, x):
    """A KV cache element as float32: a float32 as it is, bf16 bits (uint16) widened (exact)."""
    if x not in (types.float32, types.uint16):
        return None
    sig = types.float32(x)

    def codegen(context, builder, signature, args):
        return _widen(builder, args[0]) if x == types.uint16 else args[0]

    return sig, codegen


def _data(context, builder, aryty, ary, offset=None):
    """Pointer to an array argument's first element, or to its element `offset` (flat)."""
    data = context.make_array(aryty)(context, builder, ary).data
    return data if offset is None else builder.gep(data, [offset])


def _is_bf16(aryty) -> bool:
    """An array of bf16 bits (uint16; a KVCache(kv="bf16")'s) rather than float32."""
    return aryty.dtype == types.uint16


def _widen(builder, value):
    """bf16 bits (i16, or a vector of them) -> float32 (a vector): the bits land in the high
    half of each 32-bit lane, exact."""
    if isinstance(value.type, ir.VectorType):
        n = value.type.count
        wide = builder.zext(value, ir.VectorType(_i32, n))
        wide = builder.shl(wide, ir.Constant(ir.VectorType(_i32, n), [16] * n))
        return builder.bitcast(wide, ir.VectorType(_f32, n))
    return builder.bitcast(builder.shl(builder.zext(value, _i32), ir.Constant(_i32, 16)), _f32)


def _splat(builder, value, width: int):
    """A scalar float32 repeated in every lane of a <width x float>."""
    vec = ir.VectorType(_f32, width)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_i32, width), [0] * width))


def _store_sums(builder, accs, width: int, optr, stride):
    """out[j * stride] = the lane sum of accumulator j (a <width x float> alloca), for each j."""
    for j, acc in enumerate(accs):
        builder.store(_sum_lanes(builder, builder.load(acc), width),
                      builder.gep(optr, [builder.mul(_const(j), stride)]))


def _add_product(builder, slot, a, b) -> None:
    """*slot += a * b (vectors; the safe fast flags: may fuse into an FMA)."""
    builder.store(builder.fadd(builder.load(slot), builder.fmul(a, b, flags=_FAST), flags=_FAST),
                  slot)


def _sum_lanes(builder, vec, width: int):
    """Tree reduction of a <width x float> to its float32 sum."""
    while width > 1:
        width //= 2
        left = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_i32, width),
                                                              list(range(width))))
        right = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_i32, width),
                                                               list(range(width, 2 * width))))
        vec = builder.fadd(left, right, flags=_FAST)
    return builder.extract_element(vec, ir.Constant(_i32, 0))


# --- the MXFP4 matvec: E2M1 values looked up as bf16 bytes -------------------------------------
# Every E2M1 value is exact in bf16, and a bf16 widens to float32 by landing in the high half of a
# 32-bit lane. So two pshufb tables (the bf16's high byte, its low byte), one byte interleave and
# a shift or a mask turn 32 nibbles into 32 float32s with no int->float conversion and no
# lane-crossing shuffle: ~15 vector instructions per 32 weights (the int8 table + sign-extend +
# convert way took ~25 and saturated the shuffle ports). With AVX-512 the same instructions take
# two blocks at once (`_e2m1_decode(..., lanes=4)`). The price is the order the values come out
# in (`kernels.lane_order`); x is put in that order once per matvec (it is shared by all rows).

_E2M1_BF16 = [int(b) for b in (np.asarray([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
                               .view(np.uint32) >> 16)]
_E2M1_BF16 += [b | 0x8000 for b in _E2M1_BF16]  # nibble bit 3 is the sign


def _decode_order(lanes: int) -> list[int]:
    """Element (of `lanes // 2` blocks) in each float lane of `_e2m1_decode(..., lanes)`'s four
    vectors, one after the other. The 128-bit lane L of the nibble vector holds the low (L <
    lanes/2) or high nibbles (elements 2j / 2j+1 of byte j) of block L % (lanes/2); the interleave
    pairs bytes j = half, half+1.. of each 128-bit lane, and the shift (even word) / mask (odd
    word) take every other pair."""
    n = lanes // 2  # blocks
    return [32 * (L % n) + 2 * (half + 2 * d + odd) + L // n for half in (0, 8)
            for odd in (0, 1) for L in range(lanes) for d in range(4)]


MXFP4_LANE_ORDER = tuple(_decode_order(2))  # one block (AVX2): 32 elements
MXFP4_PAIR_ORDER = tuple(_decode_order(4))  # two blocks (AVX-512): 64 elements

# With AVX-512 the matvec's main step takes four blocks (64 bytes, a cache line's worth) and
# needs no byte interleaves: a permute looks each nibble up in a 16-entry table by the low bits of
# its lane. First (`vpermps`, 16 float32 lanes: 8 shifts-and-permutes per 128 weights, 16
# instructions; the pair step takes ~22: byte tables, interleaves, shifts and masks), in one
# process alternating with the pair step (the 20b's expert matvecs from RAM, 4 experts x 24
# layers, Zen 4): 1.17-1.26x, 13-15 GB/s -> 18-19 GB/s against a ~20 GB/s probe. Now `vpermw`
# (32 bf16 lanes, `_e2m1_decode_quad`): half the permutes; the kernel is held by its vector
# instructions (~24 a row per 128 weights with the products), and on the Zen 4 (2026-12-06, one
# process, `benchmarks/ab_decode.py`, 30 alternating tokens) whole tokens took 0.967x the time
# with bf16 dense, 0.979x with q8 dense (exact expert inputs). Float lane j of vector k holds
# element 8j + k of the four blocks: block j // 4's element 8 (j % 4) + k.
MXFP4_QUAD_ORDER = tuple(32 * (i // 4) + 8 * (i % 4) + k for k in range(8) for i in range(16))


def _e2m1_lookup_quad(builder, bptr):
    """The 64 bytes at bptr (four blocks) -> four <32 x i16> of bf16 E2M1 values (unscaled):
    word i of lookup k holds element 4i + k (AVX-512BW `vpermw`, see _e2m1_decode_quad)."""
    v32h = ir.VectorType(ir.IntType(16), 32)
    permute = builder.module.declare_intrinsic("llvm.x86.avx512.permvar.hi.512",
                                               fnty=ir.FunctionType(v32h, [v32h, v32h]))
    words = builder.load(builder.bitcast(bptr, v32h.as_pointer()), align=1)
    table = ir.Constant(v32h, [b - (1 << 16) if b >= 1 << 15 else b for b in _E2M1_BF16] * 2)
    return [builder.call(permute, [table, words if k == 0 else builder.lshr(
        words, ir.Constant(v32h, [4 * k] * 32))]) for k in range(4)]


def _e2m1_decode_quad(builder, bptr):
    """The 64 bytes at bptr (four blocks) -> eight <16 x float> E2M1 values (unscaled), in the
    order MXFP4_QUAD_ORDER (AVX-512BW). `vpermw` looks up 32 16-bit words at once by the low 5
    bits of each: the 64 bytes read as 32 words of 4 nibbles, shifted right by 4k, put nibble k
    in bits 0-3 (bit 4, the next nibble's low bit, picks the table's second copy: the same
    16 bf16 E2M1 values); the bf16 results widen to float32 by a shift (even words) and a mask
    (odd words). Word i of lookup k holds element 4i + k, so float lane j of widened vector
    4p + k holds element 8j + 4p + k: MXFP4_QUAD_ORDER's. Half the permutes of looking up
    float32s (`vpermps`, 16 a step: 8 permutes, 7 shifts per 128 weights; here 4 permutes, 3
    shifts, 8 widening steps)."""
    v16i, v16f = ir.VectorType(_i32, 16), ir.VectorType(_f32, 16)
    looked = [builder.bitcast(w, v16i) for w in _e2m1_lookup_quad(builder, bptr)]
    evens = [builder.bitcast(builder.shl(w, ir.Constant(v16i, [16] * 16)), v16f) for w in looked]
    odds = [builder.bitcast(builder.and_(w, ir.Constant(v16i, [-65536] * 16)), v16f)
            for w in looked]
    return evens + odds


def _e8m0_floats(builder, scale_bytes):
    """<n x i8> E8M0 scale bytes -> <n x float> 2**(s-127): s << 23 is the float32 with
    exponent field s (s = 255 gives inf, as mxfp4.scale_to_f32), and the unsigned max with
    0x00400000 turns s = 0 into the subnormal 2**-127. Exact for every byte."""
    n = scale_bytes.type.count
    vi = ir.VectorType(_i32, n)
    bits = builder.shl(builder.zext(scale_bytes, vi), ir.Constant(vi, [23] * n))
    least = ir.Constant(vi, [0x00400000] * n)
    bits = builder.select(builder.icmp_unsigned(">", bits, least), bits, least)
    return builder.bitcast(bits, ir.VectorType(_f32, n))


def _e8m0_quad(builder, sptr):
    """The 4 scale bytes at sptr -> <16 x float>, block i // 4's scale in lane i (the lanes of
    `_e2m1_decode_quad`)."""
    four = builder.load(builder.bitcast(sptr, ir.VectorType(_i8, 4).as_pointer()), align=1)
    return _spread_quad(builder, _e8m0_floats(builder, four), 0)


def _spread_quad(builder, scales, q: int):
    """<n x float> scales of n blocks -> <16 x float>: those of blocks 4q .. 4q + 3, each in
    the 4 lanes of `_e2m1_decode_quad` that hold its values (one vpermps)."""
    return builder.shuffle_vector(scales, scales, ir.Constant(ir.VectorType(_i32, 16),
                                                              [4 * q + i // 4 for i in range(16)]))


def _nibbles(builder, bptr, lanes: int = 2):
    """The 16 * lanes / 2 bytes at bptr -> a <16 * lanes x i8> of their nibbles, one a byte:
    128-bit lane L holds the low (L < lanes/2) or high nibbles of block L % (lanes/2), byte j of
    a lane the nibble of that block's byte j (elements 2j / 2j+1)."""
    width = 16 * lanes
    vbytes, vwords = ir.VectorType(_i8, width), ir.VectorType(_i32, width // 4)
    packed = builder.load(builder.bitcast(bptr, ir.VectorType(_i8, width // 2).as_pointer()),
                          align=1)
    both = builder.shuffle_vector(packed, packed, ir.Constant(ir.VectorType(_i32, width),
                                                              list(range(width // 2)) * 2))
    shifted = builder.lshr(builder.bitcast(both, vwords),
                           ir.Constant(vwords, [0] * (width // 8) + [4] * (width // 8)))
    return builder.and_(builder.bitcast(shifted, vbytes), ir.Constant(vbytes, [15] * width))


def _e2m1_decode(builder, bptr, lanes: int = 2):
    """The 16 * lanes / 2 bytes at bptr (lanes / 2 blocks: one with AVX2, two with AVX-512) ->
    four <4 * lanes x float> E2M1 values (unscaled), in the order `_decode_order(lanes)` (with
    NEON, one block, `_e2m1_decode_neon`'s order)."""
    if HAVE_NEON:
        return _e2m1_decode_neon(builder, bptr)
    width = 16 * lanes  # bytes of the nibble vector
    vbytes, vwords = ir.VectorType(_i8, width), ir.VectorType(_i32, width // 4)
    vf = ir.VectorType(_f32, width // 4)
    nibbles = _nibbles(builder, bptr, lanes)
    name = "llvm.x86.avx2.pshuf.b" if lanes == 2 else "llvm.x86.avx512.pshuf.b.512"
    pshufb = builder.module.declare_intrinsic(name, fnty=ir.FunctionType(vbytes, [vbytes, vbytes]))
    hi = builder.call(pshufb, [ir.Constant(vbytes, [b >> 8 for b in _E2M1_BF16] * lanes), nibbles])
    lo = builder.call(pshufb, [ir.Constant(vbytes, [b & 0xFF for b in _E2M1_BF16] * lanes),
                               nibbles])
    values = []
    for half in (0, 8):  # bytes j = half..half+7 of each 128-bit lane -> 16-bit words (lo, hi)
        order = [k for lane in range(0, width, 16) for j in range(half, half + 8)
                 for k in (lane + j, width + lane + j)]
        words = builder.bitcast(builder.shuffle_vector(
            lo, hi, ir.Constant(ir.VectorType(_i32, width), order)), vwords)
        values.append(builder.bitcast(builder.shl(words, ir.Constant(vwords, [16] * (width // 4))),
                                      vf))
        values.append(builder.bitcast(builder.and_(words, ir.Constant(vwords, [-65536] * (width // 4))),
                                      vf))
    return values


# NEON's `tbl` looks up 16 bytes in a 16-byte table, as pshufb does in each 128-bit lane. Its
# table here is of float16 rather than bf16: every E2M1 value is exact in float16 too, and its
# low byte is 0, so one table (the high byte) is enough, a zip with zeros makes the float16
# and `fcvtl` widens it to float32, exact. Per 32 weights: and, shift, 2 tbl, 4 zips and 8 fcvtl
# (16) where AVX2 takes ~15 256-bit instructions. The values come out in the plain kernels'
# order (kernels.lane_element): a block's 16 even elements (low nibbles), then its 16 odd ones.
_E2M1_F16_HIGH = [int(h) >> 8 for h in np.asarray(FP4_VALUES, np.float16).view(np.uint16)]


def _tbl(builder, table: list[int], index):
    """NEON `tbl`: byte i of the result is table[index[i]] (a <16 x i8> index, values < 16)."""
    v16 = ir.VectorType(_i8, 16)
    fn = builder.module.declare_intrinsic("llvm.aarch64.neon.tbl1.v16i8",
                                          fnty=ir.FunctionType(v16, [v16, v16]))
    return builder.call(fn, [ir.Constant(v16, table), index])


def _low_high_nibbles(builder, bptr):
    """The 16 bytes at bptr (a block) -> two <16 x i8>: the low nibbles (even elements), the
    high ones (odd elements)."""
    v16 = ir.VectorType(_i8, 16)
    packed = builder.load(builder.bitcast(bptr, v16.as_pointer()), align=1)
    return (builder.and_(packed, ir.Constant(v16, [15] * 16)),
            builder.lshr(packed, ir.Constant(v16, [4] * 16)))


def _e2m1_decode_neon(builder, bptr, natural: bool = False):
    """The block at bptr -> four <8 x float> E2M1 values (unscaled): its even elements, then its
    odd ones; with natural, in element order (two zips more)."""
    v16, v8h = ir.VectorType(_i8, 16), ir.VectorType(ir.HalfType(), 8)
    evens, odds = _low_high_nibbles(builder, bptr)
    if natural:
        i32s = ir.Constant(ir.VectorType(_i32, 16), [k // 2 + 16 * (k % 2) for k in range(16)])
        evens, odds = (builder.shuffle_vector(evens, odds, i32s),
                       builder.shuffle_vector(evens, odds, ir.Constant(
                           ir.VectorType(_i32, 16), [8 + k // 2 + 16 * (k % 2) for k in range(16)])))
    zero = ir.Constant(v16, [0] * 16)
    values = []
    for nibbles in (evens, odds):
        high = _tbl(builder, _E2M1_F16_HIGH, nibbles)
        for half in (0, 8):  # float16 = (0, high byte): bytes half .. half + 7 -> 8 halves
            words = builder.shuffle_vector(zero, high, ir.Constant(ir.VectorType(_i32, 16), [
                k for j in range(half, half + 8) for k in (j, 16 + j)]))
            values.append(builder.fpext(builder.bitcast(words, v8h), ir.VectorType(_f32, 8)))
    return values


MAX_GROUP = 4  # vectors a row-dot intrinsic takes at once (their sums stay in registers)


def _for_group(builder, g, emit, most: int = MAX_GROUP) -> None:
    """emit(group) for the run-time g in 1..most: a switch over `most` copies of the loop, each
    with its `group` sums in registers (a constant g, as decode's 1, folds to one)."""
    end = builder.append_basic_block("group.end")
    switch = builder.switch(g, end)
    for group in range(1, most + 1):
        block = builder.append_basic_block(f"group.{group}")
        switch.add_case(ir.Constant(g.type, group), block)
        builder.position_at_end(block)
        emit(group)
        builder.branch(end)
    builder.position_at_end(end)


PREFETCH_ROWS = 8  # rows ahead the matvecs ask the cache for (mxfp4_matvec_rows, bf16_row_dots,
# q8_row_dot)


def l1d_bytes(cache: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The first core's level-1 data cache in bytes, as Linux's sysfs tells it (None elsewhere)."""
    for index in sorted(Path(cache).glob("index*")):
        try:
            level, kind, size = ((index / name).read_text().strip()
                                 for name in ("level", "type", "size"))
        except OSError:
            continue
        if level == "1" and kind == "Data":
            units = {"K": 1 << 10, "M": 1 << 20}
            return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return None


# The bf16 matvec's line 8 rows ahead (46 KB on the 20b's 2880-column rows) must still be in L1
# when its row comes: on a Zen 5 (48 KB L1D) asking for it made the dense matvecs 1.15x faster; on
# a Zen 4 (32 KB) it is evicted first: without it, ten alternating pairs of bf16 tokens on one
# (2026-12-06) ran faster in 7, slower in 2 (dense matvecs 100.8 -> 89.6 ms a token on average,
# the memory's speed moving ~20 % between runs). So it is asked for only where L1D holds 48 KB
# or more. Not measured on a Zen 3 (32 KB: no prefetch there now).
_L1D = l1d_bytes()
_L1D_HOLDS_AHEAD = _L1D is None or _L1D >= 48 << 10
BF16_PREFETCH = _L1D_HOLDS_AHEAD
# Without it, the few-token bf16 matmul (batched decode: kernels._bf16_rows, which walks the
# columns in chunks, all rows of a chunk before the next) waited on memory: its reads jump from
# row to row, which the hardware prefetcher does not follow. On the Zen 4 (2026-12-06), 60000
# rows of 2880 from RAM, best of 5: 4 tokens 22.9-24.3 ms -> 11.0-11.4 ms with the line 16 rows
# ahead asked into L2 (the one-token matvec: 9.3), 2 tokens 19.6-20.4 -> 10.7-11.0; 8 rows
# ahead 14.8 / 11.3, 4 rows 17.2 / 11.5, 24-32 rows as 16; into L1 (prefetcht0) 16-18 / 15.
FEW_PREFETCH_ROWS = 16

# The same decides where the other prefetches PREFETCH_ROWS ahead (the MXFP4 experts, the int8
# dense rows; also the bench probe's xor_lines) put their line: every cache level (x86
# prefetcht0, locality 3), or L2 and L3 only (prefetcht1, 2), where it waits without evicting the
# lines in use. On the Zen
# 4 (32 KB, 2026-12-06; `benchmarks/ab_decode.py`, 30 alternating tokens each, against
# prefetcht0): the exact MXFP4 expert matvec read 1.2-1.3x faster from RAM, whole tokens 1.10x
# (bf16), 1.22x (q8 dense, float expert inputs), 1.05x (q8 + int8 expert inputs). On the Zen 5
# (48 KB L1D) prefetcht0 stays, as measured there. Not on Intel: on a Xeon with 48 KB L1D
# (2026-12-07, family 6 model 167, LLVM's "rocketlake"; 2 threads) prefetcht1 read the 20b's
# unembedding at 28.3-29.5 GB/s against 22.5-23.0 (the bench probe's best read: 29-30), and
# `ab_decode.py` (30 alternating tokens against prefetcht0) took 0.871x the time a bf16 token,
# 0.902x with q8 dense + int8 expert inputs; the expert matvecs alone within the noise.
PREFETCH_LOCALITY = 3 if _L1D_HOLDS_AHEAD and _CPU.startswith("znver") else 2


def _block_steps(builder, count, first, per_step, run) -> None:
    """run(b, index) for `count` loop steps of per_step blocks from block `first`."""
    with cgutils.for_range(builder, count) as loop:
        run(builder.add(first, builder.mul(loop.index, _const(per_step))), loop.index)


def _sixteens_then_fours(builder, nb, sixteen, four):
    """The AVX-512 kernels' walk over a row's nb blocks: sixteen(b, index) for blocks 16 at a
    time, then four(b, index) for the whole groups of 4 left; returns the first block after
    them (4 * (nb // 4)), where the caller's leftovers start."""
    sixteens = builder.udiv(nb, _const(16))
    _block_steps(builder, sixteens, _const(0), 16, sixteen)
    done = builder.mul(sixteens, _const(16))
    quads = builder.udiv(nb, _const(4))
    _block_steps(builder, builder.sub(quads, builder.udiv(done, _const(4))), done, 4, four)
    return builder.mul(quads, _const(4))


def _mxfp4_dots(builder, bptr, sptr, tptr, xptr, x_len, nb, optr, o_stride, rows: int,
                group: int, prefetch: bool) -> None:
    """The loop of the MXFP4 row-dot intrinsics: `rows` adjacent weight rows (nb blocks each,
    from bptr / sptr) against `group` vectors (x_j = xptr + j * x_len, in lane order), out[j *
    o_stride + r] = row r . x_j. A step decodes one block (four with AVX-512: `quad`) of each
    row once for the group vectors, and loads each x vector once for the rows; a block's
    products are summed, then scaled (exact: a power of two); the sums stay in registers.
    prefetch: ask for the line PREFETCH_ROWS rows ahead of each new line read."""
    def scale_of(b):  # float32 2**(s-127) of block b (counted from the first row's first)
        return builder.load(builder.gep(tptr, [builder.zext(
            builder.load(builder.gep(sptr, [b])), _i64)]))

    def step(b, lanes, accs, index):
        """Blocks b .. b + lanes/2 - 1 of each row: their products with each x_j, scaled, into
        accs[r][j]."""
        width = 4 * lanes  # floats a vector
        vf = ir.VectorType(_f32, width)
        x0 = builder.mul(b, _const(32))
        xs = [[builder.load(builder.bitcast(builder.gep(xptr, [builder.add(builder.mul(
            _const(j), x_len), builder.add(x0, _const(width * i)))]), vf.as_pointer()), align=4)
            for i in range(4)] for j in range(group)]
        for r in range(rows):
            rb = builder.add(b, builder.mul(nb, _const(r)))  # the block, counted from row 0's
            if prefetch and index is not None:  # a new 64-byte line every 64 / (8 lanes) steps
                with builder.if_then(builder.icmp_unsigned("==", builder.urem(
                        index, _const(8 // lanes)), _const(0))):
                    _prefetch(builder, builder.gep(bptr, [builder.mul(builder.add(
                        rb, builder.mul(nb, _const(PREFETCH_ROWS))), _const(16))]))
            w = _e2m1_decode(builder, builder.gep(bptr, [builder.mul(rb, _const(16))]), lanes)
            if lanes == 2:
                scale = _splat(builder, scale_of(rb), width)
            else:  # float lanes 0-3 and 8-11 hold block b's values, 4-7 and 12-15 block b+1's
                two = ir.VectorType(_f32, 2)
                pair = builder.insert_element(builder.insert_element(
                    ir.Constant(two, ir.Undefined), scale_of(rb), ir.Constant(_i32, 0)),
                    scale_of(builder.add(rb, _const(1))), ir.Constant(_i32, 1))
                scale = builder.shuffle_vector(pair, pair, ir.Constant(
                    ir.VectorType(_i32, width), [(f // 4) % 2 for f in range(width)]))
            for j in range(group):
                part = None
                for i in range(4):
                    prod = builder.fmul(w[i], xs[j][i], flags=_FAST)
                    part = prod if part is None else builder.fadd(part, prod, flags=_FAST)
                _add_product(builder, accs[r][j], part, scale)

    def quad(b, accs, index, scales=None):
        """Blocks b .. b + 3 of each row (AVX-512, `_e2m1_decode_quad`), as step; scales[r]:
        row r's four scales in the decoder's lanes, else they are read here."""
        vf = ir.VectorType(_f32, 16)
        x0 = builder.mul(b, _const(32))
        xs = [[builder.load(builder.bitcast(builder.gep(xptr, [builder.add(builder.mul(
            _const(j), x_len), builder.add(x0, _const(16 * k)))]), vf.as_pointer()), align=4)
            for k in range(8)] for j in range(group)]
        for r in range(rows):
            rb = builder.add(b, builder.mul(nb, _const(r)))
            if prefetch:  # a step reads a line's worth of each row
                _prefetch(builder, builder.gep(bptr, [builder.mul(builder.add(
                    rb, builder.mul(nb, _const(PREFETCH_ROWS))), _const(16))]))
            w = _e2m1_decode_quad(builder, builder.gep(bptr, [builder.mul(rb, _const(16))]))
            scale = scales[r] if scales else _e8m0_quad(builder, builder.gep(sptr, [rb]))
            for j in range(group):
                parts = [builder.fmul(w[k], xs[j][k], flags=_FAST) for k in range(8)]
                while len(parts) > 1:  # a tree: a chain of 8 measured 1.04x where this is 1.2x
                    parts = [builder.fadd(parts[i], parts[i + 1], flags=_FAST)
                             for i in range(0, len(parts), 2)]
                _add_product(builder, accs[r][j], parts[0], scale)

    def quads4(b, accs, index):
        """Blocks b .. b + 15 of each row: four quad steps, their 16 scales read at once (one
        shuffle a step then places four). In one process on the Zen 4, alternating: the decode
        matvec 1.14-1.15x with its rows in L2 (reading each step's four scales took ~15 % of
        its time); from RAM the same within the noise (0.95-0.99x: bound there by this VM's
        ~19 GB/s), a gain where memory outpaces the decoding (the Zen 5's ~45 GB/s)."""
        sixteen = ir.VectorType(_i8, 16)
        scales = [_e8m0_floats(builder, builder.load(builder.bitcast(builder.gep(
            sptr, [builder.add(b, builder.mul(nb, _const(r)))]), sixteen.as_pointer()), align=1))
            for r in range(rows)]
        for q in range(4):
            quad(builder.add(b, _const(4 * q)), accs, index,
                 [_spread_quad(builder, row, q) for row in scales])

    def steps(count, first, per_step, run, accs):
        """run(b, accs, index) for `count` steps of per_step blocks from block `first`."""
        _block_steps(builder, count, first, per_step, lambda b, index: run(b, accs, index))

    def zeros(width):
        vf = ir.VectorType(_f32, width)
        return [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * width))
                 for _ in range(group)] for _ in range(rows)]  # (two a vector measured no faster)

    def one(lanes):
        return lambda b, accs, index: step(b, lanes, accs, index)

    def lane_sums(accs, width):
        return [[_sum_lanes(builder, builder.load(acc), width) for acc in row] for row in accs]

    if HAVE_AVX512:  # 16 blocks a loop step, then 4; a leftover pair, then an odd last block
        accs = zeros(16)
        first = _sixteens_then_fours(builder, nb, lambda b, index: quads4(b, accs, index),
                                     lambda b, index: quad(b, accs, index))
        left = builder.sub(nb, first)
        steps(builder.udiv(left, _const(2)), first, 2, one(4), accs)
        tail = zeros(8)
        steps(builder.urem(left, _const(2)), builder.sub(nb, _const(1)), 1,
              lambda b, accs, index: step(b, 2, accs, None), tail)
        sums = [[builder.fadd(a, t, flags=_FAST) for a, t in zip(ra, rt)]
                for ra, rt in zip(lane_sums(accs, 16), lane_sums(tail, 8))]
    else:
        accs = zeros(8)
        steps(nb, _const(0), 1, one(2), accs)
        sums = lane_sums(accs, 8)
    for r, row_sums in enumerate(sums):
        for j, total in enumerate(row_sums):
            builder.store(total, builder.gep(optr, [builder.add(builder.mul(_const(j), o_stride),
                                                                _const(r))]))


def _row_pointers(context, builder, arg_types, args, first: int):
    """The pointers of an MXFP4 row-dot intrinsic's (blocks, b_off, scales, s_off, scale_table,
    xl, x_off) arguments, starting at args[first]: (blocks, scales, table, x)."""
    t, v = arg_types[first:first + 7], args[first:first + 7]
    return (_data(context, builder, t[0], v[0], v[1]), _data(context, builder, t[2], v[2], v[3]),
            _data(context, builder, t[4], v[4]), _data(context, builder, t[5], v[5], v[6]))


@intrinsic
def mxfp4_row_dots(typingctx, g, blocks, b_off, scales, s_off, scale_table, xl, x_off, x_len, nb,
                   out, o_off, o_stride):
    """One MXFP4 weight row against g <= MAX_GROUP vectors: out[o_off + j * o_stride] =
    sum_c w[c] x_j[c] for j < g (float32). blocks/scales: flat uint8, the row's nb blocks start
    at blocks[b_off], scales[s_off]; scale_table: float32, byte s -> 2**(s-127);
    x_j = xl[x_off + j * x_len :] in `kernels.lane_order(nb)` (`kernels.to_lane_order`).
    Each block is decoded once for the g vectors (`_mxfp4_dots`): prefill's few-token matmul
    (g = 1..4) and a lone last row of the decode matvec (g = 1)."""
    sig = types.void(types.intp, blocks, types.intp, scales, types.intp, scale_table, xl,
                     types.intp, types.intp, types.intp, out, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        g, x_len, nb, out_a, o_off, o_stride = args[0], *args[8:]
        bptr, sptr, tptr, xptr = _row_pointers(context, builder, signature.args, args, 1)
        optr = _data(context, builder, signature.args[10], out_a, o_off)
        _for_group(builder, g, lambda group: _mxfp4_dots(
            builder, bptr, sptr, tptr, xptr, x_len, nb, optr, o_stride, 1, group, False))
        return context.get_dummy_value()

    return sig, codegen


MXFP4_ROWS = 2 if HAVE_AVX512 else 1  # rows a call of mxfp4_matvec_rows takes (below)


@intrinsic
def mxfp4_matvec_rows(typingctx, blocks, b_off, scales, s_off, scale_table, xl, x_off, nb, out,
                      o_off):
    """MXFP4_ROWS adjacent MXFP4 weight rows against one vector, decode's matvec: out[o_off + r]
    = row r . x for r < MXFP4_ROWS (arguments as `mxfp4_row_dots`, the rows' blocks from
    b_off); each row's line PREFETCH_ROWS rows ahead is asked for as a line is read. With
    AVX-512 two rows share x's loads: in one process, alternating with the one-row kernel
    without prefetch (the 20b's expert matvecs, 4 experts x 24 layers from RAM, medians of 12
    passes), 1.14x and 1.18x (1.05-1.18x at 2 to 16 rows ahead), and against one row with the
    prefetch 1.04x with the rows in L3, 0.98x from RAM (Zen 4). On the AVX2 path one row a call:
    1.05-1.07x two rows on the Zen 4 (from RAM and L3, one thread or two; two interleaved row
    streams read memory slower than one, see simd.MXFP4_Q8_ROWS), 1.03x whole tokens. Two rows
    without the prefetch ran 0.5x (the hardware prefetcher loses the interleaved streams)."""
    sig = types.void(blocks, types.intp, scales, types.intp, scale_table, xl, types.intp,
                     types.intp, out, types.intp)

    def codegen(context, builder, signature, args):
        nb, out_a, o_off = args[7:]
        bptr, sptr, tptr, xptr = _row_pointers(context, builder, signature.args, args, 0)
        optr = _data(context, builder, signature.args[8], out_a, o_off)
        _mxfp4_dots(builder, bptr, sptr, tptr, xptr, _const(0), nb, optr, _const(0), MXFP4_ROWS,
                    1, True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def mxfp4_matvec_rows_two(typingctx, blocks, b_off, scales, s_off, scale_table, xl, x_off, x_len,
                          nb, out, o_off, o_stride):
    """mxfp4_matvec_rows against two vectors at once (x_j = xl[x_off + j * x_len:], out[o_off +
    j * o_stride + r]): each block decoded once for both, the prefetch kept (batched decode's
    experts that two tokens chose; `mxfp4_row_dots` has no prefetch and takes one row)."""
    sig = types.void(blocks, types.intp, scales, types.intp, scale_table, xl, types.intp,
                     types.intp, types.intp, out, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        x_len, nb, out_a, o_off, o_stride = args[7:]
        bptr, sptr, tptr, xptr = _row_pointers(context, builder, signature.args, args, 0)
        optr = _data(context, builder, signature.args[9], out_a, o_off)
        _mxfp4_dots(builder, bptr, sptr, tptr, xptr, x_len, nb, optr, o_stride, MXFP4_ROWS, 2, True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def mxfp4_block_decode_simd(typingctx, blocks, b_off, scale, out, o_off):
    """Decode the 16-byte block at blocks[b_off] into out[o_off : o_off + 32] (float32, natural
    order: the low nibble of byte j is element 2j); `scale` is the block's 2**(s-127). The same
    byte lookup as the matvec (AVX2 or NEON), put back in order by one shuffle (AVX2) or two
    zips of the nibbles (NEON). Bit-exact: an E2M1 value times a power of two."""
    sig = types.void(blocks, types.intp, types.float32, out, types.intp)

    def codegen(context, builder, signature, args):
        blocks_a, b_off, scale, out_a, o_off = args
        bptr = _data(context, builder, signature.args[0], blocks_a, b_off)
        optr = _data(context, builder, signature.args[3], out_a, o_off)
        v32f = ir.VectorType(_f32, 32)
        i32s = lambda ids: ir.Constant(ir.VectorType(_i32, len(ids)), ids)  # noqa: E731
        w = _e2m1_decode_neon(builder, bptr, natural=True) if HAVE_NEON else _e2m1_decode(
            builder, bptr)  # four <8 x float>, natural (NEON) or in MXFP4_LANE_ORDER
        lanes = builder.shuffle_vector(builder.shuffle_vector(w[0], w[1], i32s(list(range(16)))),
                                       builder.shuffle_vector(w[2], w[3], i32s(list(range(16)))),
                                       i32s(list(range(32))))
        natural = lanes if HAVE_NEON else builder.shuffle_vector(
            lanes, ir.Constant(v32f, ir.Undefined), i32s([MXFP4_LANE_ORDER.index(e)
                                                          for e in range(32)]))
        values = builder.fmul(natural, _splat(builder, scale, 32))
        builder.store(values, builder.bitcast(optr, v32f.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


# --- MXFP4 rows against int8 activations (expert_input="q8", an approximation) ---------------
# llama.cpp quantizes the activations entering its MXFP4 matvecs to int8 blocks of 32 (Q8_0) and
# takes integer dot products; expert_input="q8" does the same (quant.x8_quantize). With AVX2 a
# block is one pshufb of the 16 doubled E2M1 values (0, 1, 2, 3, 4, 6, 8, 12 and negatives:
# exact int8), a sign moved onto x (psign: vpmaddubsw takes an unsigned and a signed operand),
# vpmaddubsw, vpmaddwd by ones and one int -> float conversion: ~11 AVX2 instructions per block
# and row where the float decode takes ~16 (1.4x in a loop on cached rows on the Zen 3). With
# AVX-512 VNNI (`_q8_group`) four blocks go at once, as 64 unsigned bytes: the doubled value
# plus 12 (0 .. 24), so that vpdpbusd (unsigned x signed bytes, four products summed into each
# 32-bit lane) needs no sign step; the 12 * sum(x) this adds is taken off once per group for
# all the rows. Exact integer sums (|sum| <= 32 * 12 * 127 < 2^24): the only rounding is x's
# own, to int8.
# x is read in the order of the decode, in groups of MXFP4_Q8_GROUP blocks (4 with AVX-512 VNNI,
# else 1; the nb % 4 last blocks of a row one by one): a group's even elements (2j of its
# blocks in turn), then its odd ones (kernels.x8_position).
HAVE_VNNI512 = HAVE_AVX512 and "+avx512vnni" in _FEATURES
MXFP4_Q8_GROUP = 4 if HAVE_VNNI512 else 1
MXFP4_Q8_ROWS = 1 if HAVE_VNNI512 else 2  # rows a call of mxfp4_q8_row_dots takes. Two rows
# share x's loads (the AVX2 kernel, bound by its arithmetic: 1.4x the float kernel so on the
# Zen 3), but their two interleaved streams read memory slower: on the Zen 4, the 20b's expert
# matvecs from RAM read 21.5-22.8 GB/s two rows at a time and 32.4-34.8 one row at a time with
# VNNI (the bf16 matvec over the same bytes 36.6), while the AVX2 kernel gained 1.06x from one
# row at a time there (not measured on a Zen 3: it stays at two).
_E2M1_TWICE = [0, 1, 2, 3, 4, 6, 8, 12]
_E2M1_TWICE_I8 = _E2M1_TWICE + [(-v) & 0xFF for v in _E2M1_TWICE]  # nibble bit 3 is the sign
_E2M1_TWICE_U8 = [12 + v for v in _E2M1_TWICE] + [12 - v for v in _E2M1_TWICE]  # (+12: VNNI)
# AVX2 (no VNNI-512) takes the same unsigned bytes, eight blocks a loop step (`_mxfp4_q8_dots`):
# vpmaddubsw multiplies them by x's signed bytes directly (|2 * 24 * 127| fits its int16 sums),
# so the two sign steps a block and row go; the 12 * sum(q) each block's sums gain comes off at
# the end, as a dot product of the row's scales with Q8_OFFSETS sums that the caller computes once
# per x (kernels.x8_offset_sums); the eight blocks' scales are read and multiplied at once.
Q8_OFFSETS = HAVE_AVX2 and not HAVE_VNNI512


def _mxfp4_q8_dots(builder, bptr, sptr, tptr, qptr, dptr, cptr, nb, optr, rows: int) -> None:
    """out[r] = sum_b 2**(s[r, b]-127) * d[b] * sum_i 2 E2M1[r, b, i] * q[b, i] / 2 for `rows`
    adjacent MXFP4 rows: q int8 [nb * 32] in the order above, d float32 [nb] its block scales
    halved (quant.x8_quantize), c float32 [nb] 12 * each block's sum of q (Q8_OFFSETS; else
    unread). Each row's line PREFETCH_ROWS rows ahead is asked for as a line is read. With
    AVX-512 VNNI: 16 blocks a loop step (their scales read at once), then groups of 4, then the
    last nb % 4 blocks one by one (the AVX2 step, into their own sums). With AVX2: eight blocks
    a step as unsigned bytes (Q8_OFFSETS), then the nb % 8 last one by one."""
    v32, v16i16, v8i32, v8f = (ir.VectorType(_i8, 32), ir.VectorType(ir.IntType(16), 16),
                               ir.VectorType(_i32, 8), ir.VectorType(_f32, 8))
    mod = builder.module

    def declare(name, ret, *args):
        return mod.declare_intrinsic(name, fnty=ir.FunctionType(ret, list(args)))

    def prefetch(rb):  # row r's line PREFETCH_ROWS rows ahead of block rb
        _prefetch(builder, builder.gep(bptr, [builder.mul(builder.add(
            rb, builder.mul(nb, _const(PREFETCH_ROWS))), _const(16))]))

    def block_sums(rb, q, offset: bool):
        """AVX2: block rb's products with its 32 int8 x values q, summed four to a lane
        (<8 x float>, exact integers): of 2 E2M1, a sign step putting it on x (vpmaddubsw takes
        one unsigned operand); with offset, of 2 E2M1 + 12, unsigned already (Q8_OFFSETS)."""
        pshufb = declare("llvm.x86.avx2.pshuf.b", v32, v32, v32)
        maddubs = declare("llvm.x86.avx2.pmadd.ub.sw", v16i16, v32, v32)
        maddwd = declare("llvm.x86.avx2.pmadd.wd", v8i32, v16i16, v16i16)
        nibbles = _nibbles(builder, builder.gep(bptr, [builder.mul(rb, _const(16))]))
        w = builder.call(pshufb, [ir.Constant(v32, (_E2M1_TWICE_U8 if offset else _E2M1_TWICE_I8)
                                              * 2), nibbles])
        if offset:
            pairs = builder.call(maddubs, [w, q])
        else:
            psign = declare("llvm.x86.avx2.psign.b", v32, v32, v32)
            pairs = builder.call(maddubs, [builder.call(psign, [w, w]), builder.call(psign, [q, w])])
        return builder.sitofp(builder.call(maddwd, [pairs, ir.Constant(v16i16, [1] * 16)]), v8f)

    def load_q(b):  # x's 32 int8 values of block b
        return builder.load(builder.bitcast(builder.gep(qptr, [builder.mul(b, _const(32))]),
                                            v32.as_pointer()), align=1)

    def block_step(b, accs):  # block b of each row (AVX2 or NEON)
        if HAVE_NEON:
            return _q8_block_neon(builder, bptr, sptr, tptr, qptr, dptr, b, nb, accs, prefetch)
        q, d = load_q(b), builder.load(builder.gep(dptr, [b]))
        for r in range(rows):
            rb = builder.add(b, builder.mul(nb, _const(r)))
            with builder.if_then(builder.icmp_unsigned("==", builder.urem(b, _const(4)),
                                                       _const(0))):  # a new 64-byte line
                prefetch(rb)
            scale = builder.fmul(builder.load(builder.gep(tptr, [builder.zext(
                builder.load(builder.gep(sptr, [rb])), _i64)])), d)  # a power of two times d
            _add_product(builder, accs[r], block_sums(rb, q, False), _splat(builder, scale, 8))

    def zeros(width):
        vf = ir.VectorType(_f32, width)
        return [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * width))
                for _ in range(rows)]

    def eight(b, accs, offsets):  # blocks b .. b + 7 of each row (AVX2: Q8_OFFSETS)
        d8, c8 = (builder.load(builder.bitcast(builder.gep(ptr, [b]), v8f.as_pointer()), align=4)
                  for ptr in (dptr, cptr))
        steps = []  # each row's eight block scales times d (exact: powers of two times d)
        for r in range(rows):
            rb = builder.add(b, builder.mul(nb, _const(r)))
            step = builder.fmul(_e8m0_floats(builder, builder.load(builder.bitcast(
                builder.gep(sptr, [rb]), ir.VectorType(_i8, 8).as_pointer()), align=1)), d8)
            _add_product(builder, offsets[r], step, c8)  # what the +12 adds, taken off at the end
            steps.append(step)
        for k in range(8):
            bk = builder.add(b, _const(k))
            q = load_q(bk)
            for r in range(rows):
                rb = builder.add(bk, builder.mul(nb, _const(r)))
                if k % 4 == 0:  # a new 64-byte line
                    prefetch(rb)
                _add_product(builder, accs[r], block_sums(rb, q, True), builder.shuffle_vector(
                    steps[r], steps[r], ir.Constant(ir.VectorType(_i32, 8), [k] * 8)))

    if Q8_OFFSETS:
        accs, offsets = zeros(8), zeros(8)
        eights = builder.udiv(nb, _const(8))
        _block_steps(builder, eights, _const(0), 8, lambda b, _: eight(b, accs, offsets))
        first = builder.mul(eights, _const(8))
        _block_steps(builder, builder.sub(nb, first), first, 1, lambda b, _: block_step(b, accs))
        sums = [builder.fsub(_sum_lanes(builder, builder.load(acc), 8),
                             _sum_lanes(builder, builder.load(off), 8), flags=_FAST)
                for acc, off in zip(accs, offsets)]
    elif not HAVE_VNNI512:
        width = 4 if HAVE_NEON else 8  # a block's partial sums: i32 lanes of sdot / vpmaddwd
        accs = zeros(width)
        _block_steps(builder, nb, _const(0), 1, lambda b, _: block_step(b, accs))
        sums = [_sum_lanes(builder, builder.load(acc), width) for acc in accs]
    else:
        v16f, v4f = ir.VectorType(_f32, 16), ir.VectorType(_f32, 4)

        def sixteen(b, accs):  # blocks b .. b + 15: four groups, the 16 scales read at once
            d = builder.load(builder.bitcast(builder.gep(dptr, [b]), v16f.as_pointer()), align=4)
            scales = [builder.fmul(_e8m0_floats(builder, builder.load(builder.bitcast(
                builder.gep(sptr, [builder.add(b, builder.mul(nb, _const(r)))]),
                ir.VectorType(_i8, 16).as_pointer()), align=1)), d) for r in range(rows)]
            for g in range(4):
                _q8_group(builder, bptr, qptr, builder.add(b, _const(4 * g)), nb, accs,
                          [_spread_quad(builder, row, g) for row in scales], prefetch)

        def four(b, accs):  # blocks b .. b + 3
            d = builder.load(builder.bitcast(builder.gep(dptr, [b]), v4f.as_pointer()), align=4)
            scales = [_spread_quad(builder, builder.fmul(_e8m0_floats(builder, builder.load(
                builder.bitcast(builder.gep(sptr, [builder.add(b, builder.mul(nb, _const(r)))]),
                                ir.VectorType(_i8, 4).as_pointer()), align=1)), d), 0)
                for r in range(rows)]
            _q8_group(builder, bptr, qptr, b, nb, accs, scales, prefetch)

        accs = zeros(16)
        first = _sixteens_then_fours(builder, nb, lambda b, _: sixteen(b, accs),
                                     lambda b, _: four(b, accs))
        tail = zeros(8)
        _block_steps(builder, builder.sub(nb, first), first, 1, lambda b, _: block_step(b, tail))
        sums = [builder.fadd(_sum_lanes(builder, builder.load(a), 16),
                             _sum_lanes(builder, builder.load(t), 8), flags=_FAST)
                for a, t in zip(accs, tail)]
    for r in range(rows):
        builder.store(sums[r], builder.gep(optr, [_const(r)]))


def _q8_block_neon(builder, bptr, sptr, tptr, qptr, dptr, b, nb, accs, prefetch) -> None:
    """Block b of each row (rows = len(accs)) against its 32 int8 x values, with NEON: the low
    and high nibbles (even and odd elements, the order x is in) looked up as doubled E2M1 values
    (`tbl`, signed bytes), then with dotprod two `sdot`s (four products summed into each of 4
    i32 lanes), else widening multiplies summed pairwise (|sum of 2| <= 2 * 12 * 127 fits in
    i16; LLVM makes them smull/smlal and saddlp). Exact integer sums, converted, scaled into
    accs[r] (<4 x float>)."""
    v16, v4i = ir.VectorType(_i8, 16), ir.VectorType(_i32, 4)
    x0 = builder.mul(b, _const(32))
    q_even, q_odd = (builder.load(builder.bitcast(builder.gep(qptr, [builder.add(x0, _const(k))]),
                                                  v16.as_pointer()), align=1) for k in (0, 16))
    d = builder.load(builder.gep(dptr, [b]))
    sdot = builder.module.declare_intrinsic("llvm.aarch64.neon.sdot.v4i32.v16i8",
                                            fnty=ir.FunctionType(v4i, [v4i, v16, v16]))
    for r, acc in enumerate(accs):
        rb = builder.add(b, builder.mul(nb, _const(r)))
        with builder.if_then(builder.icmp_unsigned("==", builder.urem(b, _const(4)), _const(0))):
            prefetch(rb)  # a new 64-byte line
        low, high = _low_high_nibbles(builder, builder.gep(bptr, [builder.mul(rb, _const(16))]))
        w_even, w_odd = _tbl(builder, _E2M1_TWICE_I8, low), _tbl(builder, _E2M1_TWICE_I8, high)
        if HAVE_DOTPROD:
            sums = builder.call(sdot, [builder.call(sdot, [ir.Constant(v4i, [0] * 4), w_even,
                                                           q_even]), w_odd, q_odd])
        else:
            v16i16, v16i32 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(_i32, 16)
            pairs = builder.add(*(builder.mul(builder.sext(w, v16i16), builder.sext(q, v16i16))
                                  for w, q in ((w_even, q_even), (w_odd, q_odd))))
            wide = builder.sext(pairs, v16i32)
            quarters = [builder.shuffle_vector(wide, wide, ir.Constant(
                ir.VectorType(_i32, 4), list(range(4 * k, 4 * k + 4)))) for k in range(4)]
            sums = builder.add(builder.add(quarters[0], quarters[1]),
                               builder.add(quarters[2], quarters[3]))
        scale = builder.fmul(builder.load(builder.gep(tptr, [builder.zext(
            builder.load(builder.gep(sptr, [rb])), _i64)])), d)  # a power of two times d
        _add_product(builder, acc, builder.sitofp(sums, ir.VectorType(_f32, 4)),
                     _splat(builder, scale, 4))


def _e2m1_twice_u8(builder, packed):
    """64 packed MXFP4 bytes (<64 x i8>: four blocks) -> (evens, odds): their low nibbles (even
    elements) and high nibbles (odd ones) looked up as doubled E2M1 + 12, unsigned (vpdpbusd's
    u8 side; the +12 is undone by lane offsets)."""
    v64, v8i64 = ir.VectorType(_i8, 64), ir.VectorType(_i64, 8)
    pshufb = builder.module.declare_intrinsic("llvm.x86.avx512.pshuf.b.512",
                                              fnty=ir.FunctionType(v64, [v64, v64]))
    table, low = ir.Constant(v64, _E2M1_TWICE_U8 * 4), ir.Constant(v64, [15] * 64)
    high = builder.bitcast(builder.lshr(builder.bitcast(packed, v8i64),
                                        ir.Constant(v8i64, [4] * 8)), v64)
    return (builder.call(pshufb, [table, builder.and_(packed, low)]),
            builder.call(pshufb, [table, builder.and_(high, low)]))


def _q8_group(builder, bptr, qptr, b, nb, accs, scales, prefetch) -> None:
    """Blocks b .. b + 3 of each row against their 128 int8 x values (AVX-512 VNNI): the 64
    bytes' low nibbles (even elements) and high nibbles (odd ones) looked up as doubled E2M1 +
    12, unsigned; vpdpbusd against x's evens, then its odds, from 32-bit lanes that start at
    -12 * the x values they will meet; lane i holds block i // 4's partial sums (the lanes of
    `_spread_quad`): converted to float (exact), times scales[r] into accs[r]."""
    v64, v16i = ir.VectorType(_i8, 64), ir.VectorType(_i32, 16)
    dpbusd = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512",
                                              fnty=ir.FunctionType(v16i, [v16i, v16i, v16i]))

    def dot(acc, unsigned, signed):  # acc + four u8 x s8 products a 32-bit lane
        return builder.call(dpbusd, [acc, builder.bitcast(unsigned, v16i),
                                     builder.bitcast(signed, v16i)])

    x0 = builder.mul(b, _const(32))
    evens, odds = (builder.load(builder.bitcast(builder.gep(qptr, [builder.add(x0, _const(k))]),
                                                v64.as_pointer()), align=1) for k in (0, 64))
    twelve = ir.Constant(v64, [12] * 64)
    bias = builder.sub(ir.Constant(v16i, [0] * 16),
                       dot(dot(ir.Constant(v16i, [0] * 16), twelve, evens), twelve, odds))
    for r, acc in enumerate(accs):
        rb = builder.add(b, builder.mul(nb, _const(r)))
        prefetch(rb)  # a group is a 64-byte line of each row
        w_even, w_odd = _e2m1_twice_u8(builder, builder.load(builder.bitcast(
            builder.gep(bptr, [builder.mul(rb, _const(16))]), v64.as_pointer()), align=1))
        sums = builder.sitofp(dot(dot(bias, w_even, evens), w_odd, odds), ir.VectorType(_f32, 16))
        _add_product(builder, acc, sums, scales[r])


@intrinsic
def mxfp4_q8_row_dots(typingctx, blocks, b_off, scales, s_off, scale_table, q, q_off, d, d_off,
                      c, c_off, nb, out, o_off):
    """MXFP4_Q8_ROWS adjacent MXFP4 rows against int8 activations (`_mxfp4_q8_dots`):
    out[o_off + r] for r < MXFP4_Q8_ROWS; the rows' blocks from blocks[b_off], scales[s_off]
    (flat uint8); scale_table float32 byte -> 2**(s-127); q int8 from q_off, d float32 from
    d_off, c float32 from c_off (kernels.x8_offset_sums: read where Q8_OFFSETS)."""
    sig = types.void(blocks, types.intp, scales, types.intp, scale_table, q, types.intp, d,
                     types.intp, c, types.intp, types.intp, out, types.intp)

    def codegen(context, builder, signature, args):
        (blocks_a, b_off, scales_a, s_off, table_a, q_a, q_off, d_a, d_off, c_a, c_off, nb, out_a,
         o_off) = args
        a = signature.args
        _mxfp4_q8_dots(builder, _data(context, builder, a[0], blocks_a, b_off),
                       _data(context, builder, a[2], scales_a, s_off),
                       _data(context, builder, a[4], table_a),
                       _data(context, builder, a[5], q_a, q_off),
                       _data(context, builder, a[7], d_a, d_off),
                       _data(context, builder, a[9], c_a, c_off), nb,
                       _data(context, builder, a[12], out_a, o_off), MXFP4_Q8_ROWS)
        return context.get_dummy_value()

    return sig, codegen


# --- prefill's int8 expert matmul (expert_input="q8", AVX-512 VNNI) ---------------------------
# The matvec above decodes each block for one x; prefill's experts see ~64 tokens each, and the
# float path decodes a tile to float32 for BLAS (FP32 FMAs: 16 products a cycle-slot, where
# vpdpbusd does 64). Here a block's 4 rows are decoded once into registers (pshufb, as
# `_q8_group`) and met by 1-4 tokens' int8 values; each (row, token) keeps its own float sums.
# The u8 x s8 offset (E2M1 doubled + 12) is undone by each token's lane offsets, -12 * the sum
# of the x bytes a 32-bit lane meets (kernels.x8_quantize_blocks), once per token, not per row.
X8_TILES = HAVE_VNNI512 and "+avx512vl" in _FEATURES  # (the nb % 4 last blocks: 256-bit VNNI)
Q8_TILE_ROWS, Q8_TILE_TOKENS = 4, 4  # rows and tokens (at most) a call of mxfp4_q8_tile_dots
# takes: 16 sums, 8 decoded rows, their 4 scales and a token's 4 vectors fill the 32 vector
# registers. On a Zen 4 core, a 512-row tile of the 20b's mlp1 against 64 tokens: 138 GOP/s;
# 4 x 3: 140, 4 x 2: 132, 2 x 8: 114, 2 x 6: 92, 3 x 6: 90, 5 x 3: 79, 6 x 2: 81 (spilling).


def _x8_tile(builder, bptr, sptr, tptr, qptr, q_len, dptr, d_len, cptr, c_len, nb, optr, o_row,
             o_tok, tokens: int) -> None:
    """out[r * o_row + t * o_tok] = sum_b 2**(s[r, b]-127) * d[t, b] * sum_i 2 E2M1[r, b, i] *
    q[t, b, i] for Q8_TILE_ROWS adjacent MXFP4 rows (nb * 16 bytes apart) and `tokens` tokens
    (q int8 in kernels.x8_position order, q_len apart; d float32, d_len apart; c int32 lane
    offsets, c_len apart). Groups of 4 blocks with 512-bit vpdpbusd, then the nb % 4 last blocks
    one by one with 256-bit ones (AVX512-VL); exact integer sums, one float scale a block."""
    R = Q8_TILE_ROWS
    v64, v16i, v16f = ir.VectorType(_i8, 64), ir.VectorType(_i32, 16), ir.VectorType(_f32, 16)
    v32, v8i, v8f, v2i64 = (ir.VectorType(_i8, 32), ir.VectorType(_i32, 8), ir.VectorType(_f32, 8),
                            ir.VectorType(_i64, 2))
    mod = builder.module

    def declare(name, ret, *args):
        return mod.declare_intrinsic(name, fnty=ir.FunctionType(ret, list(args)))

    dpbusd = declare("llvm.x86.avx512.vpdpbusd.512", v16i, v16i, v16i, v16i)
    pshufb256 = declare("llvm.x86.avx2.pshuf.b", v32, v32, v32)
    dpbusd256 = declare("llvm.x86.avx512.vpdpbusd.256", v8i, v8i, v8i, v8i)
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16))
             for _ in range(tokens)] for _ in range(R)]

    def load(ptr, vec, index, align=1):
        return builder.load(builder.bitcast(builder.gep(ptr, [index]), vec.as_pointer()),
                            align=align)

    def group(b, _):  # blocks b .. b + 3 of every row, against every token
        rows = []
        for r in range(R):
            rb = builder.add(b, builder.mul(nb, _const(r)))
            _prefetch(builder, builder.gep(bptr, [builder.mul(builder.add(
                rb, builder.mul(nb, _const(PREFETCH_ROWS))), _const(16))]))  # (batched decode)
            rows.append((*_e2m1_twice_u8(builder, load(bptr, v64, builder.mul(rb, _const(16)))),
                         _spread_quad(builder, _e8m0_floats(builder, load(
                             sptr, ir.VectorType(_i8, 4), rb)), 0)))
        g = builder.udiv(b, _const(4))
        for t in range(tokens):
            x0 = builder.add(builder.mul(_const(t), q_len), builder.mul(b, _const(32)))
            evens, odds = load(qptr, v64, x0), load(qptr, v64, builder.add(x0, _const(64)))
            offsets = load(cptr, v16i, builder.add(builder.mul(_const(t), c_len),
                                                   builder.mul(g, _const(16))), 4)
            d = _spread_quad(builder, load(dptr, ir.VectorType(_f32, 4), builder.add(
                builder.mul(_const(t), d_len), b), 4), 0)
            for r, (w_even, w_odd, scale) in enumerate(rows):
                sums = builder.call(dpbusd, [builder.call(dpbusd, [
                    offsets, builder.bitcast(w_even, v16i), builder.bitcast(evens, v16i)]),
                    builder.bitcast(w_odd, v16i), builder.bitcast(odds, v16i)])
                _add_product(builder, accs[r][t], builder.sitofp(sums, v16f),
                             builder.fmul(scale, d))

    quads = builder.udiv(nb, _const(4))
    first = builder.mul(quads, _const(4))  # the first block of the nb % 4 last

    def single(b, _):  # block b alone (32 bytes of x: its evens, then its odds)
        table, low = ir.Constant(v32, _E2M1_TWICE_U8 * 2), ir.Constant(v32, [15] * 32)
        rows = []
        for r in range(R):
            rb = builder.add(b, builder.mul(nb, _const(r)))
            packed = load(bptr, _V16i8, builder.mul(rb, _const(16)))
            high = builder.bitcast(builder.lshr(builder.bitcast(packed, v2i64),
                                                ir.Constant(v2i64, [4] * 2)), _V16i8)
            both = builder.shuffle_vector(packed, high, ir.Constant(ir.VectorType(_i32, 32),
                                                                    list(range(32))))
            scale = builder.load(builder.gep(tptr, [builder.zext(builder.load(
                builder.gep(sptr, [rb])), _i64)]))
            rows.append((builder.call(pshufb256, [table, builder.and_(both, low)]), scale))
        slot = builder.add(builder.mul(quads, _const(16)), builder.mul(builder.sub(b, first),
                                                                         _const(8)))
        for t in range(tokens):
            x = load(qptr, v32, builder.add(builder.mul(_const(t), q_len),
                                            builder.mul(b, _const(32))))
            offsets = load(cptr, v8i, builder.add(builder.mul(_const(t), c_len), slot), 4)
            d = builder.load(builder.gep(dptr, [builder.add(builder.mul(_const(t), d_len), b)]))
            for r, (w, scale) in enumerate(rows):
                sums = builder.sitofp(builder.call(dpbusd256, [
                    offsets, builder.bitcast(w, v8i), builder.bitcast(x, v8i)]), v8f)
                wide = builder.shuffle_vector(sums, ir.Constant(v8f, [0.0] * 8), ir.Constant(
                    ir.VectorType(_i32, 16), list(range(16))))
                _add_product(builder, accs[r][t], wide,
                             _splat(builder, builder.fmul(scale, d), 16))

    _block_steps(builder, quads, _const(0), 4, group)
    _block_steps(builder, builder.sub(nb, first), first, 1, single)
    for r in range(R):
        for t in range(tokens):
            builder.store(_sum_lanes(builder, builder.load(accs[r][t]), 16), builder.gep(
                optr, [builder.add(builder.mul(_const(r), o_row), builder.mul(_const(t), o_tok))]))


@intrinsic
def mxfp4_q8_tile_dots(typingctx, g, blocks, b_off, scales, s_off, scale_table, q, q_off, q_len,
                       d, d_off, d_len, c, c_off, c_len, nb, out, o_off, o_row, o_tok):
    """Q8_TILE_ROWS adjacent MXFP4 rows against g <= Q8_TILE_TOKENS tokens' int8 x (`_x8_tile`,
    AVX-512 VNNI only): out[o_off + r * o_row + t * o_tok]. The rows' blocks from blocks[b_off],
    scales from scales[s_off] (flat uint8); scale_table float32 byte -> 2**(s-127); token t's q int8
    from q[q_off + t * q_len], halved scales d from d[d_off + t * d_len], lane offsets c from
    c[c_off + t * c_len] (kernels.x8_quantize_blocks)."""
    ip = types.intp
    sig = types.void(ip, blocks, ip, scales, ip, scale_table, q, ip, ip, d, ip, ip, c, ip, ip, ip,
                     out, ip, ip, ip)

    def codegen(context, builder, signature, args):
        a = signature.args
        (g, blocks_a, b_off, scales_a, s_off, table_a, q_a, q_off, q_len, d_a, d_off, d_len, c_a,
         c_off, c_len, nb, out_a, o_off, o_row, o_tok) = args
        ptrs = (_data(context, builder, a[1], blocks_a, b_off),
                _data(context, builder, a[3], scales_a, s_off),
                _data(context, builder, a[5], table_a),
                _data(context, builder, a[6], q_a, q_off))
        dptr = _data(context, builder, a[9], d_a, d_off)
        cptr = _data(context, builder, a[12], c_a, c_off)
        optr = _data(context, builder, a[16], out_a, o_off)
        if X8_TILES:  # (elsewhere never called: kernels.mxfp4_q8_matmul_rows)
            _for_group(builder, g, lambda tokens: _x8_tile(
                builder, *ptrs, q_len, dptr, d_len, cptr, c_len, nb, optr, o_row, o_tok, tokens),
                Q8_TILE_TOKENS)
        return context.get_dummy_value()

    return sig, codegen


def _scale_at(builder, sptr, index):
    """Scale `index` of an int8 weight row (bf16 bits, quant.py) as float32."""
    return _widen(builder, builder.load(builder.gep(sptr, [index])))


@intrinsic
def q8_row_dot(typingctx, q, q_off, scales, s_off, x, nb):
    """sum over one int8 row of scale[b] * q[32b + j] * x[32b + j] (float32), 32 values a step.

    q: flat int8 array (row starts at q_off), scales: flat bf16 bits (uint16; the row's first at
    s_off),
    x: float32 [nb * 32]. Rows are nb * 32 bytes apart: every other step (a 64-byte line) asks
    for the line PREFETCH_ROWS rows ahead. Plain LLVM vector IR: portable, no CPU-specific
    instruction."""
    if not _is_bf16(scales):
        return None  # the weights' copies keep bf16 scales
    sig = types.float32(q, types.intp, scales, types.intp, x, types.intp)

    def codegen(context, builder, signature, args):
        q_a, q_off, s_a, s_off, x_a, nb = args
        a = signature.args
        v32i8, v32i32, v32f = (ir.VectorType(t, 32) for t in (_i8, _i32, _f32))
        qptr = _data(context, builder, a[0], q_a, q_off)
        sptr = _data(context, builder, a[2], s_a, s_off)
        xptr = _data(context, builder, a[4], x_a)
        acc_slot = cgutils.alloca_once_value(builder, ir.Constant(v32f, [0.0] * 32))
        with cgutils.for_range(builder, nb) as loop:
            off = builder.mul(loop.index, ir.Constant(_i64, 32))
            with builder.if_then(builder.icmp_unsigned("==", builder.and_(loop.index, _const(1)),
                                                       _const(0))):
                _prefetch(builder, builder.gep(qptr, [builder.add(off, builder.mul(
                    nb, _const(32 * PREFETCH_ROWS)))]))
            qv = builder.load(builder.bitcast(builder.gep(qptr, [off]), v32i8.as_pointer()), align=1)
            xv = builder.load(builder.bitcast(builder.gep(xptr, [off]), v32f.as_pointer()), align=4)
            splat = _splat(builder, _scale_at(builder, sptr, loop.index), 32)
            prod = builder.fmul(builder.sitofp(builder.sext(qv, v32i32), v32f), xv, flags=_FAST)
            _add_product(builder, acc_slot, prod, splat)
        return _sum_lanes(builder, builder.load(acc_slot), 32)

    return sig, codegen


def _few_token_dots(builder, rows: int, group: int, steps, x_len, xptr, optr, o_stride,
                    row_values) -> None:
    """The loop of the few-token row dots (bf16 and int8 rows): `steps` steps of 32 columns;
    row_values(index, off, rr) gives row rr's 32 values of step `index` (column `off`) as
    <32 x float>; each x load serves every row; optr[j * o_stride + rr] = the sums."""
    v32f = ir.VectorType(_f32, 32)
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(v32f, [0.0] * 32))
             for _ in range(group)] for _ in range(rows)]
    with cgutils.for_range(builder, steps) as loop:
        off = builder.mul(loop.index, _const(32))
        ws = [row_values(loop.index, off, rr) for rr in range(rows)]
        for j in range(group):
            xj = builder.gep(xptr, [builder.add(builder.mul(_const(j), x_len), off)])
            xv = builder.load(builder.bitcast(xj, v32f.as_pointer()), align=4)
            for rr in range(rows):  # x's loads serve both rows
                _add_product(builder, accs[rr][j], ws[rr], xv)
    for rr in range(rows):
        _store_sums(builder, accs[rr], 32, builder.gep(optr, [_const(rr)]), o_stride)


def _q8_dots(rows: int):
    """The codegen of q8_row_dots (rows=1) and q8_row_pair_dots (rows=2)."""

    def codegen(context, builder, signature, args):
        g, q_a, q_off, s_a, s_off, x_a, x_off, x_len, nb, out_a, o_off, o_stride = args
        a = signature.args
        v32i8, v32i32, v32f = (ir.VectorType(t, 32) for t in (_i8, _i32, _f32))
        qptr = _data(context, builder, a[1], q_a, q_off)
        sptr = _data(context, builder, a[3], s_a, s_off)
        xptr = _data(context, builder, a[5], x_a, x_off)
        optr = _data(context, builder, a[9], out_a, o_off)

        def row_values(index, off, rr):  # row rr: x_len bytes of q, x_len / 32 scales after
            roff = builder.add(off, builder.mul(x_len, _const(rr)))
            with builder.if_then(builder.icmp_unsigned("==", builder.and_(index, _const(1)),
                                                       _const(0))):
                _prefetch(builder, builder.gep(qptr, [builder.add(roff, builder.mul(
                    x_len, _const(FEW_PREFETCH_ROWS)))]), 2)
            qv = builder.load(builder.bitcast(builder.gep(qptr, [roff]), v32i8.as_pointer()),
                              align=1)
            scale = _scale_at(builder, sptr, builder.add(index, builder.mul(
                builder.udiv(x_len, _const(32)), _const(rr))))
            return builder.fmul(builder.sitofp(builder.sext(qv, v32i32), v32f),
                                _splat(builder, scale, 32), flags=_FAST)

        def tokens(group):
            _few_token_dots(builder, rows, group, nb, x_len, xptr, optr, o_stride, row_values)

        _for_group(builder, g, tokens)
        return context.get_dummy_value()

    return codegen


def _q8_dots_signature(q, scales, x, out):
    if not _is_bf16(scales):
        return None  # the weights' copies keep bf16 scales
    ip = types.intp
    return types.void(ip, q, ip, scales, ip, x, ip, ip, ip, out, ip, ip)


@intrinsic
def q8_row_dots(typingctx, g, q, q_off, scales, s_off, x, x_off, x_len, nb, out, o_off, o_stride):
    """`q8_row_dot` of nb blocks of an int8 row against g <= MAX_GROUP float32 vectors (x_j =
    x[x_off + j * x_len:]): out[o_off + j * o_stride]. Each block is converted and scaled once
    for the g vectors (a few tokens: batched decode); the line FEW_PREFETCH_ROWS rows ahead is
    asked into L2 (q's rows x_len bytes apart), as the few-token bf16 rows do."""
    sig = _q8_dots_signature(q, scales, x, out)
    return None if sig is None else (sig, _q8_dots(1))


@intrinsic
def q8_row_pair_dots(typingctx, g, q, q_off, scales, s_off, x, x_off, x_len, nb, out, o_off,
                     o_stride):
    """`q8_row_dots` of two rows at once, q_off's and the one x_len after it (scales x_len / 32
    after): out[o_off + j * o_stride + rr] for row rr in 0, 1; each x load serves both rows."""
    sig = _q8_dots_signature(q, scales, x, out)
    return None if sig is None else (sig, _q8_dots(2))


def _bf16_dots():
    """The codegen of bf16_row_dots."""

    def codegen(context, builder, signature, args):
        g, w_a, w_off, x_a, x_off, x_len, n, out_a, o_off, o_stride = args
        a = signature.args
        v32i16 = ir.VectorType(ir.IntType(16), 32)
        wptr = _data(context, builder, a[1], w_a, w_off)
        xptr = _data(context, builder, a[3], x_a, x_off)
        optr = _data(context, builder, a[7], out_a, o_off)

        def row(group):
            def row_values(index, off, rr):  # row rr starts x_len after the row before it
                roff = builder.add(off, builder.mul(x_len, _const(rr)))
                if BF16_PREFETCH:  # (64 bytes a step: a line)
                    _prefetch(builder, builder.gep(wptr, [builder.add(roff, builder.mul(
                        x_len, _const(PREFETCH_ROWS)))]))
                elif group > 1:  # a few tokens: their column chunks jump from row to row
                    _prefetch(builder, builder.gep(wptr, [builder.add(roff, builder.mul(
                        x_len, _const(FEW_PREFETCH_ROWS)))]), 2)
                return _widen(builder, builder.load(builder.bitcast(
                    builder.gep(wptr, [roff]), v32i16.as_pointer()), align=2))

            _few_token_dots(builder, 1, group, builder.udiv(n, _const(32)), x_len, xptr,
                            optr, o_stride, row_values)

        _for_group(builder, g, row)
        return context.get_dummy_value()

    return codegen


def _bf16_dots_signature(w, x, out):
    return types.void(types.intp, w, types.intp, x, types.intp, types.intp, types.intp, out,
                      types.intp, types.intp)


@intrinsic
def bf16_row_dots(typingctx, g, w, w_off, x, x_off, x_len, n, out, o_off, o_stride):
    """One bf16 row against g <= MAX_GROUP float32 vectors: out[o_off + j * o_stride] =
    sum_{c < n} w[w_off + c] * x[x_off + j * x_len + c] for j < g, 32 values a step (n a multiple
    of 32: the tail is the caller's). Each uint16 widens to float32 by a shift into the high half,
    once for the g vectors. w's rows are x_len apart: each step asks for the line PREFETCH_ROWS
    rows ahead where L1D is large enough (BF16_PREFETCH; on the 20b's unembedding, in one process
    alternating with the kernel without it: 1.13-1.38x, medians of 10, 4 to 16 rows ahead, Zen 5).
    Plain LLVM vector IR."""
    return _bf16_dots_signature(w, x, out), _bf16_dots()


# The few-token bf16 matmul with AVX-512 (batched decode, short prefills: 2-4 tokens) takes four
# rows a step, each x load serving all four (two rows a step, as it was, were held by their x
# loads: 8 loads of x and 2 of w for 16 multiply-adds), and x's columns in BF16_SPLIT_ORDER: 32
# bf16 of a row load as 16 32-bit lanes, the even columns widen by one shift, the odd ones by one mask (`_widen`: two
# zero-extends and two shifts per 32). Per 32 columns and four tokens: 4 loads of w, 8 of x, 8
# widening instructions, 32 multiply-adds into 16 <16 x float> sums (and 4 x + 8 w registers).
BF16_SPLIT_ORDER = [2 * i for i in range(16)] + [2 * i + 1 for i in range(16)]  # x within 32


def _bf16_split_dots(rows: int):
    """The codegen of bf16_split_row_dots: `rows` rows (1, 2 or 4) against g <= MAX_GROUP x.
    Its own loop rather than `_few_token_dots`: a row's even and odd products go into one
    <16 x float> sum, where `_few_token_dots`' <32 x float> sums would take all 32 vector
    registers for four rows and four tokens."""

    def codegen(context, builder, signature, args):
        g, w_a, w_off, x_a, x_off, x_len, n, out_a, o_off, o_stride = args
        a = signature.args
        v16i32, v16f = ir.VectorType(_i32, 16), ir.VectorType(_f32, 16)
        wptr = _data(context, builder, a[1], w_a, w_off)
        xptr = _data(context, builder, a[3], x_a, x_off)
        optr = _data(context, builder, a[7], out_a, o_off)
        high = ir.Constant(v16i32, [0xFFFF0000 - (1 << 32)] * 16)  # (as a signed i32)
        shift = ir.Constant(v16i32, [16] * 16)

        def tokens(group):
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(v16f, [0.0] * 16))
                     for _ in range(group)] for _ in range(rows)]
            with cgutils.for_range(builder, builder.udiv(n, _const(32))) as loop:
                off = builder.mul(loop.index, _const(32))
                halves = []
                for rr in range(rows):
                    roff = builder.add(off, builder.mul(x_len, _const(rr)))
                    _prefetch(builder, builder.gep(wptr, [builder.add(roff, builder.mul(
                        x_len, _const(FEW_PREFETCH_ROWS)))]), 2)
                    pairs = builder.load(builder.bitcast(builder.gep(wptr, [roff]),
                                                         v16i32.as_pointer()), align=2)
                    halves.append((builder.bitcast(builder.shl(pairs, shift), v16f),
                                   builder.bitcast(builder.and_(pairs, high), v16f)))
                for j in range(group):
                    xj = builder.gep(xptr, [builder.add(builder.mul(_const(j), x_len), off)])
                    even = builder.load(builder.bitcast(xj, v16f.as_pointer()), align=4)
                    odd = builder.load(builder.bitcast(builder.gep(xj, [_const(16)]),
                                                       v16f.as_pointer()), align=4)
                    for rr in range(rows):
                        _add_product(builder, accs[rr][j], halves[rr][0], even)
                        _add_product(builder, accs[rr][j], halves[rr][1], odd)
            for rr in range(rows):
                _store_sums(builder, accs[rr], 16, builder.gep(optr, [_const(rr)]), o_stride)

        _for_group(builder, g, tokens)
        return context.get_dummy_value()

    return codegen


@intrinsic
def bf16_split_row_dots(typingctx, rows, g, w, w_off, x, x_off, x_len, n, out, o_off, o_stride):
    """`rows` (a literal 1, 2 or 4) bf16 rows, w_off's and those x_len after it, against g <=
    MAX_GROUP float32 vectors whose columns are in BF16_SPLIT_ORDER within each 32 (the even
    ones, then the odd ones): out[o_off + j * o_stride + rr] = sum_{c < n} w[row rr, c] x_j[c],
    32 columns a step (n a multiple of 32). Each step asks for the line FEW_PREFETCH_ROWS rows
    ahead into L2, as `bf16_row_dots` does for a few tokens."""
    if not isinstance(rows, types.IntegerLiteral) or rows.literal_value not in (1, 2, 4):
        return None
    sig = types.void(rows, *_bf16_dots_signature(w, x, out).args)
    codegen = _bf16_split_dots(rows.literal_value)
    return sig, lambda context, builder, signature, args: codegen(
        context, builder, types.void(*signature.args[1:]), args[1:])


# --- decode attention: one KV head's 8 query heads (gpt-oss: 64 query heads on 8 KV heads) ------

QK_HEADS, QK_DIM = 8, 64  # the shape the two kernels below are written for (both gpt-oss models)


QK_KEYS = 8  # keys a step of qk8_scores: their sums stay in registers while a q row is reused
QK_PREFETCH_KEYS = 64  # keys ahead qk8_scores asks the cache for: its 64 loads per key keep few
# misses in flight by themselves (16 keys: 14 % less time at 4096 keys from memory than none; 32
# keys: 1.10x 16 on the Zen 5 in one process, 64 or 128 in between). Into L2, not L1
# (ATTENTION_LOCALITY): on the Zen 4, in one process, 12 layers' 4096 keys from RAM, 64 keys
# into L2 took 1.13-1.27x less time than 32 into L1 (32 or 96 into L2 about the same as 64;
# 64 into L1 or non-temporal slower)
ATTENTION_LOCALITY = 2  # where the decode attention kernels prefetch to: L2 (their lines are read
# once, while L1 holds the q rows or the chunk of values being summed; weighted_rows64 too took
# 1.04-1.07x less time so than into L1, on the Zen 4)


def _transpose8(builder, rows):
    """8 <8 x float> rows -> their 8 columns (an 8x8 transpose, in-lane shuffles + lane swaps)."""
    i32v8 = ir.VectorType(_i32, 8)

    def shuffle(a, b, order):
        return builder.shuffle_vector(a, b, ir.Constant(i32v8, order))

    lo32, hi32 = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    lo64, hi64 = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    t = [shuffle(rows[i], rows[i + 1], order) for i in range(0, 8, 2) for order in (lo32, hi32)]
    u = [shuffle(t[i + j], t[i + j + 2], order) for i in (0, 4) for j in (0, 1)
         for order in (lo64, hi64)]
    # u[c] (c < 4): rows 0-3 of column c in its low 128 bits, of column c + 4 in its high 128
    # bits; u[c + 4]: the same for rows 4-7
    return [shuffle(u[c], u[c + 4], order) for order in ([0, 1, 2, 3, 8, 9, 10, 11],
                                                         [4, 5, 6, 7, 12, 13, 14, 15])
            for c in range(4)]


@intrinsic
def qk8_scores(typingctx, qt, q_off, keys, k_off, count, scale, out, o_off, o_stride):
    """out[o_off + m * o_stride + t] = scale * sum_d keys[k_off + 64t + d] * qt[q_off + 8d + m]
    for t < count, m < 8 (float32): one KV head's 8 queries (transposed: qt [64, 8]) against
    `count` keys [count, 64], float32 or bf16 bits (widened as loaded: half the bytes, but a
    load, a shift and a broadcast from a register instead of one broadcast load, 1.1-1.2x the
    float32 time on the Zen 5). The 8 queries fill one vector, so a key element is one broadcast
    and one FMA with no horizontal sum. Keys go eight at a time: each q row is loaded once for the
    eight (the 64 rows don't fit in registers), the eight sums are transposed to 8 scores per
    query and stored as vectors; the last count % 8 keys one by one. Each score is summed over d
    in order."""
    sig = types.void(qt, types.intp, keys, types.intp, types.intp, types.float32, out, types.intp,
                     types.intp)

    def codegen(context, builder, signature, args):
        qt_a, q_off, keys_a, k_off, count, scale, out_a, o_off, o_stride = args
        a = signature.args
        v8f = ir.VectorType(_f32, QK_HEADS)
        qptr = _data(context, builder, a[0], qt_a, q_off)
        kptr = _data(context, builder, a[2], keys_a, k_off)
        optr = _data(context, builder, a[6], out_a, o_off)
        splat_scale = _splat(builder, scale, QK_HEADS)
        bf16 = _is_bf16(a[2])
        per_line = 32 if bf16 else 16  # keys' elements a 64-byte line

        def sums(t0, n):  # [n x <8 x float>]: key t0 + i against the 8 queries
            accs = [None] * n
            for d in range(QK_DIM):
                qd = builder.load(builder.bitcast(builder.gep(qptr, [_const(QK_HEADS * d)]),
                                                  v8f.as_pointer()), align=4)
                for i in range(n):
                    kd = builder.load(builder.gep(kptr, [builder.add(
                        builder.mul(builder.add(t0, _const(i)), _const(QK_DIM)), _const(d))]))
                    kd = _widen(builder, kd) if bf16 else kd
                    prod = builder.fmul(_splat(builder, kd, QK_HEADS), qd, flags=_FMA)
                    accs[i] = prod if accs[i] is None else builder.fadd(accs[i], prod, flags=_FMA)
            return [builder.fmul(acc, splat_scale, flags=_FMA) for acc in accs]

        blocks = builder.sdiv(count, _const(QK_KEYS))
        with cgutils.for_range(builder, blocks) as loop:
            t0 = builder.mul(loop.index, _const(QK_KEYS))
            ahead = builder.mul(builder.add(t0, _const(QK_PREFETCH_KEYS)), _const(QK_DIM))
            for line in range(QK_KEYS * QK_DIM // per_line):
                _prefetch(builder, builder.gep(kptr, [builder.add(ahead, _const(per_line * line))]),
                          ATTENTION_LOCALITY)
            for m, col in enumerate(_transpose8(builder, sums(t0, QK_KEYS))):
                dst = builder.gep(optr, [builder.add(builder.mul(o_stride, _const(m)), t0)])
                builder.store(col, builder.bitcast(dst, v8f.as_pointer()), align=4)
        with cgutils.for_range(builder, count, start=builder.mul(blocks, _const(QK_KEYS))) as loop:
            scores = sums(loop.index, 1)[0]
            for m in range(QK_HEADS):  # query-major: the softmax then reduces contiguous rows
                dst = builder.gep(optr, [builder.add(builder.mul(o_stride, _const(m)), loop.index)])
                builder.store(builder.extract_element(scores, ir.Constant(_i32, m)), dst)
        return context.get_dummy_value()

    return sig, codegen


# Queries a call of weighted_rows64 takes: with AVX-512 four (their 4 x 64 sums in 16 of the 32
# vector registers), so each value row is loaded once for four queries instead of once for each;
# AVX2 (16 registers: one query's sums fill 8) and NEON keep one.
VALUE_QUERIES = 4 if HAVE_AVX512 else 1


@intrinsic
def weighted_rows64(typingctx, g, w, w_off, w_stride, w_qstride, rows, r_off, count, out, o_off,
                    pf_off, pf_rows):
    """out[o_off + 64j + d] += sum_t w[w_off + j * w_qstride + t * w_stride] * rows[r_off + 64t +
    d] for d < 64 and each of g <= VALUE_QUERIES queries j (float32; rows float32 or bf16 bits,
    widened as loaded): attention's weighted sums of value rows, each row loaded once for the g
    queries, their 64g accumulators in registers. While at it, asks the cache for the rows
    pf_off + 64t, t < pf_rows (the caller's next rows; a hint that never faults): a KV head's
    rows then stream in while the previous ones are summed."""
    sig = types.void(types.intp, w, types.intp, types.intp, types.intp, rows, types.intp,
                     types.intp, out, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        g, w_a, w_off, w_stride, w_qstride, rows_a, r_off, count, out_a, o_off, pf_off, pf_rows = args
        a = signature.args
        v64f = ir.VectorType(_f32, QK_DIM)
        bf16 = _is_bf16(a[5])
        per_line = 32 if bf16 else 16  # a row's elements a 64-byte line
        row_type = ir.VectorType(ir.IntType(16), QK_DIM) if bf16 else v64f
        wptr = _data(context, builder, a[1], w_a, w_off)
        rows_base = _data(context, builder, a[5], rows_a)
        rptr, pptr = builder.gep(rows_base, [r_off]), builder.gep(rows_base, [pf_off])
        optr = builder.bitcast(_data(context, builder, a[8], out_a, o_off), v64f.as_pointer())

        def queries(group):
            outs = [builder.gep(optr, [_const(j)]) for j in range(group)]
            accs = [cgutils.alloca_once_value(builder, builder.load(o, align=4)) for o in outs]
            with cgutils.for_range(builder, count) as loop:
                with builder.if_then(builder.icmp_signed("<", loop.index, pf_rows)):
                    row0 = builder.mul(loop.index, _const(QK_DIM))
                    for line in range(QK_DIM // per_line):
                        _prefetch(builder, builder.gep(pptr, [builder.add(
                            row0, _const(per_line * line))]), ATTENTION_LOCALITY)
                row = builder.load(builder.bitcast(builder.gep(
                    rptr, [builder.mul(loop.index, _const(QK_DIM))]), row_type.as_pointer()),
                    align=2 if bf16 else 4)
                row = _widen(builder, row) if bf16 else row
                for j, acc in enumerate(accs):
                    wt = builder.load(builder.gep(wptr, [builder.add(
                        builder.mul(_const(j), w_qstride), builder.mul(loop.index, w_stride))]))
                    _add_product(builder, acc, _splat(builder, wt, QK_DIM), row)
            for acc, o in zip(accs, outs):
                builder.store(builder.load(acc), o, align=4)

        _for_group(builder, g, queries, VALUE_QUERIES)
        return context.get_dummy_value()

    return sig, codegen


# --- prefill's float32 matmul: register blocks of rows x tokens ---------------------------------
# A [M, K] @ x.T for a weight tile A (decoded or widened to float32) and n tokens, as BLAS's
# kernels do it: PANEL_ROWS rows of A against a panel of PANEL_LANES or 2 * PANEL_LANES tokens
# (x packed by kernels.pack_panels: for each step k the tokens side by side), every product an
# FMA into an accumulator that stays in a register for the whole run of k. For the few to a
# hundred tokens an expert sees in a prefill, numpy's OpenBLAS took [512, 2880] @ [2880, n] at
# 49-86 GFLOP/s where this runs 81-103 (one thread, Zen 4: benchmarks/panel_rates.py).

PANEL_LANES = 16 if HAVE_AVX512 else 8  # tokens in a vector; NEON and others: LLVM splits
PANEL_ROWS = 6  # rows of A a block: 6 x 2 accumulators + 2 token vectors + a broadcast fit
# AVX2's 16 registers, as BLAS's Haswell kernel
PANEL_STEP = 8  # tokens are padded to a multiple of this (with AVX-512 the last panel may hold
# 8, 16 or 24 of them, in a 256-bit vector, a 512-bit one or both: less padding to multiply)


def _panel_block(widths: tuple):
    """The codegen of a panel block: out[o_off + i * ldo + t] (+)= sum over k < K of
    a[a_off + i * lda + k] * p[p_off + k * T + t] for i < rows (PANEL_ROWS, else 1), t < T =
    sum(widths): the panel's tokens in vectors of these widths; added to what out holds if
    `add` is non-zero."""
    vecs = [ir.VectorType(_f32, w) for w in widths]
    starts = [sum(widths[:j]) for j in range(len(widths))]
    T = sum(widths)

    def block(builder, rows, aptr, lda, pptr, K, optr, ldo, add):
        fmas = [builder.module.declare_intrinsic(f"llvm.fma.v{v.count}f32",
                                                 fnty=ir.FunctionType(v, [v] * 3)) for v in vecs]
        def out_at(i, t, v):  # out row i, token t, as a vector pointer
            return builder.bitcast(builder.gep(optr, [builder.add(builder.mul(_const(i), ldo),
                                                                  _const(t))]), v.as_pointer())

        outs = [[out_at(i, t, v) for v, t in zip(vecs, starts)] for i in range(rows)]
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(v, [0.0] * v.count))
                 for v in vecs] for _ in range(rows)]
        with builder.if_then(builder.icmp_signed("!=", add, ir.Constant(add.type, 0))):
            for i in range(rows):
                for j in range(len(vecs)):
                    builder.store(builder.load(outs[i][j], align=4), accs[i][j])
        arows = [builder.gep(aptr, [builder.mul(_const(i), lda)]) for i in range(rows)]
        with cgutils.for_range(builder, K) as loop:
            step = builder.gep(pptr, [builder.mul(loop.index, _const(T))])
            xs = [builder.load(builder.bitcast(builder.gep(step, [_const(t)]), v.as_pointer()),
                               align=4) for v, t in zip(vecs, starts)]
            for i in range(rows):
                w = builder.load(builder.gep(arows[i], [loop.index]))
                for j, v in enumerate(vecs):
                    builder.store(builder.call(fmas[j], [_splat(builder, w, v.count), xs[j],
                                                         builder.load(accs[i][j])]), accs[i][j])
        for i in range(rows):
            for j in range(len(vecs)):
                builder.store(builder.load(accs[i][j]), outs[i][j], align=4)

    def codegen(context, builder, signature, args):
        rows, a_a, a_off, lda, p_a, p_off, K, out_a, o_off, ldo, add = args
        sig = signature.args
        ptrs = (_data(context, builder, sig[1], a_a, a_off), lda,
                _data(context, builder, sig[4], p_a, p_off), K,
                _data(context, builder, sig[7], out_a, o_off), ldo, add)
        whole = builder.icmp_signed("==", rows, ir.Constant(rows.type, PANEL_ROWS))
        with builder.if_else(whole) as (six, one):
            with six:
                block(builder, PANEL_ROWS, *ptrs)
            with one:
                block(builder, 1, *ptrs)
        return context.get_dummy_value()

    return codegen


def _panel_intrinsic(widths: tuple):
    def typer(typingctx, rows, a, a_off, lda, p, p_off, K, out, o_off, ldo, add):
        if not all(isinstance(t, types.Array) and t.dtype == types.float32 for t in (a, p, out)):
            return None
        ip = types.intp
        return types.void(ip, a, ip, ip, p, ip, ip, out, ip, ip, add), _panel_block(widths)

    typer.__name__ = f"panel_block_{'_'.join(map(str, widths))}"
    typer.__doc__ = (f"rows (PANEL_ROWS or 1) rows of a against a panel of {sum(widths)} tokens "
                     f"(vectors of {widths}): see _panel_block.")
    return intrinsic(typer)


# The panels: 2 * PANEL_LANES tokens, then a last one of 8, 16 or 24 (AVX-512) or 8 (AVX2)
panel_block = _panel_intrinsic((PANEL_LANES, PANEL_LANES))
panel_block_8 = _panel_intrinsic((8,))
panel_block_16 = _panel_intrinsic((16,))
panel_block_24 = _panel_intrinsic((16, 8))


def _prefetch(builder, ptr, locality: int | None = None) -> None:
    """Ask for the cache line at ptr (to read): a hint, never a fault. locality 3 brings it into
    every cache level (x86 prefetcht0), 2 into L2 and L3 (prefetcht1; ATTENTION_LOCALITY); by
    default PREFETCH_LOCALITY."""
    locality = PREFETCH_LOCALITY if locality is None else locality
    i8p, name = _i8.as_pointer(), "llvm.prefetch.p0"
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, _i32, _i32, _i32]), name)
    builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(_i32, 0),
                      ir.Constant(_i32, locality), ir.Constant(_i32, 1)])


@intrinsic
def xor_lines(typingctx, words, off, count, ahead):
    """The XOR of `count` 64-byte lines of words (uint64) from words[off] (a line's first), as
    uint64: a read of memory that costs no arithmetic (one vector xor a line), for `tinyoss
    bench`'s bandwidth ceiling. ahead > 0: each line also asks for the one `ahead` lines on."""
    sig = types.uint64(words, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        words_a, off, count, ahead = args
        v8 = ir.VectorType(_i64, 8)
        ptr = _data(context, builder, signature.args[0], words_a, off)
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8, [0] * 8))
        fetch = builder.icmp_signed(">", ahead, _const(0))
        with cgutils.for_range(builder, count) as loop:
            line = builder.gep(ptr, [builder.mul(loop.index, _const(8))])
            with builder.if_then(fetch):
                _prefetch(builder, builder.gep(line, [builder.mul(ahead, _const(8))]))
            value = builder.load(builder.bitcast(line, v8.as_pointer()), align=8)
            builder.store(builder.xor(builder.load(acc), value), acc)
        vec, width = builder.load(acc), 8
        while width > 1:
            width //= 2
            vec = builder.xor(*(builder.shuffle_vector(vec, vec, ir.Constant(
                ir.VectorType(_i32, width), list(range(k, k + width)))) for k in (0, width)))
        return builder.extract_element(vec, ir.Constant(_i32, 0))

    return sig, codegen


# --- softmax rows: exp in vector IR ----------------------------------------------------------
# Decode attention exponentiates ~260k scores per dense layer at 4096 tokens of context; numba's
# scalar expf costs ~30 cycles each, numpy's needs the scores in memory between two kernels. This
# is Cephes' expf (range reduction by ln 2, a degree-5 polynomial, the power of two added to the
# exponent bits): within 1 ULP of the true exp down to 1e-36, within 1e-5 relative down to
# FLT_MIN (tests/test_kernels checks it against float64), as numpy's float32 exp; up to 88.72
# finite, as numpy's, then inf. The caller
# must not be fastmath (reassociation folds the two-step reduction). Arguments below EXP_MIN
# give exp(EXP_MIN) ~ 1.2e-38 (the true value would be subnormal or 0): next to the softmax's
# largest term, 1.0, the difference is below float32's resolution. NaN gives 1.2e-38 too: the
# caller propagates NaN itself.

EXP_MIN = -87.33654  # ln(FLT_MIN)
_LOG2E, _LN2_HI, _LN2_LO = 1.44269504088896341, 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)


def _exp(builder, x, width: int):
    """exp of a <width x float>, lane by lane (see above)."""
    vf, vi = ir.VectorType(_f32, width), ir.VectorType(_i32, width)
    const = lambda c: ir.Constant(vf, [float(np.float32(c))] * width)  # noqa: E731
    maxnum = builder.module.declare_intrinsic(f"llvm.maxnum.v{width}f32",
                                              fnty=ir.FunctionType(vf, [vf, vf]))
    floor = builder.module.declare_intrinsic(f"llvm.floor.v{width}f32",
                                             fnty=ir.FunctionType(vf, [vf]))
    x = builder.call(maxnum, [x, const(EXP_MIN)])
    n = builder.call(floor, [builder.fadd(builder.fmul(x, const(_LOG2E)), const(0.5))])
    r = builder.fsub(builder.fsub(x, builder.fmul(n, const(_LN2_HI))), builder.fmul(n, const(_LN2_LO)))
    poly = const(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        poly = builder.fadd(builder.fmul(poly, r, flags=_FMA), const(c), flags=_FMA)
    y = builder.fadd(builder.fadd(builder.fmul(poly, builder.fmul(r, r), flags=_FMA), r), const(1.0))
    # 2**n as 2**h * 2**(n - h), h = n >> 1: both factors normal for n in -126 .. 128 (n = 128,
    # from x = 88.38 on, would be inf's bits in one factor, where numpy's exp is finite up to
    # 88.72); multiplying by powers of two rounds at most once, so every other result is the
    # same as with one factor
    ni = builder.fptosi(n, vi)
    h = builder.ashr(ni, ir.Constant(vi, [1] * width))

    def power(e):
        return builder.bitcast(builder.shl(builder.add(e, ir.Constant(vi, [127] * width)),
                                           ir.Constant(vi, [23] * width)), vf)

    return builder.fmul(builder.fmul(y, power(h)), power(builder.sub(ni, h)))


EXP_LANES = 16 if HAVE_AVX512 else 8  # exps a step of exp_shifted_sum


@intrinsic
def max_nan(typingctx, a, off, count):
    """The float32 max of a[off : off + count] (-inf if count is 0), NaN if any of them is NaN
    (as numpy's max): 16 lanes a step, the last count % 16 one at a time."""
    sig = types.float32(a, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        a_a, off, count = args
        width = 16
        vf = ir.VectorType(_f32, width)
        ptr = _data(context, builder, signature.args[0], a_a, off)
        vmax = builder.module.declare_intrinsic(f"llvm.maximum.v{width}f32",
                                                fnty=ir.FunctionType(vf, [vf, vf]))
        smax = builder.module.declare_intrinsic("llvm.maximum.f32",
                                                fnty=ir.FunctionType(_f32, [_f32, _f32]))
        acc = cgutils.alloca_once_value(builder, ir.Constant(vf, [float("-inf")] * width))
        steps = builder.udiv(count, _const(width))
        with cgutils.for_range(builder, steps) as loop:
            v = builder.load(builder.bitcast(builder.gep(ptr, [builder.mul(loop.index, _const(width))]),
                                             vf.as_pointer()), align=4)
            builder.store(builder.call(vmax, [builder.load(acc), v]), acc)
        vec, lanes = builder.load(acc), width
        while lanes > 1:  # tree reduction (maximum keeps a NaN)
            lanes //= 2
            left, right = (builder.shuffle_vector(vec, vec, ir.Constant(
                ir.VectorType(_i32, lanes), list(range(k, k + lanes)))) for k in (0, lanes))
            vec = builder.call(builder.module.declare_intrinsic(
                f"llvm.maximum.v{lanes}f32", fnty=ir.FunctionType(left.type, [left.type] * 2)),
                [left, right])
        vec = builder.extract_element(vec, ir.Constant(_i32, 0))
        top = cgutils.alloca_once_value(builder, vec)
        with cgutils.for_range_slice(builder, builder.mul(steps, _const(width)), count,
                                     _const(1)) as (t, _):
            builder.store(builder.call(smax, [builder.load(top), builder.load(
                builder.gep(ptr, [t]))]), top)
        return builder.load(top)

    return sig, codegen


@intrinsic
def exp_shifted_sum(typingctx, a, off, count, shift):
    """a[off + t] = exp(a[off + t] - shift) for t < count, in place; returns their float32 sum
    (EXP_LANES a step, the last count % EXP_LANES one at a time)."""
    sig = types.float32(a, types.intp, types.intp, types.float32)

    def codegen(context, builder, signature, args):
        a_a, off, count, shift = args
        width = EXP_LANES
        vf = ir.VectorType(_f32, width)
        ptr = _data(context, builder, signature.args[0], a_a, off)
        splat_shift = _splat(builder, shift, width)
        acc_slot = cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * width))
        steps = builder.udiv(count, _const(width))
        with cgutils.for_range(builder, steps) as loop:
            vptr = builder.bitcast(builder.gep(ptr, [builder.mul(loop.index, _const(width))]),
                                   vf.as_pointer())
            e = _exp(builder, builder.fsub(builder.load(vptr, align=4), splat_shift), width)
            builder.store(e, vptr, align=4)
            builder.store(builder.fadd(builder.load(acc_slot), e), acc_slot)
        total = _sum_lanes(builder, builder.load(acc_slot), width)
        total_slot = cgutils.alloca_once_value(builder, total)
        with cgutils.for_range_slice(builder, builder.mul(steps, _const(width)), count,
                                     _const(1)) as (t, _):  # the last count % width, one by one
            sptr = builder.gep(ptr, [t])
            vec = builder.insert_element(ir.Constant(vf, [float("-inf")] * width),
                                         builder.fsub(builder.load(sptr), shift), ir.Constant(_i32, 0))
            e = builder.extract_element(_exp(builder, vec, width), ir.Constant(_i32, 0))
            builder.store(e, sptr)
            builder.store(builder.fadd(builder.load(total_slot), e), total_slot)
        return builder.load(total_slot)

    return sig, codegen
