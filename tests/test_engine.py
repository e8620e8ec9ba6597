"""The serving engine on the tiny random model, without HTTP: a long prompt goes in chunk by chunk
between the decode steps of the streams already running (they keep streaming), and comes out as a
prompt prefilled at once would; slots keep their caches for the next turn."""

from __future__ import annotations

import numpy as np
import pytest

import tinyoss
from tinyoss import engine as eng
from tinyoss.engine import Done, Engine, Job, Started, Token
from tinyoss.generate import Context
from tinyoss.sampling import Sampler

GREEDY = Sampler(temperature=0)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tinyoss.load(tiny_checkpoint)


def ids(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 200_000, n)]


def greedy_alone(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """The reference: one Context, the prompt at once, then one token at a time."""
    context, out, logprobs = Context(model), [], []
    logits, _ = context.prefill(prompt)
    for _ in range(n):
        choice = Sampler(temperature=0).sample_with_logprobs(logits)
        out.append(choice.token)
        logprobs.append(choice.logprob)
        logits = context.append([choice.token])
    return out, logprobs


def test_a_long_prompt_goes_in_between_the_steps_of_running_streams(model, monkeypatch):
    monkeypatch.setattr(eng, "PREFILL_CHUNK", 16)
    engine = Engine(model, parallel=2, ctx=2048)
    try:
        running = engine.submit(Job(ids(20, 1), 400, GREEDY))
        events = iter(running)
        assert isinstance(next(events), Started) and isinstance(next(events), Token)
        long_prompt = ids(300, 2)  # 19 chunks of 16
        late = engine.submit(Job(long_prompt, 6, GREEDY, logprobs=0))
        late_events = list(late)  # its whole reply, while the first keeps decoding
        started = next(e for e in late_events if isinstance(e, Started))
        assert started.prompt_tokens == 300 and started.cached_tokens == 0
        # a decode step after each of the 19 chunks, then the 6 steps both decode in: had the
        # prompt gone in at once, the first stream would have sampled 7 or 8 tokens by now
        assert len(running.sampled) >= 19 + 6
        running.cancel()
        got = [e for e in late_events if isinstance(e, Token)]
        want, want_logprobs = greedy_alone(model, long_prompt, 6)
        assert [e.token for e in got] == want
        assert [e.choice.logprob for e in got] == pytest.approx(want_logprobs, abs=1e-4)
        assert late_events[-1] == Done("length", 300, 0, 6, late_events[-1].prefill_seconds,
                                       late_events[-1].decode_seconds)
    finally:
        engine.close()


def test_a_slot_keeps_its_cache_for_the_next_turn(model):
    engine = Engine(model, parallel=2, ctx=2048)
    try:
        prompt = ids(40, 3)
        first = list(engine.submit(Job(prompt, 5, GREEDY)))
        reply = [e.token for e in first if isinstance(e, Token)]
        follow_up = prompt + reply + ids(10, 4)
        second = list(engine.submit(Job(follow_up, 3, GREEDY)))
        started = next(e for e in second if isinstance(e, Started))
        assert started.cached_tokens == len(prompt) + len(reply) - 1  # all but the last, never run
        # a new conversation sharing only the first ids (a system message) with that one: the
        # rings can't go back there, so it takes the other slot rather than evicting this one
        other = list(engine.submit(Job(follow_up[:5] + ids(30, 5), 2, GREEDY)))
        assert next(e for e in other if isinstance(e, Started)).cached_tokens == 0
        second_reply = [e.token for e in second if isinstance(e, Token)]
        third = list(engine.submit(Job(follow_up + second_reply + ids(4, 6), 2, GREEDY)))
        assert next(e for e in third if isinstance(e, Started)).cached_tokens == \
            len(follow_up) + len(second_reply) - 1
        assert engine.load == {"running": 0, "waiting": 0, "prefilling": 0, "slots": 2}
    finally:
        engine.close()


def test_a_cancelled_prompt_leaves_while_going_in(model, monkeypatch):
    monkeypatch.setattr(eng, "PREFILL_CHUNK", 8)
    engine = Engine(model, parallel=1, ctx=2048)
    try:
        stream = engine.submit(Job(ids(400, 6), 10, GREEDY))
        stream.cancel()
        assert list(stream)[-1].reason == "cancelled"
        after = list(engine.submit(Job(ids(10, 7), 2, GREEDY)))  # the slot is free again
        assert after[-1].reason == "length"
    finally:
        engine.close()


def test_the_engine_runs_its_kernels_on_its_creators_thread_count(model, monkeypatch):
    """numba's thread count belongs to a thread, and a new one starts at all cores: the engine's
    thread takes its creator's (`tinyoss serve --threads N` sets it, then builds the engine)."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: every thread count is 1")
    seen = []
    forward = model.forward

    def noting(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", noting)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        engine = Engine(model, parallel=1, ctx=64)
    finally:
        numba.set_num_threads(before)
    try:
        events = list(engine.submit(Job(ids(5, 1), 3, GREEDY)))
    finally:
        engine.close()
    assert isinstance(events[-1], Done) and seen and set(seen) == {1}
