"""Generation: a model and a harmony conversation in; streamed tokens and parsed messages out.

    messages --render--> prompt ids --prefill--> logits --sample--> token --decode--> ... <|return|>
                             ^                                         |
                             +-- tool result <-- run the function <----+ <|call|>

- `Context` is a model, its KV cache and the ids the cache holds (the split of the Metal reference:
  an immutable Model, a mutable Context). `prefill(prompt)` runs only the ids the cache does not
  hold yet, so a tool round does not recompute the conversation before it.
- `generate(model, messages, ...)` renders the conversation, prefills once, then samples one token
  at a time until `<|return|>` (answer done), `<|call|>` (a tool call), `max_tokens` or a full
  context. It yields a `TokenEvent` per sampled token (with the text it added, and to which channel),
  a `ToolEvent` per function it ran, and last a `Reply`: the new messages, every sampled token, `Stats`.
- `chat(model, messages, ...)` runs `generate` to the end and returns the `Reply`.

Function tools are plain Python functions with type hints and a docstring (harmony.tool_from_function
describes them to the model). A call (`to=functions.NAME`, JSON arguments) is run, its result fed
back as a `functions.NAME to=assistant` message, and sampling goes on, for at most
`max_tool_rounds` calls. Bad JSON, an unknown tool or an exception in the function becomes an
`{"error": ...}` result for the model to read; it never ends the generation.

The prompt follows harmony's rules: the system message carries the date (today's unless given) and
the reasoning effort; analysis from turns that already ended with a final answer is left out.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import datetime
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Sequence

import numpy as np

from tinyoss import harmony
from tinyoss.errors import NonFiniteError, TinyossError, TinyossTypeError, expect_type
from tinyoss.harmony import DeveloperContent, Message, ReasoningEffort, Role, SystemContent
from tinyoss.sampling import Choice, Sampler
from tinyoss.tokenizer import CALL, RETURN, get_tokenizer

DEFAULT_MAX_TOKENS = 2048  # sampled tokens per reply, all tool rounds together
DEFAULT_MAX_TOOL_ROUNDS = 8  # function calls run per reply

# why sampling stopped (Stats.stop_reason)
STOP_REASONS = {
    "return": "the model finished its answer (<|return|>)",
    "call": "the model called a tool and no tools were given (<|call|>)",
    "max_tokens": "max_tokens tokens were sampled",
    "context": "the context (KV cache) is full",
    "tool_rounds": "the model kept calling tools after max_tool_rounds calls",
    "malformed": "the model's output is not harmony (see harmony.StreamParser)",
}


class GenerationError(TinyossError):
    """A conversation that cannot be generated from: a prompt longer than the context, bad tools."""


class ContextFullError(GenerationError):
    """A prompt longer than the context (a conversation that has outgrown it)."""


# ---------------------------------------------------------------------------------------------------
# What generate() yields
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEvent:
    """One sampled token, and what it added to the message being written.

    `text` is the content the token added ("" for header and stop tokens, and while a multi-byte
    character is incomplete). `channel` and `recipient` are those of the message the token belongs
    to, None while its header is being written. `choice` holds log-probabilities when asked for.
    """

    token: int
    text: str
    channel: str | None
    recipient: str | None
    choice: Choice | None = None


@dataclass(frozen=True)
class ToolEvent:
    """A function call the model made, and the result it was given back."""

    recipient: str  # e.g. "functions.get_weather"
    arguments: str  # the JSON text the model wrote
    result: str  # what the model reads back


@dataclass(frozen=True)
class Stats:
    """Counts and timings of one reply (all tool rounds together). Times exclude the consumer's."""

    prompt_tokens: int  # length of the first prompt
    reused_tokens: int  # of those, already in the KV cache (not prefilled again)
    prefill_tokens: int  # ids run through prefill: the new part of the prompt, plus tool results
    prefill_seconds: float
    generated_tokens: int  # sampled tokens
    decode_seconds: float  # sampling, and the one-token forward passes between samples
    stop_reason: str  # a key of STOP_REASONS

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass(frozen=True)
class Reply:
    """The end of a generation: the messages it added (assistant messages and tool results, in
    order), every sampled token, and the stats."""

    messages: list[Message]
    tokens: list[int]
    stats: Stats

    @property
    def has_final(self) -> bool:
        """Whether the model wrote a final answer (a message on the final channel)."""
        return any(m.role == Role.ASSISTANT and m.channel == "final" for m in self.messages)

    @property
    def text(self) -> str:
        """The final answer. When the model wrote none (`has_final` is False: it was cut off while
        reasoning, left a tool call to the caller, or wrote no harmony at all, as random weights
        do), what it wrote instead: the text of every sampled token, special tokens written out."""
        if self.has_final:
            return "".join(m.text for m in self.messages if m.role == Role.ASSISTANT and m.channel == "final")
        return get_tokenizer().decode(self.tokens)

    @property
    def analysis(self) -> str:
        """The reasoning (analysis channel)."""
        return "".join(m.text for m in self.messages if m.role == Role.ASSISTANT and m.channel == "analysis")


Event = TokenEvent | ToolEvent | Reply


# ---------------------------------------------------------------------------------------------------
# Context: a model + KV cache + the ids the cache holds
# ---------------------------------------------------------------------------------------------------


class Context:
    """The run state of one conversation: a KV cache and the token ids it holds.

    `max_tokens` bounds the context (default: the model's, 131072 for gpt-oss). `prefill(prompt)`
    keeps the longest prefix the prompt shares with the cached ids and runs only the rest: a
    follow-up turn of a chat (or a tool result) prefills just its new tokens. The banded layers'
    rings hold only the last 128 positions, so going back to an earlier point needs the rings as
    they were there: a copy is kept where each prompt ended (the next turn diverges there or
    later, where the re-rendered reply differs from the sampled one), the last `RING_COPIES` of
    them. If a forward pass is interrupted (Ctrl-C) the context empties itself, since the cache
    may then hold part of the interrupted tokens.
    """

    RING_COPIES = 4

    def __init__(self, model: Any, max_tokens: int | None = None):
        if not callable(getattr(model, "new_cache", None)):
            raise TinyossTypeError(f"model must be a loaded model (tinyoss.load), got "
                                   f"{type(model).__name__}")
        self.model = model
        if max_tokens is not None and (isinstance(max_tokens, bool) or
                                       not isinstance(max_tokens, (int, np.integer))):
            raise TinyossTypeError(f"max_tokens must be None or an int, got {type(max_tokens).__name__}")
        # (0 is refused by the cache as out of range, not taken as "the model's")
        self.max_tokens = model.config.max_position_embeddings if max_tokens is None else int(max_tokens)
        self.reset()

    def reset(self) -> None:
        self.cache = self.model.new_cache(self.max_tokens)
        self.tokens: list[int] = []
        self._logits: np.ndarray | None = None  # [vocab] after the last token
        self._copies: list = []  # (model.RingCopy, logits after it) where prompts ended, oldest first

    @property
    def room(self) -> int:
        """How many more tokens fit."""
        return self.max_tokens - len(self.tokens)

    def append(self, tokens: Sequence[int]) -> np.ndarray:
        """Run `tokens` after the cached ones. -> logits [vocab] of the token after them"""
        try:
            logits = self.model.forward(list(tokens), self.cache, last_only=True)[-1]
        except BaseException:
            self.reset()
            raise
        self.extended(tokens, logits)
        return logits

    def extended(self, tokens: Sequence[int], logits: np.ndarray) -> None:
        """Record that the cache now also holds `tokens` (run by `append`, or by a batched forward
        of several contexts), with `logits` [vocab] after them."""
        self.tokens += [int(t) for t in tokens]
        self._logits = logits

    def shared_prefix(self, prompt: Sequence[int]) -> int:
        """How many leading ids of `prompt` the cache holds."""
        n = min(len(prompt), len(self.tokens))
        same = np.asarray(prompt[:n]) == np.asarray(self.tokens[:n], dtype=np.int64)
        return int(n if same.all() else np.argmin(same))

    def prefill(self, prompt: Sequence[int]) -> tuple[np.ndarray, int]:
        """Make the context hold exactly `prompt`. -> (logits [vocab] after it, ids reused from the cache)"""
        prompt = [int(t) for t in prompt]
        kept, logits = self.start_prompt(prompt)
        if logits is None:
            logits = self.end_prompt(self.append(prompt[kept:]))
        return logits, kept

    def start_prompt(self, prompt: list[int]) -> tuple[int, np.ndarray | None]:
        """The first half of `prefill`: keep what the cache shares with `prompt`. -> (ids kept,
        the logits after the prompt when nothing is left to run, else None: then `append` the
        rest, in pieces if you like, and hand the last logits to `end_prompt`)."""
        if not prompt:
            raise GenerationError("the prompt is empty")
        if len(prompt) > self.max_tokens:
            raise ContextFullError(f"the prompt ({len(prompt)} tokens) does not fit the context "
                                   f"({self.max_tokens} tokens)")
        shared = self.shared_prefix(prompt)
        if shared == len(prompt) == len(self.tokens):
            assert self._logits is not None
            return shared, self._logits
        ended_here = [logits for copy, logits in self._copies if copy.at == len(prompt)]
        if shared == len(prompt) and ended_here:  # the same prompt again: its logits were kept
            if self.rewind(shared) == shared:
                self._logits = ended_here[0]
                return shared, self._logits
        # keep at least one id to run: its logits are the ones wanted
        return self.rewind(min(shared, len(prompt) - 1)), None

    def end_prompt(self, logits: np.ndarray) -> np.ndarray:
        """The prompt is in: keep the rings (and the logits) where it ends, for the next turn."""
        self._copies = (self._copies + [(self.cache.ring_copy(), logits)])[-self.RING_COPIES:]
        return logits

    def reusable(self, prompt: Sequence[int]) -> int:
        """How many ids of `prompt` `prefill` would take from the cache (it changes nothing): what
        a server ranks its slots by."""
        shared = self.shared_prefix(prompt)
        if shared == len(prompt) and (shared == len(self.tokens) or
                                      any(copy.at == shared for copy, _ in self._copies)):
            return shared
        target = min(shared, len(prompt) - 1)
        if target == len(self.tokens):
            return target
        return self.cache.reachable(target, [copy for copy, _ in self._copies])

    def rewind(self, n_tokens: int) -> int:
        """Keep the first `n_tokens` cached ids, or as many as the rings allow. -> how many kept"""
        if n_tokens == len(self.tokens):
            return n_tokens
        kept = self.cache.rewind(n_tokens, [copy for copy, _ in self._copies])
        self.tokens = self.tokens[:kept]
        self._copies = [(copy, logits) for copy, logits in self._copies if copy.at <= kept]
        self._logits = None
        return kept


# ---------------------------------------------------------------------------------------------------
# The conversation the model sees
# ---------------------------------------------------------------------------------------------------


def drop_finished_analysis(messages: Sequence[Message]) -> list[Message]:
    """Harmony's rule for reasoning: analysis from a turn that ended in a final answer is not shown
    again. Analysis after the last final answer (the turn in progress, e.g. between tool calls) stays.

    (harmony.render_conversation's auto_drop_analysis only drops what precedes the *first* final
    answer, as openai-harmony does; this drops what precedes the *last* one, as the chat template does.)
    A tool call the model wrote on the analysis channel (120b does, about half the time) is a call,
    not reasoning: it stays, as its result does (the chat template renders every call).
    """
    finals = [i for i, m in enumerate(messages) if m.role == Role.ASSISTANT and m.channel == "final"]
    last_final = finals[-1] if finals else -1
    return [m for i, m in enumerate(messages)
            if not (i < last_final and m.channel == "analysis" and m.recipient is None)]


def _leading(messages: list[Message], role: Role) -> tuple[Message | None, list[Message]]:
    """The first message if it has `role`, and the rest."""
    if messages and messages[0].role == role:
        return messages[0], messages[1:]
    return None, messages


def system_message(existing: Message | None, reasoning: str | None, date: str | None) -> Message:
    """The system message with its date and reasoning effort set: `date` and `reasoning` when given,
    else what `existing` says, else today's date and medium effort. Plain-text content is kept as is."""
    content = existing.content if existing is not None else SystemContent()
    if isinstance(content, str):
        return existing  # type: ignore[return-value]  # the caller wrote it by hand
    assert isinstance(content, SystemContent)
    if reasoning is not None and reasoning not in {e.value for e in ReasoningEffort}:
        raise GenerationError(f"reasoning must be one of {', '.join(e.value for e in ReasoningEffort)}, "
                              f"got {reasoning!r}")
    if date is not None:
        try:  # (3.11's fromisoformat also takes 20240101 and 2024-W01-1)
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
                raise ValueError
            datetime.date.fromisoformat(date)
        except ValueError:
            raise GenerationError(f"date must be YYYY-MM-DD, got {date!r}") from None
    content = dataclasses.replace(
        content,
        conversation_start_date=date or content.conversation_start_date or datetime.date.today().isoformat(),
        reasoning_effort=ReasoningEffort(reasoning) if reasoning is not None else content.reasoning_effort,
    )
    return Message.system(content)


def developer_message(existing: Message | None, instructions: str | None,
                      tools: Sequence[harmony.ToolDescription]) -> Message | None:
    """The developer message: `existing` with `instructions` (when given) and `tools` added; None
    when there is nothing to say."""
    content = existing.content if existing is not None else DeveloperContent()
    if isinstance(content, str):  # a hand-written developer message: its text is the instructions
        content = DeveloperContent(content)
    assert isinstance(content, DeveloperContent)
    content = dataclasses.replace(content, tools=[*content.tools, *tools],
                                  instructions=instructions if instructions is not None else content.instructions)
    if content.instructions is None and not content.tools and not content.namespaces:
        return None
    return Message(Role.DEVELOPER, content)


def prepare_conversation(
    messages: str | Sequence[Message],
    *,
    reasoning: str | None = None,
    date: str | None = None,
    instructions: str | None = None,
    tools: Sequence[harmony.ToolDescription] = (),
) -> list[Message]:
    """The messages as the model must see them: a system message first (date, reasoning effort), a
    developer message next when there are instructions or tools, then the conversation without the
    analysis of finished turns. A str is one user message."""
    if not isinstance(messages, (str, collections.abc.Sequence)) or not all(
            isinstance(m, Message) for m in ([] if isinstance(messages, str) else messages)):
        raise TinyossTypeError("messages must be a str or a list of tinyoss.harmony.Message, got "
                               f"{type(messages).__name__}")
    rest = [Message.user(messages)] if isinstance(messages, str) else list(messages)
    # (instructions alone are a conversation: the server's request of only a system message)
    if not rest and instructions is None and not tools:
        raise GenerationError("messages is empty: give at least one message (a str is one user "
                              "message)")
    system, rest = _leading(rest, Role.SYSTEM)
    developer, rest = _leading(rest, Role.DEVELOPER)
    developer = developer_message(developer, instructions, tools)
    head = [system_message(system, reasoning, date)] + ([developer] if developer is not None else [])
    return head + drop_finished_analysis(rest)


# ---------------------------------------------------------------------------------------------------
# Function tools
# ---------------------------------------------------------------------------------------------------


def functions_by_name(tools: Sequence[Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """The tools by the name the model calls them (`functions.NAME`)."""
    functions: dict[str, Callable[..., Any]] = {}
    if isinstance(tools, (str, bytes)) or not isinstance(tools, collections.abc.Iterable):
        raise TinyossTypeError(f"tools must be a list of functions, got {type(tools).__name__}")
    for function in tools:
        name = getattr(function, "__name__", None)
        if not callable(function) or not name or name == "<lambda>":
            raise GenerationError(f"a tool must be a named function, got {function!r}")
        if name in functions:
            raise GenerationError(f"two tools are named {name!r}")
        functions[name] = function
    return functions


def _error_result(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def run_tool(functions: dict[str, Callable[..., Any]], recipient: str, arguments: str) -> str:
    """Call the function `recipient` names (`functions.NAME`) with the JSON object `arguments`.
    -> its result as text (str as is, anything else as JSON); every failure as an error result."""
    name = recipient.removeprefix("functions.")
    function = functions.get(name) if recipient.startswith("functions.") else None
    if function is None:
        known = ", ".join(f"functions.{n}" for n in functions) or "none"
        return _error_result(f"unknown tool {recipient!r}; the tools are: {known}")
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as err:
        return _error_result(f"the arguments are not valid JSON: {err}")
    if not isinstance(args, dict):
        return _error_result("the arguments must be a JSON object")
    try:
        result = function(**args)
    except Exception as err:  # the tool's own failure is news for the model, not a crash
        return _error_result(f"{type(err).__name__}: {err}")
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


def tool_result(call: Message, output: str) -> Message:
    """The message that answers `call`: from its recipient, to the assistant, on its channel."""
    return Message(Role.TOOL, output, name=call.recipient, channel=call.channel or "commentary",
                   recipient="assistant")


# ---------------------------------------------------------------------------------------------------
# Sampling one assistant turn
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """Stats being counted."""

    prompt_tokens: int
    reused_tokens: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0

    def stats(self, stop_reason: str) -> Stats:
        return Stats(self.prompt_tokens, self.reused_tokens, self.prefill_tokens, self.prefill_seconds,
                     self.generated_tokens, self.decode_seconds, stop_reason)


def _parse(parser: harmony.StreamParser, token: int, choice: Choice | None) -> TokenEvent | None:
    """Feed `token` to the parser. -> the event it makes, or None when it is not harmony."""
    channel, recipient = parser.current_channel, parser.current_recipient  # of the message it may end
    try:
        parser.process(token)
    except harmony.HarmonyError:
        return None
    if parser.state == "content":
        channel, recipient = parser.current_channel, parser.current_recipient
        return TokenEvent(token, parser.last_content_delta or "", channel, recipient, choice)
    if token in harmony.STOP_TOKENS:
        return TokenEvent(token, "", channel, recipient, choice)
    return TokenEvent(token, "", None, None, choice)  # a header token


def _finish(parser: harmony.StreamParser) -> list[Message]:
    """The messages parsed, the one cut off by a stop included."""
    try:
        parser.process_eos()
    except harmony.HarmonyError:
        pass  # a header cut off mid-way says nothing (the parser is lenient, this is belt and braces)
    return parser.messages


def _sample(sampler: Sampler, logits: np.ndarray, logprobs: int | None) -> tuple[int, Choice | None]:
    if logprobs is None:
        return sampler.sample(logits), None
    choice = sampler.sample_with_logprobs(logits, logprobs)
    return choice.token, choice


@contextlib.contextmanager
def _naming_the_step(step: str):
    """A forward pass that turned NaN/inf (fast.NonFiniteError names the layer and position)
    says at which step of the generation too."""
    try:
        yield
    except NonFiniteError as err:
        err.args = (f"{step}: {err}",)
        raise


def _prefill(context: Context, prompt: list[int], tally: _Tally) -> tuple[np.ndarray, int]:
    """`context.prefill`, timed. -> (logits [vocab] after the prompt, ids reused from the cache)"""
    start = time.perf_counter()
    with _naming_the_step("reading the prompt"):
        logits, reused = context.prefill(prompt)
    tally.prefill_seconds += time.perf_counter() - start
    tally.prefill_tokens += len(prompt) - reused
    return logits, reused


def _sample_turn(
    context: Context,
    logits: np.ndarray,
    sampler: Sampler,
    max_tokens: int,
    logprobs: int | None,
    tally: _Tally,
) -> Generator[TokenEvent, None, tuple[str, list[int], list[Message]]]:
    """Sample the assistant's turn from `logits` (those after a prompt ending in `<|start|>assistant`)
    until `<|return|>`, `<|call|>`, `max_tokens` or a full context.

    Yields a TokenEvent per token; returns (stop reason, the sampled tokens, the parsed messages).
    The context ends holding every sampled token but the last (which is never run).
    """
    parser = harmony.StreamParser(Role.ASSISTANT, strict=False)
    sampled: list[int] = []
    while True:
        start = time.perf_counter()
        token, choice = _sample(sampler, logits, logprobs)
        tally.decode_seconds += time.perf_counter() - start
        sampled.append(token)
        tally.generated_tokens += 1
        event = _parse(parser, token, choice)
        yield event if event is not None else TokenEvent(token, "", None, None, choice)
        if event is None:
            reason = "malformed"
        elif token == RETURN:
            reason = "return"
        elif token == CALL:
            reason = "call"
        elif len(sampled) >= max_tokens:
            reason = "max_tokens"
        elif context.room < 1:
            reason = "context"
        else:
            start = time.perf_counter()
            with _naming_the_step(f"decode step {len(sampled)} (after the reply's token "
                                  f"{len(sampled) - 1})"):
                logits = context.append([token])
            tally.decode_seconds += time.perf_counter() - start
            continue
        return reason, sampled, _finish(parser)


# ---------------------------------------------------------------------------------------------------
# The public entry points
# ---------------------------------------------------------------------------------------------------


def generate(
    model: Any,
    messages: str | Sequence[Message],
    *,
    tools: Sequence[Callable[..., Any]] | None = None,
    sampler: Sampler | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    reasoning: str | None = None,
    date: str | None = None,
    instructions: str | None = None,
    logprobs: int | None = None,
    max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS,
    context: Context | None = None,
) -> Iterator[Event]:
    """Stream the assistant's reply to `messages` (a str is one user message).

    tools: Python functions the model may call; None means no tool loop (a call stops the reply
        with stop_reason "call" and is left to the caller in `Reply.messages`).
    sampler: how tokens are chosen (default: Sampler(), temperature 1; Sampler(temperature=0) is greedy).
    max_tokens: sampled tokens, all tool rounds together.
    reasoning: "low" | "medium" | "high"; date: "YYYY-MM-DD" (default today); instructions: the
        developer message's (what other formats call the system prompt). Each overrides what a
        system or developer message in `messages` says.
    logprobs: None for none; n >= 0 for each token's log-probability and its n most likely rivals.
    context: reuse a Context (its cached ids) across calls, e.g. the turns of a chat.

    Yields TokenEvent per token, ToolEvent per function run, and last a Reply. (Being a generator,
    it checks its arguments and renders the prompt when first asked for an event.)
    """
    expect_type(max_tokens, int, "max_tokens")
    if max_tokens < 1:
        raise GenerationError(f"max_tokens must be >= 1, got {max_tokens}")
    for name, value in (("reasoning", reasoning), ("date", date), ("instructions", instructions)):
        if value is not None:
            expect_type(value, str, name)
    if context is not None:
        expect_type(context, Context, "context")
        if context.model is not model:  # (its cache, and every forward it runs, is that model's)
            raise GenerationError("context was made for another model: Context(model) with the "
                                  "model given here")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, (int, np.integer)):
            raise TinyossTypeError(f"logprobs must be None or an int, got {type(logprobs).__name__}")
        if not 0 <= logprobs < model.config.vocab_size:
            raise GenerationError(f"logprobs must be from 0 to {model.config.vocab_size - 1} (the "
                                  f"rivals shown per token), got {logprobs}")
    if isinstance(max_tool_rounds, bool) or not isinstance(max_tool_rounds, (int, np.integer)):
        raise TinyossTypeError(f"max_tool_rounds must be an int, got {type(max_tool_rounds).__name__}")
    if max_tool_rounds < 0:
        raise GenerationError(f"max_tool_rounds must be >= 0, got {max_tool_rounds}")
    if sampler is not None and not callable(getattr(sampler, "sample", None)):
        raise TinyossTypeError(f"sampler must be a tinyoss.Sampler, got {type(sampler).__name__}")
    functions = functions_by_name(tools) if tools is not None else None
    descriptions = [harmony.tool_from_function(f) for f in (functions or {}).values()]
    conversation = prepare_conversation(messages, reasoning=reasoning, date=date,
                                        instructions=instructions, tools=descriptions)
    prompt = harmony.render_conversation_for_completion(conversation, auto_drop_analysis=False)
    context = context if context is not None else Context(model)
    sampler = sampler if sampler is not None else Sampler()
    tally = _Tally(prompt_tokens=len(prompt))
    new_messages: list[Message] = []
    tokens: list[int] = []
    rounds = 0
    while True:
        logits, reused = _prefill(context, prompt, tally)
        if rounds == 0:
            tally.reused_tokens = reused
        budget = max_tokens - len(tokens)
        reason, sampled, said = yield from _sample_turn(context, logits, sampler, budget, logprobs, tally)
        tokens += sampled
        new_messages += said
        call = said[-1] if reason == "call" and said and said[-1].recipient else None
        if functions is None or call is None:
            break
        if rounds == max_tool_rounds:
            reason = "tool_rounds"
            break
        result = tool_result(call, run_tool(functions, call.recipient, call.text))
        rounds += 1
        new_messages.append(result)
        yield ToolEvent(call.recipient, call.text, result.text)
        # continue from exactly what the model saw: its own tokens, then the result, then our turn
        prompt = prompt + sampled + harmony.render_conversation_for_completion([result])
        if len(tokens) >= max_tokens:
            reason = "max_tokens"
            break
        if len(prompt) > context.max_tokens:
            reason = "context"
            break
    yield Reply(new_messages, tokens, tally.stats(reason))


def chat(model: Any, messages: str | Sequence[Message], **options: Any) -> Reply:
    """Generate a whole reply: `chat(model, "Hello", sampler=Sampler(temperature=0)).text`.

    Takes the options of `generate`. The reply's `.text` is the final answer; when the model wrote
    none (`.has_final` is False: cut off while reasoning, a tool call left to the caller, or output
    that is not harmony, as random weights write), it is the text of every token sampled instead.
    """
    for event in generate(model, messages, **options):
        if isinstance(event, Reply):
            return event
    raise AssertionError("generate() always ends with a Reply")
