"""The fast path: the forward pass of model.py with numba kernels, for prefill and decode.

Same math, same order of steps as `model.forward_reference` (read that first); what changes:
  - dense weights: one token -> the bf16 (or int8) matvec kernel, reading each weight once (a
    few tokens: the bf16 matmul kernel, the same); many -> BLAS on float32 tiles widened a few
    rows at a time;
  - experts: one token -> the fused MXFP4 matvec kernel (decodes on the fly, reads only the routed
    experts); many tokens -> grouped by expert, each expert decoded once per call: block by
    block in registers for the few tokens that chose it, or tile by tile for BLAS for many;
  - attention: the kernel reads keys straight from the KV cache (ring buffer on banded layers) and
    touches only the visible band.
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from . import amx, kernels, simd
from .config import Config
from .errors import NonFiniteError
from .model import SWIGLU_ALPHA, KVCache, LayerWeights, Weights, rope_cos_sin, swiglu
from .quant import x8_round_trip
from .store import bf16_to_f32, scratch

MATVEC_MAX_TOKENS = 1  # decode: one token, the matvec kernels
FUSED_MAX_TOKENS = 8  # up to this many tokens, fused kernels (each weight decoded once, the
# tokens' sums in registers) beat widening tiles for BLAS: dense bf16 weights and each expert
TILE_ROWS = 512  # rows widened/decoded at once for BLAS: a few MB, stays in cache
# Up to this many tokens a tile's product is taken as tile @ x.T (then transposed into place):
# OpenBLAS 0.3.31 (numpy's, one thread, Zen 4) did the 20b's [n, 2880] @ [2880, 512] at 41, 60,
# 78 GFLOP/s for n = 16, 32, 64 tokens, and [512, 2880] @ [2880, n] at 77, 89, 95; at n = 512
# both ~102. Prefill's experts see ~n * 4 / 32 tokens each.
FEW_TOKENS = 256
# Prefill's expert tiles (MXFP4, decoded as they are multiplied) and, up to FEW_TOKENS tokens,
# the dense ones, multiplied by our register blocks (kernels.f32_mf4_panel_matmul,
# f32_panel_matmul) rather than BLAS, on x86 (AVX2 / AVX-512); elsewhere numpy's BLAS. Where
# BLAS was ahead (512 tokens x a dense matrix: [512, 2880] @ [2880, 512], two threads at once)
# it stays.
PANEL_MATMUL = simd.HAVE_AVX2
_NO_BIAS = np.zeros(0, np.uint16)
_NO_BIAS.flags.writeable = False  # read-only, as a checkpoint's biases: one compiled kernel
# serves the matrices with and without a bias (numba compiles each array type apart)
_NO_EXPERT_BIAS = np.zeros((0, 0), np.uint16)  # (the int8 expert matmul's: bias added later)
_NO_EXPERT_BIAS.flags.writeable = False
_NO_OFFSETS = np.zeros((0, 0), np.int32)  # kernels.f32_swiglu_x8 without the VNNI lane offsets
_NO_F32 = np.zeros(0, np.float32)  # amx's matmuls without a bias
_NO_ADD = np.zeros((0, 0), np.float32)  # or without a residual


class TileMatmul:
    """Prefill's matmuls: x [n, C] @ W.T for a weight W [R, C] stored as bf16, int8 or MXFP4.

    W is turned into float32 a tile of rows at a time (TILE_ROWS or fewer) and multiplied by
    BLAS. Each of the worker threads (one per core) takes the next task, fills its tile with a
    serial numba kernel into its own reused buffer (fresh memory would page-fault every time),
    multiplies it with BLAS held to one thread and writes its columns of the output, bias and
    residual added there. Two thread pools (numba's, OpenBLAS's) alternating on the same cores
    would spin against each other; here there is one pool, and numba's and BLAS's code run
    inside it. `run` takes the tasks of several matmuls at once (q, k and v; every expert of a
    layer): the threads wait for each other once per run, not once per matrix.
    """

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._workers = 0

    def buffer(self, name: str, rows: int, cols: int) -> np.ndarray:
        """This thread's reused float32 buffer `name` (store.scratch), as [rows, cols]."""
        return scratch("tiles " + name, rows * cols).reshape(rows, cols)

    def product(self, x: np.ndarray, tile: np.ndarray) -> np.ndarray:
        """x [n, C] @ tile.T -> [n, r] in this thread's buffer (BLAS held to one thread): for up
        to FEW_TOKENS tokens taken as tile @ x.T and returned transposed (a view)."""
        with np.errstate(all="ignore"):  # NaN / inf from a bad weight: `_forward` names the
            if x.shape[0] <= FEW_TOKENS:  # layer (numpy's warnings said nothing useful first)
                ht = self.buffer("ht", tile.shape[0], x.shape[0])
                np.matmul(tile, x.T, out=ht)
                return ht.T
            h = self.buffer("h", x.shape[0], tile.shape[0])
            np.matmul(x, tile.T, out=h)
            return h

    def panels(self, x: np.ndarray) -> np.ndarray:
        """x [n, C] packed for panel_product (kernels.pack_panels): fresh, shared by tasks."""
        p = np.empty(x.shape[1] * kernels.panel_tokens(x.shape[0]), np.float32)
        kernels.pack_panels(x, p)
        return p

    def panel_product(self, p: np.ndarray, n: int, tile: np.ndarray) -> np.ndarray:
        """x [n, C] @ tile.T -> [n, r] (a view of this thread's buffer) for x packed into p by
        `panels`: our register blocks (kernels.f32_panel_matmul) in place of BLAS."""
        ht = self.buffer("ht", tile.shape[0], kernels.panel_tokens(n))
        kernels.f32_panel_matmul(tile, p, ht)
        return ht[:, :n].T

    def mxfp4_panel_product(self, blocks: np.ndarray, scales: np.ndarray, p: np.ndarray,
                            n: int) -> np.ndarray:
        """`panel_product` for the MXFP4 rows blocks [r, nb, 16], scales [r, nb], decoded a few
        columns at a time into the cache as they are multiplied (kernels.f32_mf4_panel_matmul)."""
        ht = self.buffer("ht", blocks.shape[0], kernels.panel_tokens(n))
        a = self.buffer("panel a", kernels.PANEL_M, kernels.PANEL_K)
        kernels.f32_mf4_panel_matmul(blocks, scales, p, ht, a)
        return ht[:, :n].T

    def bf16_buffer(self, name: str, rows: int, cols: int) -> np.ndarray:
        """This thread's reused buffer `name` of bf16 bits (uint16), as [rows, cols]."""
        return scratch("tiles " + name, -(-rows * cols // 2)).view(np.uint16)[:rows * cols] \
            .reshape(rows, cols)

    def packed(self, x: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """x [n, C] as amx.pack_x lays it out for the matmul's row slots `cols` (amx.order),
        packed by the worker threads, a share of the token tiles each."""
        xp = amx.empty_packed(*x.shape)
        tiles = xp.shape[1]
        step = -(-tiles // self.workers())
        self.run([functools.partial(amx.pack_x, x[amx.TILE * j:amx.TILE * (j + step)], cols,
                                    xp[:, j:j + step]) for j in range(0, tiles, step)])
        return xp

    def workers(self) -> int:
        return numba.get_num_threads()

    def run(self, tasks: list) -> None:
        """Call every task (no arguments) on the worker threads; returns when all are done."""
        workers = self.workers()
        if self._pool is None or self._workers != workers:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tinyoss-tile")
            self._workers = workers
        list(self._pool.map(lambda task: task(), tasks))

    def tasks(self, x: np.ndarray, rows: int, cols: int, fill, out: np.ndarray,
              bias: np.ndarray | None = None, add: np.ndarray | None = None) -> list:
        """The tasks writing out [n, R] = x @ W.T (+ bias [R] f32) (+ add [n, R]), in that order
        of the adds; fill(r0, r1, tile) writes rows r0..r1 of W as float32 into tile."""
        step = tile_rows(rows, self.workers())
        n = x.shape[0]
        p = self.panels(x) if PANEL_MATMUL and n <= FEW_TOKENS else None  # else BLAS's turn

        def work(r0: int) -> None:
            r1 = min(r0 + step, rows)
            tile = self.buffer("tile", r1 - r0, cols)
            fill(r0, r1, tile)
            # (BLAS into a strided `out=` column slice would not run)
            h = self.product(x, tile) if p is None else self.panel_product(p, n, tile)
            if bias is not None:
                h += bias[r0:r1]
            if add is not None:
                np.add(add[:, r0:r1], h, out=out[:, r0:r1])
            else:
                out[:, r0:r1] = h

        return [functools.partial(work, r0) for r0 in range(0, rows, step)]


def tile_rows(rows: int, workers: int) -> int:
    """Rows of a dense matrix's tiles: TILE_ROWS, or fewer (a multiple of 64) where that leaves
    fewer than two tiles a worker (k and v of the 20b: 512 rows)."""
    per = -(-rows // (2 * workers))
    return min(TILE_ROWS, max(64, -(-per // 64) * 64))


TILE_MATMUL = TileMatmul()


class Dense:
    """One dense weight matrix [R, C] (+ bias [R]): bf16 as published, or int8 blocks (q8)."""

    def __init__(self, w: np.ndarray, b: np.ndarray | None,
                 q8: tuple[np.ndarray, np.ndarray] | None = None, release=lambda arr: None):
        self.rows, self.cols = w.shape
        self.serial = self.rows < 256  # waking the worker threads costs more than the work
        self.bias = _NO_BIAS if b is None else b
        self.bias_f32 = None if b is None else bf16_to_f32(b)
        self.w = w
        self.q8 = q8  # (int8 [R, C], scales [R, C/32]) from quant.q8_copies, or None
        if q8:
            release(w)  # the bf16 pages are not read again: keep resident memory to the int8 copy

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.q8) if self.q8 else self.w.nbytes

    def __call__(self, x: np.ndarray, add: np.ndarray | None = None) -> np.ndarray:
        """x [n, C] f32 -> [n, R] f32 (+ add [n, R]: the residual)."""
        n = x.shape[0]
        if n > FUSED_MAX_TOKENS:  # prefill: float32 tiles for BLAS
            out = np.empty((n, self.rows), np.float32)
            TILE_MATMUL.run(self.tasks(x, out, add))
            return out
        out = self._few(x)
        return out if add is None else add + out

    @property
    def amx(self) -> bool:
        """Whether prefill takes this matrix's products on AMX (bf16 weights, whole tiles)."""
        return amx.AVAILABLE and not self.q8 and self.rows % amx.TILE == 0 and \
            self.cols % amx.STEP == 0

    def tasks(self, x: np.ndarray, out: np.ndarray, add: np.ndarray | None = None,
              xp: np.ndarray | None = None) -> list:
        """TileMatmul's tasks writing out [n, R] = x @ W.T + bias (+ add); on AMX from xp, x
        packed (TileMatmul.packed with amx.order(C, False): q, k and v share it), or packed here."""
        if self.amx:
            if xp is None:
                xp = TILE_MATMUL.packed(x, amx.order(self.cols, False))
            step = tile_rows(self.rows, TILE_MATMUL.workers())
            bias = _NO_F32 if self.bias_f32 is None else self.bias_f32
            return [functools.partial(amx.bf16_matmul, self.w[r0:r0 + step], xp, x.shape[0],
                                      bias[r0:r0 + step], _NO_ADD if add is None else add, out, r0)
                    for r0 in range(0, self.rows, step)]
        if self.q8:
            q, s = self.q8
            fill = lambda r0, r1, tile: kernels.q8_dequantize(q[r0:r1], s[r0:r1], tile)  # noqa
        else:
            fill = lambda r0, r1, tile: kernels.bf16_widen(self.w[r0:r1], tile)  # noqa: E731
        return TILE_MATMUL.tasks(x, self.rows, self.cols, fill, out, self.bias_f32, add)

    def _few(self, x: np.ndarray) -> np.ndarray:
        """Up to FUSED_MAX_TOKENS tokens: the matvec or few-token kernels."""
        n = x.shape[0]
        out = np.empty((n, self.rows), np.float32)
        if n <= MATVEC_MAX_TOKENS:
            for i in range(n):
                if self.q8:
                    kernels.f32_q8w_matvec(self.q8[0], self.q8[1], x[i], self.bias, out[i])
                elif self.serial:
                    kernels.f32_bf16w_matvec_serial(self.w, x[i], self.bias, out[i])
                else:
                    kernels.f32_bf16w_matvec(self.w, x[i], self.bias, out[i])
            return out
        if n <= FUSED_MAX_TOKENS:  # a few tokens: each weight read once
            if self.q8:
                kernels.f32_q8w_matmul(self.q8[0], self.q8[1], np.ascontiguousarray(x), self.bias, out)
            else:
                kernels.f32_bf16w_matmul(self.w, np.ascontiguousarray(x), self.bias, out)
        return out


def q8_matrices(w: Weights) -> dict[str, np.ndarray]:
    """The bf16 matrices dense='q8' replaces with int8 copies, by checkpoint name: attention's
    q/k/v/o of every layer and the unembedding (the tiny router stays exact)."""
    mats = {f"{i}.{n}": getattr(lw, n) for i, lw in enumerate(w.layers)
            for n in ("q_w", "k_w", "v_w", "o_w")}
    return mats | {"unembed": w.unembed}


class FastLayer:
    def __init__(self, lw: LayerWeights, q8: dict, prefix: str, release, x8: bool = False):
        self.lw = lw
        self.x8 = x8  # expert_input="q8": int8 activations into the routed experts
        self.q = Dense(lw.q_w, lw.q_b, q8.get(prefix + "q_w"), release)
        self.k = Dense(lw.k_w, lw.k_b, q8.get(prefix + "k_w"), release)
        self.v = Dense(lw.v_w, lw.v_b, q8.get(prefix + "v_w"), release)
        self.o = Dense(lw.o_w, lw.o_b, q8.get(prefix + "o_w"), release)
        self.router = Dense(lw.router_w, lw.router_b)  # tiny; kept exact
        self.sinks = bf16_to_f32(lw.sinks)  # [Hq]

    def qkv(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """t [n, D] -> q [n, Hq*dh], k, v [n, Hkv*dh]; one kernel launch for a few bf16 tokens."""
        n = t.shape[0]
        if n > FUSED_MAX_TOKENS:  # prefill: the three matrices' tiles in one run of the pool
            q, k, v = (np.empty((n, d.rows), np.float32) for d in (self.q, self.k, self.v))
            xp = TILE_MATMUL.packed(t, amx.order(t.shape[1], False)) if self.q.amx else None
            TILE_MATMUL.run(self.q.tasks(t, q, xp=xp) + self.k.tasks(t, k, xp=xp) +
                            self.v.tasks(t, v, xp=xp))
            return q, k, v
        if self.q.q8 and n == 1:  # decode: one launch for the three int8 matvecs
            q, k, v = (np.empty((1, d.rows), np.float32) for d in (self.q, self.k, self.v))
            kernels.f32_q8w_qkv_matvec(*self.q.q8, self.q.bias, q[0], *self.k.q8, self.k.bias, k[0],
                                       *self.v.q8, self.v.bias, v[0], t[0])
            return q, k, v
        if self.q.q8:
            return self.q(t), self.k(t), self.v(t)
        q = np.empty((n, self.q.rows), np.float32)
        k = np.empty((n, self.k.rows), np.float32)
        v = np.empty((n, self.v.rows), np.float32)
        kernels.f32_bf16w_qkv_matmul(self.q.w, self.q.bias, q, self.k.w, self.k.bias, k,
                                     self.v.w, self.v.bias, v, np.ascontiguousarray(t))
        return q, k, v


class FastWeights:
    """The weights as the fast path uses them: views, plus the int8 copies when dense='q8'."""

    def __init__(self, w: Weights, q8: dict | None = None, release=lambda arr: None,
                 expert_input: str = "f32"):
        """q8: {name: (int8, scales)} for the matrices of `q8_matrices(w)` (dense='q8');
        expert_input: "f32", or "q8" (model.moe_block)."""
        q8 = q8 or {}
        self.embed = w.embed
        self.norm = w.norm
        self.layers = [FastLayer(lw, q8, f"{i}.", release, expert_input == "q8")
                       for i, lw in enumerate(w.layers)]
        self.unembed = Dense(w.unembed, None, q8.get("unembed"), release)

    def dense(self) -> list[Dense]:
        """The matrices dense='q8' may replace: every layer's q, k, v, o and the unembedding."""
        return [self.unembed] + [d for fl in self.layers for d in (fl.q, fl.k, fl.v, fl.o)]

    @property
    def q8_bytes(self) -> int:
        """Memory held by int8 copies (0 with bf16 dense weights)."""
        return sum(d.nbytes for d in self.dense() if d.q8)


def attention(c: Config, layer: int, fl: FastLayer, cache: KVCache, q, k, v,
              positions) -> np.ndarray:
    """q [n, Hq, dh], k/v [n, Hkv, dh] (roped) -> [n, Hq*dh]; appends k/v to the cache."""
    n = q.shape[0]
    sliding = c.layer_sliding[layer]
    window = c.sliding_window if sliding else 0
    if sliding and n > 1:
        # the new tokens would overwrite ring slots their own queries still need: attend over
        # (cached keys in order + new keys, as the cache stores them), then keep the last
        # `window` in the ring
        k, v = cache.stored(k), cache.stored(v)
        old_pos, old_k, old_v = cache.read(layer)
        keys = np.concatenate([old_k, k]).transpose(1, 0, 2).copy()  # [Hkv, T, dh]
        values = np.concatenate([old_v, v]).transpose(1, 0, 2).copy()
        first = int(old_pos[0]) if len(old_pos) else int(positions[0])
        out = np.empty((n, c.q_dim), np.float32)
        kernels.f32_attention(q, keys, values, fl.sinks, int(positions[0]), first, 0, first,
                              window, out)
        cache.write(layer, positions, k, v)
        return out
    cache.write(layer, positions, k, v)  # the kernels below read the keys as stored
    end = int(positions[-1]) + 1
    if n == 1:  # decode: every cached key is visible, in any slot order
        count = min(end, cache.window) if sliding else end
        return attend_one(q, cache.k[layer], cache.v[layer], count, fl.sinks)
    out = np.empty((n, c.q_dim), np.float32)
    kernels.f32_attention(q, cache.k[layer], cache.v[layer], fl.sinks, int(positions[0]), 0, 0,
                          0, 0, out)
    return out


def attend_one(q: np.ndarray, k_buf: np.ndarray, v_buf: np.ndarray, count: int,
               sinks: np.ndarray) -> np.ndarray:
    """One query token against the first `count` slots of the cache, all visible (in any slot
    order): model.sdpa without a mask. q [1, Hq, dh], k_buf/v_buf [Hkv, S, dh] (cache buffers),
    sinks [Hq] -> [1, Hq*dh]. Up to FUSED_KEYS keys one kernel launch, a task per KV head (as the
    scores and values kernels split that many); beyond, three kernels on all cores: scores (keys
    split across the threads too), softmax (in place, in a reused buffer), weighted sum of values."""
    Hkv, slots, dh = k_buf.shape
    assert 0 < count <= slots  # the kernels read the buffers unchecked
    if count <= FUSED_KEYS:
        return attend_fused(q, [k_buf], [v_buf], np.array([count], np.int64), sinks)
    qh = q[0].reshape(Hkv, -1, dh)  # [Hkv, q_mult, dh]
    q_mult = qh.shape[1]
    scores = scratch("scores", Hkv * q_mult * count).reshape(Hkv, q_mult, count)
    kernels.f32_decode_scores(qh, k_buf, count, scores)
    denom = np.empty(Hkv * q_mult, np.float32)
    kernels.f32_softmax_rows(scores.reshape(-1, count), sinks, denom)  # the sink: one more column
    out = np.empty((Hkv, q_mult, dh), np.float32)
    kernels.f32_decode_values(scores, v_buf, count, denom, out)
    return out.reshape(1, -1)


FUSED_KEYS = 512  # f32_decode_scores's keys a task: below, it has a task per KV head too


def attend_fused(q: np.ndarray, k_bufs: list, v_bufs: list, counts: np.ndarray,
                 sinks: np.ndarray) -> np.ndarray:
    """B query tokens (q [B, Hq, dh]), each against the first counts[i] slots of its own cache
    buffers k_bufs[i], v_bufs[i] [Hkv, S_i, dh] (KVCache's: C-contiguous, k and v alike, one
    dtype across the B), in one kernel launch -> [B, Hq*dh]."""
    k_addr = np.array([b.ctypes.data for b in k_bufs], np.int64)  # (the lists keep them alive)
    v_addr = np.array([b.ctypes.data for b in v_bufs], np.int64)
    slots = np.array([b.shape[1] for b in k_bufs], np.int64)
    assert (counts <= slots).all()  # the kernel reads the buffers unchecked
    out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), np.float32)
    kernels.f32_decode_attention_batch(q, k_bufs[0].shape[0], k_addr, v_addr, slots, counts,
                                       k_bufs[0], sinks, out)
    return out


def attend_batch(c: Config, layer: int, fl: FastLayer, caches: list[KVCache], q, k, v,
                 positions: np.ndarray) -> np.ndarray:
    """One decode token of each of B streams (caches of one kv kind; q [B, Hq, dh], k/v
    [B, Hkv, dh] roped, positions [B]) -> [B, Hq*dh]: appends each k/v to its cache, then every
    stream's attention in one kernel launch, each against its own buffers."""
    for i, cache in enumerate(caches):
        cache.write(layer, positions[i:i + 1], k[i:i + 1], v[i:i + 1])
    counts = positions + 1
    if c.layer_sliding[layer]:
        counts = np.minimum(counts, c.sliding_window)
    return attend_fused(q, [cache.k[layer] for cache in caches],
                        [cache.v[layer] for cache in caches], counts, fl.sinks)


def moe(c: Config, fl: FastLayer, t: np.ndarray, x: np.ndarray) -> np.ndarray:
    """t [n, D] (normed), x [n, D] (the residual) -> x + the weighted sum of t's experts' outputs
    [n, D]."""
    lw = fl.lw
    n, k = t.shape[0], c.experts_per_token
    if n > FUSED_MAX_TOKENS:  # prefill
        logits = fl.router(t)  # [n, E]
        experts = np.argsort(-logits, axis=-1, kind="stable")[:, :k]  # [n, k] best first
        top = np.take_along_axis(logits, experts, axis=-1)
        weights = np.exp(top - top[:, :1])
        weights /= weights.sum(axis=-1, keepdims=True)  # softmax over the top-k only
        return experts_prefill(c, fl, t, experts, weights, x)
    experts, weights = np.empty((n, k), np.int64), np.empty((n, k), np.float32)
    kernels.f32_route(lw.router_w, lw.router_b, t, experts, weights)  # the same, in one call
    if n > MATVEC_MAX_TOKENS:  # a decode batch, a short prompt
        return experts_grouped(c, fl, t, experts, weights, x)
    out = np.empty_like(t)
    for i in range(n):  # decode: the fused kernel, k experts at once
        if fl.x8:
            y = expert_matvec_x8(c, lw, experts[i], t[i:i + 1])
        else:
            y = expert_matvec(c, lw, experts[i], t[i:i + 1])
        kernels.f32_weighted_rows_add(x[i], y, weights[i], out[i])
    return out


def experts_prefill(c: Config, fl: FastLayer, t: np.ndarray, experts: np.ndarray,
                    weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Prefill's routed experts: t [n, D], experts/weights [n, k], x [n, D] (the residual) ->
    x + the weighted sum [n, D], summed as model.moe_block does (experts in ascending order).

    The (token, expert) pairs are sorted by expert and their inputs gathered side by side
    [n*k, D], so each routed expert is decoded once for its rows: block by block in registers
    if at most FUSED_MAX_TOKENS tokens chose it (expert_few), else tile by tile for BLAS
    (experts_tiles: every such expert of the layer in one run of the pool). Then one kernel
    weights and sums each token's k rows onto the residual. The steps between the matmuls run
    on every core (kernels), not in Python."""
    lw, (n, k) = fl.lw, experts.shape
    order = np.argsort(experts.reshape(-1), kind="stable")  # [n*k] pairs grouped by expert
    chosen, starts, counts = np.unique(experts.reshape(-1)[order], return_index=True,
                                       return_counts=True)
    xs = np.empty((n * k, c.hidden_size), np.float32)
    kernels.f32_gather_rows(t, order // k, xs)  # [n*k, D], each pair's token
    y = np.empty_like(xs)  # [n*k, D], each pair's expert output
    many = []
    # int8 products (VNNI) for every expert, however few; where AMX takes the tiles, it takes
    # the int8-rounded inputs too (exact products of the same values: faster there)
    int8 = fl.x8 and kernels.X8_TILES and not _amx_experts(c)
    for e, s0, m in zip(chosen.tolist(), starts.tolist(), counts.tolist()):
        if m <= FUSED_MAX_TOKENS and not int8:  # few tokens: decoded block by block, in registers
            y[s0:s0 + m] = expert_few(c, lw, e, xs[s0:s0 + m], fl.x8)
        else:
            many.append((e, s0, s0 + m))
    if many:
        (experts_x8 if int8 else experts_tiles)(c, fl, many, xs, y)
    pairs = np.empty(n * k, np.int64)
    pairs[order] = np.arange(n * k)  # the row of y of each (token, slot)
    out = np.empty_like(x)
    kernels.f32_moe_combine(x, y, pairs.reshape(n, k), np.ascontiguousarray(weights, np.float32),
                            out)
    return out


def experts_tiles(c: Config, fl: FastLayer, groups: list, xs: np.ndarray, y: np.ndarray) -> None:
    """Experts on many tokens each, decoded tile by tile for BLAS: groups [(expert, s0, s1)]:
    rows s0..s1 of xs [n*k, D] chose that expert; writes its outputs (bias added, not yet
    weighted) into rows s0..s1 of y [n*k, D]. Two runs of the pool over every expert's tiles:
    mlp1 (each task adds its bias and applies SwiGLU to its columns), then mlp2.
    x8 (expert_input="q8"): both matmuls' inputs rounded to int8 blocks first (in float)."""
    lw, D, I = fl.lw, c.hidden_size, c.intermediate_size
    limit, alpha = np.float32(c.swiglu_limit), np.float32(SWIGLU_ALPHA)
    pool = TILE_MATMUL
    groups = sorted(groups, key=lambda g: g[1] - g[2])  # the most tokens first
    b1, b2 = bf16_to_f32(lw.mlp1_bias), bf16_to_f32(lw.mlp2_bias)  # [E, 2I], [E, D]
    if fl.x8:
        rounded = np.empty_like(xs)

        def round_rows(e: int, s0: int, s1: int) -> None:
            kernels.x8_round_trip_rows(xs[s0:s1], rounded[s0:s1])

        pool.run([functools.partial(round_rows, *g) for g in groups])
        xs = rounded
    a = np.empty((xs.shape[0], I), np.float32)  # [n*k, I] the SwiGLU outputs
    if _amx_experts(c):
        return _experts_amx(c, fl, groups, xs, a, y, b1, b2)
    panels = {}  # s0 -> the group's inputs packed for kernels.f32_mf4_panel_matmul

    def pack(inputs: np.ndarray, e: int, s0: int, s1: int) -> None:
        panels[s0] = pool.panels(inputs[s0:s1])

    def product(blocks, scales, inputs: np.ndarray, s0: int, s1: int) -> np.ndarray:
        """inputs[s0:s1] @ W.T for W = the MXFP4 rows blocks, scales -> [s1 - s0, rows]."""
        if PANEL_MATMUL:
            return pool.mxfp4_panel_product(blocks, scales, panels[s0], s1 - s0)
        tile = pool.buffer("tile", blocks.shape[0], blocks.shape[1] * 32)
        kernels.mxfp4_decode_serial(blocks, scales, tile)
        return pool.product(inputs[s0:s1], tile)

    if PANEL_MATMUL:
        pool.run([functools.partial(pack, xs, *g) for g in groups])

    def mlp1(e: int, s0: int, s1: int, r0: int) -> None:  # rows r0..r1 of mlp1: [m, D] -> a
        r1 = min(r0 + TILE_ROWS, 2 * I)
        h = product(lw.mlp1_blocks[e, r0:r1], lw.mlp1_scales[e, r0:r1], xs, s0, s1)
        cols = a[s0:s1, r0 // 2:r1 // 2]  # gate, up interleaved: columns r0/2.. of SwiGLU's
        kernels.f32_bias_swiglu(h, b1[e, r0:r1], limit, alpha, cols)
        if fl.x8:  # (r0/2 is a multiple of 32: the int8 blocks of whole rows)
            kernels.x8_round_trip_rows(cols, cols)

    def mlp2(e: int, s0: int, s1: int, r0: int) -> None:  # rows r0..r1 of mlp2: a -> y
        r1 = min(r0 + TILE_ROWS, D)
        h = product(lw.mlp2_blocks[e, r0:r1], lw.mlp2_scales[e, r0:r1], a, s0, s1)
        np.add(h, b2[e, r0:r1], out=y[s0:s1, r0:r1])

    pool.run([functools.partial(mlp1, *g, r0) for g in groups for r0 in range(0, 2 * I, TILE_ROWS)])
    if PANEL_MATMUL:
        pool.run([functools.partial(pack, a, *g) for g in groups])
    pool.run([functools.partial(mlp2, *g, r0) for g in groups for r0 in range(0, D, TILE_ROWS)])


def _amx_experts(c: Config) -> bool:
    """Whether prefill's experts take amx.mxfp4_matmul: AMX here, and whole tiles."""
    return amx.AVAILABLE and c.hidden_size % amx.STEP == 0 and c.intermediate_size % amx.STEP == 0


def _experts_amx(c: Config, fl: FastLayer, groups: list, xs: np.ndarray, a: np.ndarray,
                 y: np.ndarray, b1: np.ndarray, b2: np.ndarray) -> None:
    """experts_tiles on AMX (amx.mxfp4_matmul: each task decodes its rows to bf16 and takes
    their products with the expert's tokens, x in three bf16 parts: exact). xs [n*k, D] the
    inputs, a [n*k, I] room for the SwiGLU outputs, y [n*k, D] the outputs; b1, b2 the biases
    as float32."""
    lw, D, I = fl.lw, c.hidden_size, c.intermediate_size
    limit, alpha = np.float32(c.swiglu_limit), np.float32(SWIGLU_ALPHA)
    pool = TILE_MATMUL
    packed = {}

    def pack(rows: np.ndarray, g: tuple) -> None:  # one expert's tokens, on one worker
        packed[g] = amx.packed(rows[g[1]:g[2]], amx.order(rows.shape[1], True))

    def mlp1(g: tuple, r0: int) -> None:  # rows r0..r1 of mlp1: [m, D] -> a
        (e, s0, s1), r1 = g, min(r0 + TILE_ROWS, 2 * I)
        h = pool.buffer("h", s1 - s0, r1 - r0)
        amx.mxfp4_matmul(lw.mlp1_blocks[e], lw.mlp1_scales[e], r0, r1, packed[g], s1 - s0,
                         _NO_F32, h, 0, pool.bf16_buffer("rows", r1 - r0, D))
        cols = a[s0:s1, r0 // 2:r1 // 2]  # gate, up interleaved: columns r0/2.. of SwiGLU's
        kernels.f32_bias_swiglu(h, b1[e, r0:r1], limit, alpha, cols)
        if fl.x8:
            kernels.x8_round_trip_rows(cols, cols)

    def mlp2(g: tuple, r0: int) -> None:  # rows r0..r1 of mlp2: a -> y (bias added)
        (e, s0, s1), r1 = g, min(r0 + TILE_ROWS, D)
        amx.mxfp4_matmul(lw.mlp2_blocks[e], lw.mlp2_scales[e], r0, r1, packed[g], s1 - s0,
                         b2[e, r0:r1], y[s0:s1], r0, pool.bf16_buffer("rows", r1 - r0, I))

    pool.run([functools.partial(pack, xs, g) for g in groups])
    pool.run([functools.partial(mlp1, g, r0) for g in groups for r0 in range(0, 2 * I, TILE_ROWS)])
    pool.run([functools.partial(pack, a, g) for g in groups])
    pool.run([functools.partial(mlp2, g, r0) for g in groups for r0 in range(0, D, TILE_ROWS)])


def x8_arrays(n: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Room for n rows of `cols` values as kernels.x8_quantize_blocks writes them: int8 q, halved
    scales, lane offsets."""
    return (np.empty((n, cols), np.int8), np.empty((n, cols // 32), np.float32),
            np.empty((n, kernels.x8_lane_slots(cols // 32)), np.int32))


def experts_x8(c: Config, fl: FastLayer, groups: list, xs: np.ndarray, y: np.ndarray) -> None:
    """experts_tiles with int8 inputs multiplied in int8 (expert_input="q8" where the CPU has
    AVX-512 VNNI: kernels.mxfp4_q8_matmul_rows, each block decoded once for four tokens, 1.7x
    the float tiles + BLAS on a Zen 4 core). The same three runs of the pool: the inputs
    quantized, mlp1 (each task adds its bias, applies SwiGLU to its columns and quantizes
    them), mlp2. Same numbers as experts_tiles up to float rounding (the int8 products are
    exact; the sums go in another order)."""
    lw, D, I = fl.lw, c.hidden_size, c.intermediate_size
    limit, alpha = np.float32(c.swiglu_limit), np.float32(SWIGLU_ALPHA)
    pool, n = TILE_MATMUL, xs.shape[0]
    groups = sorted(groups, key=lambda g: g[1] - g[2])  # the most tokens first
    b1 = bf16_to_f32(lw.mlp1_bias)  # [E, 2I]
    xq, aq = x8_arrays(n, D), x8_arrays(n, I)

    def quantize(e: int, s0: int, s1: int) -> None:
        kernels.x8_quantize_blocks(xs[s0:s1], *(v[s0:s1] for v in xq), 0)

    def mlp1(e: int, s0: int, s1: int, r0: int) -> None:  # rows r0..r1 of mlp1 -> aq's blocks
        r1 = min(r0 + TILE_ROWS, 2 * I)
        h = pool.buffer("h", s1 - s0, r1 - r0)
        kernels.mxfp4_q8_matmul_rows(lw.mlp1_blocks, lw.mlp1_scales, _NO_EXPERT_BIAS, e, r0, r1,
                                     *xq, s0, s1, h)
        a = pool.buffer("a", s1 - s0, (r1 - r0) // 2)
        kernels.f32_bias_swiglu(h, b1[e, r0:r1], limit, alpha, a)  # gate, up interleaved
        kernels.x8_quantize_blocks(a, *(v[s0:s1] for v in aq), r0 // 64)

    def mlp2(e: int, s0: int, s1: int, r0: int) -> None:  # rows r0..r1 of mlp2: aq -> y
        r1 = min(r0 + TILE_ROWS, D)
        kernels.mxfp4_q8_matmul_rows(lw.mlp2_blocks, lw.mlp2_scales, lw.mlp2_bias, e, r0, r1,
                                     *aq, s0, s1, y[s0:s1, r0:r1])

    pool.run([functools.partial(quantize, *g) for g in groups])
    pool.run([functools.partial(mlp1, *g, r0) for g in groups for r0 in range(0, 2 * I, TILE_ROWS)])
    pool.run([functools.partial(mlp2, *g, r0) for g in groups for r0 in range(0, D, TILE_ROWS)])


def experts_grouped(c: Config, fl: FastLayer, t: np.ndarray, experts: np.ndarray,
                    weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A few tokens' experts, two kernel launches in all: t [n, D], experts/weights [n, k], x
    [n, D] (the residual) -> x + the weighted sum [n, D]. The (token, expert) pairs are sorted
    by expert, so each routed expert is read once for every token that chose it
    (kernels.f32_mf4w_moe_matmul); then weighted and summed onto the residual as prefill's are
    (kernels.f32_moe_combine). x8 (expert_input="q8"): the inputs as int8 blocks, multiplied in
    int8 where the CPU has AVX-512 VNNI (kernels.f32_mf4w_q8x_moe_matmul), else rounded in
    float first. The float path's gather and final sums are kernels, not numpy: a 4-token
    step's Python and numpy 13.6 -> 8.4 ms of ~280 on the Zen 4 (`profile_decode.py --batch 4`)."""
    lw, (n, k) = fl.lw, experts.shape
    order = np.argsort(experts.reshape(-1), kind="stable")  # [n*k] pairs grouped by expert
    tok = order // k  # the token of each pair
    chosen, starts = np.unique(experts.reshape(-1)[order], return_index=True)
    starts = np.append(starts, n * k).astype(np.int64)
    chosen = chosen.astype(np.int64)
    h = np.empty((n * k, 2 * c.intermediate_size), np.float32)
    y = np.empty((n * k, c.hidden_size), np.float32)
    threads = numba.get_num_threads()  # each thread a share of every expert's rows
    if fl.x8 and kernels.X8_TILES:  # int8 products (as prefill's experts_x8), one launch each
        tq = x8_arrays(n, c.hidden_size)
        kernels.x8_quantize_blocks(t, *tq, 0)  # each token once, then a row per pair
        xq, aq = tuple(v[tok] for v in tq), x8_arrays(n * k, c.intermediate_size)
        kernels.f32_mf4w_q8x_moe_matmul(lw.mlp1_blocks, lw.mlp1_scales, lw.mlp1_bias, chosen,
                                        starts, *xq, h, threads)
        kernels.f32_swiglu_x8(h, np.float32(c.swiglu_limit), np.float32(SWIGLU_ALPHA), *aq)
        kernels.f32_mf4w_q8x_moe_matmul(lw.mlp2_blocks, lw.mlp2_scales, lw.mlp2_bias, chosen,
                                        starts, *aq, y, threads)
    else:
        xs = np.empty((n * k, c.hidden_size), np.float32)  # each pair's token, in lane order
        kernels.f32_gather_rows(kernels.to_lane_order(x8_round_trip(t) if fl.x8 else t), tok, xs)
        kernels.f32_mf4w_moe_matmul(lw.mlp1_blocks, lw.mlp1_scales, lw.mlp1_bias, chosen, starts,
                                    xs, h, threads)
        a = kernels.to_lane_order(x8_round_trip(swiglu(h, c.swiglu_limit))) if fl.x8 else \
            swiglu_lanes(c, h)
        kernels.f32_mf4w_moe_matmul(lw.mlp2_blocks, lw.mlp2_scales, lw.mlp2_bias, chosen, starts,
                                    a, y, threads)
    pairs = np.empty(n * k, np.int64)
    pairs[order] = np.arange(n * k)  # the row of y of each (token, slot)
    out = np.empty_like(x)
    kernels.f32_moe_combine(x, y, pairs.reshape(n, k), weights, out)
    return out


def expert_matvec(c: Config, lw: LayerWeights, experts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """experts [m], x [m, D] or [1, D] (the same x for all) -> [m, D]: expert experts[j] applied
    to row x[j]."""
    m = len(experts)
    experts = np.ascontiguousarray(experts, dtype=np.int64)
    h = np.empty((m, 2 * c.intermediate_size), np.float32)
    kernels.f32_mf4w_moe_matvec(lw.mlp1_blocks, lw.mlp1_scales, lw.mlp1_bias, experts,
                                kernels.to_lane_order(x), h)  # x: one row, read by all m
    y = np.empty((m, c.hidden_size), np.float32)
    kernels.f32_mf4w_moe_matvec(lw.mlp2_blocks, lw.mlp2_scales, lw.mlp2_bias, experts,
                                swiglu_lanes(c, h), y)
    return y


def expert_matvec_x8(c: Config, lw: LayerWeights, experts: np.ndarray,
                     x: np.ndarray) -> np.ndarray:
    """expert_matvec with expert_input="q8": x and the SwiGLU output quantized to int8 blocks
    (kernels.x8_quantize_lanes, f32_swiglu_x8), integer dot products (AVX2, 1.4x the float
    kernel on the Zen 3; AVX-512 VNNI where the CPU has it, whole tokens 1.19x the float
    kernels on a Zen 4: PERFORMANCE.md)."""
    m, D, I = len(experts), c.hidden_size, c.intermediate_size
    experts = np.ascontiguousarray(experts, dtype=np.int64)
    xq, xd = np.empty((1, D), np.int8), np.empty((1, D // 32), np.float32)
    kernels.x8_quantize_lanes(np.ascontiguousarray(x, np.float32), xq, xd)
    h = np.empty((m, 2 * I), np.float32)
    kernels.f32_mf4w_q8x_moe_matvec(lw.mlp1_blocks, lw.mlp1_scales, lw.mlp1_bias, experts, xq,
                                    xd, h)  # x: one row, read by all m
    aq, ad = np.empty((m, I), np.int8), np.empty((m, I // 32), np.float32)
    kernels.f32_swiglu_x8(h, np.float32(c.swiglu_limit), np.float32(SWIGLU_ALPHA), aq, ad,
                          _NO_OFFSETS)
    y = np.empty((m, D), np.float32)
    kernels.f32_mf4w_q8x_moe_matvec(lw.mlp2_blocks, lw.mlp2_scales, lw.mlp2_bias, experts, aq,
                                    ad, y)
    return y


def swiglu_lanes(c: Config, h: np.ndarray) -> np.ndarray:
    """h [m, 2I] -> to_lane_order(swiglu(h)) [m, I], one kernel: the MXFP4 matvec's input."""
    a = np.empty((h.shape[0], h.shape[1] // 2), np.float32)
    kernels.f32_swiglu_lanes(h, np.float32(c.swiglu_limit), np.float32(SWIGLU_ALPHA), a)
    return a


def expert_few(c: Config, lw: LayerWeights, e: int, x: np.ndarray,
               x8: bool = False) -> np.ndarray:
    """One expert on a few tokens: x [m, D] -> [m, D], each block decoded once per four.
    x8 (expert_input="q8"): the inputs rounded to int8 blocks first (in float: prefill)."""
    m = x.shape[0]
    h = np.empty((m, 2 * c.intermediate_size), np.float32)
    kernels.f32_mf4w_matmul(lw.mlp1_blocks[e], lw.mlp1_scales[e], lw.mlp1_bias[e],
                            kernels.to_lane_order(x8_round_trip(x) if x8 else x), h)
    y = np.empty((m, c.hidden_size), np.float32)
    a = kernels.to_lane_order(x8_round_trip(swiglu(h, c.swiglu_limit))) if x8 else \
        swiglu_lanes(c, h)
    kernels.f32_mf4w_matmul(lw.mlp2_blocks[e], lw.mlp2_scales[e], lw.mlp2_bias[e], a, y)
    return y


def forward_fast(fw: FastWeights, c: Config, tokens: np.ndarray, cache: KVCache,
                 last_only: bool = False) -> np.ndarray:
    """tokens [n] -> logits [n, V] (or [1, V] of the last token); appends them to the cache."""
    positions = np.arange(cache.n_tokens, cache.n_tokens + len(tokens))

    def attend(layer: int, fl: FastLayer, q, k, v) -> np.ndarray:
        return attention(c, layer, fl, cache, q, k, v, positions)

    logits = _forward_blas1(fw, c, tokens, positions, attend, last_only)
    cache.n_tokens += len(tokens)
    return logits


def forward_batch(fw: FastWeights, c: Config, tokens: np.ndarray,
                  caches: list[KVCache]) -> np.ndarray:
    """One decode step of several sequences: tokens [B] (token i follows caches[i]) -> logits
    [B, V]; appends each token to its cache. The dense weights are read once for all B tokens
    (the few-token kernels), the experts grouped (each routed expert decoded once for the
    tokens that chose it); attention runs per sequence, against its own cache."""
    positions = np.array([cache.n_tokens for cache in caches], np.int64)  # [B]
    one_kind = len({cache.kv for cache in caches}) == 1  # (one kernel reads one element type)

    def attend(layer: int, fl: FastLayer, q, k, v) -> np.ndarray:
        if one_kind:
            return attend_batch(c, layer, fl, caches, q, k, v, positions)
        return np.concatenate([attention(c, layer, fl, cache, q[i:i + 1], k[i:i + 1], v[i:i + 1],
                                         positions[i:i + 1])
                               for i, cache in enumerate(caches)])  # [B, Hq*dh]

    logits = _forward_blas1(fw, c, tokens, positions, attend, False)
    for cache in caches:
        cache.n_tokens += 1
    return logits


def _forward_blas1(*args) -> np.ndarray:
    # BLAS runs single-threaded inside our own worker threads (TileMatmul) or on tiny matrices
    # (decode attention): its own threads, spinning after each call, would stall numba's
    # (measured: a matvec + attention pair 7.8 ms with one BLAS thread, 340 ms with two)
    with _blas_controller().limit(limits=1, user_api="blas"):
        return _forward(*args)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _forward(fw: FastWeights, c: Config, tokens: np.ndarray, positions: np.ndarray, attend,
             last_only: bool, check_layers: bool = False) -> np.ndarray:
    """tokens [n] at `positions` [n] -> logits; attend(layer, fl, q, k, v) -> [n, Hq*dh] runs
    attention against (and appends k, v to) the KV cache(s).

    NaN and inf carry through the residual stream, so one check of the last layer's output says
    whether any layer's turned non-finite; then the pass runs again with `check_layers`, checking
    each layer's output to name the first (NonFiniteError). The second pass writes the same keys
    into the same cache slots; what a long chunk overwrote in a ring may make its positions
    differ, not the first layer that turns non-finite."""
    n = len(tokens)
    cos, sin = rope_cos_sin(c, positions)  # [n, dh/2], shared by every layer
    x = bf16_to_f32(fw.embed[tokens])  # [n, D]
    for layer, fl in enumerate(fw.layers):
        lw = fl.lw
        t = rmsnorm(x, lw.attn_norm, c.rms_norm_eps)
        q, k, v = fl.qkv(t)
        q = apply_rope(q.reshape(n, c.num_attention_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(n, c.num_key_value_heads, c.head_dim), cos, sin)
        v = v.reshape(n, c.num_key_value_heads, c.head_dim)
        x = fl.o(attend(layer, fl, q, k, v), add=x)  # x + o(attention)
        x = moe(c, fl, rmsnorm(x, lw.mlp_norm, c.rms_norm_eps), x)  # x + moe
        if check_layers and not np.isfinite(x).all():
            raise non_finite(layer, c, positions, x)
    if not np.isfinite(x).all():  # (a microsecond a decoded token; never true with check_layers)
        return _forward(fw, c, tokens, positions, attend, last_only, check_layers=True)
    if last_only:
        x = x[-1:]
    return fw.unembed(rmsnorm(x, fw.norm, c.rms_norm_eps))


def non_finite(layer: int, c: Config, positions: np.ndarray, x: np.ndarray) -> NonFiniteError:
    """The error for x [n, D], the output of `layer`, holding NaN or inf."""
    position = int(positions[np.flatnonzero(~np.isfinite(x).all(axis=1))[0]])
    return NonFiniteError(f"the output of layer {layer} (of 0..{c.num_hidden_layers - 1}) is not "
                          f"finite (NaN or inf) at position {position}: a weight of the checkpoint "
                          "(or an input) is; `tinyoss info MODEL --scan` names such weights",
                          layer, position)


def rmsnorm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """model.rmsnorm on the kernel: [n, D] -> [n, D]."""
    out = np.empty_like(x)
    rows = kernels.f32_rmsnorm_rows if len(x) > FUSED_MAX_TOKENS else kernels.f32_rmsnorm
    rows(np.ascontiguousarray(x), scale, eps, out)
    return out


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """model.apply_rope on the kernel: [n, heads, dh] -> same."""
    out = np.empty_like(x)
    rows = kernels.f32_rope_rows if len(x) > FUSED_MAX_TOKENS else kernels.f32_rope
    rows(np.ascontiguousarray(x), cos, sin, out)
    return out


def warm_up(dense: str = "bf16", kv: str = "f32", expert_input: str = "f32", scope: str = "all",
            on_compile=None) -> None:
    """Compile the kernels of a path (or load them from numba's on-disk cache) by running a tiny
    synthetic checkpoint through it, with `dense` weights, a `kv` cache and `expert_input`
    (runtime.Model). Its arrays have the same types as a real checkpoint's (memory-mapped,
    read-only), so the real one then starts without compiling anything.

    scope "run": a prompt of more than FUSED_MAX_TOKENS tokens, then one token at a time
    (`tinyoss run`); "all" adds the few-token kernels (a decode batch, a short prompt or chat
    turn) and, with dense="q8", int8 copies made in memory (where the cache file can't be
    written): `serve`, `chat`, `bench`.
    on_compile(): called once, from this thread, when numba first has to compile a kernel (its
    disk cache has none for this CPU and code yet); never when every kernel is in the cache."""
    import tempfile

    from . import synth
    from .runtime import Model
    from .store import Checkpoint

    if scope not in ("run", "all"):
        raise ValueError(f"warm_up: scope must be 'run' or 'all', got {scope!r}")
    # big enough for the parallel matvec (matrices under 256 rows run serial): the unembedding
    # (no bias) and the o projection (a read-only bias, like a real checkpoint's)
    config = synth.preset_config("tiny", vocab_size=300, hidden_size=256, num_hidden_layers=2,
                                 sliding_window=2)
    with tempfile.TemporaryDirectory(prefix="tinyoss-warmup-") as tmp, \
            _first_compile(on_compile):
        synth.write_checkpoint(f"{tmp}/m", config, "hf", "tiny", seed=0)
        # q8: int8 copies mapped from a cache file (read-only views, as `run` maps them) and,
        # for "all", made in memory (writable arrays): numba compiles each kind separately
        q8_caches = [False]  # (bf16: no int8 copies)
        if dense == "q8":
            q8_caches = [False, f"{tmp}/q8"] if scope == "all" else [f"{tmp}/q8"]
        for q8_cache in q8_caches:
            model = Model(Checkpoint(f"{tmp}/m"), dense, q8_cache=q8_cache,
                          expert_input=expert_input)
            cache = model.new_cache(64, kv)
            if scope == "all":  # short prefill: fused kernels
                model.forward([1, 2, 3], cache)
            model.forward(np.arange(4, 44), cache, last_only=True)  # long: tiles + BLAS
            # in a prefill, each expert takes the few-token kernel or tiles by how many tokens
            # the router sent it: run both, whatever this model's router chose
            fl, D = model.fast_weights.layers[0], config.hidden_size
            expert_few(config, fl.lw, 0, np.ones((2, D), np.float32), fl.x8)
            # (PANEL_MATMUL's outputs, [rows, m rounded up].T, cut to m tokens or whole: two
            # layouts of array for numba, f32_bias_swiglu compiles each)
            for m in (FUSED_MAX_TOKENS + 1, 2 * simd.PANEL_STEP):
                experts_tiles(config, fl, [(0, 0, m)], np.ones((m, D), np.float32),
                              np.empty((m, D), np.float32))
            model.forward([4], cache, last_only=True)  # decode: matvec and attention kernels
            del model, cache


@contextlib.contextmanager
def _first_compile(callback):
    """Within the block, callback() runs once when numba starts compiling (a disk cache miss:
    numba's "numba:compile" event fires only then, not when it loads a kernel from the cache)."""
    from numba.core import event

    if callback is None:
        yield
        return

    class First(event.Listener):
        seen = False

        def on_start(self, ev) -> None:
            if not self.seen:
                self.seen = True
                callback()

        def on_end(self, ev) -> None:
            pass

    with event.install_listener("numba:compile", First()):
        yield
