"""The few lines numba can't say in Python: a bitcast, and the MXFP4 row dot product in vector IR.

LLVM does not turn a 16-entry table lookup into a SIMD shuffle by itself, and that lookup is the
whole cost of an MXFP4 matvec. Here we write it out for x86 (SSSE3 `pshufb`, which every AVX2 CPU
has): 16 packed bytes -> 32 nibbles -> 32 table values in two instructions. On other CPUs
`HAVE_PSHUFB` is False and kernels.py uses its plain-numba row dot instead.

Both are tested equal to the numpy definition (`mxfp4.decode(...) @ x`).
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

HAVE_PSHUFB = "+ssse3" in llvm.get_host_cpu_features().flatten().split(",") and \
    llvm.get_host_cpu_name() not in ("generic",)

_i8, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16i8, _V16i32, _V16f = ir.VectorType(_i8, 16), ir.VectorType(_i32, 16), ir.VectorType(_f32, 16)
_FAST = ("fast",)  # IR-level fast flags, only on the adds/muls of a dot product (reassociation)

# E2M1 values times two, as int8 (pshufb looks bytes up): nibble -> 2 * value
_E2M1_X2 = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12]


@intrinsic
def as_float32(typingctx, bits):
    """uint32 -> float32 with the same bits (bf16 widening: `as_float32(u << 16)`)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _f32)

    return sig, codegen


def _data(context, builder, aryty, ary):
    return context.make_array(aryty)(context, builder, ary).data


def _splat(builder, value, width: int):
    """A scalar float32 repeated in every lane of a <width x float>."""
    vec = ir.VectorType(_f32, width)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_i32, width), [0] * width))


def _e2m1_lookup(builder, packed):
    """16 packed bytes -> (low nibbles' values, high nibbles' values) as <16 x i8> doubled E2M1
    values: element 2j and element 2j+1 of the block, one pshufb each."""
    pshufb = builder.module.declare_intrinsic(
        "llvm.x86.ssse3.pshuf.b.128", fnty=ir.FunctionType(_V16i8, [_V16i8, _V16i8]))
    lut = ir.Constant(_V16i8, [v & 0xFF for v in _E2M1_X2])
    low4 = ir.Constant(_V16i8, [15] * 16)
    lo = builder.call(pshufb, [lut, builder.and_(packed, low4)])
    hi = builder.call(pshufb, [lut, builder.and_(
        builder.lshr(packed, ir.Constant(_V16i8, [4] * 16)), low4)])
    return lo, hi


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


@intrinsic
def mxfp4_row_dot_pshufb(typingctx, blocks, b_off, scales, s_off, half_scale, xe, xo, x_off, nb):
    """sum over one MXFP4 weight row of w[c] * x[c] (float32).

    blocks/scales: flat uint8 arrays, the row's nb blocks start at blocks[b_off], scales[s_off].
    xe/xo: flat float32 arrays of x's even and odd elements per block ([nb, 16] each, from x_off):
    the low nibble of byte j is element 2j, the high nibble element 2j+1.
    half_scale: float32 table, byte s -> 2**(s-128) (the doubled table values are halved here).
    """
    sig = types.float32(blocks, types.intp, scales, types.intp, half_scale, xe, xo, types.intp,
                        types.intp)

    def codegen(context, builder, signature, args):
        blocks_a, b_off, scales_a, s_off, table_a, xe_a, xo_a, x_off, nb = args
        a = signature.args
        bptr = builder.gep(_data(context, builder, a[0], blocks_a), [b_off])
        sptr = builder.gep(_data(context, builder, a[2], scales_a), [s_off])
        tptr = _data(context, builder, a[4], table_a)
        eptr = builder.gep(_data(context, builder, a[5], xe_a), [x_off])
        optr = builder.gep(_data(context, builder, a[6], xo_a), [x_off])
        acc_slot = cgutils.alloca_once_value(builder, ir.Constant(_V16f, [0.0] * 16))
        with cgutils.for_range(builder, nb) as loop:
            off = builder.mul(loop.index, ir.Constant(_i64, 16))
            packed = builder.load(builder.bitcast(builder.gep(bptr, [off]), _V16i8.as_pointer()),
                                  align=1)  # 16 bytes = 32 nibbles
            lo, hi = _e2m1_lookup(builder, packed)  # elements 0, 2, 4, ... and 1, 3, 5, ...
            flo = builder.sitofp(builder.sext(lo, _V16i32), _V16f)
            fhi = builder.sitofp(builder.sext(hi, _V16i32), _V16f)
            x_even = builder.load(builder.bitcast(builder.gep(eptr, [off]), _V16f.as_pointer()),
                                  align=4)
            x_odd = builder.load(builder.bitcast(builder.gep(optr, [off]), _V16f.as_pointer()),
                                 align=4)
            part = builder.fadd(builder.fmul(flo, x_even, flags=_FAST),
                                builder.fmul(fhi, x_odd, flags=_FAST), flags=_FAST)
            s = builder.load(builder.gep(sptr, [loop.index]))
            scale = builder.load(builder.gep(tptr, [builder.zext(s, _i64)]))
            splat = _splat(builder, scale, 16)
            acc = builder.load(acc_slot)
            builder.store(builder.fadd(acc, builder.fmul(part, splat, flags=_FAST), flags=_FAST),
                          acc_slot)
        return _sum_lanes(builder, builder.load(acc_slot), 16)

    return sig, codegen


@intrinsic
def mxfp4_block_decode_pshufb(typingctx, blocks, b_off, scale, out, o_off):
    """Decode the 16-byte block at blocks[b_off] into out[o_off : o_off + 32] (float32, natural
    order: the low nibble of byte j is element 2j). `scale` is the block's 2**(s-128): the table
    holds doubled values. Bit-exact: a small integer times a power of two."""
    sig = types.void(blocks, types.intp, types.float32, out, types.intp)

    def codegen(context, builder, signature, args):
        blocks_a, b_off, scale, out_a, o_off = args
        bptr = builder.gep(_data(context, builder, signature.args[0], blocks_a), [b_off])
        optr = builder.gep(_data(context, builder, signature.args[3], out_a), [o_off])
        packed = builder.load(builder.bitcast(bptr, _V16i8.as_pointer()), align=1)
        lo, hi = _e2m1_lookup(builder, packed)
        pairs = builder.shuffle_vector(lo, hi, ir.Constant(
            ir.VectorType(_i32, 32), [k for j in range(16) for k in (j, 16 + j)]))  # interleave
        v32f = ir.VectorType(_f32, 32)
        splat = _splat(builder, scale, 32)
        values = builder.fmul(builder.sitofp(builder.sext(pairs, ir.VectorType(_i32, 32)), v32f),
                              splat)
        builder.store(values, builder.bitcast(optr, v32f.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def q8_row_dot(typingctx, q, q_off, scales, s_off, x, nb):
    """sum over one int8 row of scale[b] * q[32b + j] * x[32b + j] (float32), 32 values a step.

    q: flat int8 array (row starts at q_off), scales: flat float32 (row's first at s_off),
    x: float32 [nb * 32]. Plain LLVM vector IR: portable, no CPU-specific instruction."""
    sig = types.float32(q, types.intp, scales, types.intp, x, types.intp)

    def codegen(context, builder, signature, args):
        q_a, q_off, s_a, s_off, x_a, nb = args
        a = signature.args
        v32i8, v32i32, v32f = (ir.VectorType(t, 32) for t in (_i8, _i32, _f32))
        qptr = builder.gep(_data(context, builder, a[0], q_a), [q_off])
        sptr = builder.gep(_data(context, builder, a[2], s_a), [s_off])
        xptr = _data(context, builder, a[4], x_a)
        acc_slot = cgutils.alloca_once_value(builder, ir.Constant(v32f, [0.0] * 32))
        with cgutils.for_range(builder, nb) as loop:
            off = builder.mul(loop.index, ir.Constant(_i64, 32))
            qv = builder.load(builder.bitcast(builder.gep(qptr, [off]), v32i8.as_pointer()), align=1)
            xv = builder.load(builder.bitcast(builder.gep(xptr, [off]), v32f.as_pointer()), align=4)
            splat = _splat(builder, builder.load(builder.gep(sptr, [loop.index])), 32)
            prod = builder.fmul(builder.sitofp(builder.sext(qv, v32i32), v32f), xv, flags=_FAST)
            acc = builder.load(acc_slot)
            builder.store(builder.fadd(acc, builder.fmul(prod, splat, flags=_FAST), flags=_FAST),
                          acc_slot)
        return _sum_lanes(builder, builder.load(acc_slot), 32)

    return sig, codegen


@intrinsic
def bf16_row_dot(typingctx, w, w_off, x, n):
    """sum over one bf16 row of w[j] * x[j] (float32), 32 values a step: each uint16 widens to
    float32 by a shift into the high half. w: flat uint16 array (row starts at w_off), x: float32
    [n], n a multiple of 32 (the tail is left to the caller). Plain LLVM vector IR: portable."""
    sig = types.float32(w, types.intp, x, types.intp)

    def codegen(context, builder, signature, args):
        w_a, w_off, x_a, n = args
        a = signature.args
        v32i16, v32i32, v32f = (ir.VectorType(t, 32) for t in (ir.IntType(16), _i32, _f32))
        wptr = builder.gep(_data(context, builder, a[0], w_a), [w_off])
        xptr = _data(context, builder, a[2], x_a)
        acc_slot = cgutils.alloca_once_value(builder, ir.Constant(v32f, [0.0] * 32))
        steps = builder.udiv(n, ir.Constant(_i64, 32))
        with cgutils.for_range(builder, steps) as loop:
            off = builder.mul(loop.index, ir.Constant(_i64, 32))
            wv = builder.load(builder.bitcast(builder.gep(wptr, [off]), v32i16.as_pointer()), align=2)
            xv = builder.load(builder.bitcast(builder.gep(xptr, [off]), v32f.as_pointer()), align=4)
            wf = builder.bitcast(builder.shl(builder.zext(wv, v32i32),
                                             ir.Constant(v32i32, [16] * 32)), v32f)
            acc = builder.load(acc_slot)
            builder.store(builder.fadd(acc, builder.fmul(wf, xv, flags=_FAST), flags=_FAST),
                          acc_slot)
        return _sum_lanes(builder, builder.load(acc_slot), 32)

    return sig, codegen
