"""The public object: `load` opens a checkpoint, `Model` runs it.

`Model.forward` runs the fast path (fast.py, numba kernels) and `Model.forward_reference` the numpy
definition (model.py), on the same memory-mapped weights. This file sits above both, so that the
definition stands alone: model.py imports neither fast.py nor this file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import Config
from .errors import TinyossError, TinyossTypeError, expect_type
from .model import KVCache, RecorderLike, Weights, check_kv, forward_reference
from .store import Checkpoint


def check_tokens(tokens, vocab_size: int) -> np.ndarray:
    """Any int sequence -> int64 array [n]; a clear error for empty, non-int or out-of-range ids."""
    if isinstance(tokens, (str, bytes)):
        raise TinyossTypeError(f"tokens must be a sequence of int ids, got {type(tokens).__name__} "
                               "(tokenize text first: tinyoss.tokenizer.get_tokenizer().encode)")
    try:
        arr = np.asarray(tokens)
    except ValueError:  # ragged nesting
        raise TinyossError("tokens must be a flat sequence of int ids") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or arr.size == 0:
        raise TinyossError(f"tokens must be a non-empty 1-D sequence of ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        raise TinyossTypeError(f"token ids must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        raise TinyossError(f"token id {int(arr[bad][0])} is outside the vocabulary "
                           f"(0..{vocab_size - 1})")
    return arr.astype(np.int64)


class Model:
    """An opened checkpoint: immutable weights + the forward pass. Run state lives in KVCache.

    `forward` runs the fast path (fast.py, numba kernels); `forward_reference` the numpy
    definition above. dense="q8" replaces the dense bf16 matrices by int8 blocks (the fast path
    only; the default keeps the published bf16 and exact numerics), quantized at the first load
    and kept in a cache folder for the next ones (quant.py). kv: the kind of KV cache
    `new_cache` makes by default ("f32" exact, "bf16" half the memory; see KVCache).
    expert_input="q8" rounds the inputs of the routed experts' matmuls to int8 blocks, as
    llama.cpp does (both paths: `moe_block`); the default "f32" is exact.
    """

    def __init__(self, ckpt: Checkpoint, dense: str = "bf16", q8_cache=True, kv: str = "f32",
                 expert_input: str = "f32"):
        expect_type(ckpt, Checkpoint, "ckpt")
        for name, value in (("dense", dense), ("kv", kv), ("expert_input", expert_input)):
            expect_type(value, str, name)
        if not isinstance(q8_cache, (bool, str, os.PathLike)):
            raise TinyossTypeError(f"q8_cache must be a bool, str or path, got "
                                   f"{type(q8_cache).__name__}")
        if dense not in ("bf16", "q8"):
            raise TinyossError(f"dense must be 'bf16' or 'q8', got {dense!r}")
        if expert_input not in ("f32", "q8"):
            raise TinyossError(f"expert_input must be 'f32' or 'q8', got {expert_input!r}")
        self.kv = check_kv(kv)  # new_cache's default, checked at load rather than at first use
        self.expert_input = expert_input
        from .fast import FastWeights, q8_matrices
        from .quant import cache_dir, q8_copies

        self.checkpoint = ckpt
        self.config: Config = ckpt.config
        self.dense = dense
        self.weights = Weights.from_checkpoint(ckpt)
        if dense == "q8":
            folder = cache_dir() if q8_cache is True else (Path(q8_cache) if q8_cache else None)
            q8 = q8_copies(ckpt, q8_matrices(self.weights), folder)
        else:
            q8 = None
        self.fast_weights = FastWeights(self.weights, q8, ckpt.release, expert_input)

    def new_cache(self, max_tokens: int | None = None, kv: str | None = None) -> KVCache:
        """An empty KV cache for up to max_tokens (default: the context limit); kv: its kind
        (default: the model's, from `load`)."""
        return KVCache(self.config, max_tokens, self.kv if kv is None else kv)

    def prefault(self) -> bool:
        """Map every weight page a decoded token may read into the process now (store.map_pages),
        rather than page by page as each expert is first chosen: what `tinyoss bench` does before
        timing, and `run`/`chat` in the background. Skips the embedding table (a token reads one
        row of it) and the bf16 matrices dense='q8' replaced; a cold page cache is read from disk.
        Does nothing (returns False) when they would not fit in the memory available."""
        from .store import available_memory, map_pages

        w = self.weights
        arrays = [getattr(lw, f.name) for lw in w.layers for f in dataclasses.fields(lw)]
        arrays += [w.norm, w.unembed]
        if self.dense == "q8":
            dense = self.fast_weights.dense()
            replaced = {id(d.w) for d in dense}
            arrays = [a for a in arrays if id(a) not in replaced] + [a for d in dense for a in d.q8]
        available = available_memory()
        if available is not None and sum(a.nbytes for a in arrays) > available:
            return False
        map_pages(arrays)
        return True

    def _prepare(self, tokens, cache: KVCache | None) -> tuple[np.ndarray, KVCache]:
        tokens = check_tokens(tokens, self.config.vocab_size)
        if cache is None:  # a whole sequence: a cache just big enough for it
            limit = self.config.max_position_embeddings
            if len(tokens) > limit:
                raise TinyossError(f"context overflow: {len(tokens)} tokens exceed the limit "
                                   f"of {limit}")
            cache = self.new_cache(len(tokens))
        self._check_cache(cache).check_room(len(tokens))
        return tokens, cache

    def _check_cache(self, cache) -> KVCache:
        """`cache`, if this model can extend it: a KVCache made for this model's config (another
        model's keys have other layers, heads or window, or were rotated by another RoPE)."""
        if not isinstance(cache, KVCache):
            raise TinyossTypeError(f"cache must be a KVCache (from model.new_cache()), got "
                               f"{type(cache).__name__}")
        if cache.config != self.config:
            field = next(f.name for f in dataclasses.fields(Config)
                         if getattr(cache.config, f.name) != getattr(self.config, f.name))
            raise TinyossError(f"this KV cache was made for another model: its {field} is "
                               f"{getattr(cache.config, field)!r}, this model's "
                               f"{getattr(self.config, field)!r} (make one with model.new_cache())")
        shape = (self.config.num_key_value_heads, self.config.head_dim)
        if len(cache.k) != self.config.num_hidden_layers or any(
                (b.shape[0], b.shape[2]) != shape for b in cache.k + cache.v):
            raise TinyossError("this KV cache's buffers do not match its config (were they "
                               "replaced?): make one with model.new_cache()")
        return cache

    def forward(self, tokens, cache: KVCache | None = None, *, last_only: bool = False
                ) -> np.ndarray:
        """Logits [n_tokens, vocab] float32 of the new tokens ([1, vocab] with last_only).

        Without a cache, the tokens are a whole sequence starting at position 0. With one, they
        follow the cached tokens, and the cache is extended.
        """
        from .fast import forward_fast

        expect_type(last_only, bool, "last_only")
        tokens, cache = self._prepare(tokens, cache)
        return forward_fast(self.fast_weights, self.config, tokens, cache, last_only)

    def forward_batch(self, tokens, caches: Sequence[KVCache]) -> np.ndarray:
        """One decoded token for each of several sequences: tokens[i] follows caches[i].
        -> logits [B, vocab] float32; each cache is extended by its token. The same logits as B
        calls of `forward` (to float rounding: the few-token kernels sum in another order), for
        about the weight reads of one (fast.forward_batch)."""
        from .fast import forward_batch

        tokens = check_tokens(tokens, self.config.vocab_size)
        if isinstance(caches, (str, bytes)) or not isinstance(caches, Sequence):
            raise TinyossTypeError(f"caches must be a list of KVCache (one per token), got "
                                   f"{type(caches).__name__}")
        if len(tokens) != len(caches) or len({id(c) for c in caches}) != len(caches):
            raise TinyossError(f"forward_batch needs one distinct cache per token: {len(tokens)} "
                               f"tokens, {len(caches)} caches")
        for cache in caches:
            self._check_cache(cache).check_room(1)
        return forward_batch(self.fast_weights, self.config, tokens, list(caches))

    def forward_reference(self, tokens, cache: KVCache | None = None,
                          recorder: "RecorderLike | None" = None) -> np.ndarray:
        """The same logits from the readable numpy definition (model.py).

        recorder(layer, name, value) sees every intermediate (see recorder.py)."""
        if recorder is not None and not callable(recorder):
            raise TinyossTypeError(f"recorder must be None or callable(layer, name, value), got "
                                   f"{type(recorder).__name__}")
        tokens, cache = self._prepare(tokens, cache)
        return forward_reference(self.weights, self.config, tokens, cache, recorder,
                                 self.expert_input)


def load(path, layout: str | None = None, dense: str = "bf16", q8_cache=True,
         kv: str = "f32", expert_input: str = "f32") -> Model:
    """Open a checkpoint folder (HF repo root, `original/`, or a root with layout='original').

    dense="q8" stores the dense matrices as int8 blocks (faster decode, small logit drift);
    q8_cache: where their copy is kept for the next load (True: quant.cache_dir(), the
    TINYOSS_CACHE_DIR folder; a path; False: nowhere, quantize at every load).
    kv="bf16" makes the KV caches keep bf16 keys and values (half the memory and cache bytes
    a token reads, small logit drift); the default "f32" is exact.
    expert_input="q8" hands the routed experts int8 activations (blocks of 32, as llama.cpp's
    Q8_0): integer dot products (~1.4x faster expert matvecs on a Zen 3's AVX2; AVX-512 VNNI
    where the CPU has it), a logit drift.
    """
    return Model(Checkpoint(path, layout), dense, q8_cache, kv, expert_input)
