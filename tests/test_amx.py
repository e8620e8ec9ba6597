"""The AMX kernels (tinyoss/amx.py) against their numpy twins (hypothesis), on a CPU that has
AMX-BF16 (Xeon since Sapphire Rapids); skipped elsewhere. The forward passes of
test_reference_parity.py take them too where this CPU has them (prefill's bf16 matrices and
experts). Products are exact, sums float32: held to test_kernels' tolerance, 1e-5 of sum |w x|."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyoss import amx, mxfp4
from tinyoss.store import bf16_to_f32

pytestmark = pytest.mark.skipif(not amx.AVAILABLE, reason="this CPU (or OS) has no AMX-BF16")
RTOL = 1e-5
SETTINGS = settings(max_examples=25, deadline=None)
SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -3e-39, 3.4e38, 1e-30],
                   np.float32)


def _x(rng, m: int, cols: int, specials: bool = False) -> np.ndarray:
    """Activations over a wide range of magnitudes (each row its own), optionally with specials."""
    x = rng.standard_normal((m, cols)) * 10.0 ** rng.uniform(-6, 6, (m, 1))
    x = x.astype(np.float32)
    if specials:
        at = rng.random((m, cols)) < 0.05
        x[at] = rng.choice(SPECIAL, int(at.sum()))
    return x


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 12), st.booleans())
def test_pack_x_equals_its_twin(seed, m, steps, mxfp4_rows):
    rng = np.random.default_rng(seed)
    x = _x(rng, m, 32 * steps, specials=True)
    cols = amx.order(32 * steps, mxfp4_rows)
    assert np.array_equal(amx.packed(x, cols), amx.pack_x_twin(x, cols))


def test_the_three_parts_sum_to_x_exactly():
    """split3's (pack_x's) parts: x = hi + mid + lo, every one a bf16, for every float32 from
    2**-110 up (every exponent, random mantissas: all 2**32 patterns would take minutes); below,
    lo (or mid) would be a subnormal bf16, which AMX reads as zero: off by less than 2**-126."""
    rng = np.random.default_rng(0)
    bits = (np.arange(1, 255, dtype=np.uint32)[:, None] << 23) | rng.integers(
        0, 1 << 23, (254, 400), dtype=np.uint32)
    bits[:, ::2] |= np.uint32(1 << 31)
    x = bits.view(np.float32)
    hi, mid, lo = (bf16_to_f32(p).astype(np.float64) for p in amx.split3(x))
    exact = np.arange(1, 255) >= 127 - 110
    assert np.array_equal((hi + mid + lo)[exact], x[exact].astype(np.float64))
    assert np.abs(hi + mid + lo - x)[~exact].max() < 2.0**-126


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 11))
def test_mxfp4_rows_bf16_equals_its_twin(seed, rows, nb):
    """Every scale byte: 2..252 takes the exponent-add step, the rest the float32 route."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows + 3, nb, 16), dtype=np.uint8)
    scales = rng.integers(0, 256, (rows + 3, nb), dtype=np.uint8)
    scales[rng.random(scales.shape) < 0.7] = rng.integers(110, 135)  # most rows safe
    out = np.zeros((rows, nb * 32), np.uint16)
    amx.mxfp4_rows_bf16(blocks, scales, 2, rows, out)
    assert np.array_equal(out, amx.rows_bf16(blocks[2:2 + rows], scales[2:2 + rows]))


def _close(got, want, scale):
    """Within float32 rounding of the absolute sum; non-finite exactly where the twin is."""
    assert got.shape == want.shape
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite)
    assert np.all(np.abs(got - want)[finite] <= RTOL * (scale[finite] + 1e-6)), \
        np.abs(got - want)[finite].max()


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 70), st.integers(1, 6), st.integers(1, 10),
       st.booleans(), st.booleans())
def test_bf16_matmul_equals_its_twin(seed, m, tiles, steps, bias, add):
    """Rows in tiles of 16 (an odd count: a lone last tile), up to five token tiles (more than
    a CHUNK), bias and a residual added or not, written at a column offset."""
    rng = np.random.default_rng(seed)
    R, C, col = 16 * tiles, 32 * steps, int(rng.integers(0, 20))
    w = (rng.standard_normal((R, C)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    x = _x(rng, m, C)
    b = rng.standard_normal(R).astype(np.float32) if bias else np.zeros(0, np.float32)
    res = rng.standard_normal((m, col + R + 3)).astype(np.float32) if add else \
        np.zeros((0, 0), np.float32)
    out = np.full((m, col + R + 3), 7.0, np.float32)
    amx.bf16_matmul(w, amx.packed(x, amx.order(C, False)), m, b, res, out, col)
    wf = bf16_to_f32(w)
    want = amx.matmul_twin(wf, x) + (b if bias else 0) + (res[:, col:col + R] if add else 0)
    scale = np.abs(x).astype(np.float64) @ np.abs(wf).T + (np.abs(b) if bias else 0) + (
        np.abs(res[:, col:col + R]) if add else 0)
    _close(out[:, col:col + R], want, scale)
    assert (out[:, :col] == 7).all() and (out[:, col + R:] == 7).all()  # nothing else written


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 70), st.integers(1, 5), st.integers(1, 11),
       st.booleans())
def test_mxfp4_matmul_equals_its_twin(seed, m, tiles, nb, bias):
    """Rows r0..r1 of an expert (r1 - r0 a multiple of 16, more than a SLAB or fewer), nb blocks
    (whole quads and a leftover), a scale byte out of the exponent-add range here and there."""
    rng = np.random.default_rng(seed)
    r0, R, C, col = 16 * int(rng.integers(0, 3)), 16 * tiles, 32 * nb, int(rng.integers(0, 9))
    blocks = rng.integers(0, 256, (r0 + R + 5, nb, 16), dtype=np.uint8)
    scales = rng.integers(112, 132, (r0 + R + 5, nb), dtype=np.uint8)
    scales[rng.random(scales.shape) < 0.02] = rng.choice([0, 1, 253, 254])
    x = _x(rng, m, C)
    b = rng.standard_normal(R).astype(np.float32) if bias else np.zeros(0, np.float32)
    out = np.full((m, col + R), 7.0, np.float32)
    amx.mxfp4_matmul(blocks, scales, r0, r0 + R, amx.packed(x, amx.order(C, True)), m, b, out,
                     col, np.empty((R, C), np.uint16))
    w = mxfp4.decode(blocks[r0:r0 + R], scales[r0:r0 + R])
    with np.errstate(over="ignore", invalid="ignore"):
        want = amx.matmul_twin(w, x) + (b if bias else 0)
        scale = np.abs(x).astype(np.float64) @ np.abs(w).T + (np.abs(b) if bias else 0)
    _close(out[:, col:], want, scale)
    assert (out[:, :col] == 7).all()


def test_tinyoss_amx_0_turns_it_off():
    env = dict(os.environ, TINYOSS_AMX="0")
    done = subprocess.run([sys.executable, "-c", "from tinyoss import amx; print(amx.AVAILABLE)"],
                          env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
