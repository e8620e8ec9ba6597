"""Harmony, the chat format of gpt-oss: messages to token ids and back.

The concepts and names are those of OpenAI's reference renderer/parser `openai-harmony` (Rust, with
Python bindings); this module is a readable Python re-implementation that is tested token-for-token
against it. A conversation renders as

    <|start|>system<|message|>{identity, knowledge cutoff, date, reasoning effort, channels}<|end|>
    <|start|>developer<|message|># Instructions ... # Tools ... namespace functions { ... }<|end|>
    <|start|>user<|message|>What is the weather in Paris?<|end|>
    <|start|>assistant<|channel|>analysis<|message|>Need the tool.<|end|>
    <|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city":"Paris"}<|call|>
    <|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp": 20}<|end|>
    <|start|>assistant                                  <- the model continues from here

Tools come in namespaces: the developer's functions (`functions.get_weather`), other namespaces with a
description of their own (`ToolNamespace`), and the built-in `browser` and `python` tools, which go in
the system message (`SystemContent(namespaces=[ToolNamespace.browser()])`). For training, a conversation
that ends in a final answer ends with `<|return|>` (`render_conversation_for_training`).

Every header piece (role, ` to=...`, channel, content type) and every content text is tokenized on
its own with no special tokens allowed, exactly as openai-harmony does, so the ids match.

What the model writes back (after `<|start|>assistant`) is parsed by `StreamParser`, one token at a
time, into `Message`s. Non-features: content lists (a message holds one content).
"""

from __future__ import annotations

import codecs
import collections.abc
import copy
import dataclasses
import decimal
import enum
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import tiktoken

from tinyoss.errors import TinyossError, TinyossTypeError
from tinyoss.tokenizer import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START, get_tokenizer

CHANNELS = ("analysis", "commentary", "final")
JSON_CONTENT_TYPE = "<|constrain|>json"  # content type of a function call's JSON arguments
STOP_TOKENS = (END, RETURN, CALL)  # each ends a message
ASSISTANT_STOP_TOKENS = (RETURN, CALL)  # each ends the assistant's turn: stop sampling there

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"


class HarmonyError(TinyossError):
    """A message cannot be rendered, or model output is not valid harmony."""


class Role(str, enum.Enum):
    """Who wrote a message. A tool's messages carry the tool's name (`functions.NAME`) as author."""

    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ReasoningEffort(str, enum.Enum):
    """How long the model thinks in the analysis channel; the system message says `Reasoning: low`."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


@dataclass
class ToolDescription:
    """A function the model may call: `parameters` is a JSON schema of an object (or None: no args)."""

    name: str
    description: str
    parameters: dict[str, Any] | None = None


# The built-in tools, copied from openai-harmony 0.0.8 (`ToolNamespaceConfig.browser()` and `.python()`).
_BROWSER_DESCRIPTION = """Tool for browsing.
The `cursor` appears in brackets before each browsing display: `[{cursor}]`.
Cite information from the tool using the following format:
`【{cursor}†L{line_start}(-L{line_end})?】`, for example: `【6†L9-L11】` or `【8†L3】`.
Do not quote more than 10 words directly from the tool output.
sources=web (default: web)"""
_BROWSER_TOOLS = [
    ToolDescription("search", "Searches for information related to `query` and displays `topn` results.", {
        "type": "object",
        "properties": {"query": {"type": "string"}, "topn": {"type": "number", "default": 10},
                       "source": {"type": "string"}},
        "required": ["query"],
    }),
    ToolDescription("open", (
        "Opens the link `id` from the page indicated by `cursor` starting at line number `loc`, showing "
        "`num_lines` lines.\n"
        "Valid link ids are displayed with the formatting: `【{id}†.*】`.\n"
        "If `cursor` is not provided, the most recent page is implied.\n"
        "If `id` is a string, it is treated as a fully qualified URL associated with `source`.\n"
        "If `loc` is not provided, the viewport will be positioned at the beginning of the document or centered "
        "on the most relevant passage, if available.\n"
        "Use this function without `id` to scroll to a new location of an opened page."), {
        "type": "object",
        "properties": {"id": {"type": ["number", "string"], "default": -1}, "cursor": {"type": "number", "default": -1},
                       "loc": {"type": "number", "default": -1}, "num_lines": {"type": "number", "default": -1},
                       "view_source": {"type": "boolean", "default": False}, "source": {"type": "string"}},
    }),
    ToolDescription("find", "Finds exact matches of `pattern` in the current page, or the page given by `cursor`.", {
        "type": "object",
        "properties": {"pattern": {"type": "string"}, "cursor": {"type": "number", "default": -1}},
        "required": ["pattern"],
    }),
]
_PYTHON_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. "
    "This tool should be used for internal reasoning, but not for code that is intended to be visible to the "
    "user (e.g. when creating plots, tables, or files).\n\n"
    "When you send a message containing Python code to python, it will be executed in a stateful Jupyter "
    "notebook environment. python will respond with the output of the execution or time out after 120.0 "
    "seconds. The drive at '/mnt/data' can be used to save and persist user files. Internet access for this "
    "session is UNKNOWN. Depends on the cluster."
)


@dataclass
class ToolNamespace:
    """Tools the model addresses as `<name>.<tool>` (`browser.search`), under a description of them all.

    A namespace without tools (`python`) is its description alone: the model writes to `python` itself.
    """

    name: str
    description: str | None = None
    tools: list[ToolDescription] = field(default_factory=list)

    @classmethod
    def browser(cls) -> ToolNamespace:
        """The built-in browser (search, open, find), as openai-harmony describes it."""
        return cls("browser", _BROWSER_DESCRIPTION, copy.deepcopy(_BROWSER_TOOLS))

    @classmethod
    def python(cls) -> ToolNamespace:
        """The built-in python tool (a stateful Jupyter kernel), as openai-harmony describes it."""
        return cls("python", _PYTHON_DESCRIPTION)


@dataclass
class SystemContent:
    """The system message: who the model is, when it is, how hard it thinks, which channels exist, and
    the built-in tools it has (`namespaces`, e.g. `[ToolNamespace.browser(), ToolNamespace.python()]`).

    A field set to None is left out of the rendered text (as in openai-harmony).
    """

    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    conversation_start_date: str | None = None  # e.g. "2025-08-05"
    reasoning_effort: ReasoningEffort | str | None = ReasoningEffort.MEDIUM
    valid_channels: tuple[str, ...] = CHANNELS
    channel_required: bool = True
    namespaces: list[ToolNamespace] = field(default_factory=list)


@dataclass
class DeveloperContent:
    """The developer message: instructions (what other formats call the system prompt) and tools.

    `tools` are the functions (the `functions` namespace, rendered when not empty); `namespaces` are
    any others, or `functions` itself when it has a description or is to be shown empty.
    """

    instructions: str | None = None
    tools: list[ToolDescription] = field(default_factory=list)  # the `functions` namespace
    namespaces: list[ToolNamespace] = field(default_factory=list)


@dataclass
class Message:
    """One harmony message.

    `name` is the author's name: for a tool message it is the tool (`functions.get_weather`) and is
    what the header shows in place of the role. `recipient` is who the message is for
    (`functions.get_weather` for a call; `assistant` for a tool's result). `content_type` says how the
    content is written (`<|constrain|>json` for call arguments).
    """

    role: Role
    content: str | SystemContent | DeveloperContent
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None

    def __post_init__(self) -> None:
        """A role given as its name becomes the Role; a wrong role or content is named here,
        not in the renderer (where it was tiktoken's or the enum's error)."""
        if not isinstance(self.role, Role):
            try:
                self.role = Role(self.role)
            except ValueError:
                raise HarmonyError(f"a message's role must be one of "
                                   f"{', '.join(r.value for r in Role)}, got {self.role!r}") from None
        if not isinstance(self.content, (str, SystemContent, DeveloperContent)):
            raise TinyossTypeError(f"a {self.role.value} message's content must be a str, got "
                                   f"{type(self.content).__name__}")

    @property
    def text(self) -> str:
        """The content, when it is plain text."""
        if not isinstance(self.content, str):
            raise HarmonyError(f"a {self.role.value} message holds {type(self.content).__name__}, not text")
        return self.content

    @classmethod
    def system(cls, content: SystemContent | None = None) -> Message:
        return cls(Role.SYSTEM, content if content is not None else SystemContent())

    @classmethod
    def developer(cls, instructions: str | None = None, tools: Sequence[ToolDescription] = (),
                  namespaces: Sequence[ToolNamespace] = ()) -> Message:
        return cls(Role.DEVELOPER, DeveloperContent(instructions, list(tools), list(namespaces)))

    @classmethod
    def user(cls, text: str) -> Message:
        return cls(Role.USER, text)

    @classmethod
    def assistant(cls, text: str, channel: str = "final") -> Message:
        return cls(Role.ASSISTANT, text, channel=channel)

    @classmethod
    def tool_call(cls, tool_name: str, arguments: str, channel: str = "commentary") -> Message:
        """The assistant calling `functions.<tool_name>` with JSON `arguments`."""
        return cls(Role.ASSISTANT, arguments, channel=channel, recipient=f"functions.{tool_name}",
                   content_type=JSON_CONTENT_TYPE)

    @classmethod
    def tool_result(cls, tool_name: str, output: str, channel: str = "commentary") -> Message:
        """What `functions.<tool_name>` returned, addressed back to the assistant."""
        return cls(Role.TOOL, output, name=f"functions.{tool_name}", channel=channel, recipient="assistant")


# ---------------------------------------------------------------------------------------------------
# JSON schema -> the TypeScript-like text the model was trained on
# ---------------------------------------------------------------------------------------------------

# Rust's char::is_whitespace (Unicode White_Space), which openai-harmony uses; Python's str.isspace()
# would also count \x1c..\x1f.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
_ASCII_WHITESPACE = re.compile(r"[ \t\n\x0c\r]+")


def _rust_float(x: float) -> str:
    """A float as serde_json prints it (Rust's ryu): the same shortest digits as Python's repr, but
    plain notation from 1e-5 up to 1e16 and exponents written `1e16`, `1e-7` (Python: `1e+16`, `1e-07`)."""
    if x == 0.0 or not math.isfinite(x):
        return repr(x)
    sign = "-" if x < 0 else ""
    shortest = decimal.Decimal(repr(abs(x))).normalize().as_tuple()  # value = digits * 10**exponent
    digits, exponent = "".join(map(str, shortest.digits)), int(shortest.exponent)
    point = len(digits) + exponent  # 10**(point-1) <= value < 10**point
    if 0 <= exponent and point <= 16:
        return f"{sign}{digits}{'0' * exponent}.0"  # 1234e3 -> 1234000.0
    if 0 < point <= 16:
        return f"{sign}{digits[:point]}.{digits[point:]}"  # 1234e-2 -> 12.34
    if -5 < point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"  # 1234e-7 -> 0.0001234
    mantissa = digits if len(digits) == 1 else f"{digits[0]}.{digits[1:]}"
    return f"{sign}{mantissa}e{point - 1}"  # 1234e30 -> 1.234e33


def _json(value: Any) -> str:
    """Compact JSON as serde_json prints it: no spaces, non-ASCII kept, Rust's float notation, and
    integers outside 64 bits turned into floats (serde_json reads them as f64)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json(str(k))}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json(v) for v in value) + "]"
    if isinstance(value, float):
        return _rust_float(value)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return _rust_float(float(value))
    return json.dumps(value, ensure_ascii=False)


def _text_field(schema: dict, key: str) -> str | None:
    """A string-valued schema keyword, or None when absent or not a string."""
    value = schema.get(key)
    return value if isinstance(value, str) else None


def _is_enum(schema: dict) -> bool:
    enum_values = schema.get("enum")
    return isinstance(enum_values, list) and len(enum_values) > 0


def _default_text(schema: dict, quote_enum_default: bool = False) -> str:
    """How a default value is shown in a comment.

    openai-harmony wraps a plain string default in quotes without escaping, prints an enum's string
    default bare (except for a variant of a top-level oneOf, where it is JSON), and anything else as JSON.
    """
    value = schema["default"]
    if isinstance(value, str) and not _is_enum(schema):
        return f'"{value}"'
    if isinstance(value, str) and not quote_enum_default:
        return value
    return _json(value)


def _or_null(type_text: str, schema: dict) -> str:
    """Append ` | null` for `"nullable": true` unless the type already mentions null."""
    if schema.get("nullable") is True and "null" not in type_text:
        return f"{type_text} | null"
    return type_text


def _as_schema(value: Any) -> dict:
    """A schema's keywords; a non-object schema (e.g. `true`) has none and renders as `any`."""
    return value if isinstance(value, dict) else {}


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """Render a JSON schema as openai-harmony does: `string`, `"a" | "b"`, `number[]`, `{ ... }`, ..."""
    schema = _as_schema(schema)
    if isinstance(schema.get("oneOf"), list):
        return _union_to_typescript(schema["oneOf"], indent)
    type_names = schema.get("type")
    if isinstance(type_names, list):  # e.g. ["number", "string"]
        names = ["number" if t == "integer" else t for t in type_names if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(type_names, str):
        return "any"
    if type_names == "object":
        return _object_to_typescript(schema, indent)
    if type_names == "string":
        choices = [f'"{v}"' for v in schema.get("enum") or [] if isinstance(v, str)] if _is_enum(schema) else []
        return " | ".join(choices) if choices else "string"
    if type_names in ("number", "integer"):
        return "number"
    if type_names == "boolean":
        return "boolean"
    if type_names == "array":
        return f"{schema_to_typescript(schema['items'], indent)}[]" if "items" in schema else "Array<any>"
    return "any"


def _union_to_typescript(variants: list, indent: str) -> str:
    """A top-level oneOf: one `\\n | type // description default` line per variant."""
    out = ""
    for variant in variants:
        meta = _as_schema(variant)
        out += f"\n{indent} | " + _or_null(schema_to_typescript(variant, indent + "   "), meta)
        comments = [text for text in [_text_field(meta, "description")] if text is not None]
        if "default" in meta:
            comments.append("default: " + _default_text(meta, quote_enum_default=True))
        if comments:
            out += " // " + " ".join(comments)
    return out


def _object_to_typescript(schema: dict, indent: str) -> str:
    """`{\\n<indent>name?: type,\\n...<indent>}`, preceded by the object's description as a comment."""
    out = ""
    description = _text_field(schema, "description")
    if description is not None:
        out += f"{indent}// {description}\n"
    out += "{\n"
    properties = schema.get("properties")
    if isinstance(properties, dict):
        required_list = schema.get("required")
        required = {r for r in required_list if isinstance(r, str)} if isinstance(required_list, list) else set()
        for key, prop in properties.items():
            out += _property_to_typescript(key, prop, key in required, indent)
    return out + f"{indent}}}"


def _property_comments(meta: dict, indent: str) -> str:
    """Comment lines above a property: its title, its description (a oneOf places that itself), examples."""
    out = ""
    title = _text_field(meta, "title")
    if title is not None:
        out += f"{indent}// {title}\n{indent}//\n"
    description = _text_field(meta, "description")
    if "oneOf" not in meta and description is not None:
        out += f"{indent}// {description}\n"
    examples = meta.get("examples")
    if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        out += "".join(f'{indent}// - "{example}"\n' for example in examples if isinstance(example, str))
    return out


def _property_to_typescript(key: str, prop: Any, required: bool, indent: str) -> str:
    """One object property: comments, then `key?: type, // default: x` (optional ones get `?`)."""
    meta = _as_schema(prop)
    out = _property_comments(meta, indent)
    mark = "" if required else "?"
    if isinstance(meta.get("oneOf"), list):
        return out + _one_of_property_to_typescript(key + mark, meta, indent)
    line = f"{indent}{key}{mark}: " + _or_null(schema_to_typescript(prop, indent + "    "), meta) + ","
    if "oneOf" not in meta and "default" in meta:
        line += " // default: " + _default_text(meta)
    return out + line + "\n"


def _one_of_property_to_typescript(marked_key: str, meta: dict, indent: str) -> str:
    """A oneOf property: `key:` then one ` | type // comment` line per variant, then `,`.

    The property's description goes above unless the first variant repeats it; a variant's own
    description is shown after it unless it repeats the property's.
    """
    variants = meta["oneOf"]
    description = _text_field(meta, "description")
    first_description = _text_field(_as_schema(variants[0]), "description") if variants else None
    description_above = description is not None and description != first_description
    out = f"{indent}// {description}\n" if description_above else ""
    if "default" in meta:
        out += f"{indent}// default: {_default_text(meta)}\n"
    out += f"{indent}{marked_key}:\n"
    for i, variant in enumerate(variants):
        variant_meta = _as_schema(variant)
        comments = []
        variant_description = _text_field(variant_meta, "description")
        shown_above = i == 0 and description_above
        if not shown_above and variant_description is not None and variant_description != description:
            comments.append(variant_description)
        if "default" in variant_meta:
            comments.append("default: " + _default_text(variant_meta))
        type_text = _or_null(schema_to_typescript(variant, indent + "   "), variant_meta)
        out += f"{indent} | {type_text}" + (" // " + " ".join(comments) if comments else "") + "\n"
    return out + f"{indent},\n"


def _rust_lines(text: str) -> list[str]:
    """Split like Rust's str::lines: after each \\n, which goes with one \\r just before it; no line
    after a final \\n. Only \\n ends a line (Python's splitlines also splits on \\r, \\x0b, \\x85,
    \\u2028, ...), and a \\r at the very end, with no \\n after it, stays in the last line."""
    lines = text.split("\n")
    last = lines.pop()  # the text after the last \n: a line unless empty
    return [line.removesuffix("\r") for line in lines] + ([last] if last else [])


def namespace_section(namespace: ToolNamespace) -> str:
    """One namespace of the `# Tools` section: `## name`, its description, its tools as commented
    TypeScript function types. The description is commented out too when the namespace has tools."""
    lines = [f"## {namespace.name}\n"]
    comment = "// " if namespace.tools else ""
    lines += [comment + line for line in _rust_lines(namespace.description or "")]
    if namespace.tools:
        lines.append(f"namespace {namespace.name} {{\n")
        for tool in namespace.tools:
            lines += [f"// {line}" for line in _rust_lines(tool.description)]
            if tool.parameters is None:
                lines.append(f"type {tool.name} = () => any;\n")
            else:
                lines.append(f"type {tool.name} = (_: {schema_to_typescript(tool.parameters)}) => any;\n")
        lines.append(f"}} // namespace {namespace.name}")
    return "\n".join(lines)


def _sorted_namespaces(namespaces: Sequence[ToolNamespace]) -> list[ToolNamespace]:
    """Namespaces in the order openai-harmony renders them: by name (it keeps a map sorted by name,
    which also cannot hold a name twice: that is an error here)."""
    names = [namespace.name for namespace in namespaces]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise HarmonyError(f"tool namespace {twice[0]!r} is given twice")
    return sorted(namespaces, key=lambda namespace: namespace.name)


def tools_section(tools: Sequence[ToolDescription] | Sequence[ToolNamespace], namespace: str = "functions") -> str:
    """The `# Tools` section: `ToolDescription`s in one namespace (`namespace`), or `ToolNamespace`s,
    rendered in the order of their names."""
    if all(isinstance(tool, ToolDescription) for tool in tools):
        tools = [ToolNamespace(namespace, None, list(tools))]  # type: ignore[arg-type]
    namespaces = _sorted_namespaces(tools)  # type: ignore[arg-type]
    return "\n\n".join(["# Tools"] + [namespace_section(ns) for ns in namespaces])


# ---------------------------------------------------------------------------------------------------
# Rendering: messages -> token ids
# ---------------------------------------------------------------------------------------------------


def system_text(content: SystemContent, has_function_tools: bool = False) -> str:
    """The system message's text; it names the `functions` channel rule only when the developer
    message has functions."""
    top = [content.model_identity] if content.model_identity is not None else []
    if content.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {content.knowledge_cutoff}")
    if content.conversation_start_date is not None:
        top.append(f"Current date: {content.conversation_start_date}")
    sections = ["\n".join(top)] if top else []
    if content.reasoning_effort is not None:
        sections.append(f"Reasoning: {ReasoningEffort(content.reasoning_effort).value}")
    if content.namespaces:
        sections.append(tools_section(content.namespaces))
    if content.valid_channels:
        channels = f"# Valid channels: {', '.join(content.valid_channels)}."
        if content.channel_required:
            channels += " Channel must be included for every message."
        if has_function_tools:
            channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(channels)
    return "\n\n".join(sections)


def developer_namespaces(content: DeveloperContent) -> list[ToolNamespace]:
    """The developer message's tool namespaces: `namespaces`, and `functions` when `tools` has any."""
    functions = [ToolNamespace("functions", None, list(content.tools))] if content.tools else []
    return list(content.namespaces) + functions


def developer_text(content: DeveloperContent) -> str:
    """The developer message's text: `# Instructions` then `# Tools`."""
    sections = ["# Instructions", content.instructions] if content.instructions is not None else []
    namespaces = developer_namespaces(content)
    if namespaces:
        sections.append(tools_section(namespaces))
    return "\n\n".join(sections)


def _content_text(message: Message, has_function_tools: bool) -> str:
    """A message's content as text, checking that system/developer content sits in its own role."""
    content = message.content
    if isinstance(content, SystemContent):
        if message.role is not Role.SYSTEM:
            raise HarmonyError(f"SystemContent may only appear in a system message, not {message.role.value}")
        return system_text(content, has_function_tools)
    if isinstance(content, DeveloperContent):
        if message.role is not Role.DEVELOPER:
            raise HarmonyError(f"DeveloperContent may only appear in a developer message, not {message.role.value}")
        return developer_text(content)
    return content


def _header_ids(message: Message, tokenizer: tiktoken.Encoding) -> list[int]:
    """`<|start|>role[:name][ to=recipient][<|channel|>channel][ content_type]<|message|>`.

    Each text piece is encoded separately (as openai-harmony does): encoding the header as one string
    could merge tokens across piece boundaries and give different ids.
    """
    text = tokenizer.encode_ordinary
    role = Role(message.role)
    if role is Role.TOOL:
        if not message.name:
            raise HarmonyError("a tool message needs the tool's name as author, e.g. 'functions.get_weather'")
        ids = [START] + text(message.name)
    else:
        ids = [START] + text(role.value) + (text(f":{message.name}") if message.name is not None else [])
    if message.recipient is not None and message.recipient != "all":
        ids += text(f" to={message.recipient}")
    if message.channel is not None:
        ids += [CHANNEL] + text(message.channel)
    if message.content_type is not None:
        if message.content_type.startswith("<|constrain|>"):  # the marker is a special token
            rest = message.content_type[len("<|constrain|>"):]
            ids += text(" ") + [CONSTRAIN] + (text(rest) if rest else [])
        else:
            ids += text(f" {message.content_type}")
    return ids + [MESSAGE]


def render_message(
    message: Message, *, has_function_tools: bool = False, tokenizer: tiktoken.Encoding | None = None
) -> list[int]:
    """One message as token ids. An assistant message with a recipient is a tool call: it ends with
    `<|call|>`; every other message ends with `<|end|>`."""
    tokenizer = tokenizer or get_tokenizer()
    ids = _header_ids(message, tokenizer)
    ids += tokenizer.encode_ordinary(_content_text(message, has_function_tools))
    is_call = Role(message.role) is Role.ASSISTANT and message.recipient is not None
    return ids + [CALL if is_call else END]


def _has_function_tools(messages: Sequence[Message]) -> bool:
    """Whether a developer message gives the model functions (the system message then says where
    calls to them go). Built-in tools and other namespaces do not count, as in openai-harmony."""
    return any(namespace.name == "functions" and namespace.tools
               for m in messages if isinstance(m.content, DeveloperContent)
               for namespace in developer_namespaces(m.content))


def _kept_messages(messages: Sequence[Message], auto_drop_analysis: bool) -> list[Message]:
    """The messages to render: when the last assistant message is a final answer, the analysis
    messages before the *first* final answer are dropped.

    That is openai-harmony's rule, kept for identical ids; it keeps the reasoning of later finished
    turns, which the checkpoint's chat template drops. A multi-turn chat should therefore keep only
    the final answers of finished turns in its history.
    """
    assistant_channels = [m.channel for m in messages if Role(m.role) is Role.ASSISTANT]
    if not (auto_drop_analysis and assistant_channels and assistant_channels[-1] == "final"):
        return list(messages)
    first_final = next(i for i, m in enumerate(messages) if m.channel == "final")
    return [m for i, m in enumerate(messages) if not (i < first_final and m.channel == "analysis")]


def render_conversation(
    messages: Sequence[Message], *, auto_drop_analysis: bool = True, tokenizer: tiktoken.Encoding | None = None
) -> list[int]:
    """A whole conversation as token ids (see `_kept_messages` for which analysis messages are dropped)."""
    tokenizer = tokenizer or get_tokenizer()
    has_tools = _has_function_tools(messages)
    ids: list[int] = []
    for message in _kept_messages(messages, auto_drop_analysis):
        ids += render_message(message, has_function_tools=has_tools, tokenizer=tokenizer)
    return ids


def render_conversation_for_completion(
    messages: Sequence[Message],
    next_role: Role = Role.ASSISTANT,
    *,
    auto_drop_analysis: bool = True,
    tokenizer: tiktoken.Encoding | None = None,
) -> list[int]:
    """The prompt to sample from: the conversation, then `<|start|>assistant` for the model to continue."""
    tokenizer = tokenizer or get_tokenizer()
    ids = render_conversation(messages, auto_drop_analysis=auto_drop_analysis, tokenizer=tokenizer)
    return ids + [START] + tokenizer.encode_ordinary(Role(next_role).value)


def render_conversation_for_training(
    messages: Sequence[Message], *, auto_drop_analysis: bool = True, tokenizer: tiktoken.Encoding | None = None
) -> list[int]:
    """A conversation to train on: as `render_conversation`, but when the last message is the
    assistant's final answer it ends with `<|return|>` (what the model writes when it is done)
    instead of `<|end|>`."""
    ids = render_conversation(messages, auto_drop_analysis=auto_drop_analysis, tokenizer=tokenizer)
    last = messages[-1] if messages else None
    if last is not None and Role(last.role) is Role.ASSISTANT and last.channel == "final":
        ids[-1] = RETURN  # openai-harmony replaces the last token, even a final call's <|call|>
    return ids


# ---------------------------------------------------------------------------------------------------
# Parsing: token ids -> messages
# ---------------------------------------------------------------------------------------------------


@dataclass
class Header:
    """What a message header says, once `<|message|>` closes it."""

    role: Role
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


def _cut_channel(header: str) -> tuple[str | None, str]:
    """Take `<|channel|>NAME` out of a header; NAME runs up to whitespace or the next `<`."""
    marker = "<|channel|>"
    at = header.find(marker)
    if at < 0:
        return None, header
    after = header[at + len(marker):]
    end = next((i for i, c in enumerate(after) if c in _WHITESPACE or c == "<"), len(after))
    if end == 0:
        raise HarmonyError(f"message header has <|channel|> but no channel name: {header!r}")
    return after[:end], header[:at] + after[end:]


def _header_words(header: str) -> list[str]:
    """The header without its channel, split on ASCII whitespace, `<|constrain|>` starting a new word
    (the model may write `to=functions.f<|constrain|>json` with no space)."""
    header = header.strip(_WHITESPACE)
    if "<|constrain|>" in header:
        header = header.replace("<|constrain|>", " <|constrain|>").strip(_WHITESPACE)
    return [word for word in _ASCII_WHITESPACE.split(header) if word]


def _take_author(words: list[str], role: Role | None) -> tuple[Role, str | None, list[str]]:
    """The author (role and, for a tool, its name) and the words left after it.

    With `role` unknown the first word names it; an unknown first word followed by more words (or
    starting with `to=`) is a tool speaking: `functions.get_weather to=assistant`.
    """
    name = None
    if role is None:
        if not words:
            raise HarmonyError("message header has no role")
        first = words[0]
        try:
            role = Role(first)
        except ValueError:
            if len(words) == 1 and not first.startswith("to="):
                raise HarmonyError(f"unknown role {first!r} in message header") from None
            role, words = Role.TOOL, words[1:]
        name = first if role is Role.TOOL else None
    if words and words[0] == role.value:
        words = words[1:]
    return role, name, words


def _take_recipient_and_content_type(words: list[str]) -> tuple[str | None, str | None, list[str]]:
    """Read `[to=]recipient [content_type]` from the end of the header words; return what is left.

    A lone word is a recipient unless it starts with `<|constrain|>`; `to=` may be omitted.
    """
    if not words:
        return None, None, []
    *rest, last = words
    if last.startswith("to="):
        return last[len("to="):], None, rest
    if not rest and not last.startswith("<|constrain|>"):
        return last, None, []
    recipient = None
    if rest:
        word = rest.pop()
        recipient = word[len("to="):] if word.startswith("to=") else word
    return recipient, last, rest


def parse_header(text: str, role: Role | None) -> Header:
    """Parse a decoded header (what lies between `<|start|>` and `<|message|>`); `role` is given when
    the role was already in the prompt (`<|start|>assistant`)."""
    channel, rest = _cut_channel(text)
    role, name, words = _take_author(_header_words(rest), role)
    recipient, content_type, leftover = _take_recipient_and_content_type(words)
    if leftover:
        raise HarmonyError(f"unexpected words {leftover} in message header {text!r}")
    return Header(role, name, channel, recipient, content_type)


def _recover_header(text: str, role: Role | None) -> tuple[Header, str]:
    """For a header cut off by a stop token (no `<|message|>`): its role and channel, and every other
    word as the content (e.g. `<|channel|>final Hello<|end|>` -> final message "Hello")."""
    channel, rest = _cut_channel(text)
    role, name, words = _take_author(_header_words(rest), role)
    return Header(role, name, channel), " ".join(words)


class StreamParser:
    """Parse model output into messages, one token at a time, as it is sampled.

    `role` is the role already given in the prompt (`Role.ASSISTANT` after `<|start|>assistant`), or
    None when the output starts with `<|start|>`. While a message's content streams, `current_role`,
    `current_channel`, `current_recipient` and `current_content_type` describe it and
    `last_content_delta` is the text the last token added (None while a multi-byte character is
    incomplete). `messages` holds the finished messages.

    strict=True (openai-harmony's default) raises HarmonyError on anything that is not harmony.
    strict=False recovers what a sloppy model means: a header that reaches a stop token (or the end
    of output) without `<|message|>` becomes a message whose content is the header's extra words (or
    is dropped when it names no known role), and a stray stop token between messages
    (`<|end|><|return|>`) is ignored. Other text between messages is an error in both modes. Output
    that ends inside a message's content always yields the partial message (truncation is no error).
    """

    def __init__(self, role: Role | None, *, strict: bool = True, tokenizer: tiktoken.Encoding | None = None):
        self.tokenizer = tokenizer or get_tokenizer()
        self.strict = strict
        self.messages: list[Message] = []
        self.tokens: list[int] = []
        self.last_content_delta: str | None = None
        self._next_role = Role(role) if role is not None else None  # the prompt's role, first message only
        self._state = "header" if role is not None else "expect_start"
        self._header_tokens: list[int] = []
        self._header: Header | None = None  # set while in content
        self._content: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def state(self) -> str:
        """`expect_start`, `header` or `content`."""
        return self._state

    @property
    def current_role(self) -> Role | None:
        return self._header.role if self._header else self._next_role

    @property
    def current_channel(self) -> str | None:
        return self._header.channel if self._header else None

    @property
    def current_recipient(self) -> str | None:
        return self._header.recipient if self._header else None

    @property
    def current_content_type(self) -> str | None:
        return self._header.content_type if self._header else None

    @property
    def current_content(self) -> str:
        return "".join(self._content)

    def process(self, token: int) -> StreamParser:
        """Feed one sampled token."""
        token = int(token)
        if not 0 <= token < self.tokenizer.n_vocab:
            raise HarmonyError(f"token id {token} is outside the vocabulary (0..{self.tokenizer.n_vocab - 1})")
        self.tokens.append(token)
        if self._state == "expect_start":
            self._expect_start(token)
        elif self._state == "header":
            self._header_token(token)
        else:
            self._content_token(token)
        return self

    def process_eos(self) -> StreamParser:
        """The output ended (sampling stopped or hit its limit): finish the message in progress."""
        if self._state == "content":
            self._finish_message()
        elif self._state == "header":
            if self.strict:
                raise HarmonyError(f"output ended inside a message header: {self._header_so_far()!r}")
            self._recover_message()
        return self

    def _token_text(self, token: int) -> str:
        return self.tokenizer.decode_single_token_bytes(token).decode("utf-8", errors="replace")

    def _header_so_far(self) -> str:
        return self.tokenizer.decode_bytes(self._header_tokens).decode("utf-8", errors="replace")

    def _expect_start(self, token: int) -> None:
        if token == START:
            self._state = "header"
        elif not self.strict and token in STOP_TOKENS:
            pass  # e.g. <|return|> right after <|end|>: nothing more was said
        else:
            raise HarmonyError(
                f"expected <|start|> to begin a message, got {self._token_text(token)!r} (id {token})"
            )

    def _header_token(self, token: int) -> None:
        if token == MESSAGE:
            self._start_content()
        elif not self.strict and token in STOP_TOKENS:
            self._recover_message()
        else:
            self._header_tokens.append(token)

    def _decoded_header(self) -> str:
        try:
            return self.tokenizer.decode_bytes(self._header_tokens).decode("utf-8")
        except UnicodeDecodeError:
            raise HarmonyError(f"message header is not valid UTF-8: {self._header_so_far()!r}") from None

    def _start_content(self) -> None:
        self._header = parse_header(self._decoded_header(), self._next_role)
        self._next_role = None
        self._header_tokens = []
        self._state = "content"

    def _recover_message(self) -> None:
        """Non-strict: a header that never reached `<|message|>` becomes a message when it can be read
        (a role and channel, then text); one that cannot (no known role, bad UTF-8) is dropped."""
        try:
            if self._header_tokens:
                header, text = _recover_header(self._decoded_header(), self._next_role)
                self.messages.append(Message(header.role, text, name=header.name, channel=header.channel))
        except HarmonyError:
            pass  # nothing readable was said; openai-harmony drops such headers too
        self._header_tokens = []
        self._next_role = None
        self._state = "expect_start"

    def _content_token(self, token: int) -> None:
        if token in STOP_TOKENS:
            self._finish_message()
            return
        text = self._utf8.decode(self.tokenizer.decode_single_token_bytes(token))
        self.last_content_delta = text or None
        if text:
            self._content.append(text)

    def _finish_message(self) -> None:
        tail = self._utf8.decode(b"", final=True)  # an incomplete character becomes U+FFFD
        header = self._header
        assert header is not None
        self.messages.append(
            Message(header.role, self.current_content + tail, name=header.name, channel=header.channel,
                    recipient=header.recipient, content_type=header.content_type)
        )
        self._header = None
        self._content = []
        self._utf8.reset()
        self.last_content_delta = None
        self._state = "expect_start"


def parse_messages_from_completion_tokens(
    tokens: Iterable[int],
    role: Role | None = None,
    *,
    strict: bool = True,
    tokenizer: tiktoken.Encoding | None = None,
) -> list[Message]:
    """Parse a finished completion into messages (see `StreamParser` for `role` and `strict`)."""
    parser = StreamParser(role, strict=strict, tokenizer=tokenizer)
    for token in tokens:
        parser.process(token)
    return parser.process_eos().messages


# ---------------------------------------------------------------------------------------------------
# Python functions -> tool descriptions
# ---------------------------------------------------------------------------------------------------

_PRIMITIVE_SCHEMAS: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
}
_ARRAY_ORIGINS = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Collection,
                  collections.abc.Iterable)
_DOC_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Examples?)\s*:\s*$")
_DOC_ARGUMENT = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")  # name (type): text


def _enum_schema(values: list[Any]) -> dict[str, Any]:
    """An enum, typed when all its values share a JSON type (the renderer shows string enums only)."""
    for python_type, schema in _PRIMITIVE_SCHEMAS.items():
        if all(type(v) is python_type for v in values):
            return {**schema, "enum": values}
    return {"enum": values}


def type_to_schema(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a type hint: str/int/float/bool, Literal, Enum, lists and tuples, dicts,
    dataclasses (nested objects), Optional (nullable) and other unions (oneOf); Any or no hint is `{}`."""
    if annotation in (inspect.Parameter.empty, Any):
        return {}
    if annotation in _PRIMITIVE_SCHEMAS:
        return dict(_PRIMITIVE_SCHEMAS[annotation])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _enum_schema([member.value for member in annotation])
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return _dataclass_schema(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return _enum_schema(list(args))
    if origin in (typing.Union, types.UnionType):
        return _union_schema(args)
    if annotation in (list, tuple, set, frozenset) or origin in _ARRAY_ORIGINS:
        item_types = {a for a in args if a is not Ellipsis}  # tuple[int, ...] has items int
        if len(item_types) != 1:
            return {"type": "array"}  # list, or tuple[int, str]: items of mixed or unknown type
        return {"type": "array", "items": type_to_schema(item_types.pop())}
    if annotation is dict or origin in (dict, collections.abc.Mapping):
        return {"type": "object"}
    raise HarmonyError(f"cannot describe type {annotation!r} as a JSON schema")


def _union_schema(members: tuple[Any, ...]) -> dict[str, Any]:
    """`X | None` is X, nullable; any other union is a oneOf of its members."""
    present = [m for m in members if m is not type(None)]
    schema = type_to_schema(present[0]) if len(present) == 1 else {"oneOf": [type_to_schema(m) for m in present]}
    return {**schema, "nullable": True} if len(present) < len(members) else schema


def _dataclass_schema(cls: type) -> dict[str, Any]:
    """A dataclass as a nested object: fields without defaults are required."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    properties = {f.name: type_to_schema(hints.get(f.name, Any)) for f in fields}
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    return {"type": "object", "properties": properties, **({"required": required} if required else {})}


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a docstring into its description (the text before any `Args:`-like section) and the
    per-argument descriptions of a Google-style `Args:` section (`name (type): text`, continued on
    more-indented lines)."""
    description: list[str] = []
    arguments: dict[str, str] = {}
    section, current, argument_indent = None, None, None
    for line in doc.splitlines():
        header = _DOC_SECTION.match(line)
        if header:
            section, current, argument_indent = header.group(1), None, None
            continue
        if section is None:
            description.append(line)
            continue
        if section not in ("Args", "Arguments", "Parameters") or not line.strip():
            continue
        match = _DOC_ARGUMENT.match(line)
        indent = len(line) - len(line.lstrip())
        if match and (argument_indent is None or indent <= argument_indent):
            argument_indent, current = indent, match.group(1).lstrip("*")
            arguments[current] = match.group(2).strip()
        elif current is not None:
            arguments[current] = (arguments[current] + " " + line.strip()).strip()
    return "\n".join(description).strip(), arguments


def _json_default(value: Any) -> Any | None:
    """A default value as JSON data (an Enum by its value); None when there is no default, it is
    None (the nullable type already says so), or it has no JSON form."""
    value = value.value if isinstance(value, enum.Enum) else value
    if value is inspect.Parameter.empty:
        return None
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def _parameter_schema(parameter: inspect.Parameter, hint: Any, doc: str | None) -> dict[str, Any]:
    """One argument's schema: its type, its docstring line, its default when it has a JSON one."""
    schema = type_to_schema(hint)
    if doc:
        schema["description"] = doc
    default = _json_default(parameter.default)
    if default is not None:
        schema["default"] = default
    return schema


def tool_from_function(function: Callable[..., Any]) -> ToolDescription:
    """Describe a plain Python function as a harmony tool: its name, its docstring's description,
    and a JSON schema built from its type hints (arguments without defaults are required).

    Only named arguments can be described: *args/**kwargs raise HarmonyError, as do type hints with no
    JSON equivalent.
    """
    description, argument_docs = _parse_docstring(inspect.getdoc(function) or "")
    hints = typing.get_type_hints(function)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise HarmonyError(f"tool {function.__name__}: *{name} cannot be described; use named arguments")
        try:
            hint = hints.get(name, parameter.annotation)
            properties[name] = _parameter_schema(parameter, hint, argument_docs.get(name))
        except HarmonyError as err:
            raise HarmonyError(f"tool {function.__name__}, argument {name!r}: {err}") from None
        if parameter.default is inspect.Parameter.empty:
            required.append(name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return ToolDescription(function.__name__, description, parameters if properties else None)
