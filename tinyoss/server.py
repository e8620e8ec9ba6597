"""`tinyoss serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over one model.

    GET  /                     the chat page (tinyoss/web)
    GET  /health               {"status": "ok", ...}; no key needed
    GET  /v1/models            the model this server runs
    POST /v1/chat/completions  Chat Completions, streamed (SSE) or not
    POST /v1/responses         the Responses API subset of OpenAI's gpt-oss reference server
    GET  /v1/responses/{id}    a stored response

    request JSON --check (here) + apimap--> harmony conversation --render--> prompt ids
        --Engine (batched decode, prompt cache)--> token ids --apimap.OutputMapper--> deltas
        --> a chat.completion(.chunk) / response object / Responses stream events

Every failure a client can cause is an OpenAI-shaped error body with its HTTP status (400 naming
the field, 401, 404, 408, 413, 503 with Retry-After); nothing a client sends makes a traceback, and
the server logs one line per request. Safe by default: 127.0.0.1, bounded bodies (in bytes and in
time), request heads (in time: a client that never finishes one gets 408), connections (503 beyond
them), tokens and queue, a constant-time key check, no CORS unless asked for.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import http
import json
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import apimap, harmony
from .apimap import RequestError
from .engine import Constraint, Done, Engine, Job, Overloaded, Started, Token
from .errors import TinyossError
from .generate import prepare_conversation
from .sampling import Sampler, SamplingError
from .tokenizer import CALL, get_tokenizer

log = logging.getLogger("tinyoss.server")
WEB = Path(__file__).parent / "web"
MAX_BODY_BYTES = 4 * 1024 * 1024
BODY_SECONDS = 30.0  # for the whole body after the headers: a stalled upload would hold its socket
HEADER_SECONDS = 10.0  # for a request's line and headers (one packet from any real client)
MAX_CONNECTIONS = 256  # open at once (each a file descriptor): far above parallel + queue
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
STORED_RESPONSES = 256  # previous_response_id: the most recent ones kept in memory
EFFORTS = ("low", "medium", "high")

# fields a request may carry that change nothing here (say so in the docs rather than refuse)
_HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
             "prompt_cache_key", "stream_options", "truncation"}


# ---------------------------------------------------------------------------------------------------
# Errors: one shape for all of them
# ---------------------------------------------------------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error", 500: "server_error", 503: "server_error"}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(err: RequestError) -> Response:
    headers = {"Retry-After": "1"} if err.status == 503 else None
    if err.status == 408:  # the rest of the body may still come: no next request on this connection
        headers = {"Connection": "close"}
    body = json.dumps(error_body(str(err), err.status, err.param, err.code))  # ASCII: never fails
    return Response(body, err.status, headers=headers, media_type="application/json")


# ---------------------------------------------------------------------------------------------------
# Reading a request's fields
# ---------------------------------------------------------------------------------------------------


def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{name}' must be a number, got {json.dumps(value)}", name)
    if not (low < value if low_open else low <= value) or value > high:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise RequestError(f"'{name}' must be in {bound}, got {value}", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {json.dumps(value)}", name)
    if value < low or (high is not None and value > high):
        raise RequestError(f"'{name}' must be in [{low}, {high if high is not None else '...'}], "
                           f"got {value}", name)
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return value


def _check_fields(body: dict, known: set[str], refused: dict[str, str]) -> None:
    """Refuse what this server does not do, naming the field: never a silent ignore."""
    for name, value in body.items():
        if name in refused and value not in (None, False, [], {}):
            raise RequestError(f"'{name}' is not supported by this server: {refused[name]}", name,
                               code="unsupported_parameter")
        if name not in known and name not in refused and name not in _HARMLESS:
            raise RequestError(f"unknown field '{name}'", name, code="unknown_parameter")


def _reasoning_effort(body: dict) -> str | None:
    """Reasoning effort, in every dialect clients send; two that disagree are an error."""
    said: dict[str, Any] = {}
    if body.get("reasoning_effort") is not None:
        said["reasoning_effort"] = body["reasoning_effort"]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        said["reasoning.effort"] = reasoning["effort"]
    elif reasoning is not None and not isinstance(reasoning, dict):
        raise RequestError("'reasoning' must be an object such as {\"effort\": \"low\"}", "reasoning")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise RequestError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("reasoning_effort") is not None:
        said["chat_template_kwargs.reasoning_effort"] = kwargs["reasoning_effort"]
    for name, value in said.items():
        if value not in EFFORTS:
            raise RequestError(f"'{name}' must be one of {', '.join(EFFORTS)}, got "
                               f"{json.dumps(value)}", name)
    if len(set(said.values())) > 1:
        raise RequestError(f"reasoning efforts disagree: {said}", next(iter(said)))
    return next(iter(said.values()), None)


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    return stops


def _tool_choice(value: Any, tools: list[harmony.ToolDescription], api: str) -> str | None:
    """-> "auto", "none", "required", or the name of the function that must be called."""
    if value is None or value == "auto":
        return "auto"
    if value in ("none", "required"):
        if value == "required" and not tools:
            raise RequestError("'tool_choice' is 'required' but no tools are given", "tool_choice")
        return value
    name = None
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function") if api == "chat" else value
        name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise RequestError("'tool_choice' must be 'auto', 'none', 'required' or a function "
                           "{\"type\": \"function\", ...}", "tool_choice")
    if name not in {t.name for t in tools}:
        raise RequestError(f"'tool_choice' names '{name}', which is not among the tools", "tool_choice")
    return name


def _call_header(name: str) -> list[int]:
    """The ids after `<|start|>assistant` that open a call to functions.NAME, as harmony renders
    it (` to=functions.NAME<|channel|>commentary <|constrain|>json<|message|>`)."""
    tokenizer = get_tokenizer()
    role = tokenizer.encode_ordinary("assistant")
    ids = harmony._header_ids(harmony.Message.tool_call(name, ""), tokenizer)
    return ids[1 + len(role):]


def _constraint(choice: str, tools: list[harmony.ToolDescription]) -> Constraint | None:
    if choice == "auto":
        return None
    if choice == "none":
        return Constraint([], banned=[CALL])
    names = [t.name for t in tools] if choice == "required" else [choice]
    return Constraint([_call_header(n) for n in names])


# ---------------------------------------------------------------------------------------------------
# One generation: the engine's tokens as deltas, stop strings applied
# ---------------------------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0

    def chat(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}

    def responses(self) -> dict:
        return {"input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": self.cached_tokens},
                "output_tokens": self.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class StopStrings:
    """Cuts the content at the first stop string; holds back text that may begin one, and the
    logprobs entries of the tokens that text came from: an entry goes out with the first piece of
    its token's text that goes out, so each content token has one entry, in order.

    The stop string is not part of the content (as OpenAI does it), and the logprobs are those of
    the content: a token cut by the stop string keeps its entry when some of its text is in the
    content; the tokens wholly inside the stop string, or after it, have none."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.entries: list[tuple[int, list[dict]]] = []  # (where in pending its text begins, entries)
        self.hit = False

    def feed(self, text: str, entries: list[dict]) -> tuple[str, list[dict]]:
        """-> the content that is safe to send now, and the entries that go with it"""
        if not self.stops:
            return text, entries
        self.entries.append((len(self.pending), entries))
        self.pending += text
        at = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            self.hit = True
            out = self._take(at)
            self.pending, self.entries = "", []  # the stop string and whatever came with it
            return out
        return self._take(max(0, len(self.pending) - self.keep))

    def flush(self) -> tuple[str, list[dict]]:
        return self._take(len(self.pending))

    def _take(self, n: int) -> tuple[str, list[dict]]:
        """The first n characters held, with the entries of the tokens whose text begins there."""
        out, self.pending = self.pending[:n], self.pending[n:]
        sent = [e for at, entries in self.entries if at < n for e in entries]
        self.entries = [(at - n, entries) for at, entries in self.entries if at >= n]
        return out, sent


class Generation:
    """Runs a job and turns its tokens into apimap deltas (reasoning, content, tool calls)."""

    def __init__(self, server: "Server", job: Job, stops: list[str], calls_allowed: bool):
        self.server = server
        self.job = job
        self.mapper = apimap.OutputMapper(calls_allowed=calls_allowed)
        self.stops = StopStrings(stops)
        self.usage = Usage()
        self.reason = "return"
        self.error = ""
        self.logprobs: list[dict] = []  # of the content tokens
        self.held: list[dict] = []  # of content tokens whose text the mapper holds (part of a character)
        self.output: apimap.Output | None = None
        self.stream = server.engine.submit(job, asyncio.get_running_loop())
        self.client_gone = False  # the client disconnected: the stream was cancelled for that

    async def deltas(self) -> AsyncIterator[tuple[apimap.Delta, list[dict]]]:
        """(delta, the logprobs entries of the tokens it came from) until the end."""
        try:
            async for event in self.stream:
                if isinstance(event, Started):
                    self.usage.prompt_tokens = event.prompt_tokens
                    self.usage.cached_tokens = event.cached_tokens
                elif isinstance(event, Token):
                    self.usage.completion_tokens += 1
                    for delta in self._map(event):
                        yield delta
                elif isinstance(event, Done) and not self.stops.hit:
                    self.reason, self.error = event.reason, event.error
                    if event.reason == "cancelled" and not self.client_gone:  # nor by a stop
                        self.reason, self.error = "shutdown", "cancelled: the server is shutting down"
            self.output = self.mapper.finish()
            self.usage.reasoning_tokens = self.output.reasoning_tokens
            for delta in self.output.tail:  # e.g. a character cut off by the end: U+FFFD
                for item in self._send(delta):
                    yield item
            for item in self._content(*self.stops.flush()):
                yield item
        finally:
            self.stream.cancel()  # a client gone mid-stream: its slot is freed at the next step

    def _map(self, event: Token):
        deltas = self.mapper.feed(event.token)
        if self.mapper.content_token and event.choice is not None:
            self.held.append(_logprob_entry(event.choice))
        for delta in deltas:
            yield from self._send(delta)

    def _send(self, delta: apimap.Delta):
        """A delta on its way out: content through the stop strings; nothing once one is found
        (the engine may have made a few more tokens before it saw the cancel)."""
        if self.stops.hit:
            return
        if delta.kind != "content":
            yield delta, []
            return
        text, entries = self.stops.feed(delta.text, self.held)
        self.held = []
        if self.stops.hit:
            self.stream.cancel()
            self.reason = "stop_string"
        yield from self._content(text, entries)

    def _content(self, text: str, entries: list[dict]):
        if text:
            self.logprobs += entries
            yield apimap.Delta("content", text), entries

    @property
    def finish_reason(self) -> str:
        """Chat Completions' finish_reason."""
        if self.output is not None and self.output.tool_calls and self.reason in ("call", "return"):
            return "tool_calls"
        return "length" if self.reason in ("length", "context") else "stop"


def _logprob_entry(choice) -> dict:
    tokenizer = get_tokenizer()

    def one(token: int, logprob: float) -> dict:
        raw = tokenizer.decode_single_token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {**one(choice.token, choice.logprob),
            "top_logprobs": [one(t, lp) for t, lp in choice.top_logprobs]}


# ---------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class Server:
    """The state behind the routes: the model's engine, its names, the stored responses."""

    def __init__(self, model: Any, model_id: str, *, parallel: int = 1, ctx: int | None = None,
                 max_queue: int = 16, api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
                 body_seconds: float = BODY_SECONDS, header_seconds: float = HEADER_SECONDS,
                 max_connections: int = MAX_CONNECTIONS, date: str | None = None):
        self.model = model
        self.model_id = model_id
        self.engine = Engine(model, parallel=parallel, ctx=ctx, max_queue=max_queue,
                             on_error=lambda err: log.error("engine: %s: %s", type(err).__name__, err))
        self.ctx = self.engine.ctx
        self.api_key = api_key
        self.max_body = max_body
        self.body_seconds = body_seconds
        self.header_seconds = header_seconds
        self.max_connections = max_connections
        self.date = date  # the conversation date the model is told (default: today)
        self.created = int(time.time())
        self.responses: OrderedDict[str, dict] = OrderedDict()  # id -> {"response", "messages"}

    # -- the request's prompt ------------------------------------------------------------------

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError(f"'model' must be a string (GET /v1/models lists it), got "
                               f"{type(model).__name__}", "model")
        if not model:
            raise RequestError("'model' is required (GET /v1/models lists it)", "model")
        if model != self.model_id:
            raise RequestError(f"the model '{model}' does not exist; this server runs "
                               f"'{self.model_id}'", "model", 404, "model_not_found")

    def prompt(self, conversation: apimap.Conversation, effort: str | None, tool_choice: str) -> list[int]:
        tools = conversation.tools if tool_choice != "none" else []
        try:
            return render_prompt(conversation.messages, effort or "medium", self.date,
                                 conversation.instructions, tools)
        except TinyossError as err:  # (checked by apimap first: a 400, never a 500, if one is missed)
            raise RequestError(str(err), "messages") from None

    def job(self, prompt: list[int], max_tokens: int | None, max_tokens_field: str, sampler: Sampler,
            logprobs: int | None, constraint: Constraint | None) -> Job:
        room = self.ctx - len(prompt)
        if room < 1:
            raise RequestError(f"the prompt is {len(prompt)} tokens; this server's context is "
                               f"{self.ctx} tokens (--ctx)", "messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise RequestError(f"the context is {self.ctx} tokens; the prompt takes {len(prompt)} and "
                               f"'{max_tokens_field}' asks for {max_tokens} more ({room} fit)",
                               max_tokens_field, code="context_length_exceeded")
        return Job(prompt, max_tokens or room, sampler, logprobs, constraint)

    def generation(self, job: Job, stops: list[str], calls_allowed: bool) -> Generation:
        try:
            return Generation(self, job, stops, calls_allowed)
        except Overloaded as err:
            raise RequestError(f"the server is busy: {err}; retry shortly", None, 503, "overloaded")
        except TinyossError as err:
            raise RequestError(str(err), "messages", code="context_length_exceeded")

    def store(self, response: dict, messages: list[harmony.Message]) -> None:
        self.responses[response["id"]] = {"response": response, "messages": messages}
        while len(self.responses) > STORED_RESPONSES:
            self.responses.popitem(last=False)


def render_prompt(messages: list[harmony.Message], effort: str, date: str | None = None,
                  instructions: str | None = None, tools=()) -> list[int]:
    """A request's prompt: its messages after the system message (date: default today) and
    the developer's (instructions, tools), rendered for the assistant's reply."""
    messages = prepare_conversation(messages, reasoning=effort, instructions=instructions, tools=tools,
                                    date=date or datetime.date.today().isoformat())
    return harmony.render_conversation_for_completion(messages, auto_drop_analysis=False)


def shortest_prompt() -> int:
    """Tokens of the shortest prompt a request can make (one one-word user message, no tools):
    a server whose context is not longer answers nothing."""
    return len(render_prompt([harmony.Message.user("hi")], "low"))


def _sampler(body: dict) -> Sampler:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _integer(body, "top_k", 0) or 0
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    try:
        return Sampler(temperature, top_k, top_p, min_p, None if seed is None else seed % 2**64)
    except SamplingError as err:
        raise RequestError(str(err), None) from None


# ---------------------------------------------------------------------------------------------------
# Chat Completions
# ---------------------------------------------------------------------------------------------------

_CHAT_FIELDS = {"model", "messages", "tools", "tool_choice", "reasoning_effort", "reasoning", "modalities",
                "chat_template_kwargs", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                "top_k", "min_p", "seed", "stop", "logprobs", "top_logprobs", "stream", "n",
                "response_format"}
_CHAT_REFUSED = {
    "audio": "audio output is not supported",
    "logit_bias": "not supported", "prediction": "not supported",
    "presence_penalty": "penalties are not implemented", "frequency_penalty": "penalties are not implemented",
    "functions": "use 'tools'", "function_call": "use 'tool_choice'",
    "web_search_options": "no built-in tools", "verbosity": "not supported",
}


def _check_ended(generation: "Generation") -> None:
    """A non-streamed reply that did not end well: say so with the right status."""
    if generation.client_gone:
        raise RequestError("the client went away", None, 499, "client_closed_request")
    if generation.reason == "shutdown":
        raise RequestError(generation.error, None, 503, "shutting_down")
    if generation.reason == "error":
        raise RequestError(f"generation failed: {generation.error}", None, 500)


async def _collect(request, generation: "Generation"):
    """generation.deltas() for a non-streamed reply, cancelled if the client goes away meanwhile."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        generation.client_gone = True
        generation.stream.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for item in generation.deltas():
            yield item
    finally:
        watcher.cancel()


async def chat_completions(server: Server, body: dict, request=None) -> Response:
    _check_fields(body, _CHAT_FIELDS, _CHAT_REFUSED)
    if _integer(body, "n", 1) not in (None, 1):
        raise RequestError("'n' must be 1: one choice per request", "n", code="unsupported_parameter")
    if body.get("modalities") not in (None, ["text"]):
        raise RequestError("only text output is supported", "modalities")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError("'response_format' other than {\"type\": \"text\"} is not supported "
                           "(no constrained JSON output)", "response_format", code="unsupported_parameter")
    server.check_model(body)
    conversation = apimap.chat_conversation(body.get("messages"), body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), conversation.tools, "chat")
    effort = _reasoning_effort(body)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise RequestError("give 'max_completion_tokens' or 'max_tokens', not both", "max_tokens")
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, field, 1)
    logprobs = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise RequestError("'stream_options' is an object, and only with 'stream': true", "stream_options")
    if options and not isinstance(options.get("include_usage", False), bool):
        raise RequestError("'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    include_usage = bool(options and options.get("include_usage"))
    stops = _stop_strings(body)
    sampler = _sampler(body)
    prompt = server.prompt(conversation, effort, choice)
    job = server.job(prompt, max_tokens, field, sampler, (top or 0) if logprobs else None,
                     _constraint(choice, conversation.tools))
    generation = server.generation(job, stops, calls_allowed=choice != "none")
    chunk_id, created = _new_id("chatcmpl"), int(time.time())
    if stream:
        return StreamingResponse(_chat_stream(server, generation, chunk_id, created, include_usage,
                                              logprobs),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    reasoning, content, calls = [], [], {}
    async for delta, _ in _collect(request, generation):
        if delta.kind == "reasoning":
            reasoning.append(delta.text)
        elif delta.kind == "content":
            content.append(delta.text)
        elif delta.kind == "tool_call":
            calls[delta.index] = {"id": delta.call_id, "type": "function",
                                  "function": {"name": delta.name, "arguments": ""}}
        else:
            calls[delta.index]["function"]["arguments"] += delta.text
    _check_ended(generation)
    message = {"role": "assistant", "content": "".join(content) if content or not calls else None}
    if reasoning:
        message["reasoning"] = message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    choice_out = {"index": 0, "message": message, "finish_reason": generation.finish_reason,
                  "logprobs": {"content": generation.logprobs} if logprobs else None}
    return JSONResponse({"id": chunk_id, "object": "chat.completion", "created": created,
                         "model": server.model_id, "choices": [choice_out],
                         "usage": generation.usage.chat(), "system_fingerprint": None})


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _chat_stream(server: Server, generation: Generation, chunk_id: str, created: int,
                       include_usage: bool, logprobs: bool) -> AsyncIterator[str]:
    head = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": server.model_id}

    def chunk(delta: dict, finish: str | None = None, entries: list | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish,
                  "logprobs": {"content": entries} if logprobs and entries is not None else None}
        return _sse({**head, "choices": [choice], **({"usage": None} if include_usage else {})})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for delta, entries in generation.deltas():
            if delta.kind == "reasoning":
                yield chunk({"reasoning": delta.text, "reasoning_content": delta.text})
            elif delta.kind == "content":
                yield chunk({"content": delta.text}, entries=entries)
            elif delta.kind == "tool_call":
                yield chunk({"tool_calls": [{"index": delta.index, "id": delta.call_id, "type": "function",
                                             "function": {"name": delta.name, "arguments": ""}}]})
            else:
                yield chunk({"tool_calls": [{"index": delta.index, "function": {"arguments": delta.text}}]})
        if generation.reason in ("error", "shutdown"):
            yield _sse(error_body(f"generation failed: {generation.error}", 500))
        else:
            yield chunk({}, generation.finish_reason)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": generation.usage.chat()})
    except Exception as err:  # noqa: BLE001  a bug: logged, the client gets an error event
        log.exception("chat stream failed")
        yield _sse(error_body(f"internal server error: {type(err).__name__}", 500))
    finally:
        generation.stream.cancel()  # whatever happened, the engine drops the stream
    yield _sse("[DONE]")


# ---------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------

_RESPONSES_FIELDS = {"model", "input", "instructions", "tools", "tool_choice", "reasoning",
                     "max_output_tokens", "temperature", "top_p", "store", "previous_response_id",
                     "stream", "text", "include"}
_RESPONSES_REFUSED = {"background": "not supported", "conversation": "use previous_response_id",
                      "prompt": "prompt templates are not supported", "max_tool_calls": "not supported",
                      "top_logprobs": "not supported"}


class Items:
    """Output items built from deltas, in order: reasoning, message, function_call. Each change of
    kind (or each new call) opens an item; `events` are the Responses stream events they make."""

    def __init__(self):
        self.items: list[dict] = []
        self.events: list[tuple[str, dict]] = []
        self._open: dict | None = None

    def feed(self, delta: apimap.Delta) -> None:
        kind = {"reasoning": "reasoning", "content": "message"}.get(delta.kind, "function_call")
        if delta.kind == "tool_call" or self._open is None or self._open["type"] != kind:
            self.close()
            self._begin(kind, delta)
        item, index = self._open, len(self.items) - 1
        if kind == "function_call":
            if delta.kind == "tool_arguments":
                item["arguments"] += delta.text
                self.events.append(("response.function_call_arguments.delta",
                                    {"item_id": item["id"], "output_index": index, "delta": delta.text}))
            return
        part = item["content"][0]
        part["text"] += delta.text
        event = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        self.events.append((event, {"item_id": item["id"], "output_index": index, "content_index": 0,
                                    "delta": delta.text, **extra}))

    def _begin(self, kind: str, delta: apimap.Delta) -> None:
        if kind == "function_call":
            item = {"type": "function_call", "id": _new_id("fc"), "call_id": delta.call_id,
                    "name": delta.name, "arguments": "", "status": "in_progress"}
        elif kind == "reasoning":
            item = {"type": "reasoning", "id": _new_id("rs"), "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
        else:
            item = {"type": "message", "id": _new_id("msg"), "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
        self.items.append(item)
        self._open = item
        index = len(self.items) - 1
        added = json.loads(json.dumps(item))
        if kind != "function_call":
            added["content"] = []
        self.events.append(("response.output_item.added", {"output_index": index, "item": added}))
        if kind != "function_call":
            part = {**item["content"][0], "text": ""}
            self.events.append(("response.content_part.added", {"item_id": item["id"], "output_index": index,
                                                                "content_index": 0, "part": part}))

    def close(self) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = len(self.items) - 1
        item["status"] = "completed"
        if item["type"] == "function_call":
            self.events.append(("response.function_call_arguments.done",
                                {"item_id": item["id"], "output_index": index, "name": item["name"],
                                 "arguments": item["arguments"]}))
        else:
            part = item["content"][0]
            event = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            extra = {} if item["type"] == "reasoning" else {"logprobs": []}
            self.events.append((event, {"item_id": item["id"], "output_index": index, "content_index": 0,
                                        "text": part["text"], **extra}))
            self.events.append(("response.content_part.done", {"item_id": item["id"], "output_index": index,
                                                               "content_index": 0, "part": part}))
        self.events.append(("response.output_item.done", {"output_index": index, "item": item}))

    def take_events(self) -> list[tuple[str, dict]]:
        events, self.events = self.events, []
        return events


async def responses(server: Server, body: dict, request=None) -> Response:
    _check_fields(body, _RESPONSES_FIELDS, _RESPONSES_REFUSED)
    server.check_model(body)
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise RequestError(f"'text' must be an object (e.g. {{\"format\": {{\"type\": \"text\"}}}}), got "
                           f"{apimap._json_type(text)}", "text")
    if text is not None and text.get("format", {"type": "text"}) != {"type": "text"}:
        raise RequestError("'text.format' other than {\"type\": \"text\"} is not supported", "text.format",
                           code="unsupported_parameter")
    if body.get("include") not in (None, []):
        raise RequestError("'include' is not supported", "include", code="unsupported_parameter")
    previous_id = body.get("previous_response_id")
    previous: list[harmony.Message] | None = None
    if previous_id is not None and not isinstance(previous_id, str):
        raise RequestError("'previous_response_id' must be a string", "previous_response_id")
    if previous_id is not None:
        stored = server.responses.get(previous_id)
        if stored is None:
            raise RequestError(f"no stored response '{previous_id}' (kept in memory: the last "
                               f"{STORED_RESPONSES} with store=true)", "previous_response_id", 404,
                               "previous_response_not_found")
        previous = stored["messages"]
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError("'instructions' must be a string", "instructions")
    if body.get("input") is None:
        raise RequestError("'input' is required", "input")
    conversation = apimap.responses_conversation(body["input"], instructions, body.get("tools"), previous)
    choice = _tool_choice(body.get("tool_choice"), conversation.tools, "responses")
    effort = _reasoning_effort({"reasoning": body.get("reasoning")})
    max_tokens = _integer(body, "max_output_tokens", 1)
    store = _boolean(body, "store", True)
    stream = _boolean(body, "stream")
    sampler = _sampler(body)
    prompt = server.prompt(conversation, effort, choice)
    job = server.job(prompt, max_tokens, "max_output_tokens", sampler, None,
                     _constraint(choice, conversation.tools))
    generation = server.generation(job, [], calls_allowed=choice != "none")
    response = {"id": _new_id("resp"), "object": "response", "created_at": int(time.time()),
                "status": "in_progress", "model": server.model_id, "output": [], "error": None,
                "incomplete_details": None, "instructions": instructions,
                "tools": [{"type": "function", "name": t.name, "description": t.description,
                           "parameters": t.parameters, "strict": False} for t in conversation.tools],
                "tool_choice": body.get("tool_choice") or "auto", "parallel_tool_calls": False,
                "temperature": sampler.temperature, "top_p": sampler.top_p,
                "max_output_tokens": max_tokens, "previous_response_id": previous_id,
                "reasoning": {"effort": effort or "medium", "summary": None}, "store": store,
                "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {},
                "usage": None}

    def finished(items: Items) -> dict:
        items.close()
        done = dict(response, output=items.items, usage=generation.usage.responses())
        if generation.reason in ("error", "shutdown"):
            done.update(status="failed", error={"code": "server_error", "message": generation.error})
        elif generation.reason in ("length", "context"):
            done.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        else:
            done["status"] = "completed"
        if store and done["status"] != "failed":
            server.store(done, conversation.messages + generation.output.messages)
        return done

    if stream:
        return StreamingResponse(_responses_stream(response, generation, finished),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    items = Items()
    async for delta, _ in _collect(request, generation):
        items.feed(delta)
    _check_ended(generation)
    done = finished(items)
    return JSONResponse(done)


async def _responses_stream(response: dict, generation: Generation, finished) -> AsyncIterator[str]:
    sequence = 0

    def event(kind: str, data: dict) -> str:
        nonlocal sequence
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': sequence - 1, **data}, ensure_ascii=False)}\n\n"

    yield event("response.created", {"response": response})
    yield event("response.in_progress", {"response": response})
    items = Items()
    try:
        async for delta, _ in generation.deltas():
            items.feed(delta)
            for kind, data in items.take_events():
                yield event(kind, data)
        done = finished(items)
    except Exception as err:  # noqa: BLE001  a bug: logged, the client gets a failed response
        log.exception("responses stream failed")
        done = dict(response, status="failed", error={"code": "server_error",
                                                      "message": f"internal server error: {type(err).__name__}"})
    finally:
        generation.stream.cancel()
    for kind, data in items.take_events():
        yield event(kind, data)
    final = {"completed": "response.completed", "incomplete": "response.incomplete",
             "failed": "response.failed"}[done["status"]]
    yield event(final, {"response": done})


# ---------------------------------------------------------------------------------------------------
# HTTP: routes, key, body limit, errors, one log line per request
# ---------------------------------------------------------------------------------------------------


async def _read_json(request: Request, limit: int, seconds: float) -> dict:
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):  # (a gzip body was "not valid JSON: can't decode byte 0x8b")
        raise RequestError(f"Content-Encoding {encoding!r} is not supported: send the body "
                           "uncompressed", None, 415, "unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(f"the request body is {length} bytes; the limit is {limit}", None, 413,
                           "request_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):  # uvicorn has no bound of its own on a body's time
            async for piece in request.stream():
                body += piece
                if len(body) > limit:
                    raise RequestError(f"the request body exceeds the limit of {limit} bytes", None,
                                       413, "request_too_large")
    except TimeoutError:
        raise RequestError(f"the request body did not arrive within {seconds:g} s ({len(body)} "
                           f"bytes came)", None, 408, "request_timeout") from None
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, a 5000-digit int, deep nesting
        raise RequestError(f"the request body is not valid JSON: {err}", None) from None
    try:
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise RequestError("the request body holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                           "escape), which is no text", None) from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object", None)
    return data


def create_app(server: Server, cors_origins: list[str] | None = None) -> Starlette:
    """The ASGI app over `server`."""

    def authorized(request: Request) -> bool:
        if server.api_key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        # Starlette decodes header bytes as latin-1: back to the bytes the client sent (UTF-8
        # for a key with non-ASCII characters), compared with the key's UTF-8 bytes
        sent = key.strip().encode("latin-1", errors="replace")
        return scheme.lower() == "bearer" and hmac.compare_digest(sent, server.api_key.encode())

    def endpoint(handler, needs_body: bool = True, public: bool = False):
        async def route(request: Request) -> Response:
            start = time.perf_counter()
            status, note = 500, ""
            try:
                if not public and not authorized(request):
                    raise RequestError("a valid API key is required: 'Authorization: Bearer KEY'",
                                       None, 401, "invalid_api_key")
                body = (await _read_json(request, server.max_body, server.body_seconds)
                        if needs_body else None)
                response = await handler(request, body)
                status = response.status_code
                return response
            except RequestError as err:
                status, note = err.status, str(err)
                return error_response(err)
            except ClientDisconnect:  # gone before its body arrived: nobody to answer
                status, note = 499, "the client went away"
                return Response(status_code=400)
            except Exception as err:  # noqa: BLE001  a bug: logged here, never shown to the client
                log.exception("%s %s failed", request.method, request.url.path)
                note = f"{type(err).__name__}: {err}"
                return JSONResponse(error_body("internal server error", 500), 500)
            finally:
                log.info("%s %s %d %.3fs%s", request.method, request.url.path, status,
                         time.perf_counter() - start, f" ({note})" if note else "")
        return route

    async def health(request, body):
        return JSONResponse({"status": "ok", "model": server.model_id, **server.engine.load})

    async def models(request, body):
        return JSONResponse({"object": "list", "data": [_model_card(server)]})

    async def model(request, body):
        if request.path_params["model"] != server.model_id:
            raise RequestError(f"the model '{request.path_params['model']}' does not exist", "model",
                               404, "model_not_found")
        return JSONResponse(_model_card(server))

    async def chat(request, body):
        return await chat_completions(server, body, request)

    async def respond(request, body):
        return await responses(server, body, request)

    async def stored(request, body):
        entry = server.responses.get(request.path_params["id"])
        if entry is None:
            raise RequestError(f"no stored response '{request.path_params['id']}'", "id", 404, "not_found")
        return JSONResponse(entry["response"])

    async def page(request):
        return FileResponse(WEB / "index.html", media_type="text/html")

    async def asset(request):
        name = request.path_params["name"]
        path = WEB / name
        if name not in {p.name for p in WEB.iterdir()} or path.suffix not in (".js", ".css"):
            return JSONResponse(error_body(f"no such file '{name}'", 404), 404)
        return FileResponse(path)

    async def not_found(request, exc):
        return JSONResponse(error_body(f"no route {request.method} {request.url.path}", 404), 404)

    async def not_allowed(request, exc):
        return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}", 405), 405)

    routes = [
        Route("/", page),
        Route("/static/{name}", asset),
        Route("/health", endpoint(health, needs_body=False, public=True)),
        Route("/v1/models", endpoint(models, needs_body=False)),
        Route("/v1/models/{model:path}", endpoint(model, needs_body=False)),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
        Route("/v1/responses", endpoint(respond), methods=["POST"]),
        Route("/v1/responses/{id}", endpoint(stored, needs_body=False)),
    ]
    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins,
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={404: not_found, 405: not_allowed})
    app.router.redirect_slashes = False  # (/v1/models/ was a 307 with an empty body: a 404 now)
    app.state.server = server
    return app


def _model_card(server: Server) -> dict:
    return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "tinyoss",
            "context_length": server.ctx}


def model_id_for(path: str) -> str:
    """The id a model is served as: its folder's name (`gpt-oss-20b/original` -> gpt-oss-20b)."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "original" else p.name


# ---------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------


def kv_bytes_per_slot(model: Any, ctx: int) -> int:
    """A slot's KV cache when full: every position on the dense layers, a ring on the banded ones."""
    c = model.config
    per_position = c.num_key_value_heads * c.head_dim * 2 * (4 if model.kv == "f32" else 2)
    return sum(min(c.sliding_window, ctx) if s else ctx for s in c.layer_sliding) * per_position


class BoundedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with the two bounds uvicorn 0.55 lacks.

    Time: uvicorn times only the idle gap after a response (timeout_keep_alive), and the next byte
    stops that timer, so a client that connects and says nothing, drips its request head a byte at a
    time (slowloris), or drips the rest of a body no endpoint reads (GET /health with a
    Content-Length) holds its socket for ever. Here a timer runs from the connection's opening, and
    from the first byte after a response, until a request head is complete: then 408 and close (only
    close where a response already went out). A request's body has body_seconds (`_read_json`);
    idle keep-alive connections and requests being answered are not timed here.

    Number: a connection beyond max_connections open at once is answered 503 and closed at once, so
    that clients cannot take all of the process's file descriptors (uvicorn's limit_concurrency
    answers 503 only once a request head is complete, and closes nothing before).
    """

    head_seconds = HEADER_SECONDS  # uvicorn_config sets both for its Server
    max_connections = MAX_CONNECTIONS
    head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)  # counted in self.connections (shared by all of them)
        if len(self.connections) > self.max_connections:
            self._answer(503, f"the server is busy: {self.max_connections} connections open, its "
                         f"limit; retry shortly", "overloaded", ((b"retry-after", b"1"),))
        else:
            self._time_head()

    def data_received(self, data: bytes) -> None:
        if self._between_requests():
            self._time_head()  # from the first byte on (a no-op while it runs already)
        super().data_received(data)
        if not self._between_requests() and self.head_timer is not None:  # a head came: the app's now
            self.head_timer.cancel()
            self.head_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _time_head(self) -> None:
        if self.head_timer is None and not self.transport.is_closing():
            self.head_timer = self.loop.call_later(self.head_seconds, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or not self._between_requests():
            return
        if self.conn.our_state is h11.IDLE:  # nothing answered yet on this connection's turn
            self._answer(408, f"no complete request head within {self.head_seconds:g} s",
                         "request_timeout")
        else:  # answered; what still drips is the rest of a body that nobody reads
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """A request h11 can't parse (a Content-Length of letters, a bad request line): uvicorn
        answers it in plain text; an OpenAI client expects the JSON error body here too."""
        self._answer(400, f"not a well-formed HTTP/1.1 request ({msg.rstrip('.')})",
                     "invalid_request")

    def _answer(self, status: int, message: str, code: str, headers: tuple = ()) -> None:
        """An error response of our own (no request reached the app), then close."""
        body = json.dumps(error_body(message, status, None, code)).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"), *headers]
        for event in (h11.Response(status_code=status, headers=head,
                                   reason=http.HTTPStatus(status).phrase.encode()),
                      h11.Data(data=body), h11.EndOfMessage(), h11.ConnectionClosed()):
            self.transport.write(self.conn.send(event) or b"")  # ConnectionClosed writes nothing
        self.transport.close()
        log.info("- - %d (%s)", status, message)  # the request's log line, as far as there is one


def uvicorn_config(server: Server, host: str, port: int, cors_origins: list[str] | None = None,
                   **options) -> uvicorn.Config:
    """uvicorn's settings for `server`: its app, on h11 with the bounds of `BoundedH11`."""
    protocol = type("BoundedH11", (BoundedH11,), {"head_seconds": server.header_seconds,
                                                  "max_connections": server.max_connections})
    # ws="none": the app serves no WebSocket, and an upgrade would hand the socket to another
    # protocol, past these bounds
    return uvicorn.Config(create_app(server, cors_origins), host=host, port=port, http=protocol,
                          ws="none", log_level="warning", access_log=False, lifespan="off", **options)


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000,
          cors_origins: list[str] | None = None, on_ready=print) -> None:
    """Serve until Ctrl-C (or SIGTERM): then cancel what is still generating, and return."""
    class Uvicorn(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
                on_ready(f"ready: http://{host}:{bound}  (chat page at /, API at /v1)")

        def handle_exit(self, sig, frame) -> None:
            server.engine.cancel_all()  # in-flight streams end now, with an error event saying why
            super().handle_exit(sig, frame)

    config = uvicorn_config(server, host, port, cors_origins, timeout_graceful_shutdown=5)
    try:
        Uvicorn(config).run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down: that is
        pass  # how a server is meant to stop, so exit 0
    finally:
        server.engine.close()
