"""The gpt-oss forward pass in plain numpy: the readable reference, side by side with the paper.

Dimensions (20b in brackets):
    n      tokens in this call            T   keys visible (cached + new)
    D      hidden_size [2880]             V   vocab_size [201088]
    Hq     query heads [64]               Hkv kv heads [8]     q_mult = Hq // Hkv [8]
    dh     head_dim [64]                  E   experts [32]     k = experts_per_token [4]
    I      intermediate_size [2880]

A block is pre-norm:  x += attention(rmsnorm(x));  x += moe(rmsnorm(x)).
All compute is float32; bf16 weights (stored as uint16) are widened by a 16-bit shift, MXFP4 expert
weights are decoded by `mxfp4.decode`. Every gpt-oss trap sits on its own commented line.

The fast path (`fast.py`) computes the same thing with numba kernels; this file stays the definition
they are tested against, and imports neither it nor `runtime.py` (`load`, `Model`: the public object
that runs either).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import numpy as np

from . import mxfp4
from .config import Config
from .errors import TinyossError, expect_type
from .quant import x8_round_trip
from .store import Checkpoint, bf16_to_f32, f32_to_bf16

Recorder = Callable[[str, np.ndarray], None]  # one layer's view: rec(name, value)
RecorderLike = Callable[[int, str, np.ndarray], None]  # rec(layer, name, value)

# ---------------------------------------------------------------------------------------------
# weights: immutable views into the memory-mapped checkpoint


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # [D] bf16
    q_w: np.ndarray  # [Hq*dh, D] bf16
    q_b: np.ndarray  # [Hq*dh] bf16
    k_w: np.ndarray  # [Hkv*dh, D] bf16
    k_b: np.ndarray  # [Hkv*dh] bf16
    v_w: np.ndarray  # [Hkv*dh, D] bf16
    v_b: np.ndarray  # [Hkv*dh] bf16
    sinks: np.ndarray  # [Hq] bf16: one learned logit per query head
    o_w: np.ndarray  # [D, Hq*dh] bf16
    o_b: np.ndarray  # [D] bf16
    mlp_norm: np.ndarray  # [D] bf16
    router_w: np.ndarray  # [E, D] bf16
    router_b: np.ndarray  # [E] bf16
    mlp1_blocks: np.ndarray  # [E, 2I, D/32, 16] u8: rows alternate gate, up, gate, up, ...
    mlp1_scales: np.ndarray  # [E, 2I, D/32] u8
    mlp1_bias: np.ndarray  # [E, 2I] bf16
    mlp2_blocks: np.ndarray  # [E, D, I/32, 16] u8
    mlp2_scales: np.ndarray  # [E, D, I/32] u8
    mlp2_bias: np.ndarray  # [E, D] bf16


@dataclasses.dataclass(frozen=True)
class Weights:
    embed: np.ndarray  # [V, D] bf16
    layers: tuple[LayerWeights, ...]
    norm: np.ndarray  # [D] bf16
    unembed: np.ndarray  # [V, D] bf16 (not tied to embed)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> "Weights":
        t = ckpt.tensors
        fields = [f.name for f in dataclasses.fields(LayerWeights)]
        layers = tuple(LayerWeights(**{f: t[f"{L}.{f}"] for f in fields})
                       for L in range(ckpt.config.num_hidden_layers))
        return cls(embed=t["embed"], layers=layers, norm=t["norm"], unembed=t["unembed"])


# ---------------------------------------------------------------------------------------------
# run state: the KV cache


KV_DTYPES = {"f32": np.float32, "bf16": np.uint16}  # a KV cache's kinds: what its buffers hold


def check_kv(kv: str) -> str:
    expect_type(kv, str, "kv")
    if kv not in KV_DTYPES:
        raise TinyossError(f"kv must be one of {', '.join(map(repr, KV_DTYPES))}, got {kv!r}")
    return kv


class KVCache:
    """Keys and values of the tokens seen so far, per layer.

    Banded (sliding) layers keep a ring buffer of `sliding_window` slots: position p lives in slot
    p % window. Dense layers keep every position, growing by doubling up to `max_tokens`.
    Buffers are head-major, k[layer] [Hkv, slots, dh]: one kv head's keys are contiguous, which is
    how attention reads them.

    kv="f32" keeps the float32 keys and values the layers compute (exact). kv="bf16" rounds them
    to bfloat16 (to nearest even, as the published model does when it runs in bf16) and keeps the
    bits (uint16): half the memory, and half the bytes a decoded token reads from the cache, for
    a small logit drift. Every token then attends to keys as stored, its own included (`stored`).
    """

    def __init__(self, config: Config, max_tokens: int | None = None, kv: str = "f32"):
        expect_type(config, Config, "config")
        limit = config.max_position_embeddings
        if max_tokens is not None:
            expect_type(max_tokens, (int, np.integer), "max_tokens")
        self.max_tokens = limit if max_tokens is None else int(max_tokens)
        if not 0 < self.max_tokens <= limit:
            raise TinyossError(f"max_tokens must be in 1..{limit} (the context limit), "
                               f"got {max_tokens}")
        self.kv, self.dtype = check_kv(kv), KV_DTYPES[kv]
        self.config = config
        self.n_tokens = 0  # positions 0 .. n_tokens-1 are cached
        self.window = config.sliding_window
        Hkv, dh = config.num_key_value_heads, config.head_dim
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        for sliding in config.layer_sliding:
            slots = min(self.window, self.max_tokens) if sliding else min(256, self.max_tokens)
            self.k.append(np.zeros((Hkv, slots, dh), self.dtype))  # [Hkv, slots, dh]
            self.v.append(np.zeros((Hkv, slots, dh), self.dtype))

    def stored(self, x: np.ndarray) -> np.ndarray:
        """Keys or values (float32) as this cache gives them back: x itself with kv="f32", else
        rounded to bf16."""
        return x if self.kv == "f32" else bf16_to_f32(f32_to_bf16(x))

    def check_room(self, n_new: int) -> None:
        if self.n_tokens + n_new > self.max_tokens:
            raise TinyossError(f"context overflow: {self.n_tokens} cached + {n_new} new tokens "
                               f"exceed the limit of {self.max_tokens}")

    def positions(self, layer: int) -> np.ndarray:
        """Positions cached for `layer`, oldest first (a ring keeps only the last `window`)."""
        first = max(0, self.n_tokens - self.window) if self.config.layer_sliding[layer] else 0
        return np.arange(first, self.n_tokens)

    def slots(self, layer: int, positions: np.ndarray) -> np.ndarray:
        return positions % self.window if self.config.layer_sliding[layer] else positions

    def read(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions [T0], k [T0, Hkv, dh], v [T0, Hkv, dh]) of the cached tokens, oldest first."""
        pos = self.positions(layer)
        s = self.slots(layer, pos)
        k, v = self.k[layer][:, s].transpose(1, 0, 2), self.v[layer][:, s].transpose(1, 0, 2)
        return (pos, k, v) if self.kv == "f32" else (pos, bf16_to_f32(k), bf16_to_f32(v))

    def write(self, layer: int, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store new keys/values; a ring keeps only the last `window` of them."""
        if len(positions) == 1:  # one token (decode): its slot, without the masks below
            p = int(positions[0])
            if self.config.layer_sliding[layer]:
                p %= self.window
            else:
                self._grow(layer, p + 1)
            if self.kv == "bf16":
                k, v = f32_to_bf16(k), f32_to_bf16(v)
            self.k[layer][:, p] = k[0]  # [1, Hkv, dh] -> slot p of [Hkv, S, dh]
            self.v[layer][:, p] = v[0]
            return
        if self.config.layer_sliding[layer]:
            keep = positions > positions[-1] - self.window
            positions, k, v = positions[keep], k[keep], v[keep]
        else:
            self._grow(layer, int(positions[-1]) + 1)
        s = self.slots(layer, positions)
        if self.kv == "bf16":
            k, v = f32_to_bf16(k), f32_to_bf16(v)
        self.k[layer][:, s] = k.transpose(1, 0, 2)  # [n, Hkv, dh] -> [Hkv, n, dh]
        self.v[layer][:, s] = v.transpose(1, 0, 2)

    # -- rolling back: a prompt cache reuses the longest prefix the next prompt shares --------

    def ring_copy(self) -> "RingCopy":
        """A copy of the banded layers' rings as they are now (where a prompt ends: the next turn
        of a conversation diverges there or later). A few MB: 128 slots a banded layer."""
        sliding = [i for i, s in enumerate(self.config.layer_sliding) if s]
        return RingCopy(self.n_tokens, {i: (self.k[i].copy(), self.v[i].copy()) for i in sliding})

    def rewind(self, n_tokens: int, copies: Sequence["RingCopy"] = ()) -> int:
        """Forget every position from `n_tokens` on, as far as the rings allow. -> the positions
        kept (<= n_tokens): then run the rest of the prompt from there.

        A dense layer keeps every position: cutting it is free. A banded layer's ring holds only
        the last `window` positions, so the ring as it was at position R is rebuilt from the live
        ring (positions n-W..n-1) and the `copies` (a copy taken at X holds X-W..X-1); R is the
        largest point <= n_tokens whose last W positions one of them holds. Copies taken past R
        describe positions about to be overwritten: the caller drops them (`RingCopy.at`).
        """
        if not 0 <= n_tokens <= self.n_tokens:
            raise TinyossError(f"cannot rewind to {n_tokens}: the cache holds {self.n_tokens} tokens")
        sources = [c for c in copies if c.at <= self.n_tokens]
        kept = self.reachable(n_tokens, sources)
        need = np.arange(max(0, kept - self.window), kept)  # positions the ring at `kept` holds
        missing = need[need < self.n_tokens - self.window]  # no longer in the live ring
        for copy in sorted(sources, key=lambda c: -c.at):  # newest first
            mine = missing[(missing >= copy.at - self.window) & (missing < copy.at)]
            if len(mine) == 0:
                continue
            slots = mine % self.window
            for layer, (k, v) in copy.rings.items():
                self.k[layer][:, slots] = k[:, slots]
                self.v[layer][:, slots] = v[:, slots]
            missing = np.setdiff1d(missing, mine)
        assert len(missing) == 0, "rewind: _reachable promised a position no ring holds"
        self.n_tokens = kept
        return kept

    def reachable(self, n_tokens: int, copies: Sequence["RingCopy"] = ()) -> int:
        """How many positions `rewind(n_tokens, copies)` would keep (it changes nothing)."""
        points = [self.n_tokens] + [c.at for c in copies if c.at <= self.n_tokens]
        return _reachable(min(n_tokens, self.n_tokens), points, self.window)

    def _grow(self, layer: int, need: int) -> None:
        Hkv, slots, dh = self.k[layer].shape
        if need <= slots:
            return
        new = min(max(need, 2 * slots), self.max_tokens)
        for buf in (self.k, self.v):
            grown = np.zeros((Hkv, new, dh), self.dtype)
            grown[:, :slots] = buf[layer]
            buf[layer] = grown


@dataclasses.dataclass(frozen=True)
class RingCopy:
    """The banded layers' rings (layer -> (k, v) buffers) as they were when the cache held `at`
    tokens: they hold positions at-W .. at-1."""

    at: int
    rings: dict


def _reachable(target: int, points: Sequence[int], window: int) -> int:
    """The largest R <= target such that positions R-W..R-1 (those >= 0) all lie in the windows
    [X-W, X) of the given points X: the rings can be rebuilt as they were at R."""
    runs: list[list[int]] = []  # the windows merged into runs of consecutive positions
    for a, b in sorted((max(0, x - window), x) for x in points):
        if runs and a <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], b)
        else:
            runs.append([a, b])
    best = 0
    for start, end in runs:  # R may be any of [start + W, end] ([0, end] for a run from 0)
        low = 0 if start == 0 else start + window
        if min(target, end) >= low:
            best = max(best, min(target, end))
    return best


# ---------------------------------------------------------------------------------------------
# the layers, in the order a reader meets them


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None,
           rows_per_chunk: int = 16384) -> np.ndarray:
    """x @ w.T + b with bf16 w widened a chunk of rows at a time: [n, in] -> [n, out]."""
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    for r in range(0, w.shape[0], rows_per_chunk):
        out[:, r:r + rows_per_chunk] = x @ bf16_to_f32(w[r:r + rows_per_chunk]).T
    if b is not None:
        out += bf16_to_f32(b)
    return out


def rmsnorm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """[n, D] -> [n, D], in float32."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * bf16_to_f32(scale)


@functools.lru_cache(maxsize=8)
def rope_inv_freq(c: Config) -> tuple[float, np.ndarray]:
    """YaRN: (concentration, inv_freq [dh/2]), computed in float32 exactly as the reference."""
    d_half = c.head_dim / 2
    freq = np.float32(c.rope_theta) ** (np.arange(0, c.head_dim, 2, dtype=np.float32)
                                        / np.float32(c.head_dim))  # [dh/2]
    if c.rope_scaling_factor <= 1.0:
        return 1.0, (1.0 / freq).astype(np.float32)
    concentration = 0.1 * math.log(c.rope_scaling_factor) + 1.0  # YaRN attention temperature
    # NTK-by-parts: dims below `low` rotate fast enough to keep (extrapolate), dims above `high`
    # are interpolated by `factor`, a linear ramp in between. The bounds are NOT rounded.
    low = d_half * math.log(c.initial_context_length / (c.rope_ntk_beta * 2 * math.pi)) \
        / math.log(c.rope_theta)
    high = d_half * math.log(c.initial_context_length / (c.rope_ntk_alpha * 2 * math.pi)) \
        / math.log(c.rope_theta)
    if c.rope_truncate:  # HF's truncate=True variant (not gpt-oss)
        low, high = math.floor(low), math.ceil(high)
    interpolation = 1.0 / (np.float32(c.rope_scaling_factor) * freq)
    extrapolation = 1.0 / freq
    ramp = (np.arange(d_half, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    mask = 1 - np.clip(ramp, 0, 1)  # 1 = extrapolate, 0 = interpolate
    inv_freq = interpolation * (1 - mask) + extrapolation * mask
    return concentration, inv_freq.astype(np.float32)


def rope_cos_sin(c: Config, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n] positions -> cos, sin [n, dh/2], both scaled by the YaRN concentration."""
    concentration, inv_freq = rope_inv_freq(c)
    angles = np.outer(positions.astype(np.float32), inv_freq)  # [n, dh/2] float32
    conc = np.float32(concentration)
    return np.cos(angles) * conc, np.sin(angles) * conc


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """[n, heads, dh] -> same. Half-split (NeoX) pairs: dim i rotates with dim i + dh/2."""
    x1, x2 = np.split(x, 2, axis=-1)  # [n, heads, dh/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_scores_mask(q_pos: np.ndarray, k_pos: np.ndarray, window: int) -> np.ndarray:
    """[n] x [T] -> bool [n, T]: may query i see key j?"""
    visible = k_pos[None, :] <= q_pos[:, None]  # causal
    if window:
        visible &= k_pos[None, :] > q_pos[:, None] - window  # band counts the current token
    return visible


def sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, sinks: np.ndarray,
         visible: np.ndarray, rec: Recorder | None = None) -> np.ndarray:
    """Attention with a learned sink per head.

    q [n, Hkv, q_mult, dh], k/v [T, Hkv, dh], sinks [Hkv, q_mult] f32, visible [n, T] -> [n, Hq*dh]
    With a recorder: "attn_weights" [Hq, n, T] and "sink_mass" [Hq, n] (the sink's share).
    """
    n, Hkv, q_mult, dh = q.shape
    scores = np.einsum("qhmd,khd->hmqk", q, k) * np.float32(1 / math.sqrt(dh))  # [Hkv, qm, n, T]
    scores = np.where(visible, scores, np.float32(-np.inf))
    sink = sinks[:, :, None, None]  # [Hkv, qm, 1, 1]
    # the sink is one extra softmax column (not scaled, not masked), dropped after the softmax:
    # it only adds exp(sink) to the denominator
    m = np.maximum(scores.max(axis=-1, keepdims=True), sink)
    w = np.exp(scores - m)  # [Hkv, qm, n, T]
    w /= w.sum(axis=-1, keepdims=True) + np.exp(sink - m)
    if rec is not None:
        rec("attn_weights", w.reshape(Hkv * q_mult, n, -1))
        rec("sink_mass", 1 - w.sum(axis=-1).reshape(Hkv * q_mult, n))
    out = np.einsum("hmqk,khd->qhmd", w, v)  # [n, Hkv, qm, dh]
    return out.reshape(n, Hkv * q_mult * dh)


def attention_block(x: np.ndarray, lw: LayerWeights, c: Config, layer: int, cache: KVCache,
                    positions: np.ndarray, query_chunk: int = 256,
                    rec: Recorder | None = None) -> np.ndarray:
    """x [n, D] -> x + attention(rmsnorm(x)) [n, D]; appends this layer's keys to the cache."""
    n, Hkv, dh = x.shape[0], c.num_key_value_heads, c.head_dim
    t = rmsnorm(x, lw.attn_norm, c.rms_norm_eps)  # [n, D]
    q = linear(t, lw.q_w, lw.q_b).reshape(n, c.num_attention_heads, dh)  # [n, Hq, dh]
    k = linear(t, lw.k_w, lw.k_b).reshape(n, Hkv, dh)  # [n, Hkv, dh]
    v = linear(t, lw.v_w, lw.v_b).reshape(n, Hkv, dh)  # [n, Hkv, dh]
    cos, sin = rope_cos_sin(c, positions)  # RoPE after the bias
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = cache.stored(k), cache.stored(v)  # kv="bf16": the keys as the cache keeps them
    q = q.reshape(n, Hkv, c.q_mult, dh)  # query head h reads kv head h // q_mult
    old_pos, old_k, old_v = cache.read(layer)
    k_pos = np.concatenate([old_pos, positions])  # [T]
    k_all, v_all = np.concatenate([old_k, k]), np.concatenate([old_v, v])  # [T, Hkv, dh]
    window = c.sliding_window if c.layer_sliding[layer] else 0  # banded on sliding layers only
    sinks = bf16_to_f32(lw.sinks).reshape(Hkv, c.q_mult)
    out = np.empty((n, c.q_dim), np.float32)
    if rec is not None:  # recording wants the whole [heads, n, T] picture at once
        query_chunk = n
        rec("key_positions", k_pos)
        rec("visible", attention_scores_mask(positions, k_pos, window))
    for i in range(0, n, query_chunk):  # bounds the [heads, n, T] score matrix
        s = slice(i, i + query_chunk)
        out[s] = sdpa(q[s], k_all, v_all, sinks, attention_scores_mask(positions[s], k_pos, window),
                      rec)
    cache.write(layer, positions, k, v)
    return x + linear(out, lw.o_w, lw.o_b)


SWIGLU_ALPHA = 1.702  # the sigmoid's slope in gpt-oss's SwiGLU


def swiglu(h: np.ndarray, limit: float, alpha: float = SWIGLU_ALPHA) -> np.ndarray:
    """[.., 2I] -> [.., I]. gpt-oss's clamped SwiGLU."""
    glu, lin = h[..., 0::2], h[..., 1::2]  # gate = even rows, up ("linear") = odd rows
    glu = np.minimum(glu, np.float32(limit))  # gate clamped above only
    lin = np.clip(lin, np.float32(-limit), np.float32(limit))  # up clamped both ways
    return glu / (1 + np.exp(-np.float32(alpha) * glu)) * (lin + 1)  # note the +1 on up


def route(t: np.ndarray, lw: LayerWeights, k: int) -> tuple[np.ndarray, np.ndarray]:
    """t [n, D] -> (experts [n, k] int, weights [n, k] f32), best expert first."""
    logits = linear(t, lw.router_w, lw.router_b)  # [n, E]
    experts = np.argsort(-logits, axis=-1, kind="stable")[:, :k]  # [n, k]
    top = np.take_along_axis(logits, experts, axis=-1)  # [n, k]
    weights = np.exp(top - top[:, :1])  # softmax over the top-k logits only
    return experts, weights / weights.sum(axis=-1, keepdims=True)


def moe_block(x: np.ndarray, lw: LayerWeights, c: Config,
              rec: Recorder | None = None, expert_input: str = "f32") -> np.ndarray:
    """x [n, D] -> x + moe(rmsnorm(x)) [n, D]. Each used expert is decoded once per call.
    expert_input="q8": each expert's two matmuls take their input rounded to int8 blocks
    (quant.x8_round_trip), as llama.cpp does (an approximation; the default is exact)."""
    into = (lambda a: a) if expert_input == "f32" else x8_round_trip
    t = rmsnorm(x, lw.mlp_norm, c.rms_norm_eps)  # [n, D]
    experts, weights = route(t, lw, c.experts_per_token)  # [n, k], [n, k]
    if rec is not None:
        rec("router_logits", linear(t, lw.router_w, lw.router_b))
        rec("experts", experts)
        rec("expert_weights", weights)
    out = np.zeros_like(t)
    for e in np.unique(experts):
        tok, slot = np.nonzero(experts == e)  # the tokens routed to expert e
        w1 = mxfp4.decode(lw.mlp1_blocks[e], lw.mlp1_scales[e])  # [2I, D]
        h = into(t[tok]) @ w1.T + bf16_to_f32(lw.mlp1_bias[e])  # [m, 2I]
        w2 = mxfp4.decode(lw.mlp2_blocks[e], lw.mlp2_scales[e])  # [D, I]
        y = into(swiglu(h, c.swiglu_limit)) @ w2.T + bf16_to_f32(lw.mlp2_bias[e])  # bias per expert
        out[tok] += weights[tok, slot, None] * y  # then weighted by the router
    return x + out


def forward_reference(w: Weights, c: Config, tokens: np.ndarray, cache: KVCache,
                      recorder: "RecorderLike | None" = None,
                      expert_input: str = "f32") -> np.ndarray:
    """tokens [n] -> logits [n, V] float32; appends the tokens to `cache`. expert_input: see
    moe_block.

    A recorder (see recorder.py) is called as recorder(layer, name, value) at each step; layer
    is -1 outside the blocks. Without one, recording costs one `is None` test per step.
    """
    positions = np.arange(cache.n_tokens, cache.n_tokens + len(tokens))
    x = bf16_to_f32(w.embed[tokens])  # [n, D], no embedding scale
    for layer, lw in enumerate(w.layers):
        rec = None if recorder is None else functools.partial(recorder, layer)
        if rec is not None:
            rec("resid_pre", x)
        x = attention_block(x, lw, c, layer, cache, positions, rec=rec)
        if rec is not None:
            rec("resid_mid", x)
        x = moe_block(x, lw, c, rec, expert_input)
        if rec is not None:
            rec("resid_post", x)
    cache.n_tokens += len(tokens)
    x = rmsnorm(x, w.norm, c.rms_norm_eps)
    logits = linear(x, w.unembed)  # [n, V]
    if recorder is not None:
        recorder(-1, "logits", logits)
    return logits
