"""MXFP4: the numpy decoder against the published table, the numba kernel against the decoder."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tinyoss import kernels, mxfp4

PUBLISHED_TABLE = [0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6]


def test_decode_one_block_by_hand():
    # element 2j is the LOW nibble of byte j: byte 0x71 -> elements (1 -> 0.5, 7 -> 6.0)
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0] = 0x71
    blocks[0, 15] = 0x9F  # low nibble 0xF -> -6, high nibble 0x9 -> -0.5 (elements 30, 31)
    out = mxfp4.decode(blocks, np.array([128], np.uint8))  # scale 2**1
    expected = np.zeros(32, np.float32)
    expected[[0, 1, 30, 31]] = [1.0, 12.0, -12.0, -1.0]
    np.testing.assert_array_equal(out, expected)


def test_every_byte_and_every_scale():
    """All 256 byte values under every scale 0..254 against the published table, bit for bit."""
    blocks = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (255, 1, 1))  # [255, 16, 16]
    scales = np.repeat(np.arange(255, dtype=np.uint8)[:, None], 16, axis=1)  # [255, 16]
    got = mxfp4.decode(blocks, scales).reshape(255, 16, 16, 2)
    table = np.array(PUBLISHED_TABLE, np.float64)
    powers = 2.0 ** (np.arange(255) - 127.0)
    byte = np.arange(256).reshape(16, 16)
    want_lo = table[byte & 15][None] * powers[:, None, None]
    want_hi = table[byte >> 4][None] * powers[:, None, None]
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got[..., 0], want_lo.astype(np.float32))
        np.testing.assert_array_equal(got[..., 1], want_hi.astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(blocks=hnp.arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 5), st.just(16))),
       data=st.data())
def test_kernel_equals_numpy_decoder_exactly(blocks, data):
    """Every value identical (inf included); the kernels' only liberty: -0.0 decodes as +0.0.
    Both compiled variants (parallel, and serial for prefill's worker threads) and the plain
    block decoder of CPUs without AVX2."""
    scales = data.draw(hnp.arrays(np.uint8, blocks.shape[:2], elements=st.integers(0, 254)))
    want = mxfp4.decode(blocks, scales)
    plain = np.full(want.size, np.nan, np.float32)
    for i, (block, s) in enumerate(zip(blocks.reshape(-1, 16), scales.reshape(-1))):
        kernels.mxfp4_block_decode_plain(block, 0, kernels._E8M0[s], plain, i * 32)
    for decode in (kernels.mxfp4_decode, kernels.mxfp4_decode_serial):
        got = np.full(want.shape, np.nan, np.float32)
        decode(blocks, scales, got)
        for values in (got, plain.reshape(want.shape)):
            np.testing.assert_array_equal(values, want)
            same_bits = values.view(np.uint32) == want.view(np.uint32)
            assert np.all(same_bits | (want == 0))


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])),
                  elements=st.floats(-2.0**100, 2.0**100, width=32)))
def test_roundtrip_within_the_format_bound(x):
    blocks, scales = mxfp4.encode(x)
    assert blocks.shape == (*x.shape[:-1], x.shape[-1] // 32, 16) and blocks.dtype == np.uint8
    y = mxfp4.decode(blocks, scales)
    assert np.all(np.abs(y - x) <= mxfp4.max_error(x, scales))


def test_encode_exact_values_roundtrip():
    x = (np.array(PUBLISHED_TABLE * 2, np.float32) * 2.0 ** -5).reshape(1, 32)
    blocks, scales = mxfp4.encode(x)
    np.testing.assert_array_equal(mxfp4.decode(blocks, scales), x)


def test_encode_ties_go_to_the_even_code():
    # scale 1 (max 6); 0.25 is between 0 and 0.5 -> 0; 0.75 between 0.5 and 1 -> 1 (code 2)
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [6.0, 0.25, 0.75, 5.0]
    blocks, scales = mxfp4.encode(x)
    assert scales[0, 0] == 127
    np.testing.assert_array_equal(mxfp4.decode(blocks, scales)[0, :4], [6.0, 0.0, 1.0, 4.0])
