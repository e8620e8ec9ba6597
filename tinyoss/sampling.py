"""Choosing the next token from a logits vector: greedy, temperature, top-k, top-p, min-p.

Order of operations (the one Hugging Face transformers uses):

    logits -> / temperature -> top-k -> top-p -> min-p -> softmax -> draw one token

Each filter removes tokens by setting their score to -inf and sees the scores left by the previous
one. Temperature goes first so that top-p's "probability mass" and min-p's "fraction of the top
token's probability" refer to the distribution that is actually sampled from. (llama.cpp's default
chain instead filters first and divides by the temperature last; with top-p or min-p at a temperature
other than 1 the two orders keep different sets of tokens.) Temperature 0 means greedy: the argmax,
with no filter and no random draw.

All arithmetic is float64 on a [n_vocab] vector. Every step is linear in n_vocab except top-p, which
sorts the vocabulary. A `Sampler` owns a `numpy.random.Generator`, so the same seed gives the same
tokens for the same logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tinyoss.config import FLOAT32_MAX
from tinyoss.errors import TinyossError, TinyossTypeError
from tinyoss.store import scratch


class SamplingError(TinyossError):
    """Invalid sampling settings, or logits that cannot be sampled (NaN, all -inf)."""


class SamplingTypeError(SamplingError, TinyossTypeError):
    """A sampling setting or logits of the wrong type (also a TypeError)."""


_REAL = (int, float, np.integer, np.floating)
_SEEDS = (int, np.integer, np.random.Generator, np.random.BitGenerator, np.random.SeedSequence)


def _expect(value, types: tuple, what: str, kind: str) -> None:
    if not isinstance(value, types) or isinstance(value, (bool, np.bool_)):
        raise SamplingTypeError(f"{what} must be {kind}, got {type(value).__name__}")


@dataclass(frozen=True)
class Choice:
    """A sampled token with its log-probability and the most likely alternatives.

    Log-probabilities are those of the model itself (log-softmax of the raw logits), not of the
    filtered distribution, so they do not depend on the sampling settings.
    """

    token: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]  # (token, logprob), most likely first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p for every token; -inf logits get -inf. [n_vocab] -> [n_vocab] float64"""
    scores = np.asarray(logits, dtype=np.float64)
    shifted = scores - scores.max()  # the max becomes 0: exp cannot overflow
    return shifted - math.log(np.exp(shifted).sum())


def softmax(scores: np.ndarray) -> np.ndarray:
    """Probabilities from scores; -inf scores get probability 0. [n_vocab] -> [n_vocab] float64
    (one exp over the vocabulary: sampling runs once per token, 201088 of them)"""
    e = np.exp(np.asarray(scores, dtype=np.float64) - np.max(scores))  # the max becomes 1
    return e / e.sum()


def keep_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep the k highest scores (and any tied with the k-th, as transformers does); the rest -> -inf."""
    if k <= 0 or k >= scores.size:
        return scores
    kth_highest = np.partition(scores, scores.size - k)[scores.size - k]
    return np.where(scores >= kth_highest, scores, -np.inf)


def keep_top_p(scores: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the fewest most-likely tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return scores
    probs = softmax(scores)
    order = np.argsort(-probs, kind="stable")  # most likely first; ties by token id
    cumulative = np.cumsum(probs[order])
    n_keep = min(int(np.searchsorted(cumulative, p)) + 1, scores.size)  # first prefix reaching p
    kept = np.full(scores.size, -np.inf)
    kept[order[:n_keep]] = scores[order[:n_keep]]
    return kept


def keep_min_p(scores: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens at least min_p times as likely as the most likely one.

    p_i >= min_p * p_max is s_i >= s_max + log(min_p): the softmax normalisation cancels out.
    """
    if min_p <= 0.0:
        return scores
    return np.where(scores >= scores.max() + math.log(min_p), scores, -np.inf)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token drawn with the given probabilities, from a single uniform number (inverse CDF)."""
    cumulative = np.cumsum(probs)
    token = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return min(token, probs.size - 1)  # guard the u * total == total rounding edge


def top_logprobs(logprobs: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    """The n most likely tokens and their log-probabilities, most likely first."""
    n = min(n, logprobs.size)
    if n <= 0:
        return ()
    best = np.argpartition(logprobs, logprobs.size - n)[logprobs.size - n:]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return tuple((int(t), float(logprobs[t])) for t in best)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    try:
        scores = np.asarray(logits, dtype=np.float64)
    except (TypeError, ValueError):
        raise SamplingTypeError(f"logits must be a vector of numbers, got "
                                f"{type(logits).__name__}") from None
    if scores.ndim != 1 or scores.size == 0:
        raise SamplingError(f"logits must be a non-empty vector, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise SamplingError("logits contain NaN")
    if not np.isfinite(scores.max()):
        raise SamplingError("logits are all -inf (or contain +inf): nothing can be sampled")
    return scores


class Sampler:
    """Turns logits into tokens with fixed settings and its own random generator.

    temperature 0 = greedy; top_k 0, top_p 1 and min_p 0 switch those filters off. `seed` (an int,
    or a numpy Generator to share) makes the sequence of draws reproducible; None seeds from the OS.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed: int | np.random.Generator | None = None,
    ):
        for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
            _expect(value, _REAL, name, "a number")
        _expect(top_k, (int, np.integer), "top_k", "an integer >= 0 (0 = off)")
        if seed is not None:
            _expect(seed, _SEEDS, "seed", "an integer, a numpy Generator or None")
            if isinstance(seed, (int, np.integer)) and seed < 0:
                raise SamplingError(f"seed must be at least 0, got {seed}")
        if not temperature >= 0.0:
            raise SamplingError(f"temperature must be >= 0, got {temperature}")
        if not top_k >= 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
        if not 0.0 <= min_p <= 1.0:
            raise SamplingError(f"min_p must be in [0, 1] (0 = off), got {min_p}")
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.min_p = float(min_p)
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a token is drawn from: temperature, then top-k, top-p, min-p, softmax."""
        scores = _check_logits(logits)
        with np.errstate(over="ignore"):
            scaled = scores / self.temperature
            if not np.isfinite(scaled.max()):  # a tiny temperature: +inf - inf in the softmax;
                scaled = (scores - scores.max()) / self.temperature  # shifted first, 0 or -inf
        scores = scaled
        scores = keep_top_k(scores, self.top_k)
        scores = keep_top_p(scores, self.top_p)
        scores = keep_min_p(scores, self.min_p)
        return softmax(scores)

    def sample(self, logits: np.ndarray) -> int:
        """The next token. [n_vocab] logits -> token id"""
        if self.greedy:  # ties: the lowest id
            if isinstance(logits, np.ndarray) and logits.ndim == 1 and logits.size \
                    and np.isfinite(logits.max()):  # (NaN, +inf, all -inf: the checks' errors)
                return int(np.argmax(logits))  # no float64 copy: 1.6 MB of fresh pages a token
            return int(np.argmax(_check_logits(logits)))
        if not isinstance(logits, np.ndarray):
            logits = _check_logits(logits)  # a list: float64 (the float32 fast path below needs arrays)
        if self.top_k == 0 and self.top_p == 1.0 and self.min_p == 0.0 and logits.dtype == np.float32 \
                and logits.ndim == 1 and logits.size:  # (else the checks' errors, below)
            return self._draw_plain(logits)
        return draw(self.probabilities(logits), self.rng)

    def _draw_plain(self, logits: np.ndarray) -> int:
        """`draw(self.probabilities(logits))` with no filters, in a fifteenth of the time (a served
        token's sampling was 3 ms, 7 % of a 16-core decode step; now ~0.2 ms): the exp in float32
        (to 1e-7 of the float64 one), the running sum in float64, the same single uniform number."""
        top = logits.max()
        if not np.isfinite(top):
            _check_logits(logits)  # raises: NaN, +inf or all -inf
        # max -> 1, in a reused buffer: three fresh 800 KB temporaries a token page-faulted (glibc
        # hands such blocks back to the OS when they are freed): 1.5 of the 1.7 ms this took
        weights = scratch("sampling", logits.size)
        with np.errstate(over="ignore"):  # (-3e38 - 3e38: -inf, whose exp is the 0 it should be)
            np.subtract(logits, top, out=weights)
        if 1.0 / self.temperature > FLOAT32_MAX:  # below ~3e-39, (logit - top) / temperature is
            np.copyto(weights, weights == 0.0)  # 0 or -inf: the largest logits share the mass
        else:
            if self.temperature != 1.0:  # (times 1.0: the same values; -inf where it overflows)
                with np.errstate(over="ignore"):
                    np.multiply(weights, np.float32(1.0 / self.temperature), out=weights)
            np.exp(weights, out=weights)
        # the inverse CDF in two levels (a float64 running sum over the whole vocabulary took
        # 1.6 ms): which chunk of 2048 holds the draw, then where in that chunk
        starts = np.arange(0, weights.size, 2048)
        chunks = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
        u = self.rng.random() * chunks[-1]
        c = min(int(np.searchsorted(chunks, u, side="right")), len(chunks) - 1)
        within = np.cumsum(weights[starts[c]:starts[c] + 2048], dtype=np.float64)
        before = chunks[c - 1] if c > 0 else 0.0
        token = starts[c] + int(np.searchsorted(within, u - before, side="right"))
        return min(int(token), logits.size - 1)

    def sample_with_logprobs(self, logits: np.ndarray, n_top: int = 0) -> Choice:
        """The next token, with its log-probability and the n_top most likely tokens'."""
        _expect(n_top, (int, np.integer), "n_top", "an integer >= 0")
        if n_top < 0:
            raise SamplingError(f"n_top must be an integer >= 0, got {n_top}")
        token = self.sample(logits)
        logprobs = log_softmax(_check_logits(logits))
        return Choice(token, float(logprobs[token]), top_logprobs(logprobs, n_top))
