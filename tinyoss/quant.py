"""Optional int8 dense weights (`dense="q8"`): the numpy definition of the format.

Each row is cut in blocks of 32 values with one float32 scale = max|w| / 127, and
q = round(w / scale) as int8: llama.cpp's Q8_0. It halves the bytes a decoded token reads from the
dense (attention, router, unembedding) weights; the expert weights stay MXFP4 as published.
The numba twins are kernels.bf16_to_q8 and kernels.f32_q8w_matvec.
"""

from __future__ import annotations

import numpy as np

from .store import bf16_to_f32


def q8_quantize(w_bf16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bf16 [R, C] -> (int8 [R, C], float32 [R, C/32])."""
    w = bf16_to_f32(w_bf16).reshape(w_bf16.shape[0], -1, 32)  # [R, C/32, 32]
    scale = np.abs(w).max(axis=-1) / np.float32(127.0)  # [R, C/32]
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0).astype(np.float32)
    q = np.rint(w * inv[..., None]).astype(np.int8)
    return q.reshape(w_bf16.shape), scale.astype(np.float32)


def q8_dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(int8 [R, C], float32 [R, C/32]) -> float32 [R, C]."""
    return (q.reshape(q.shape[0], -1, 32).astype(np.float32) * scale[..., None]).reshape(q.shape)
