"""OpenAI's HTTP API shapes <-> harmony: what a server reads from a request, and what it sends back.

No HTTP and no model here: decoded JSON in, harmony messages out (validated, every error naming its
field as `messages[2].tool_calls[0].function.arguments`); sampled tokens in, API deltas out.

Requests. Chat Completions `messages` and the Responses API's `input` items (as OpenAI's reference
server `gpt_oss/responses_api` reads them) become a `Conversation`:

    system/developer at the start      -> instructions: the developer message's `# Instructions`
    (Responses: `instructions` first)     (harmony's own system message, identity/date/effort, is the server's)
    system/developer later             -> <|start|>developer<|message|># Instructions\\n\\n...<|end|>
    user                               -> <|start|>user<|message|>...<|end|>
    assistant reasoning_content        -> <|start|>assistant<|channel|>analysis<|message|>...<|end|>
      (Responses: a reasoning item)
    assistant content, no tool_calls   -> <|start|>assistant<|channel|>final<|message|>...<|end|>
    assistant content + tool_calls     -> <|start|>assistant<|channel|>commentary<|message|>...<|end|>  (a preamble)
      (Responses: a message item, then <|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json
       a function_call item)              <|message|>{"city":"Paris"}<|call|>
    tool (tool_call_id)                -> <|start|>functions.f to=assistant<|channel|>commentary<|message|>...<|end|>
      (Responses: function_call_output, by call_id)
    tools [{"type": "function"...}]    -> the developer message's `# Tools`, namespace functions

then harmony's rule for reasoning: analysis from turns that already ended in a final answer is dropped.

Model output. `OutputMapper` is fed the tokens sampled after `<|start|>assistant` and turns each into
`Delta`s, whatever channel the model chose and wherever it put the recipient:

    analysis, no recipient                         -> "reasoning"
    final; commentary without recipient (preamble) -> "content"
    any channel, to=functions.f (or browser.x...)  -> "tool_call" (name, fresh call_id), then "tool_arguments"
    anything that is not harmony                   -> "content", malformed=True; parsing resumes at <|start|>

`finish()` then gives the whole `Output`, including the harmony messages to store for a later turn.
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

import tiktoken

from tinyoss.errors import TinyossError
from tinyoss.generate import drop_finished_analysis, tool_result
from tinyoss.harmony import (STOP_TOKENS, DeveloperContent, HarmonyError, Message, Role, StreamParser,
                             ToolDescription)
from tinyoss.tokenizer import CHANNEL, CONSTRAIN, MESSAGE, N_BASE_TOKENS, START, get_tokenizer

TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
TEXT_PARTS = ("text", "input_text", "output_text")  # content part types that hold plain text
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
RESPONSES_ROLES = ("system", "developer", "user", "assistant")
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")  # vLLM/DeepSeek, OpenRouter, the HF template

_CONTROL_TEXT = re.compile(r"<\|[a-z_0-9]+\|>")  # a special token's text, e.g. <|channel|>


class RequestError(TinyossError):
    """A request the API cannot serve: HTTP status (400 default), message, the offending `param`
    (a JSON path such as `messages[2].content`, or None), and an optional machine-readable `code`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


@dataclass
class Conversation:
    """A request as harmony: the turns after the system/developer head, the developer instructions,
    and the function tools. `generate.prepare_conversation` adds the head."""

    messages: list[Message]
    instructions: str | None
    tools: list[ToolDescription]


# ---------------------------------------------------------------------------------------------------
# Reading JSON fields
# ---------------------------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    for python_type, name in ((bool, "a boolean"), (str, "a string"), (int, "a number"), (float, "a number"),
                              (list, "an array"), (dict, "an object")):
        if isinstance(value, python_type):
            return name
    return "null" if value is None else type(value).__name__


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(f"{param} must be an object, got {_json_type(value)}", param)
    return value


def _optional_string(obj: dict[str, Any], key: str, param: str) -> str | None:
    """`obj[key]`: a string, or None when absent or null."""
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"{param}.{key} must be a string, got {_json_type(value)}", f"{param}.{key}")
    return value


def _string(obj: dict[str, Any], key: str, param: str) -> str:
    value = _optional_string(obj, key, param)
    if value is None:
        raise RequestError(f"{param}.{key} is required", f"{param}.{key}")
    return value


def _name(obj: dict[str, Any], key: str, param: str) -> str:
    name = _string(obj, key, param)
    if not name:
        raise RequestError(f"{param}.{key} must not be empty", f"{param}.{key}")
    return name


def _function_name(obj: dict[str, Any], key: str, param: str) -> str:
    """A tool's name as `tools` defines it: OpenAI's rule."""
    name = _name(obj, key, param)
    if not TOOL_NAME.fullmatch(name):
        raise RequestError(f"{param}.{key} {name!r} must match ^[a-zA-Z0-9_-]{{1,64}}$", f"{param}.{key}")
    return name


def _called_name(obj: dict[str, Any], key: str, param: str) -> str:
    """The name of a call in an earlier turn: any the model may have written (`browser.search`,
    which this server returns as a call, included), but nothing that would make the harmony header
    it goes into (`to=functions.NAME`) read otherwise: no whitespace, control characters or `<|`."""
    name = _name(obj, key, param)
    if len(name) > 256 or any(c.isspace() or ord(c) < 32 for c in name) or "<|" in name or "|>" in name:
        raise RequestError(f"{param}.{key} {name!r} is not a function name (no whitespace, control "
                           "characters or special tokens' text, at most 256 characters)", f"{param}.{key}")
    return name


def _text(content: Any, param: str) -> str:
    """Message content: a string, or an array of text parts whose texts are concatenated."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{param} must be a string or an array of text parts, got {_json_type(content)}", param)
    texts = []
    for j, part in enumerate(content):
        part = _object(part, f"{param}[{j}]")
        if part.get("type") not in TEXT_PARTS:
            raise RequestError(f"{param}[{j}].type {part.get('type')!r} is not supported: only text content is",
                               f"{param}[{j}].type")
        texts.append(_string(part, "text", f"{param}[{j}]"))
    return "".join(texts)


def _arguments(value: Any, param: str) -> str:
    """A call's arguments: the JSON text as sent; an object (some clients send one) as JSON text."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    raise RequestError(f"{param} must be a string of JSON, got {_json_type(value)}", param)


def _instructions(texts: list[str]) -> str | None:
    """Leading system/developer texts as one instructions text (empty ones say nothing)."""
    return "\n\n".join(t for t in texts if t) or None


def _system_text(text: str, head: list[str], turns: list[Message]) -> None:
    """A client's system/developer text: instructions while nothing else was said (the chat template's
    rule), else a developer message in place."""
    if turns:
        turns.append(Message(Role.DEVELOPER, DeveloperContent(text)))
    else:
        head.append(text)


def _call(name: str, arguments: str) -> Message:
    """A call as the model writes it. A dotted name (`browser.search`, which OutputMapper gives for a
    recipient outside `functions`) is the recipient itself: function names cannot hold a dot."""
    call = Message.tool_call(name, arguments, channel="commentary")
    if "." in name:
        call.recipient = name
    return call


def _unanswered_calls(messages: list[Message]) -> list[Message]:
    """The tool calls in `messages` no tool result follows yet (results answer calls in order)."""
    pending: list[Message] = []
    for message in messages:
        if message.role is Role.ASSISTANT and message.recipient not in (None, "all"):
            pending.append(message)
        elif message.role is Role.TOOL and pending:
            pending.pop(0)
    return pending


# ---------------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------------


MAX_SCHEMA_DEPTH = 64  # harmony renders a schema recursively: ~330 nested objects exhaust Python's stack


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in a decoded JSON value (a scalar: 0)."""
    depth, level = 0, [value]
    while level:
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        depth += 1
    return depth - 1


def function_tools(tools: Any, api: str) -> list[ToolDescription]:
    """The `tools` of a request (api "chat": `{"type": "function", "function": {...}}`; api "responses":
    `{"type": "function", "name": ...}`) as harmony tool descriptions. Only function tools exist here."""
    if api not in ("chat", "responses"):
        raise ValueError(f"api must be 'chat' or 'responses', got {api!r}")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise RequestError(f"tools must be an array, got {_json_type(tools)}", "tools")
    descriptions: list[ToolDescription] = []
    for i, raw in enumerate(tools):
        tool = _object(raw, f"tools[{i}]")
        if tool.get("type") != "function":
            raise RequestError(f"tools[{i}].type {tool.get('type')!r} is not supported: only function tools",
                               f"tools[{i}].type")
        param = f"tools[{i}].function" if api == "chat" else f"tools[{i}]"
        spec = _object(tool.get("function"), param) if api == "chat" else tool
        name = _function_name(spec, "name", param)
        if any(d.name == name for d in descriptions):
            raise RequestError(f"{param}.name {name!r}: two tools have this name", f"{param}.name")
        parameters = spec.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise RequestError(f"{param}.parameters must be a JSON schema object, got {_json_type(parameters)}",
                               f"{param}.parameters")
        if parameters is not None and _depth(parameters) > MAX_SCHEMA_DEPTH:
            raise RequestError(f"{param}.parameters nests deeper than {MAX_SCHEMA_DEPTH} levels", f"{param}.parameters")
        if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
            raise RequestError(f"{param}.strict must be a boolean", f"{param}.strict")
        description = _optional_string(spec, "description", param) or ""
        descriptions.append(ToolDescription(name, description, parameters))
    return descriptions


# ---------------------------------------------------------------------------------------------------
# Chat Completions
# ---------------------------------------------------------------------------------------------------


def chat_conversation(messages: Any, tools: Any = None) -> Conversation:
    """Chat Completions `messages` (and `tools`) as a harmony Conversation."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array of messages", "messages")
    head: list[str] = []  # the leading system/developer texts
    turns: list[Message] = []
    calls: dict[str, Message] = {}  # tool_call id -> the call, for the tool messages that answer it
    for i, raw in enumerate(messages):
        param = f"messages[{i}]"
        message = _object(raw, param)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(f"{param}.role {role!r} is not one of {', '.join(CHAT_ROLES)}", f"{param}.role")
        if role in ("system", "developer"):
            _system_text(_text(message.get("content"), f"{param}.content"), head, turns)
        elif role == "user":
            turns.append(Message.user(_text(message.get("content"), f"{param}.content")))
        elif role == "assistant":
            turns += _chat_assistant(message, param, calls)
        else:
            turns.append(_chat_tool_result(message, param, calls))
    return Conversation(drop_finished_analysis(turns), _instructions(head), function_tools(tools, "chat"))


def _chat_reasoning(message: dict[str, Any], param: str) -> str | None:
    """The reasoning a client sends back, under whichever name its stack uses."""
    for key in REASONING_FIELDS:
        reasoning = _optional_string(message, key, param)
        if reasoning:
            return reasoning
    return None


def _chat_assistant(message: dict[str, Any], param: str, calls: dict[str, Message]) -> list[Message]:
    """Reasoning as analysis; then either a preamble and calls on commentary, or the final answer."""
    said = []
    reasoning = _chat_reasoning(message, param)
    if reasoning:
        said.append(Message.assistant(reasoning, "analysis"))
    content = None if message.get("content") is None else _text(message["content"], f"{param}.content")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise RequestError(f"{param}.tool_calls must be an array, got {_json_type(tool_calls)}", f"{param}.tool_calls")
    if tool_calls:
        if content:
            said.append(Message.assistant(content, "commentary"))
        said += [_chat_tool_call(call, f"{param}.tool_calls[{k}]", calls) for k, call in enumerate(tool_calls)]
    elif content or (content is not None and not said):  # "" alone is an empty answer; beside reasoning, nothing
        said.append(Message.assistant(content, "final"))
    if not said:
        raise RequestError(f"{param}: an assistant message needs content, tool_calls or reasoning", param)
    return said


def _chat_tool_call(raw: Any, param: str, calls: dict[str, Message]) -> Message:
    call = _object(raw, param)
    if call.get("type", "function") != "function":  # the HF template's tool_calls have no type
        raise RequestError(f"{param}.type {call.get('type')!r} is not supported: only function calls",
                           f"{param}.type")
    function = _object(call.get("function"), f"{param}.function")
    message = _call(_called_name(function, "name", f"{param}.function"),
                    _arguments(function.get("arguments"), f"{param}.function.arguments"))
    call_id = _optional_string(call, "id", param)
    if call_id is not None:
        calls[call_id] = message
    return message


def _chat_tool_result(message: dict[str, Any], param: str, calls: dict[str, Message]) -> Message:
    """A tool message, from the tool its tool_call_id names (or, failing that, its `name`)."""
    output = _text(message.get("content"), f"{param}.content")
    call_id = _optional_string(message, "tool_call_id", param)
    if call_id in calls:
        return tool_result(calls[call_id], output)
    if message.get("name"):
        return tool_result(_call(_called_name(message, "name", param), ""), output)
    if call_id is None:
        raise RequestError(f"{param}.tool_call_id is required: the id of the tool call this message "
                           "answers", f"{param}.tool_call_id")
    raise RequestError(f"{param}.tool_call_id {call_id!r} matches no tool call of an earlier assistant message",
                       f"{param}.tool_call_id")


# ---------------------------------------------------------------------------------------------------
# Responses API
# ---------------------------------------------------------------------------------------------------


def responses_conversation(input: Any, instructions: Any = None, tools: Any = None,
                           previous: list[Message] | None = None) -> Conversation:
    """A Responses API request as a harmony Conversation. `previous` is the conversation of the stored
    response that `previous_response_id` names (its turns and output): it comes first."""
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError(f"instructions must be a string, got {_json_type(instructions)}", "instructions")
    items = [{"role": "user", "content": input}] if isinstance(input, str) else input
    if not isinstance(items, list) or not (items or previous):
        raise RequestError("input must be a string or a non-empty array of items", "input")
    head = [instructions] if instructions is not None else []
    turns = list(previous or [])
    calls: dict[str, Message] = {}  # call_id -> function_call of this input
    pending = _unanswered_calls(turns)  # calls of `previous`: their ids were the server's, so match in order
    for i, raw in enumerate(items):
        param = f"input[{i}]"
        item = _object(raw, param)
        kind = item.get("type") or "message"  # an EasyInputMessage has no type
        if kind == "message":
            role = item.get("role")
            if role not in RESPONSES_ROLES:
                raise RequestError(f"{param}.role {role!r} is not one of {', '.join(RESPONSES_ROLES)}",
                                   f"{param}.role")
            text = _text(item.get("content"), f"{param}.content")
            if role in ("system", "developer"):
                _system_text(text, head, turns)
            elif role == "user":
                turns.append(Message.user(text))
            else:
                turns.append(Message.assistant(text, "commentary" if _before_call(items, i) else "final"))
        elif kind == "reasoning":
            reasoning = _reasoning_text(item, param)
            if reasoning:
                turns.append(Message.assistant(reasoning, "analysis"))
        elif kind == "function_call":
            function_call = _call(_called_name(item, "name", param), _arguments(item.get("arguments"), f"{param}.arguments"))
            calls[_string(item, "call_id", param)] = function_call
            turns.append(function_call)
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", param)
            answered = calls.get(call_id) or (pending.pop(0) if pending else None)
            if answered is None:
                raise RequestError(f"{param}.call_id {call_id!r} matches no function_call", f"{param}.call_id")
            turns.append(tool_result(answered, _text(item.get("output"), f"{param}.output")))
        else:
            raise RequestError(f"{param}.type {kind!r} is not supported: only message, reasoning, function_call "
                               "and function_call_output items", f"{param}.type")
    return Conversation(drop_finished_analysis(turns), _instructions(head), function_tools(tools, "responses"))


def _before_call(items: list[Any], i: int) -> bool:
    """Whether item i is followed by a function_call: then an assistant message is the call's preamble."""
    following = items[i + 1] if i + 1 < len(items) else None
    return isinstance(following, dict) and following.get("type") == "function_call"


def _reasoning_text(item: dict[str, Any], param: str) -> str:
    """A reasoning item's raw text (`content`), else its summary's paragraphs; "" when it has neither
    (e.g. OpenAI's encrypted reasoning, which says nothing to this model)."""
    for key, part_type, separator in (("content", "reasoning_text", ""), ("summary", "summary_text", "\n\n")):
        parts = item.get(key)
        if parts is None:
            continue
        if not isinstance(parts, list):
            raise RequestError(f"{param}.{key} must be an array, got {_json_type(parts)}", f"{param}.{key}")
        texts = []
        for j, raw in enumerate(parts):
            part = _object(raw, f"{param}.{key}[{j}]")
            if part.get("type", part_type) != part_type:
                raise RequestError(f"{param}.{key}[{j}].type must be {part_type!r}", f"{param}.{key}[{j}].type")
            texts.append(_string(part, "text", f"{param}.{key}[{j}]"))
        if any(texts):
            return separator.join(texts)
    return ""


# ---------------------------------------------------------------------------------------------------
# Model output -> deltas
# ---------------------------------------------------------------------------------------------------

_ID_ALPHABET = string.ascii_letters + string.digits
HEADER_TOKENS = (CHANNEL, CONSTRAIN, MESSAGE, *STOP_TOKENS)  # control tokens a header may hold or end with


def _is_control(token: int) -> bool:
    """A special token (or an id outside the vocabulary): never text."""
    return not 0 <= token < N_BASE_TOKENS


def new_call_id() -> str:
    """A fresh tool call id, shaped like OpenAI's: `call_` and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class Delta:
    """What one sampled token added to the reply."""

    kind: str  # "reasoning" | "content" | "tool_call" | "tool_arguments"
    text: str = ""  # reasoning/content text, or a piece of a call's arguments
    index: int = 0  # which tool call (0, 1, ...), for "tool_call" and "tool_arguments"
    call_id: str = ""  # for "tool_call"
    name: str = ""  # for "tool_call": the function name (the whole recipient outside `functions`)


@dataclass
class ToolCall:
    call_id: str
    name: str
    arguments: str


@dataclass
class Output:
    """The whole reply: the texts and calls the deltas streamed, and the messages the model wrote."""

    reasoning: str  # all analysis text without recipient, concatenated
    content: str  # final text, commentary preambles, and text recovered from malformed output
    tool_calls: list[ToolCall]
    messages: list[Message]  # as parsed, plus recovered text as final messages: what to store and re-render
    reasoning_tokens: int  # sampled tokens of analysis messages without recipient, headers included
    malformed: bool  # some output was not harmony and was recovered as content
    tail: list[Delta] = field(default_factory=list)  # what finish() added: an incomplete character


class OutputMapper:
    """Feed the tokens the model samples after `<|start|>assistant`, one at a time; get deltas.

    Wraps a lenient harmony StreamParser. calls_allowed=False (tool_choice "none") turns what the model
    addresses to a tool into content. Never raises on what the model writes.
    """

    def __init__(self, *, calls_allowed: bool = True, tokenizer: tiktoken.Encoding | None = None):
        self.calls_allowed = calls_allowed
        self.tokenizer = tokenizer or get_tokenizer()
        self.reasoning_tokens = 0
        self.malformed = False
        self._parser = StreamParser(Role.ASSISTANT, strict=False, tokenizer=self.tokenizer)
        self._earlier: list[Message] = []  # messages of parsers given up on, and recovered text
        self._kind: str | None = None  # "reasoning" | "content" | "call" of the message whose content streams
        self._streamed: list[str] = []  # that message's text so far
        self._header_tokens = 0  # tokens since the last message ended: the next one's header
        self._junk: list[str] = []  # text outside any message, not yet stored as a message
        self._junk_utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[ToolCall] = []
        self._output: Output | None = None
        # the last token fed is text of the content, streamed or held (part of a character, which
        # streams with the token that completes it): the tokens that get a logprobs entry
        self.content_token = False

    def feed(self, token: int) -> list[Delta]:
        token = int(token)
        deltas: list[Delta] = []
        self.content_token = False
        state = self._parser.state
        if token == START and state != "expect_start":
            # the model began a new message without ending this one (or repeated the prompt's <|start|>)
            self.malformed |= state == "content" or self._header_tokens > 0
            deltas += self._end_here()
            self._restart()
        elif _is_control(token) and state == "content" and token not in STOP_TOKENS:
            self.malformed = True  # a control token is no text (the parser would keep it as text)
            self.reasoning_tokens += int(self._kind == "reasoning")
            return []
        elif _is_control(token) and state == "header" and token not in HEADER_TOKENS:
            return self._junk_token(token)  # the parser would read it as a header word, e.g. a recipient
        before, n_messages = self._parser.state, len(self._parser.messages)
        if before != "content":
            self._header_tokens += 1
        else:
            self.reasoning_tokens += int(self._kind == "reasoning")  # its text and its stop token
        try:
            self._parser.process(token)
        except HarmonyError:
            return deltas + self._junk_token(token)
        state = self._parser.state
        if token == START and self._junk:
            deltas += self._flush_junk()
        if before == "header" and state == "content":  # <|message|>: the header is complete
            deltas += self._open()
        elif before == "content" and state == "content":
            self.content_token = self._kind == "content"
            deltas += self._stream(self._parser.last_content_delta or "")
        elif before == "content":  # a stop token ended the message
            deltas += self._end(self._parser.messages[-1])
        elif len(self._parser.messages) > n_messages:  # a header ended by a stop token (no <|message|>)
            self.malformed = True
            deltas += self._recovered(self._parser.messages[-1])
        if state == "expect_start":
            self._header_tokens = 0
        return deltas

    def finish(self) -> Output:
        """The output ended (a stop token, or cut off): finish what was being written. Call once;
        later calls return the same Output."""
        if self._output is None:
            # a header cut off by the end said nothing yet: its words are a recipient or content type in
            # the making (`to`, `to=functions.get_wea`), which the lenient parser would read as text
            tail = self._end_here() if self._parser.state == "content" else []
            tail += self._flush_junk()
            self._output = Output("".join(self._reasoning), "".join(self._content), self._calls,
                                  self._earlier + self._parser.messages, self.reasoning_tokens, self.malformed,
                                  tail)
        return self._output

    def _end_here(self) -> list[Delta]:
        """End the message being written (a new <|start|> came): its content as it is, or its header
        as the lenient parser reads it."""
        state, n_messages = self._parser.state, len(self._parser.messages)
        self._parser.process_eos()
        if state == "content":
            return self._end(self._parser.messages[-1])
        if len(self._parser.messages) > n_messages:
            return self._recovered(self._parser.messages[-1])
        return []

    def _kind_of(self, role: Role | None, channel: str | None, recipient: str | None) -> str:
        if role is Role.ASSISTANT and recipient not in (None, "all"):  # a call, whatever the channel
            return "call" if self.calls_allowed else "content"
        return "reasoning" if channel == "analysis" else "content"

    def _open(self) -> list[Delta]:
        """A message's header is complete: a call is announced now, before its arguments stream."""
        parser = self._parser
        self._kind = self._kind_of(parser.current_role, parser.current_channel, parser.current_recipient)
        self._streamed = []
        if self._kind == "reasoning":
            self.reasoning_tokens += self._header_tokens
        if self._kind != "call":
            return []
        recipient = parser.current_recipient or ""
        call = ToolCall(new_call_id(), recipient.removeprefix("functions."), "")
        self._calls.append(call)
        return [Delta("tool_call", index=len(self._calls) - 1, call_id=call.call_id, name=call.name)]

    def _stream(self, text: str) -> list[Delta]:
        """Text of the current message, as the delta of its kind."""
        if not text:
            return []
        self._streamed.append(text)
        if self._kind == "call":
            self._calls[-1].arguments += text
            return [Delta("tool_arguments", text, index=len(self._calls) - 1)]
        if self._kind == "reasoning":
            self._reasoning.append(text)
            return [Delta("reasoning", text)]
        self._content.append(text)
        return [Delta("content", text)]

    def _end(self, message: Message) -> list[Delta]:
        """The message is done; the parser may have completed its text (an incomplete character)."""
        tail = message.text[len("".join(self._streamed)):]
        deltas = self._stream(tail)
        self._kind, self._streamed = None, []
        return deltas

    def _recovered(self, message: Message) -> list[Delta]:
        """A header ended by a stop token, read leniently: its extra words are its text (the model
        forgot <|message|>), except a recipient or content type, which are no text."""
        words = message.text.split(" ")
        message.content = " ".join(_CONTROL_TEXT.sub("", w) for w in words  # a control token is no text
                                   if not w.startswith(("to=", "<|constrain|>")))
        self._kind = self._kind_of(message.role, message.channel, message.recipient)
        if self._kind == "reasoning":
            self.reasoning_tokens += self._header_tokens
        return self._end(message)

    def _restart(self) -> None:
        """Go on with a fresh parser that waits for the next `<|start|>`."""
        self._earlier += self._parser.messages
        self._parser = StreamParser(None, strict=False, tokenizer=self.tokenizer)
        self._kind, self._streamed, self._header_tokens = None, [], 0

    def _junk_token(self, token: int) -> list[Delta]:
        """A token the parser rejects (text between messages, a broken header): its text is content."""
        self.malformed = True
        self._restart()
        raw = self._token_bytes(token)
        self.content_token = bool(raw)
        text = self._junk_utf8.decode(raw)
        if not text:
            return []
        self._junk.append(text)
        self._content.append(text)
        return [Delta("content", text)]

    def _flush_junk(self) -> list[Delta]:
        """Store recovered text as a final message, so that a stored conversation shows what was sent."""
        text = self._junk_utf8.decode(b"", final=True)
        if text:
            self._junk.append(text)
            self._content.append(text)
        if self._junk:
            self._earlier.append(Message.assistant("".join(self._junk), "final"))
        self._junk = []
        return [Delta("content", text)] if text else []

    def _token_bytes(self, token: int) -> bytes:
        """An ordinary token's bytes; a special token (or an id outside the vocabulary) has no text."""
        return b"" if _is_control(token) else self.tokenizer.decode_single_token_bytes(token)
