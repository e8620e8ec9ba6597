"""The serving engine: one model, several conversations decoded together, in a thread of its own.

    submit(Job) -> Stream          (any thread; raises Overloaded when the queue is full)
        |
        v  pending (bounded)
    engine thread, forever:
      1. admit: each waiting job takes a free slot (the one whose cached ids share the longest
         prefix with its prompt); only the ids its cache lacks are left to prefill
      2. prefill one chunk (PREFILL_CHUNK ids) of the oldest prompt still going in: a long
         prompt goes in between decode steps, it does not stop the other streams
      3. sample one token for every decoding stream (its own sampler, constraint, logprobs)
      4. run all the sampled tokens through ONE forward (Model.forward_batch): the dense weights
         are read once per step for every stream, the experts grouped
    A stream ends at <|return|> / <|call|>, max_tokens, a full context, or when cancelled (a client
    that went away): it leaves at the next step and its slot is free for the next job.

A slot is a `generate.Context`: its KV cache stays after the reply, so the next turn of the same
conversation (the same prefix) prefills only its new tokens (`Event.cached_tokens`).

Streams are consumed from asyncio (`async for event in stream`, the server) or from a plain thread
(`for event in stream`). Events: Started (prompt and cached counts), Token (id + Choice with
logprobs when asked), Done (why it stopped, counts and timings). A failure inside the engine ends
the streams it touched with Done(reason="error"); the engine keeps serving.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numba
import numpy as np

from .errors import TinyossError
from .generate import Context
from .harmony import ASSISTANT_STOP_TOKENS
from .sampling import Choice, Sampler
from .tokenizer import CALL, RETURN


PREFILL_CHUNK = 256  # prompt ids run between two decode steps of the other streams


class Overloaded(TinyossError):
    """The queue of waiting requests is full."""


@dataclass
class Job:
    """What one request asks the engine for."""

    prompt: list[int]  # ids, ending with <|start|>assistant
    max_tokens: int
    sampler: Sampler = field(default_factory=Sampler)
    logprobs: int | None = None  # None: none; n >= 0: each token's logprob and the n best rivals
    constraint: "Constraint | None" = None
    stop_tokens: tuple[int, ...] = ASSISTANT_STOP_TOKENS


class Constraint:
    """The output must begin with one of `prefixes` (token sequences): a forced tool call header.
    `allowed(sampled)` -> the ids that keep it on one of them, or None once it is free."""

    def __init__(self, prefixes: Sequence[Sequence[int]], banned: Sequence[int] = ()):
        self.prefixes = [list(p) for p in prefixes]
        self.banned = list(banned)  # never allowed (e.g. <|call|> with tool_choice "none")

    def allowed(self, sampled: list[int]) -> list[int] | None:
        n = len(sampled)
        nexts = {p[n] for p in self.prefixes if len(p) > n and p[:n] == sampled}
        return sorted(nexts) or None

    def apply(self, logits: np.ndarray, sampled: list[int]) -> np.ndarray:
        allowed = self.allowed(sampled)
        if allowed is None and not self.banned:
            return logits
        out = logits.copy()
        if allowed is not None:
            out[:] = -np.inf
            out[allowed] = logits[allowed]
        out[self.banned] = -np.inf
        return out


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    cached_tokens: int  # of the prompt, reused from the slot's KV cache


@dataclass(frozen=True)
class Token:
    token: int
    choice: Choice | None  # with logprobs when the job asked for them


@dataclass(frozen=True)
class Done:
    reason: str  # "return", "call", "length" (max_tokens), "context" (full), "cancelled", "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # first token to last
    error: str = ""


Event = Started | Token | Done


class Stream:
    """The events of one job, as the engine makes them. Iterate it (sync or async) until Done."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop | None):
        self.job = job
        self.cancelled = threading.Event()
        self._loop = loop
        self._async: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._sync: queue.SimpleQueue | None = queue.SimpleQueue() if loop is None else None
        # engine-side state
        self.context: Context | None = None
        self.todo: list[int] = []  # prompt ids still to prefill
        self.cached = 0  # prompt ids the slot's cache already held
        self.logits: np.ndarray | None = None  # set once the prompt is in: decoding
        self.sampled: list[int] = []
        self.started = Started(0, 0)
        self.prefill_seconds = 0.0
        self.admitted_at = 0.0
        self.first_token_at = 0.0

    def cancel(self) -> None:
        """Stop generating (a client that went away, a stop string found): the engine drops the
        stream at its next step and sends Done(reason="cancelled")."""
        self.cancelled.set()

    def _put(self, event: Event) -> None:
        if self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                self.cancel()
        else:
            self._sync.put(event)

    def __iter__(self):
        while True:
            event = self._sync.get()
            yield event
            if isinstance(event, Done):
                return

    async def __aiter__(self):
        while True:
            event = await self._async.get()
            yield event
            if isinstance(event, Done):
                return


class Engine:
    """Runs jobs on `model` in `parallel` slots, each with a context of `ctx` tokens; at most
    `max_queue` jobs wait for a slot."""

    def __init__(self, model: Any, *, parallel: int = 1, ctx: int | None = None,
                 max_queue: int = 16, on_error: Callable[[BaseException], None] | None = None):
        if parallel < 1:
            raise TinyossError(f"parallel must be >= 1, got {parallel}")
        self.model = model
        self.ctx = int(ctx or model.config.max_position_embeddings)
        self.max_queue = max_queue
        self.slots = [Context(model, self.ctx) for _ in range(parallel)]
        self._last_used = [0.0] * parallel
        self._busy: dict[int, Stream] = {}  # slot index -> stream decoding there
        self._pending: deque[Stream] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._on_error = on_error
        # numba's thread count is per thread, and a new thread starts at all cores: the engine's
        # thread takes its creator's (`tinyoss serve --threads`)
        self._threads = numba.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="tinyoss-engine", daemon=True)
        self._thread.start()

    # -- the client side -------------------------------------------------------------------------

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a job. -> its Stream (async when `loop` is given). Raises Overloaded."""
        if len(job.prompt) >= self.ctx:
            raise TinyossError(f"the prompt ({len(job.prompt)} tokens) leaves no room in the "
                               f"context ({self.ctx} tokens)")
        stream = Stream(job, loop)
        with self._lock:
            if self._closing:
                raise Overloaded("the server is shutting down")
            free = len(self.slots) - len(self._busy)  # pending jobs about to take a free slot
            if len(self._pending) >= self.max_queue + free:
                raise Overloaded(f"all {len(self.slots)} of its slots (--parallel) are taken and "
                                 f"{self.max_queue} requests wait, its queue's limit (--queue)")
            self._pending.append(stream)
            self._lock.notify()
        return stream

    @property
    def load(self) -> dict[str, int]:
        with self._lock:
            return {"running": len(self._busy), "waiting": len(self._pending),
                    "prefilling": sum(s.logits is None for s in self._busy.values()),
                    "slots": len(self.slots)}

    def cancel_all(self) -> None:
        """Refuse new jobs and cancel every stream (each gets Done "cancelled" at the next step)."""
        with self._lock:
            self._closing = True
            for stream in [*self._pending, *self._busy.values()]:
                stream.cancel()
            self._lock.notify()

    def close(self) -> None:
        """cancel_all, and wait for the engine thread to end."""
        self.cancel_all()
        self._thread.join(timeout=60)

    # -- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        numba.set_num_threads(self._threads)
        while True:
            with self._lock:
                while not self._pending and not self._busy and not self._closing:
                    self._lock.wait()
                if self._closing and not self._pending and not self._busy:
                    return
            try:
                self._admit()
                self._prefill_chunk()
                self._step()
            except BaseException as err:  # noqa: BLE001  a bug must not kill the engine silently
                self._fail_all(err)

    def _take_slot(self, prompt: list[int]) -> int | None:
        """The free slot that can reuse the most of `prompt` (what its rings allow, not only what
        its ids share: a new conversation that shares just the system message would otherwise
        evict one that is going on), then the least recently used; None when all are busy."""
        free = [i for i in range(len(self.slots)) if i not in self._busy]
        if not free:
            return None
        return max(free, key=lambda i: (self.slots[i].reusable(prompt), -self._last_used[i]))

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                stream = self._pending[0]
                if stream.cancelled.is_set():
                    self._pending.popleft()
                    stream._put(Done("cancelled"))
                    continue
                slot = self._take_slot(stream.job.prompt)
                if slot is None:
                    return
                self._pending.popleft()
                self._busy[slot] = stream
                stream.admitted_at = time.perf_counter()
            self._prefill(slot, stream)

    def _prefill(self, slot: int, stream: Stream) -> None:
        """Give the stream its slot's context: what it shares with the prompt is kept."""
        context = self.slots[slot]
        stream.context = context
        try:
            stream.cached, logits = context.start_prompt(stream.job.prompt)
        except Exception as err:  # noqa: BLE001
            self._failed(slot, stream, err)
            return
        stream.todo = stream.job.prompt[stream.cached:] if logits is None else []
        if logits is not None:
            self._prompt_in(stream, logits)

    def _prompt_in(self, stream: Stream, logits: np.ndarray) -> None:
        stream.logits = logits
        stream.started = Started(len(stream.job.prompt), stream.cached)
        stream._put(stream.started)

    def _prefill_chunk(self) -> None:
        """Run the next PREFILL_CHUNK ids of the prompt admitted first among those going in."""
        with self._lock:
            going_in = [(slot, s) for slot, s in self._busy.items() if s.logits is None]
        if not going_in:
            return
        slot, stream = min(going_in, key=lambda item: item[1].admitted_at)
        if stream.cancelled.is_set():
            self._end(slot, stream, self._done(stream, "cancelled"))
            return
        chunk, stream.todo = stream.todo[:PREFILL_CHUNK], stream.todo[PREFILL_CHUNK:]
        start = time.perf_counter()
        try:
            logits = stream.context.append(chunk)
        except Exception as err:  # noqa: BLE001  (append empties the context)
            self._failed(slot, stream, err)
            return
        stream.prefill_seconds += time.perf_counter() - start
        if not stream.todo:
            self._prompt_in(stream, stream.context.end_prompt(logits))

    def _failed(self, slot: int, stream: Stream, err: Exception) -> None:
        self._end(slot, stream, Done("error", error=str(err)))
        if not isinstance(err, TinyossError) and self._on_error:
            self._on_error(err)

    def _end(self, slot: int, stream: Stream, done: Done) -> None:
        with self._lock:
            self._busy.pop(slot, None)
            self._last_used[slot] = time.monotonic()
        stream._put(done)

    def _done(self, stream: Stream, reason: str) -> Done:
        now = time.perf_counter()
        return Done(reason, stream.started.prompt_tokens, stream.started.cached_tokens,
                    len(stream.sampled), stream.prefill_seconds,
                    now - stream.first_token_at if stream.sampled else 0.0)

    def _sample(self, stream: Stream) -> Token:
        job = stream.job
        logits = stream.logits
        if job.constraint is not None:
            logits = job.constraint.apply(logits, stream.sampled)
        if job.logprobs is None:
            return Token(job.sampler.sample(logits), None)
        choice = job.sampler.sample_with_logprobs(logits, job.logprobs)
        return Token(choice.token, choice)

    def _step(self) -> None:
        """Sample a token for every active stream, then run them all through one forward."""
        with self._lock:
            active = [(slot, s) for slot, s in self._busy.items() if s.logits is not None]
        running: list[tuple[int, Stream, int]] = []
        for slot, stream in active:
            if stream.cancelled.is_set():
                self._end(slot, stream, self._done(stream, "cancelled"))
                continue
            token = self._sample(stream)
            if not stream.sampled:
                stream.first_token_at = time.perf_counter()
            stream.sampled.append(token.token)
            stream._put(token)
            reason = None
            if token.token in stream.job.stop_tokens:
                reason = "call" if token.token == CALL else "return" if token.token == RETURN else "stop"
            elif len(stream.sampled) >= stream.job.max_tokens:
                reason = "length"
            elif stream.context.room < 1:
                reason = "context"
            if reason is not None:
                self._end(slot, stream, self._done(stream, reason))
            else:
                running.append((slot, stream, token.token))
        if not running:
            return
        try:
            if len(running) == 1:  # one stream: the decode kernels, as `tinyoss run` does
                _, stream, token = running[0]
                stream.logits = stream.context.append([token])
                return
            caches = [stream.context.cache for _, stream, _ in running]
            logits = self.model.forward_batch([t for _, _, t in running], caches)
        except Exception as err:  # noqa: BLE001
            for slot, stream, _ in running:
                stream.context.reset()
                self._end(slot, stream, Done("error", error=str(err)))
            if self._on_error:
                self._on_error(err)
            return
        for i, (_, stream, token) in enumerate(running):
            stream.context.extended([token], logits[i])
            stream.logits = logits[i]

    def _fail_all(self, err: BaseException) -> None:
        with self._lock:
            streams = list(self._busy.items())
        for slot, stream in streams:
            self.slots[slot].reset()
            self._end(slot, stream, Done("error", error=str(err)))
        if self._on_error:
            self._on_error(err)
