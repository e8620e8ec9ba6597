"""The prompt cache and batched decode that `tinyoss serve` relies on, on the tiny random model
(window 16): a prompt that shares a prefix with the cached ids runs only the rest, whatever point it
diverges at (the banded layers' rings rebuilt from the copy taken where the last prompt ended), and
its logits equal a fresh prefill; several caches decoded in one forward give each one's own logits."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import tinyoss
from tinyoss import generate as g
from tinyoss.model import _reachable

WINDOW = 16


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tinyoss.load(tiny_checkpoint)


def ids(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 200_000, n)]


def fresh_logits(model, prompt: list[int]) -> np.ndarray:
    return g.Context(model).prefill(prompt)[0]


def decode(context: g.Context, tokens: list[int]) -> None:
    """What generation does after a prompt: each sampled token run on its own."""
    for t in tokens:
        context.append([t])


# (prompt length S, decoded tokens, where the next prompt diverges, its length, the ids reused)
CASES = [
    (40, 30, "S", 60, 40),  # the reply re-rendered differently: back to where the prompt ended
    (40, 30, "n", 80, 70),  # a plain continuation
    (40, 10, 45, 70, 45),  # mid-reply, the rings at S and now overlap: any point between them
    (40, 30, 55, 70, 40),  # mid-reply, 30 > window decoded: back to S, then 15 run again
    (40, 30, 20, 50, 0),  # before S: 4..19 is in no ring (the copy holds 24..39): start over
    (10, 5, 8, 30, 8),  # everything still inside the first window
    (40, 30, 0, 20, 0),  # nothing shared
]


@pytest.mark.parametrize("S, decoded, diverge, length, reused", CASES)
def test_a_prompt_reuses_its_shared_prefix_and_gets_fresh_prefill_logits(model, S, decoded, diverge,
                                                                         length, reused):
    context = g.Context(model)
    first = ids(S, seed=1)
    context.prefill(first)
    reply = ids(decoded, seed=2)
    decode(context, reply)
    history = first + reply  # the ids the cache holds: S + decoded
    at = {"S": S, "n": len(history)}.get(diverge, diverge)
    second = history[:at] + ids(length - at, seed=3)
    assert context.reusable(second) == reused  # what a server ranks slots by, asked before
    logits, kept = context.prefill(second)
    assert kept == reused
    assert context.tokens == second
    np.testing.assert_allclose(logits, fresh_logits(model, second), atol=1e-4, rtol=0)
    # and the cache goes on decoding as a fresh one would
    more = ids(3, seed=4)
    decode(context, more)
    np.testing.assert_allclose(context._logits, fresh_logits(model, second + more), atol=1e-4, rtol=0)


def test_the_same_prompt_again_runs_nothing_and_a_shorter_one_runs_its_last_id(model):
    context = g.Context(model)
    prompt = ids(12, seed=5)  # inside the first window: the ring still holds every position
    first, _ = context.prefill(prompt)
    again, kept = context.prefill(prompt)
    assert kept == 12 and np.array_equal(first, again)
    decode(context, ids(40, seed=7))  # a reply longer than the window, then the prompt again:
    again, kept = context.prefill(prompt)  # the ring copy and logits kept where it ended
    assert kept == 12 and np.array_equal(first, again)
    decode(context, ids(3, seed=8))
    np.testing.assert_allclose(context._logits, fresh_logits(model, prompt + ids(3, seed=8)), atol=1e-4,
                               rtol=0)
    shorter, kept = context.prefill(prompt[:10])  # its logits need its last id run again
    assert kept == 9
    np.testing.assert_allclose(shorter, fresh_logits(model, prompt[:10]), atol=1e-4, rtol=0)
    longer = ids(30, seed=6)
    context.prefill(longer)
    shorter, kept = context.prefill(longer[:25])  # the ring lost 8..13 to 24..29: start over
    assert kept == 0
    np.testing.assert_allclose(shorter, fresh_logits(model, longer[:25]), atol=1e-4, rtol=0)


def test_the_reachable_point_is_the_latest_whose_window_the_rings_hold():
    # the live ring at 70 (54..69) and a copy at 40 (24..39): they leave 40..53 uncovered
    assert _reachable(70, [70, 40], 16) == 70
    assert _reachable(60, [70, 40], 16) == 40  # 44..59 includes 40..43, held by neither
    assert _reachable(40, [70, 40], 16) == 40
    assert _reachable(39, [70, 40], 16) == 0  # 23 is in no ring
    assert _reachable(10, [70, 40], 16) == 0
    assert _reachable(10, [12], 16) == 10  # the first window: a ring holding 0..11 has 0..9
    assert _reachable(50, [60, 45], 16) == 50  # 29..44 and 44..59 overlap: 34..49 is held


def test_a_batch_of_caches_decodes_as_each_alone(model):
    lengths = [5, 17, 40]  # before, just past and well past the window
    caches = [model.new_cache() for _ in lengths]
    for cache, n, seed in zip(caches, lengths, range(10, 13)):
        model.forward(ids(n, seed), cache)
    alone = copy.deepcopy(caches)
    tokens = ids(3, seed=20)
    for step in range(3):  # three steps: each cache's ring moves on
        batch = model.forward_batch(tokens, caches)
        for i, cache in enumerate(alone):
            one = model.forward([tokens[i]], cache, last_only=True)[0]
            np.testing.assert_allclose(batch[i], one, atol=1e-4, rtol=0)
        tokens = [int(t) for t in batch.argmax(axis=-1)]
    assert [c.n_tokens for c in caches] == [n + 3 for n in lengths]


def test_a_batch_needs_one_distinct_cache_per_token(model):
    cache = model.new_cache()
    model.forward([1, 2], cache)
    with pytest.raises(tinyoss.TinyossError, match="one distinct cache per token"):
        model.forward_batch([1, 2], [cache, cache])
