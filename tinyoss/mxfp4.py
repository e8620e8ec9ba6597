"""MXFP4, the format of the expert weights, in plain numpy (the readable definition).

A block is 32 consecutive input elements of one weight row, stored as 16 bytes plus one scale byte:
  - byte j of a block holds element 2j in its LOW nibble and element 2j+1 in its HIGH nibble;
  - a nibble is an E2M1 float: bit 3 the sign, then the magnitude code 0..7 ->
    0, 0.5, 1, 1.5, 2, 3, 4, 6;
  - the scale byte s is E8M0: the whole block is multiplied by 2**(s - 127).

    blocks [..., n_blocks, 16] uint8 + scales [..., n_blocks] uint8  ->  [..., n_blocks * 32] float32

The numba kernels in `kernels.py` decode the same bits on the fly; tests prove them bit-identical
to `decode` here.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # elements per block
BLOCK_BYTES = 16  # bytes per block

# nibble -> value (bit 3 is the sign; -0.0 is code 8)
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
_MAGNITUDES = FP4_VALUES[:8]


def scale_to_f32(scales: np.ndarray) -> np.ndarray:
    """E8M0 byte -> float32 2**(s - 127), built from bits so it is exact for every byte.

    s = 1..254 puts s straight into the float32 exponent field; s = 0 is the subnormal 2**-127;
    s = 255 (E8M0's NaN) becomes 2**128 = inf, which is what the reference's ldexp computes.
    """
    s = scales.astype(np.uint32)
    bits = np.where(s == 0, np.uint32(0x00400000), s << 23)
    return bits.astype(np.uint32).view(np.float32)


def decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """[..., n_blocks, 16] uint8, [..., n_blocks] uint8 -> [..., n_blocks * 32] float32."""
    assert blocks.shape[-1] == BLOCK_BYTES and blocks.shape[:-1] == scales.shape
    lo = FP4_VALUES[blocks & 0x0F]  # elements 0, 2, 4, ...   [..., n_blocks, 16]
    hi = FP4_VALUES[blocks >> 4]  # elements 1, 3, 5, ...     [..., n_blocks, 16]
    values = np.stack([lo, hi], axis=-1).reshape(*scales.shape, BLOCK)  # [..., n_blocks, 32]
    with np.errstate(over="ignore", invalid="ignore"):  # scales >= 253 overflow, as in the reference
        values = values * scale_to_f32(scales)[..., None]
    return values.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., n * 32] -> (blocks [..., n, 16] uint8, scales [..., n] uint8).

    The shared scale is the smallest power of two with max|x| / scale <= 6 (so nothing clips),
    then every element rounds to the nearest E2M1 value, ties to the even code.
    """
    x = np.asarray(x, dtype=np.float32)
    assert x.shape[-1] % BLOCK == 0, "the last dimension must be a multiple of 32"
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)  # [..., n, 32]
    amax = np.abs(xb).max(axis=-1)  # [..., n]
    with np.errstate(divide="ignore"):
        exp = np.ceil(np.log2(amax / 6.0))
    exp = np.where(amax > 0, exp, -127)
    exp = np.clip(exp, -127, 127).astype(np.int32)
    scales = (exp + 127).astype(np.uint8)  # [..., n]
    v = xb / scale_to_f32(scales)[..., None]  # [..., n, 32], |v| <= 6
    codes = _nearest_code(np.abs(v)) | np.where(np.signbit(v), 8, 0).astype(np.uint8)
    pairs = codes.reshape(*codes.shape[:-1], BLOCK_BYTES, 2)  # (element 2j, element 2j+1)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    return blocks, scales


def _nearest_code(a: np.ndarray) -> np.ndarray:
    """|value| -> magnitude code 0..7 of the nearest E2M1 value, ties to the even code."""
    mid = (_MAGNITUDES[1:] + _MAGNITUDES[:-1]) / 2  # the 7 decision points
    a = np.minimum(a, 6.0)
    below = np.searchsorted(mid, a, side="left")  # tie -> the lower code
    above = np.searchsorted(mid, a, side="right")  # tie -> the upper code
    code = np.where(below % 2 == 0, below, above)
    return code.astype(np.uint8)


def max_error(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Per-element bound on |decode(encode(x)) - x|: half the E2M1 step at |x|, times the scale.

    E2M1 steps are 0.5 below 2, 1 from 2 to 4, 2 from 4 to 6.
    """
    s = scale_to_f32(scales)[..., None]
    xb = np.abs(np.asarray(x, np.float32).reshape(*scales.shape, BLOCK)) / s
    half_step = np.where(xb < 2, 0.25, np.where(xb < 4, 0.5, 1.0))
    return (half_step * s).reshape(np.shape(x))
