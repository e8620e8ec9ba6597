"""Every numba kernel against its numpy twin (hypothesis), with the tolerance it is held to.

Matvec kernels sum in another order than numpy/BLAS: held to |Δ| <= 1e-5 * (sum |w x| + 1e-6),
i.e. float32 rounding of the absolute sum, never more.
"""

import platform

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyoss import kernels, mxfp4, quant, simd
from tinyoss.model import attention_scores_mask, sdpa
from tinyoss.store import bf16_to_f32, f32_to_bf16

RTOL = 1e-5
SETTINGS = settings(max_examples=25, deadline=None)


def _close(got, want, scale):
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= RTOL * (scale + 1e-6)), np.abs(got - want).max()


@st.composite
def moe_case(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # nb up to 36: with AVX-512 the row loop takes blocks sixteen, then four at a time, then a
    # leftover pair and an odd last block (every nb % 16; the 20b's rows: nb = 90, as in
    # test_row_dots_at_the_real_width).
    # R up to 40: decode takes rows two at a time in tasks of 16, a lone last row alone
    E, R, nb, K = draw(st.integers(1, 6)), draw(st.integers(1, 40)), draw(st.integers(1, 36)), \
        draw(st.integers(1, 4))
    blocks = rng.integers(0, 256, (E, R, nb, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (E, R, nb), dtype=np.uint8)
    bias = f32_to_bf16(rng.standard_normal((E, R)).astype(np.float32))
    experts = rng.integers(0, E, K)
    x = (rng.standard_normal((K, nb * 32)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    return blocks, scales, bias, experts, x


@SETTINGS
@given(moe_case())
def test_moe_matvec_equals_decode_then_matmul(case):
    blocks, scales, bias, experts, x = case
    want = np.stack([mxfp4.decode(blocks[e], scales[e]) @ x[k] + bf16_to_f32(bias[e])
                     for k, e in enumerate(experts)])
    scale = np.stack([np.abs(mxfp4.decode(blocks[e], scales[e])) @ np.abs(x[k]) + np.abs(
        bf16_to_f32(bias[e])) for k, e in enumerate(experts)])
    out = np.empty_like(want)
    kernels.f32_mf4w_moe_matvec(blocks, scales, bias, experts.astype(np.int64),
                                kernels.to_lane_order(x), out)
    _close(out, want, scale)
    shared = np.stack([mxfp4.decode(blocks[e], scales[e]) @ x[0] + bf16_to_f32(bias[e])
                       for e in experts])  # decode: one x (a [1, C] xl) for every expert
    shared_scale = np.stack([np.abs(mxfp4.decode(blocks[e], scales[e])) @ np.abs(x[0]) + np.abs(
        bf16_to_f32(bias[e])) for e in experts])
    kernels.f32_mf4w_moe_matvec(blocks, scales, bias, experts.astype(np.int64),
                                kernels.to_lane_order(x[:1]), out)
    _close(out, shared, shared_scale)


@SETTINGS
@given(moe_case())
def test_plain_row_dot_equals_decode_then_dot(case):
    """The fallback for CPUs without AVX2 (the kernel above uses AVX2 where it can). Its x holds
    each block's even elements, then its odd ones (lane_order's on such CPUs)."""
    blocks, scales, _, experts, x = case
    xl = x[:1].reshape(1, -1, 16, 2).transpose(0, 1, 3, 2).reshape(1, -1).copy()
    e, nb = int(experts[0]), blocks.shape[2]
    row = mxfp4.decode(blocks[e, 0:1], scales[e, 0:1])[0]
    want, scale = row @ x[0], np.abs(row) @ np.abs(x[0])
    flat_b, flat_s = blocks.reshape(-1), scales.reshape(-1)
    off = e * blocks.shape[1]
    args = (flat_b, off * nb * 16, flat_s, off * nb, kernels._E8M0, xl.reshape(-1), 0, nb)
    _close(np.float32(kernels.mxfp4_row_dot_plain(*args)), np.float32(want), scale)


def test_e2m1_from_bits_is_the_fp4_table():
    """The plain kernels build each E2M1 value from its bits (vectorizable) instead of looking it
    up: all 16, bit for bit (-0.0 included), against the numpy definition's table."""
    got = np.array([kernels.e2m1(n) for n in range(16)], np.float32)
    np.testing.assert_array_equal(got.view(np.uint32),
                                  np.asarray(mxfp4.FP4_VALUES, np.float32).view(np.uint32))


@pytest.mark.skipif(kernels.HAVE_AVX2, reason="the plain lane order is that of CPUs without AVX2")
def test_plain_lane_order_is_even_then_odd_elements():
    assert kernels.lane_order(2).tolist() == [32 * b + 2 * j + h for b in range(2)
                                              for h in (0, 1) for j in range(16)]


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 20), st.integers(1, 40))
def test_bf16_widen_is_exact(seed, R, C):
    w = np.random.default_rng(seed).integers(0, 2**16, (R, C), dtype=np.uint16)
    out = np.empty((R, C), np.float32)
    kernels.bf16_widen(w, out)
    np.testing.assert_array_equal(out.view(np.uint32), bf16_to_f32(w).view(np.uint32))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 50), st.integers(1, 40), st.booleans())
def test_bf16_matvec_equals_linear(seed, R, half_cols, with_bias):
    rng = np.random.default_rng(seed)
    w = f32_to_bf16(rng.standard_normal((R, 2 * half_cols)).astype(np.float32))
    b = f32_to_bf16(rng.standard_normal(R).astype(np.float32)) if with_bias else np.zeros(0, np.uint16)
    x = rng.standard_normal(2 * half_cols).astype(np.float32)
    want = bf16_to_f32(w) @ x + (bf16_to_f32(b) if with_bias else 0)
    out = np.empty(R, np.float32)
    kernels.f32_bf16w_matvec(w, x, b, out)
    _close(out, want, np.abs(bf16_to_f32(w)) @ np.abs(x) + (np.abs(bf16_to_f32(b)) if with_bias else 0))


def q_of(pair):
    return pair[0]


@pytest.mark.parametrize("bad", [0x7FC0, 0x7F80, 0xFF80])  # NaN, inf, -inf
def test_q8_block_holding_nan_or_inf_quantizes_to_zeros(bad):
    """Such a block's scale is NaN or inf and its q are 0, in the kernel as in the numpy twin
    (rounding NaN to int8 is undefined); the other blocks are untouched."""
    w = f32_to_bf16(np.linspace(-1, 1, 96, dtype=np.float32)).reshape(1, 96)
    w[0, 40] = bad
    q, s = kernels.bf16_to_q8(w)
    q_np, s_np = quant.q8_quantize(w)
    np.testing.assert_array_equal(s, s_np)
    assert not q[0, 32:64].any() and not q_np[0, 32:64].any()
    assert np.isnan(bf16_to_f32(s[0, 1])) or np.isinf(bf16_to_f32(s[0, 1]))
    np.testing.assert_array_equal(q[0, :32], q_np[0, :32])
    np.testing.assert_array_equal(q[0, 64:], q_np[0, 64:])


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(1, 4))
def test_q8_kernels_equal_numpy(seed, R, nb):
    rng = np.random.default_rng(seed)
    w = f32_to_bf16((rng.standard_normal((R, nb * 32)) * rng.uniform(0.01, 10)).astype(np.float32))
    w[0, :32] = 0  # an all-zero block: scale 0
    w[-1, -32:] = f32_to_bf16(np.full(32, 1e-39, np.float32))  # subnormal: 1 / scale overflows
    q, s = kernels.bf16_to_q8(w)
    assert not q[-1, -32:].any() and not q_of(quant.q8_quantize(w))[-1, -32:].any()
    q_np, s_np = quant.q8_quantize(w)
    np.testing.assert_array_equal(s, s_np)
    assert np.abs(q.astype(int) - q_np.astype(int)).max() <= 1  # x*(1/s) vs x/s may round apart at .5
    deq = quant.q8_dequantize(q, s)
    wf = bf16_to_f32(w)  # half a step, plus float32 rounding of w * (1/s)
    flushed = np.where(np.abs(wf) < 4e-37, np.abs(wf), 0)  # the tiny block's values went to 0
    assert s.dtype == np.uint16  # bf16 scales: the rounded max|w| / 127 of each block
    sf = bf16_to_f32(s)
    amax = np.abs(wf).reshape(R, nb, 32).max(axis=-1)
    assert np.all((np.abs(sf - amax / 127) <= amax / 127 * 2**-8) | (amax < 4e-37))
    assert np.all(np.abs(deq - wf) <= sf.repeat(32, axis=1) * 0.5 * (1 + 1e-5) + np.abs(wf) * 1e-6
                  + flushed)
    out = np.empty_like(deq)
    kernels.q8_dequantize(q, s, out)
    np.testing.assert_array_equal(out, deq)
    x = rng.standard_normal(nb * 32).astype(np.float32)
    out = np.empty(R, np.float32)
    kernels.f32_q8w_matvec(q, s, x, np.zeros(0, np.uint16), out)
    _close(out, deq @ x, np.abs(deq) @ np.abs(x))
    xs = rng.standard_normal((1 + seed % 5, nb * 32)).astype(np.float32)  # a few tokens at once
    bias = f32_to_bf16(rng.standard_normal(R).astype(np.float32))
    out = np.full((xs.shape[0], R), np.nan, np.float32)
    kernels.f32_q8w_matmul(q, s, xs, bias, out)
    _close(out, xs @ deq.T + bf16_to_f32(bias), np.abs(xs) @ np.abs(deq).T + np.abs(bf16_to_f32(bias)))
    # decode's q, k, v in one launch: three matvecs (rows 0.., 1.., 2.. of the same copy here)
    parts = [(q[i:], s[i:], b, np.full(R - i, np.nan, np.float32))
             for i, b in ((0, bias), (R // 2, np.zeros(0, np.uint16)), (R - 1, bias[R - 1:]))]
    kernels.f32_q8w_qkv_matvec(*parts[0], *parts[1], *parts[2], x)
    for qi, si, b, o in parts:
        bf = bf16_to_f32(b) if len(b) else 0
        _close(o, quant.q8_dequantize(qi, si) @ x + bf,
               np.abs(quant.q8_dequantize(qi, si)) @ np.abs(x) + np.abs(bf))


@st.composite
def attention_case(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):  # gpt-oss's shape: f32_attention runs the decode kernels' steps
        Hkv, q_mult, dh = draw(st.integers(1, 2)), 8, 64
    else:
        Hkv, q_mult, dh = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.sampled_from([2, 8, 16]))
    cached, n = draw(st.integers(0, 40)), draw(st.integers(1, 12))
    window = draw(st.sampled_from([0, 1, 3, 8, 64]))
    T = cached + n
    q = rng.standard_normal((n, Hkv * q_mult, dh)).astype(np.float32) * 2
    k = rng.standard_normal((T, Hkv, dh)).astype(np.float32) * 2
    v = rng.standard_normal((T, Hkv, dh)).astype(np.float32)
    sinks = rng.standard_normal(Hkv * q_mult).astype(np.float32) * 3
    return q, k, v, sinks, cached, window


def _sdpa_twin(q, k, v, sinks, cached, window):
    n, Hq, dh = q.shape
    Hkv = k.shape[1]
    q_pos = np.arange(cached, cached + n)
    return sdpa(q.reshape(n, Hkv, Hq // Hkv, dh), k, v, sinks.reshape(Hkv, Hq // Hkv),
                attention_scores_mask(q_pos, np.arange(k.shape[0]), window))


def _as_kv(buf, kv):
    """A float32 KV buffer as KVCache(kv=...) holds it, and the float32 values it stands for."""
    if kv == "f32":
        return buf, buf
    bits = f32_to_bf16(buf)
    return bits, bf16_to_f32(bits)


@SETTINGS
@given(attention_case(), st.sampled_from(["f32", "bf16"]))
def test_attention_equals_sdpa(case, kv):
    """Prefill attention over a float32 cache, or a bf16 one (the twin given the same keys and
    values widened: the kernel widens each exactly)."""
    q, k, v, sinks, cached, window = case
    head_major = lambda a: np.ascontiguousarray(a.transpose(1, 0, 2))  # noqa: E731
    (k_buf, k), (v_buf, v) = _as_kv(head_major(k), kv), _as_kv(head_major(v), kv)
    want = _sdpa_twin(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), sinks, cached, window)
    out = np.empty_like(want)
    kernels.f32_attention(q, k_buf, v_buf, sinks, cached, 0, 0, 0, window, out)
    _close(out, want, np.abs(v).max() * 1.0)


@SETTINGS
@given(attention_case(), st.sampled_from(["f32", "bf16"]))
def test_attention_reads_keys_from_a_first_position(case, kv):
    """As prefill passes a banded layer's keys: buffers that start at position `first` (the
    first any query sees; k_pos0 = first_pos = first)."""
    q, k, v, sinks, cached, window = case
    window = max(window, 1)
    first = max(0, cached - window + 1)
    head_major = lambda a: np.ascontiguousarray(a.transpose(1, 0, 2))  # noqa: E731
    (k_buf, k_seen), (v_buf, v_seen) = (_as_kv(head_major(a[first:]), kv) for a in (k, v))
    k, v = np.zeros_like(k), np.zeros_like(v)  # positions before `first`: masked by the band
    k[first:], v[first:] = k_seen.transpose(1, 0, 2), v_seen.transpose(1, 0, 2)
    want = _sdpa_twin(q, k, v, sinks, cached, window)
    out = np.empty_like(want)
    kernels.f32_attention(q, k_buf, v_buf, sinks, cached, first, 0, first, window, out)
    _close(out, want, np.abs(v).max())


@SETTINGS
@given(attention_case(), st.integers(1, 70))
def test_attention_reads_a_ring_buffer(case, ring):
    """Keys stored at row p % ring give the same result, as long as the ring holds the band."""
    q, k, v, sinks, cached, window = case
    n, T = q.shape[0], k.shape[0]
    if window == 0 or n > 1:
        window = max(window, 1)
        q = q[-1:]
        cached = T - 1
    ring = max(ring, window)
    k_ring = np.zeros((k.shape[1], ring, k.shape[2]), np.float32)  # head-major, like KVCache
    v_ring = np.zeros_like(k_ring)
    first = max(0, T - ring)
    for p in range(first, T):
        k_ring[:, p % ring], v_ring[:, p % ring] = k[p], v[p]
    want = _sdpa_twin(q, k, v, sinks, cached, window)
    out = np.empty_like(want)
    kernels.f32_attention(q, k_ring, v_ring, sinks, cached, first, ring, 0, window, out)
    _close(out, want, np.abs(v).max())


@pytest.mark.parametrize("dense,kv", [("bf16", "f32"), ("q8", "f32"), ("bf16", "bf16")])
def test_kernels_do_not_recompile(make_checkpoint, dense, kv, tmp_path, monkeypatch):
    """After fast.warm_up (what `tinyoss bench`, `serve` and `chat` run first), a checkpoint's
    short and long prefills, its decode steps and a decode batch add no compiled signature: every
    kernel was ready. The prefills send some experts a few tokens, others many (fast.moe's two
    paths)."""
    import tinyoss
    from tinyoss import fast

    fast.warm_up(dense, kv)
    jitted = [getattr(kernels, n) for n in dir(kernels)
              if hasattr(getattr(kernels, n), "signatures")]
    before = {k.__name__: len(k.signatures) for k in jitted}
    taken = set()  # which of an expert's prefill paths ran (the router chooses)

    def noting(name):
        run = getattr(fast, name)

        def noted(*args):
            taken.add(name)
            return run(*args)
        return noted

    for name in ("expert_few", "experts_tiles"):
        monkeypatch.setattr(fast, name, noting(name))
    # sizes of the real models' kinds: parallel matvecs with read-only biases (o: 256 rows);
    # q8: int8 copies in memory (no cache), written to a cache file and mapped, mapped again
    path = make_checkpoint("both", seed=2, vocab_size=300, hidden_size=256)
    for q8_cache in ([False, tmp_path, tmp_path] if dense == "q8" else [False]):
        model = tinyoss.load(path, dense=dense, q8_cache=q8_cache, kv=kv)
        cache = model.new_cache()
        model.forward(np.arange(2), cache)
        model.forward(np.arange(40), cache)
        for t in range(5):
            model.forward([t], cache)
        model.forward(np.arange(12))  # a prompt whose experts take either path
        other = model.new_cache()
        model.forward(np.arange(3), other)
        model.forward_batch([7, 8], [cache, other])  # a server's decode step (its attention)
    assert taken == {"expert_few", "experts_tiles"}
    assert {k.__name__: len(k.signatures) for k in jitted} == before
    assert len(list(tmp_path.glob("q8-*.safetensors"))) == (dense == "q8")


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 200))
def test_split_x_equals_numpy_indexing(seed, m, C):
    """bf16_split_x: each whole 32 columns even-then-odd (BF16_SPLIT_ORDER, a permutation of
    0..31), the last C % 32 as they are."""
    from tinyoss.simd import BF16_SPLIT_ORDER

    assert sorted(BF16_SPLIT_ORDER) == list(range(32))
    xs = np.random.default_rng(seed).standard_normal((m, C)).astype(np.float32)
    main = C - C % 32
    order = np.arange(C)
    order[:main] = (np.arange(0, main, 32)[:, None] + np.array(BF16_SPLIT_ORDER)).reshape(-1)
    np.testing.assert_array_equal(kernels.bf16_split_x(xs), xs[:, order])


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 40),
       st.integers(1, 40) | st.integers(500, 1100), st.integers(1, 9))
def test_qkv_and_few_token_matmuls_equal_linear(seed, rq, rk, C, m):
    """The few-token bf16 kernels (tokens four at a time, then the rest; rows four at a time with
    AVX-512, x in BF16_SPLIT_ORDER, then two, then one, else one at a time; columns in chunks of
    X_CHUNK_BYTES, from 500 on more than one; C % 32 columns one by one) against the linear twin;
    q, k, v in one launch equal to three matmuls."""
    rng = np.random.default_rng(seed)
    mats = [f32_to_bf16(rng.standard_normal((r, C)).astype(np.float32)) for r in (rq, rk, rk)]
    biases = [f32_to_bf16(rng.standard_normal(w.shape[0]).astype(np.float32)) for w in mats]
    biases[2] = np.zeros(0, np.uint16)  # no bias
    xs = rng.standard_normal((m, C)).astype(np.float32)
    outs = [np.empty((m, w.shape[0]), np.float32) for w in mats]
    kernels.f32_bf16w_qkv_matmul(mats[0], biases[0], outs[0], mats[1], biases[1], outs[1],
                                 mats[2], biases[2], outs[2], xs)
    for w, b, o in zip(mats, biases, outs):
        want = np.empty_like(o)
        kernels.f32_bf16w_matmul(w, xs, b, want)
        np.testing.assert_array_equal(o, want)  # same rows, same code: identical
        bias = bf16_to_f32(b) if len(b) else 0
        _close(o, xs @ bf16_to_f32(w).T + bias, np.abs(xs) @ np.abs(bf16_to_f32(w)).T + 1)


@st.composite
def decode_case(draw):
    """One query against `count` cached keys in a buffer of more slots; half the cases in
    gpt-oss's shape (8 queries of 64 per KV head: the kernels' vector path)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        Hkv, q_mult, dh = draw(st.integers(1, 3)), 8, 64
    else:
        # (64 with q_mult != 8: the values kernel's groups of 1 to 4 queries, the scores' loops)
        Hkv, q_mult, dh = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.sampled_from([2, 8, 16, 64]))
    count, extra = draw(st.integers(1, 1100)), draw(st.integers(0, 5))
    q = rng.standard_normal((1, Hkv * q_mult, dh)).astype(np.float32) * 2
    k_buf = rng.standard_normal((Hkv, count + extra, dh)).astype(np.float32) * 2
    v_buf = rng.standard_normal((Hkv, count + extra, dh)).astype(np.float32)
    sinks = rng.standard_normal(Hkv * q_mult).astype(np.float32) * 3
    return q, k_buf, v_buf, count, sinks


@SETTINGS
@given(decode_case(), st.sampled_from(["f32", "bf16"]))
def test_decode_attention_equals_sdpa(case, kv):
    """fast.attend_one (one query that sees every cached key: the three decode kernels) against
    the numpy definition, over a float32 or a bf16 cache (the twin sees it widened)."""
    from tinyoss.fast import attend_one

    q, k_buf, v_buf, count, sinks = case
    (k_buf, k_wide), (v_buf, v_wide) = _as_kv(k_buf, kv), _as_kv(v_buf, kv)
    k, v = k_wide[:, :count].transpose(1, 0, 2), v_wide[:, :count].transpose(1, 0, 2)
    want = _sdpa_twin(q, k, v, sinks, count - 1, 0)
    got = attend_one(q, k_buf, v_buf, count, sinks)
    _close(got, want, np.abs(v).max())


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.booleans(), st.sampled_from(["f32", "bf16"]))
def test_decode_attention_of_a_batch_equals_sdpa_per_stream(seed, B, gpt_oss_shape, kv):
    """kernels.f32_decode_attention_batch (B streams in one launch, each against its own buffers:
    their own numbers of slots and of visible keys, reached by address) against the numpy
    definition, stream by stream; gpt-oss's head shape (the vector path) or others (the loops)."""
    rng = np.random.default_rng(seed)
    Hkv = int(rng.integers(1, 4))
    q_mult, dh = (8, 64) if gpt_oss_shape else (int(rng.integers(1, 6)), int(rng.choice([2, 8, 16, 64])))
    counts = rng.integers(1, 700, B)
    bufs = [(_as_kv(rng.standard_normal((Hkv, n + e, dh)).astype(np.float32) * 2, kv),
             _as_kv(rng.standard_normal((Hkv, n + e, dh)).astype(np.float32), kv))
            for n, e in zip(counts, rng.integers(0, 6, B))]
    q = rng.standard_normal((B, Hkv * q_mult, dh)).astype(np.float32) * 2
    sinks = rng.standard_normal(Hkv * q_mult).astype(np.float32) * 3
    out = np.full((B, Hkv * q_mult * dh), np.nan, np.float32)
    k_bufs, v_bufs = [k for (k, _), _ in bufs], [v for _, (v, _) in bufs]
    kernels.f32_decode_attention_batch(
        q, Hkv, np.array([b.ctypes.data for b in k_bufs], np.int64),
        np.array([b.ctypes.data for b in v_bufs], np.int64),
        np.array([b.shape[1] for b in k_bufs], np.int64), counts, k_bufs[0], sinks, out)
    for i, (((_, k_wide), (_, v_wide)), n) in enumerate(zip(bufs, counts)):
        k, v = k_wide[:, :n].transpose(1, 0, 2), v_wide[:, :n].transpose(1, 0, 2)
        want = _sdpa_twin(q[i:i + 1], k, v, sinks, n - 1, 0)
        _close(out[i:i + 1], want, np.abs(v).max())


@SETTINGS
@given(decode_case(), st.sampled_from(["f32", "bf16"]))
def test_decode_attention_kernels_equal_their_twins(case, kv):
    q, k_bits, v_bits, count, sinks = case
    (k_bits, k_buf), (v_bits, v_buf) = _as_kv(k_bits, kv), _as_kv(v_bits, kv)
    Hkv, _, dh = k_buf.shape
    qh = q[0].reshape(Hkv, -1, dh)
    scores = np.empty((Hkv, qh.shape[1], count), np.float32)
    kernels.f32_decode_scores(qh, k_bits, count, scores)
    want = qh @ k_buf[:, :count].transpose(0, 2, 1) / np.float32(np.sqrt(dh))
    _close(scores, want, np.abs(qh) @ np.abs(k_buf[:, :count]).transpose(0, 2, 1) / np.sqrt(dh))
    w = np.abs(scores)  # any weights, any softmax denominators
    denom = np.random.default_rng(count).uniform(0.5, 4, qh.shape[:2]).astype(np.float32)
    out = np.empty(qh.shape, np.float32)
    kernels.f32_decode_values(w, v_bits, count, denom.reshape(-1), out)
    _close(out, w @ v_buf[:, :count] / denom[..., None],
           w @ np.abs(v_buf[:, :count]) / denom[..., None])


@pytest.mark.parametrize("count", [1, 7, 8, 63, 64, 65, 130, 511, 512, 513, 1100])
def test_decode_scores_of_bf16_keys_are_those_of_the_widened_keys(count):
    """A bf16 cache's keys are widened exactly and then summed as float32 keys are: the scores
    equal, bit for bit, those of the float32 buffer holding the same values (counts around the
    steps of 8 keys, 64 and the 512 keys of a task)."""
    rng = np.random.default_rng(count)
    bits = f32_to_bf16(rng.standard_normal((3, count + 2, 64)).astype(np.float32) * 2)
    q = rng.standard_normal((3, 8, 64)).astype(np.float32)
    got, want = (np.full((3, 8, count), np.nan, np.float32) for _ in range(2))
    kernels.f32_decode_scores(q, bits, count, got)
    kernels.f32_decode_scores(q, bf16_to_f32(bits), count, want)
    np.testing.assert_array_equal(got, want)


def test_every_kernel_has_its_own_disk_cache_entry():
    """numba's disk cache keys a kernel by file, name and first line: two dispatchers of one
    Python function (say a parallel and a serial variant) would load each other's machine code,
    and the parallel kernel would silently run on one core."""
    import importlib
    import pkgutil

    import numba

    import tinyoss

    owners = {}
    for info in pkgutil.iter_modules(tinyoss.__path__):
        module = importlib.import_module(f"tinyoss.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, numba.core.dispatcher.Dispatcher) and obj.__module__ == module.__name__:
                code = obj.py_func.__code__
                key = (code.co_filename, obj.py_func.__qualname__, code.co_firstlineno)
                # by dispatcher: one under two names (an alias, as _block_decode) is one entry
                owners.setdefault(key, {})[id(obj)] = f"{info.name}.{name}"
    shared = [sorted(names.values()) for names in owners.values() if len(names) > 1]
    assert len(owners) > 10 and not shared, shared


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 4), st.floats(0.1, 60),
       st.floats(0.5, 10))
def test_swiglu_lanes_equals_numpy(seed, m, blocks, spread, limit):
    """The decode/few-token SwiGLU kernel (clamps, sigmoid, +1 on up, written in the MXFP4
    matvec's lane order) against model.swiglu then to_lane_order; NaN goes through as NaN."""
    from tinyoss.model import SWIGLU_ALPHA, swiglu

    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((m, 64 * blocks)) * spread).astype(np.float32)
    h.reshape(-1)[rng.integers(0, h.size, 2)] = np.nan
    out = np.empty((m, 32 * blocks), np.float32)
    kernels.f32_swiglu_lanes(h, np.float32(limit), np.float32(SWIGLU_ALPHA), out)
    with np.errstate(over="ignore"):  # exp of a large negative gate: inf, the output -0
        want = kernels.to_lane_order(swiglu(h, limit))
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-37)  # NaN where numpy has NaN


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 300), st.floats(0.1, 50))
def test_softmax_rows_equals_numpy(seed, R, T, spread):
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((R, T)) * spread).astype(np.float32)
    sinks = (rng.standard_normal(R) * spread).astype(np.float32)
    top = np.maximum(scores.max(axis=1), sinks)
    want = np.exp(scores - top[:, None])
    want_denom = want.sum(axis=1) + np.exp(sinks - top)
    denom = np.empty(R, np.float32)
    kernels.f32_softmax_rows(scores, sinks, denom)
    _close(scores, want, 1.0)
    _close(denom, want_denom, want_denom)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_vector_exp_within_1_ulp(seed):
    """simd's expf against float64 exp over the softmax's range [ln FLT_MIN, 0]: within 1 ULP
    down to 1e-36, 1e-5 relative down to FLT_MIN; below, at most FLT_MIN (next to 1.0, nothing).
    A NaN score makes its row's denominator NaN, as in numpy."""
    from tinyoss.simd import EXP_MIN

    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.uniform(EXP_MIN, 0, 4000), rng.uniform(-1, 0, 4000), [0.0, EXP_MIN]])
    x = x.astype(np.float32)
    got = x.copy()
    kernels.f32_softmax_rows(got.reshape(1, -1), np.zeros(1, np.float32), np.empty(1, np.float32))
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    err = np.abs(got - want)
    big, normal = want >= 1e-36, want >= np.finfo(np.float32).tiny
    assert np.all(err[big] <= ulp[big]), (err / ulp)[big].max()
    assert np.all(err[normal] <= 1e-5 * want[normal])
    assert np.all(got[~normal] <= np.float32(1.2e-38))
    below = np.array([EXP_MIN - 1, -200, -np.inf], np.float32)
    kernels.f32_softmax_rows(below.reshape(1, -1), np.zeros(1, np.float32), np.empty(1, np.float32))
    assert np.all(below <= np.float32(1.2e-38))
    scores, denom = np.array([[0.0, np.nan, -1.0]], np.float32), np.empty(1, np.float32)
    kernels.f32_softmax_rows(scores, np.zeros(1, np.float32), denom)
    assert np.isnan(denom[0])
    for T in (16, 17, 40, 100):  # a NaN in the max's 16-lane steps (and its tail), row 2 of 4
        for at in {0, 7, 15, T // 2, T - 1}:
            scores = rng.standard_normal((4, T)).astype(np.float32)
            scores[2, at] = np.nan
            denom = np.empty(4, np.float32)
            kernels.f32_softmax_rows(scores, np.zeros(4, np.float32), denom)
            assert np.isnan(denom[2]) and not np.isnan(denom[[0, 1, 3]]).any(), (T, at)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 9), st.integers(1, 11))
def test_mxfp4_matmul_equals_decode_then_matmul(seed, R, nb, m):
    """Prefill's fused kernel for an expert a few tokens chose (tokens four at a time, then the
    remainder: m covers every group size)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (R, nb, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (R, nb), dtype=np.uint8)
    bias = f32_to_bf16(rng.standard_normal(R).astype(np.float32))
    x = rng.standard_normal((m, nb * 32)).astype(np.float32)
    w = mxfp4.decode(blocks, scales)
    out = np.full((m, R), np.nan, np.float32)
    kernels.f32_mf4w_matmul(blocks, scales, bias, kernels.to_lane_order(x), out)
    _close(out, x @ w.T + bf16_to_f32(bias), np.abs(x) @ np.abs(w).T + np.abs(bf16_to_f32(bias)))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 9),
       st.lists(st.integers(1, 9), min_size=1, max_size=5), st.integers(1, 7))
def test_grouped_moe_matmul_equals_decode_then_matmul(seed, R, nb, group_sizes, threads):
    """Batched decode's experts: each routed expert (distinct, any order) with its group of
    tokens, one launch; groups of one token take the two-row matvec; the rows split into
    `threads` shares (more than the rows, or than numba's threads, as well)."""
    rng = np.random.default_rng(seed)
    E = 6
    blocks = rng.integers(0, 256, (E, R, nb, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (E, R, nb), dtype=np.uint8)
    bias = f32_to_bf16(rng.standard_normal((E, R)).astype(np.float32))
    experts = rng.permutation(E)[:len(group_sizes)].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64)
    x = rng.standard_normal((starts[-1], nb * 32)).astype(np.float32)
    out = np.full((starts[-1], R), np.nan, np.float32)
    kernels.f32_mf4w_moe_matmul(blocks, scales, bias, experts, starts, kernels.to_lane_order(x),
                                out, threads)
    for g, e in enumerate(experts):
        rows = slice(starts[g], starts[g + 1])
        w = mxfp4.decode(blocks[e], scales[e])
        _close(out[rows], x[rows] @ w.T + bf16_to_f32(bias[e]),
               np.abs(x[rows]) @ np.abs(w).T + np.abs(bf16_to_f32(bias[e])))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_row_dots_at_the_real_width(m):
    """The 20b's rows (2880 = 90 blocks) through the decode matvec and the few-token matmul (m
    tokens: every group size of simd.mxfp4_row_dots), on scales of the real range."""
    rng = np.random.default_rng(m)
    R, nb = 24, 90
    blocks = rng.integers(0, 256, (2, R, nb, 16), dtype=np.uint8)
    scales = rng.integers(110, 135, (2, R, nb), dtype=np.uint8)
    bias = f32_to_bf16(rng.standard_normal((2, R)).astype(np.float32))
    x = rng.standard_normal((m, nb * 32)).astype(np.float32)
    w = mxfp4.decode(blocks[1], scales[1])
    want = x @ w.T + bf16_to_f32(bias[1])
    scale = np.abs(x) @ np.abs(w).T + np.abs(bf16_to_f32(bias[1]))
    out = np.full((m, R), np.nan, np.float32)
    kernels.f32_mf4w_matmul(blocks[1], scales[1], bias[1], kernels.to_lane_order(x), out)
    _close(out, want, scale)
    experts = np.ones(m, np.int64)
    kernels.f32_mf4w_moe_matvec(blocks, scales, bias, experts, kernels.to_lane_order(x), out)
    _close(out, want, scale)


@SETTINGS
@given(moe_case(), st.booleans(), st.booleans())
def test_x8_moe_matvec_equals_rounded_x_then_matmul(case, one_x, specials):
    """expert_input="q8": x quantized to int8 blocks (x8_quantize_lanes, bit for bit the numpy
    definition, in the kernel's order and with halved scales), then integer dot products a
    block: equal to the float matmul of the dequantized x (the integer sums are exact, the
    block sums meet in another order). specials: a zero block and a block holding NaN."""
    blocks, scales, bias, experts, x = case
    if one_x:
        x = x[:1]
    if specials:
        x[0, :32] = 0.0
        if x.shape[1] > 32:
            x[-1, 40] = np.nan
    q, d = np.empty(x.shape, np.int8), np.empty((x.shape[0], x.shape[1] // 32), np.float32)
    kernels.x8_quantize_lanes(x, q, d)
    want_q, want_s = quant.x8_quantize(x)
    assert np.array_equal(q, want_q[:, kernels.x8_order(x.shape[1] // 32)])
    assert np.array_equal(d, want_s / 2, equal_nan=True)
    xr = quant.x8_round_trip(x)
    out = np.full((len(experts), blocks.shape[1]), np.nan, np.float32)
    kernels.f32_mf4w_q8x_moe_matvec(blocks, scales, bias, experts, q, d, out)
    rows = [xr[0 if one_x else k] for k in range(len(experts))]
    w = [mxfp4.decode(blocks[e], scales[e]) for e in experts]
    want = np.stack([wk @ r + bf16_to_f32(bias[e]) for wk, r, e in zip(w, rows, experts)])
    scale = np.stack([np.abs(wk) @ np.abs(r) + np.abs(bf16_to_f32(bias[e]))
                      for wk, r, e in zip(w, rows, experts)])
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    _close(np.where(nan, 0, out), np.where(nan, 0, want), np.where(nan, 0, scale))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 6), st.floats(0.5, 20))
def test_swiglu_x8_is_the_swiglu_then_x8_quantize(seed, m, blocks, spread):
    """f32_swiglu_x8 = x8_quantize_lanes of the SwiGLU f32_swiglu_lanes computes (the same
    float values: that kernel is held to model.swiglu), bit for bit; and its lane offsets, where
    asked for, those of x8_quantize_blocks."""
    from tinyoss.model import SWIGLU_ALPHA

    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((m, 64 * blocks)) * spread).astype(np.float32)
    limit, alpha = np.float32(7.0), np.float32(SWIGLU_ALPHA)
    lanes = np.empty((m, 32 * blocks), np.float32)
    kernels.f32_swiglu_lanes(h, limit, alpha, lanes)
    natural = np.empty_like(lanes)
    natural[:, kernels.row_order(blocks)] = lanes
    want_q, want_d = np.empty(lanes.shape, np.int8), np.empty((m, blocks), np.float32)
    kernels.x8_quantize_lanes(natural, want_q, want_d)
    q, d = np.empty_like(want_q), np.empty_like(want_d)
    kernels.f32_swiglu_x8(h, limit, alpha, q, d, np.zeros((m, 0), np.int32))  # no lane offsets
    assert np.array_equal(q, want_q) and np.array_equal(d, want_d)
    # with them (a decode batch's VNNI kernels): as x8_quantize_blocks writes them
    want_c = np.empty((m, kernels.x8_lane_slots(blocks)), np.int32)
    kernels.x8_quantize_blocks(natural, np.empty_like(q), np.empty_like(d), want_c, 0)
    c = np.full_like(want_c, 99)
    q[:], d[:] = 0, 0
    kernels.f32_swiglu_x8(h, limit, alpha, q, d, c)
    assert np.array_equal(q, want_q) and np.array_equal(d, want_d)
    if kernels.X8_TILES:  # (elsewhere x8_quantize_blocks writes no offsets)
        assert np.array_equal(c, want_c)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(1, 20))
def test_x8_offset_sums_equal_numpy(seed, n, nb):
    """What the AVX2 int8 kernel takes off its sums (12 x each block's sum of q), where that
    path is built (simd.Q8_OFFSETS): numpy's sum, the extremes included."""
    if not simd.Q8_OFFSETS:
        pytest.skip("the AVX2 int8 path (no AVX-512 VNNI) is not built here")
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (n, 32 * nb), dtype=np.int8)
    q[0, :32] = 127
    q[-1, -32:] = -128
    want = 12 * q.reshape(n, nb, 32).astype(np.int64).sum(-1)
    assert np.array_equal(kernels.x8_offset_sums(q, nb), want.astype(np.float32))


@pytest.mark.parametrize("nb", [1, 3, 4, 5, 17, 90])
def test_x8_order_is_a_permutation(nb):
    """The int8 matvec reads each element of a row exactly once (groups of four blocks with
    AVX-512 VNNI, the nb % 4 last alone), and x8_order inverts x8_position."""
    order = kernels.x8_order(nb)
    assert sorted(order.tolist()) == list(range(32 * nb))
    assert all(kernels.x8_position(e, nb) == p for p, e in enumerate(order))


def test_x8_moe_matvec_at_the_real_width():
    """The 20b's rows (90 blocks: five steps of 16, two groups of 4, two blocks alone with AVX-512
    VNNI) through the int8 matvec, four experts, scales of the real range."""
    rng = np.random.default_rng(7)
    R, nb = 34, 90
    blocks = rng.integers(0, 256, (3, R, nb, 16), dtype=np.uint8)
    scales = rng.integers(110, 135, (3, R, nb), dtype=np.uint8)
    bias = f32_to_bf16(rng.standard_normal((3, R)).astype(np.float32))
    x = rng.standard_normal((4, nb * 32)).astype(np.float32)
    experts = np.array([2, 0, 2, 1], np.int64)
    q, d = np.empty(x.shape, np.int8), np.empty((4, nb), np.float32)
    kernels.x8_quantize_lanes(x, q, d)
    out = np.full((4, R), np.nan, np.float32)
    kernels.f32_mf4w_q8x_moe_matvec(blocks, scales, bias, experts, q, d, out)
    xr = quant.x8_round_trip(x)
    w = [mxfp4.decode(blocks[e], scales[e]) for e in experts]
    want = np.stack([wk @ r + bf16_to_f32(bias[e]) for wk, r, e in zip(w, xr, experts)])
    scale = np.stack([np.abs(wk) @ np.abs(r) + np.abs(bf16_to_f32(bias[e]))
                      for wk, r, e in zip(w, xr, experts)])
    _close(out, want, scale)


@pytest.mark.parametrize("nb", range(1, 8))
def test_lane_order_is_a_permutation(nb):
    """The matvec reads each element of a row exactly once (four blocks a step with AVX-512)."""
    order = kernels.lane_order(nb)
    assert sorted(order.tolist()) == list(range(32 * nb))
    assert np.array_equal(kernels.to_lane_order(np.arange(32 * nb, dtype=np.float32)[None])[0],
                          order.astype(np.float32))


ARM = platform.machine() in ("aarch64", "arm64")


def test_a_named_cpu_compiles_with_its_own_features():
    """NUMBA_CPU_NAME without NUMBA_CPU_FEATURES (a numba cache built for an AVX2 fleet, or the
    AVX2 path measured on this machine): numba's code generator gets that CPU's own features,
    as the kernels' path was chosen by (simd._target), not this host's (with them an
    "x86-64-v3" build held AVX-512 instructions)."""
    import os
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86 CPU name")
    env = dict(os.environ, NUMBA_CPU_NAME="x86-64-v3", TINYOSS_KERNELS="avx2")
    env.pop("NUMBA_CPU_FEATURES", None)
    code = ("from tinyoss import simd; from numba.core.registry import cpu_target; "
            "print(repr(cpu_target.target_context.codegen()._get_host_cpu_features()), "
            "simd.HAVE_AVX2, simd.HAVE_AVX512)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["''", "True", "False"]


@pytest.mark.parametrize("path, cpu, check", [
    ("avx2", "x86-64-v3", "assert simd.HAVE_AVX2 and not simd.HAVE_AVX512"),
    ("neon", "generic", "assert simd.HAVE_NEON and not simd.HAVE_DOTPROD"),
    ("portable", "generic", "assert not simd.HAVE_SIMD"),
])
def test_smaller_cpu_paths_equal_their_twins(path, cpu, check):
    """The kernels' branches for smaller CPUs than this one, which never run here otherwise:
    on x86, AVX2 without AVX-512 (Zen 3, most laptops: MXFP4 blocks one at a time); on aarch64,
    NEON without dotprod (a Pi 4's ARMv8.0); on both, plain numba (RISC-V, old CPUs). The MXFP4,
    softmax and decode-attention tests again, in a process that builds that path
    (TINYOSS_KERNELS) for such a CPU (NUMBA_CPU_NAME: LLVM then has only its instructions); it
    compiles afresh: the disk cache can't tell the builds apart."""
    import os
    import subprocess
    import sys

    if path != "portable" and (path == "neon") != ARM:
        pytest.skip(f"a path of {'x86' if path == 'avx2' else 'aarch64'} CPUs")
    if not ARM and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("neither x86 nor aarch64")
    env = dict(os.environ, TINYOSS_KERNELS=path, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="")
    here = os.path.dirname(__file__)
    code = (f"import sys, pytest; from tinyoss import simd; {check}; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', "
            "'moe_matvec or mxfp4_matmul or grouped_moe or kernel_equals_numpy or decode_attention or "
            "swiglu_lanes or plain_row_dot or real_width or softmax_rows or vector_exp or "
            "lane_order or every_scale or x8_moe or swiglu_x8 or x8_order or x8_offset or "
            "bf16_keys or panel or "
            "few_token_matmuls or split_x', "
            f"{os.path.join(here, 'test_kernels.py')!r}, {os.path.join(here, 'test_mxfp4.py')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 300), st.integers(1, 9),
       st.sampled_from([2, 8, 64]))
def test_rmsnorm_and_rope_equal_model(seed, n, D, H, dh):
    from tinyoss.model import apply_rope, rmsnorm

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, D)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    scale = f32_to_bf16(rng.standard_normal(D).astype(np.float32))
    out = np.empty_like(x)
    kernels.f32_rmsnorm(x, scale, 1e-5, out)
    want = rmsnorm(x, scale, 1e-5)
    _close(out, want, np.abs(want))
    q = rng.standard_normal((n, H, dh)).astype(np.float32)
    cos, sin = (rng.standard_normal((n, dh // 2)).astype(np.float32) for _ in range(2))
    roped = np.empty_like(q)
    kernels.f32_rope(q, cos, sin, roped)
    np.testing.assert_array_equal(roped, apply_rope(q, cos, sin))  # same operations, bit-exact


@pytest.mark.parametrize("nb", [4, 7, 90])
def test_row_dots_take_every_scale_byte_exactly(nb):
    """Every E8M0 byte, 0 (the subnormal 2**-127) to 255 (inf), in every block position of the
    matvec's steps (AVX-512 builds the four-block step's scales with integer ops, not the table),
    bit for bit. x is one-hot (element j_k of block k for x_k), so out[k, r] is the decoded
    weight W[r, j_k] (mxfp4.decode: inf where it overflows), except that the products are scaled
    after they are summed: a row with an inf scale is NaN (0 * inf from a block x's 1 is not in,
    or with AVX2 or NEON, whose sums are per vector lane, from that block's other lanes; the
    reference's decoded row holds a 0 * inf too), while a merely overflowing weight times x's 0
    stays out of the sum."""
    rng = np.random.default_rng(nb)
    R = 256
    blocks = rng.integers(0, 256, (1, R, nb, 16), dtype=np.uint8)
    scales = ((np.arange(R)[:, None] + 67 * np.arange(nb)[None]) % 256).astype(np.uint8)[None]
    bias = np.zeros((1, R), np.uint16)
    column = 32 * np.arange(nb) + rng.integers(0, 32, nb)  # x_k's one element, in block k
    x = np.zeros((nb, nb * 32), np.float32)
    x[np.arange(nb), column] = 1.0
    want = mxfp4.decode(blocks[0], scales[0])[:, column].T.copy()  # [k, r]
    inf = scales[0] == 255  # [r, b]
    elsewhere = inf.any(axis=1)[None, :] & ~(inf.sum(axis=1)[None, :] == inf.T)  # [k, r]
    want[elsewhere | (inf.T if simd.HAVE_SIMD else False)] = np.nan
    out = np.empty((nb, R), np.float32)
    kernels.f32_mf4w_moe_matvec(blocks, scales, bias, np.zeros(nb, np.int64),
                                kernels.to_lane_order(x), out)
    assert (scales[0] == 0).any() and (scales[0] == 255).any()
    np.testing.assert_array_equal(out, want)


def test_neon_kernels_compile_for_aarch64():
    """The NEON paths' IR, built here whatever this CPU is and compiled by LLVM's AArch64 backend
    (benchmarks/neon_asm.py, which counts their instructions): the E2M1 lookup is `tbl`, the
    float16 values widen by `fcvtl`, the int8-input dot is `sdot` with dotprod and widening
    multiplies without. (Their results are tested on aarch64: scripts/arm64-tests.sh.)"""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "neon_asm.py")
    spec = importlib.util.spec_from_file_location("neon_asm", path)
    neon_asm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(neon_asm)
    flags = {flag: getattr(simd, flag) for flag in neon_asm._FLAGS}
    for dotprod in (True, False):
        loops = neon_asm.loops(neon_asm.assembly(
            neon_asm.build(dotprod), "cortex-a76", "+neon," + "+-"[not dotprod] + "dotprod"))
        ops = {fn: {line.split()[0] for body in found for line in body}
               for fn, found in loops.items()}
        assert {"tbl", "fcvtl", "fcvtl2", "fmla"} <= ops["mxfp4_row_dot"]
        assert {"tbl", "fcvtl", "zip1"} <= ops["mxfp4_block_decode"]
        assert "tbl" in ops["mxfp4_q8_row_dots"]
        assert ("sdot" in ops["mxfp4_q8_row_dots"]) == dotprod
        assert dotprod or {"smull", "smlal"} <= ops["mxfp4_q8_row_dots"]
    assert {flag: getattr(simd, flag) for flag in neon_asm._FLAGS} == flags  # restored


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.integers(1, 4), st.integers(1, 4),
       st.sampled_from([0, 1, 16]))
def test_read_streams_equals_numpy(seed, lines, tasks, streams, ahead):
    """The bandwidth probe's reader XORs exactly its share of lines (prefetching past the end of
    the buffer is a hint, never a fault)."""
    words = np.random.default_rng(seed).integers(0, 2**63, 8 * lines + 3, dtype=np.uint64)
    out = np.zeros(tasks, np.uint64)
    kernels.read_streams(words, tasks, streams, ahead, out)
    per_stream = lines // tasks // streams
    for t in range(tasks):
        first = 8 * t * (lines // tasks)
        want = np.bitwise_xor.reduce(words[first:first + 8 * streams * per_stream])
        assert out[t] == want


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 20), st.integers(1, 300), st.integers(1, 9),
       st.sampled_from([2, 8, 64]))
def test_prefill_rmsnorm_and_rope_equal_model(seed, n, D, H, dh):
    """The prefill variants (tokens split across the threads) against the same twins."""
    from tinyoss.model import apply_rope, rmsnorm

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, D)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    scale = f32_to_bf16(rng.standard_normal(D).astype(np.float32))
    out = np.empty_like(x)
    kernels.f32_rmsnorm_rows(x, scale, 1e-5, out)
    want = rmsnorm(x, scale, 1e-5)
    _close(out, want, np.abs(want))
    q = rng.standard_normal((n, H, dh)).astype(np.float32)
    cos, sin = (rng.standard_normal((n, dh // 2)).astype(np.float32) for _ in range(2))
    roped = np.empty_like(q)
    kernels.f32_rope_rows(q, cos, sin, roped)
    np.testing.assert_array_equal(roped, apply_rope(q, cos, sin))  # same operations, bit-exact


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(1, 40), st.integers(1, 60))
def test_gather_rows_is_fancy_indexing(seed, n, D, m):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32)
    rows = rng.integers(0, n, m)
    out = np.empty((m, D), np.float32)
    kernels.f32_gather_rows(x, rows, out)
    np.testing.assert_array_equal(out, x[rows])


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 70), st.integers(0, 8),
       st.floats(0.1, 200), st.floats(0.5, 10))
def test_bias_swiglu_equals_numpy(seed, m, R, left, spread, limit):
    """Prefill's SwiGLU of a tile (its bias first) against model.swiglu, written into a column
    slice of a wider array as the tile pool's workers do (R past 16: the vector exp's steps and
    its one-by-one rest); gates far below -51 (spread up to 200) overflow numpy's exp; NaN goes
    through as NaN."""
    from tinyoss.model import SWIGLU_ALPHA, swiglu

    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((m, 2 * R)) * spread).astype(np.float32)
    h.reshape(-1)[rng.integers(0, h.size, 2)] = np.nan
    bias = bf16_to_f32(f32_to_bf16(rng.standard_normal(2 * R).astype(np.float32)))
    wide = np.full((m, left + R + 3), 7.0, np.float32)
    kernels.f32_bias_swiglu(h, bias, np.float32(limit), np.float32(SWIGLU_ALPHA),
                            wide[:, left:left + R])
    with np.errstate(over="ignore"):  # exp of a large negative gate: inf, the output -0
        want = swiglu(h + bias, limit)
    np.testing.assert_allclose(wide[:, left:left + R], want, rtol=2e-6, atol=2e-36)
    assert (wide[:, :left] == 7).all() and (wide[:, left + R:] == 7).all()


def test_bias_swiglu_at_the_exp_overflow_edge():
    """Gates whose sigmoid takes exp(88.38 .. 88.72) (gates -52.13 .. -51.93): numpy's float32 exp
    is finite there, and so is the vector exp (it gave inf from 88.38, the output -0 where numpy's
    is ~1e-36: hypothesis found 2.15e-36 past the test above's atol)."""
    from tinyoss.model import SWIGLU_ALPHA, swiglu

    gates = np.linspace(-52.3, -51.8, 257, dtype=np.float32)
    h = np.empty((1, 2 * gates.size), np.float32)
    h[0, 0::2], h[0, 1::2] = gates, 7.0
    out = np.empty((1, gates.size), np.float32)
    kernels.f32_bias_swiglu(h, np.zeros(2 * gates.size, np.float32), np.float32(7.0),
                            np.float32(SWIGLU_ALPHA), out)
    with np.errstate(over="ignore"):
        want = swiglu(h, 7.0)
    assert (want != 0).sum() > 100  # most of them finite and not 0 in numpy
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-44)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(1, 40), st.integers(1, 4),
       st.integers(4, 8))
def test_moe_combine_is_moe_blocks_sum(seed, n, D, k, E):
    """Weighted sum of each token's k expert outputs onto the residual, bit for bit as
    model.moe_block adds them (experts in ascending order, to zeros, then onto x)."""
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.permutation(E)[:k] for _ in range(n)])  # [n, k] distinct per token
    weights = rng.random((n, k)).astype(np.float32)
    x = rng.standard_normal((n, D)).astype(np.float32)
    order = np.argsort(experts.reshape(-1), kind="stable")  # pairs sorted by expert
    y = rng.standard_normal((n * k, D)).astype(np.float32)  # row r: pair order[r]'s output
    pairs = np.empty(n * k, np.int64)
    pairs[order] = np.arange(n * k)
    pairs = pairs.reshape(n, k)
    out = np.empty_like(x)
    kernels.f32_moe_combine(x, y, pairs, weights, out)
    acc = np.zeros_like(x)
    for e in np.unique(experts):  # model.moe_block's loop
        tok, slot = np.nonzero(experts == e)
        acc[tok] += weights[tok, slot, None] * y[pairs[tok, slot]]
    np.testing.assert_array_equal(out, x + acc)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(1, 40), st.integers(1, 70),
       st.integers(1, 4), st.booleans())
def test_route_equals_model_route(seed, n, E, D, k, ties):
    """Decode's router in one kernel against model.route: the same experts in the same order
    (ties: repeated router rows, the lower expert first; a NaN row's logit last), the same
    softmax over their logits (to the logits' rounding)."""
    from types import SimpleNamespace

    from tinyoss.model import linear, route

    k = min(k, E)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((E, D)).astype(np.float32)
    b = rng.standard_normal(E).astype(np.float32)
    if ties and E > 2:  # equal logits: two experts share a row and a bias; one row is NaN
        w[E - 1], b[E - 1] = w[0], b[0]
        w[1, 0] = np.nan
    lw = SimpleNamespace(router_w=f32_to_bf16(w), router_b=f32_to_bf16(b))
    t = rng.standard_normal((n, D)).astype(np.float32)
    _, want_w = route(t, lw, k)
    logits = linear(t, lw.router_w, lw.router_b)  # route's own logits, then its own ordering
    if ties and E > 2:  # equal rows have equal logits; BLAS may round its edge rows apart
        logits[:, E - 1] = logits[:, 0]
    want_e = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    experts, weights = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
    kernels.f32_route(lw.router_w, lw.router_b, t, experts, weights)
    np.testing.assert_array_equal(experts, want_e)
    # the logits are sums in another order (vector lanes, not BLAS): their rounding, times the
    # softmax's slope (at most 1), is the weights' tolerance
    scale = np.nan_to_num(np.abs(t) @ np.abs(bf16_to_f32(lw.router_w)).T, nan=0).max() + 1
    np.testing.assert_allclose(weights, want_w, rtol=0, atol=RTOL * scale)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.integers(1, 300))
def test_weighted_rows_add_equals_numpy(seed, k, D):
    """A decoded token's expert outputs weighted onto the residual: x + w @ y."""
    rng = np.random.default_rng(seed)
    x, y, w = (rng.standard_normal(s).astype(np.float32) for s in (D, (k, D), k))
    out = np.empty(D, np.float32)
    kernels.f32_weighted_rows_add(x, y, w, out)
    _close(out, x + w @ y, np.abs(x) + np.abs(w) @ np.abs(y))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 6), st.booleans(),
       st.sampled_from([0.0, np.nan, np.inf, 1e-40]))
def test_x8_round_trip_rows_equals_quant(seed, n, blocks, strided, special):
    """Prefill's int8 rounding in numba against quant.x8_round_trip, bit for bit: whole rows or
    a strided view rounded in place (as the tile pool does), blocks of zeros, NaN, inf and
    subnormals."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, 32 * blocks)) * rng.uniform(0.01, 50)).astype(np.float32)
    x[0, :32] = special if special != 0.0 else 0.0  # one whole block of it
    x[-1, -1] = special
    want = quant.x8_round_trip(x)
    if strided:  # columns of a wider array, rounded in place
        wide = np.zeros((n, 32 * blocks + 64), np.float32)
        view = wide[:, 32:32 + 32 * blocks]
        view[:] = x
        kernels.x8_round_trip_rows(view, view)
        got = view
    else:
        got = np.empty_like(x)
        kernels.x8_round_trip_rows(x, got)
    np.testing.assert_array_equal(got, want)


def test_l1d_bytes_reads_sysfs(tmp_path):
    """The level-1 data cache's size from a sysfs-shaped folder (what BF16_PREFETCH is chosen by):
    the instruction cache and other levels passed over, K and M units, None without the folder."""
    from tinyoss.simd import l1d_bytes

    for i, (level, kind, size) in enumerate([("1", "Instruction", "64K"), ("1", "Data", "48K"),
                                             ("2", "Unified", "2M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (d / name).write_text(value + "\n")
    assert l1d_bytes(str(tmp_path)) == 48 * 1024
    (tmp_path / "index1" / "size").write_text("1M\n")
    assert l1d_bytes(str(tmp_path)) == 1 << 20
    assert l1d_bytes(str(tmp_path / "missing")) is None


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 200), st.integers(1, 300), st.integers(1, 70))
def test_panel_matmul_equals_numpy(seed, M, K, n):
    """Prefill's register blocks (x86's path in place of BLAS): every panel width (32 tokens
    then 8, 16 or 24; AVX2: 16 then 8), whole and leftover row blocks (M % 6), several passes
    of PANEL_K steps of k and of PANEL_M rows; the padded tokens' columns are zeros."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, K), dtype=np.float32)
    x = (rng.standard_normal((n, K)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    N = kernels.panel_tokens(n)
    assert N % simd.PANEL_STEP == 0 and n <= N < n + simd.PANEL_STEP
    p = np.full(K * N, np.nan, np.float32)
    kernels.pack_panels(x, p)
    out = np.full((M, N), np.nan, np.float32)
    kernels.f32_panel_matmul(a, p, out)
    _close(out[:, :n], a @ x.T, np.abs(a) @ np.abs(x.T))
    assert not out[:, n:].any()


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(1, 200), st.integers(1, 10), st.integers(1, 70))
def test_mxfp4_panel_matmul_equals_decoded_product(seed, M, nb, n):
    """The experts' prefill product: MXFP4 rows decoded a pass of PANEL_K columns at a time
    into a small buffer and multiplied there, against mxfp4.decode (the numpy twin) @ x.T."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (M, nb, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (M, nb), dtype=np.uint8)
    x = (rng.standard_normal((n, nb * 32)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    p = np.empty(nb * 32 * kernels.panel_tokens(n), np.float32)
    kernels.pack_panels(x, p)
    out = np.full((M, kernels.panel_tokens(n)), np.nan, np.float32)
    kernels.f32_mf4_panel_matmul(blocks, scales, p, out,
                                 np.empty(kernels.PANEL_M * kernels.PANEL_K, np.float32))
    w = mxfp4.decode(blocks, scales)
    _close(out[:, :n], w @ x.T, np.abs(w) @ np.abs(x.T))


@pytest.mark.parametrize("panels", [True, False])
@pytest.mark.parametrize("n", [1, 7, 64, "few", "few+1", 300])
def test_tile_pool_products_equal_numpy(n, panels, monkeypatch):
    """TileMatmul takes a tile's product either way round (tile @ x.T for up to FEW_TOKENS
    tokens, x @ tile.T beyond), or up to FEW_TOKENS on our register blocks (PANEL_MATMUL, x86):
    each, with bias and residual, equals numpy's x @ W.T."""
    from tinyoss import fast

    monkeypatch.setattr(fast, "PANEL_MATMUL", panels)
    n = {"few": fast.FEW_TOKENS, "few+1": fast.FEW_TOKENS + 1}.get(n, n)
    rng = np.random.default_rng(n)
    R, C = 700, 96  # tiles of fast.tile_rows(R, workers) rows, the last one shorter
    w = rng.standard_normal((R, C), dtype=np.float32)
    x = rng.standard_normal((n, C), dtype=np.float32)
    bias = rng.standard_normal(R, dtype=np.float32)
    add = rng.standard_normal((n, R), dtype=np.float32)
    pool = fast.TileMatmul()

    def fill(r0, r1, tile):
        tile[:] = w[r0:r1]

    want = x.astype(np.float64) @ w.T.astype(np.float64)
    for b, a, expect in ((None, None, want), (bias, None, want + bias),
                         (bias, add, want + bias + add)):
        out = np.full((n, R), np.nan, np.float32)
        pool.run(pool.tasks(x, R, C, fill, out, bias=b, add=a))
        np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(moe_case(), st.integers(1, 9), st.integers(0, 5), st.booleans(), st.booleans())
def test_x8_tile_matmul_equals_rounded_x_then_matmul(case, m, skip, specials, no_bias):
    """Prefill's int8 expert matmul (mxfp4_q8_matmul_rows: AVX-512 VNNI four rows and up to four
    tokens a call, the rest row by row) against the float matmul of the int8-rounded x, rows
    r0..r1 of one expert into a column slice of a wider output. Its inputs from
    x8_quantize_blocks, which equals x8_quantize_lanes and, per lane, -12 * the sum of the
    bytes the VNNI lanes meet. specials: a zero block, a NaN. no_bias: a [0, 0] bias, none added."""
    blocks, scales, bias, experts, _ = case
    E, R, nb, _ = blocks.shape
    rng = np.random.default_rng(m * 7 + skip)
    x = (rng.standard_normal((m, nb * 32)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    if specials:
        x[0, :32] = 0.0
        x[-1, -1] = np.nan
    q, d = np.empty(x.shape, np.int8), np.empty((m, nb), np.float32)
    c = np.empty((m, kernels.x8_lane_slots(nb)), np.int32)
    kernels.x8_quantize_blocks(x, q, d, c, 0)
    want_q, want_d = np.empty_like(q), np.empty_like(d)
    kernels.x8_quantize_lanes(x, want_q, want_d)
    assert np.array_equal(q, want_q) and np.array_equal(d, want_d, equal_nan=True)
    groups = 4 * (nb // 4)  # lanes: 16 a group of four blocks (evens then odds), 8 a last block
    lanes = np.concatenate([
        (q[:, :32 * groups].reshape(m, -1, 2, 16, 4).sum(axis=(2, 4), dtype=np.int32)
         .reshape(m, -1)), q[:, 32 * groups:].reshape(m, -1, 4).sum(axis=2, dtype=np.int32)],
        axis=1)
    if simd.X8_TILES:  # (elsewhere the plain rows read no lane offsets)
        assert np.array_equal(c, -12 * lanes)
    e = int(experts[0])
    r0 = min(skip, R - 1)
    r1 = R
    out = np.full((m, R + 3), np.nan, np.float32)
    kernels.mxfp4_q8_matmul_rows(blocks, scales, np.zeros((0, 0), np.uint16) if no_bias else bias,
                                 e, r0, r1, q, d, c, 0, m, out[:, 2:2 + r1 - r0])
    w = mxfp4.decode(blocks[e, r0:r1], scales[e, r0:r1]).astype(np.float64)
    xr = quant.x8_round_trip(x).astype(np.float64)
    b = np.zeros(r1 - r0, np.float32) if no_bias else bf16_to_f32(bias[e, r0:r1])
    want, scale = xr @ w.T + b, np.abs(xr) @ np.abs(w).T + np.abs(b)
    got = out[:, 2:2 + r1 - r0]
    assert np.isnan(out[:, :2]).all() and np.isnan(out[:, 2 + r1 - r0:]).all()  # only its columns
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    _close(np.where(nan, 0, got), np.where(nan, 0, want).astype(np.float32), np.where(nan, 0, scale))


def test_x8_tile_matmul_at_the_real_width():
    """The 20b's expert rows (90 blocks: 22 groups of four, two alone), 64 tokens (sixteen calls
    of four), a tile of 512 rows of mlp1's 5760, and blocks b0.. of a row quantized apart (a tile
    pool task's SwiGLU columns) landing where the whole row's would."""
    rng = np.random.default_rng(11)
    R, nb, m = 5760, 90, 64
    blocks = rng.integers(0, 256, (2, R, nb, 16), dtype=np.uint8)
    scales = rng.integers(110, 135, (2, R, nb), dtype=np.uint8)
    bias = f32_to_bf16(rng.standard_normal((2, R)).astype(np.float32))
    x = rng.standard_normal((m, nb * 32)).astype(np.float32)
    q, d = np.empty(x.shape, np.int8), np.empty((m, nb), np.float32)
    c = np.empty((m, kernels.x8_lane_slots(nb)), np.int32)
    for b0 in range(0, nb, 8):  # as experts_x8's mlp1 tasks: 256 columns a tile
        kernels.x8_quantize_blocks(x[:, 32 * b0:32 * b0 + 256], q, d, c, b0)
    whole_q, whole_d = np.empty_like(q), np.empty_like(d)
    whole_c = np.empty_like(c)
    kernels.x8_quantize_blocks(x, whole_q, whole_d, whole_c, 0)
    assert np.array_equal(q, whole_q) and np.array_equal(d, whole_d)
    assert np.array_equal(c, whole_c) or not simd.X8_TILES
    r0, r1 = 1024, 1536
    out = np.empty((m, r1 - r0), np.float32)
    kernels.mxfp4_q8_matmul_rows(blocks, scales, bias, 1, r0, r1, q, d, c, 0, m, out)
    w = mxfp4.decode(blocks[1, r0:r1], scales[1, r0:r1]).astype(np.float64)
    xr = quant.x8_round_trip(x).astype(np.float64)
    b = bf16_to_f32(bias[1, r0:r1])
    _close(out, (xr @ w.T + b).astype(np.float32), np.abs(xr) @ np.abs(w).T + np.abs(b))


@SETTINGS
@given(moe_case(), st.integers(1, 12), st.integers(1, 7))
def test_x8_moe_matmul_equals_rounded_x_then_matmul(case, n, threads):
    """Batched decode's experts with int8 inputs (f32_mf4w_q8x_moe_matmul: each of `threads`
    shares of the rows through mxfp4_q8_matmul_rows): every routed expert's tokens, grouped as
    fast.experts_grouped groups them, against the float matmul of the int8-rounded x."""
    blocks, scales, bias, _, _ = case
    E, R, nb, _ = blocks.shape
    rng = np.random.default_rng(n)
    chosen = np.unique(rng.integers(0, E, 3)).astype(np.int64)  # distinct, ascending
    counts = rng.integers(1, 5, len(chosen))
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    x = rng.standard_normal((starts[-1], nb * 32)).astype(np.float32)
    q, d = np.empty(x.shape, np.int8), np.empty((len(x), nb), np.float32)
    c = np.empty((len(x), kernels.x8_lane_slots(nb)), np.int32)
    kernels.x8_quantize_blocks(x, q, d, c, 0)
    out = np.full((len(x), R), np.nan, np.float32)
    kernels.f32_mf4w_q8x_moe_matmul(blocks, scales, bias, chosen, starts, q, d, c, out, threads)
    xr = quant.x8_round_trip(x).astype(np.float64)
    for e, t0, t1 in zip(chosen, starts[:-1], starts[1:]):
        w = mxfp4.decode(blocks[e], scales[e]).astype(np.float64)
        b = bf16_to_f32(bias[e])
        _close(out[t0:t1], (xr[t0:t1] @ w.T + b).astype(np.float32),
               np.abs(xr[t0:t1]) @ np.abs(w).T + np.abs(b))
