"""tinyoss.harmony against openai-harmony (the reference renderer/parser), plus malformed output.

openai-harmony is optional: tests that compare with it skip cleanly without it. It loads its
tokenizer from TIKTOKEN_ENCODINGS_BASE, which we point at a temp copy of the verified ranks (no network).
"""

import enum
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tinyoss import harmony as h
from tinyoss.errors import TinyossError
from tinyoss.tokenizer import (CALL, CHANNEL, CONSTRAIN, END, END_OF_TEXT, MESSAGE, RETURN, START, get_tokenizer)

DATA = Path(__file__).parent / "data"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------------
# The reference, and conversion of our messages to and from its types
# ---------------------------------------------------------------------------------------------------


def tools_to_reference(oh: Any, tools: list[h.ToolDescription]) -> list[Any]:
    return [oh.ToolDescription(name=t.name, description=t.description, parameters=t.parameters) for t in tools]


def namespace_to_reference(oh: Any, namespace: h.ToolNamespace) -> Any:
    return oh.ToolNamespaceConfig(name=namespace.name, description=namespace.description,
                                  tools=tools_to_reference(oh, namespace.tools))


def to_reference(oh: Any, message: h.Message) -> Any:
    content = message.content
    if isinstance(content, h.SystemContent):
        effort = content.reasoning_effort
        system = oh.SystemContent(
            model_identity=content.model_identity,
            knowledge_cutoff=content.knowledge_cutoff,
            conversation_start_date=content.conversation_start_date,
            reasoning_effort=None if effort is None else oh.ReasoningEffort[h.ReasoningEffort(effort).name],
            channel_config=oh.ChannelConfig(
                valid_channels=list(content.valid_channels), channel_required=content.channel_required
            ),
        )
        for namespace in content.namespaces:
            system = system.with_tools(namespace_to_reference(oh, namespace))
        content = system
    elif isinstance(content, h.DeveloperContent):
        developer = oh.DeveloperContent(instructions=content.instructions)
        for namespace in content.namespaces:
            developer = developer.with_tools(namespace_to_reference(oh, namespace))
        if content.tools:
            developer = developer.with_function_tools(tools_to_reference(oh, content.tools))
        content = developer
    else:
        content = oh.TextContent(text=content)
    return oh.Message(author=oh.Author(role=oh.Role(message.role.value), name=message.name), content=[content],
                      channel=message.channel, recipient=message.recipient, content_type=message.content_type)


def from_reference(message: Any) -> h.Message:
    """Our Message for one of openai-harmony's parsed messages.

    One known difference is undone here: openai-harmony 0.0.8 (the latest release) reads a lone
    `<|constrain|>json` header word as the *recipient*; its main branch has since fixed that to a
    content type, which is what tinyoss does (a call to a tool named "<|constrain|>json" helps no one).
    """
    [content] = message.content
    recipient, content_type = message.recipient, message.content_type
    if recipient is not None and recipient.startswith("<|constrain|>") and content_type is None:
        recipient, content_type = None, recipient
    return h.Message(h.Role(message.author.role.value), content.text, name=message.author.name,
                     channel=message.channel, recipient=recipient, content_type=content_type)


def conversation(oh: Any, messages: list[h.Message]) -> Any:
    return oh.Conversation.from_messages([to_reference(oh, m) for m in messages])


def outcome(parse: Any) -> Any:
    """What a call returns, or ("error", the exception's type name) when it raises."""
    try:
        return parse()
    except Exception as error:  # noqa: BLE001 -- openai-harmony raises its own error types
        return "error", type(error).__name__


# ---------------------------------------------------------------------------------------------------
# Hypothesis strategies: conversations, tools, JSON schemas
# ---------------------------------------------------------------------------------------------------

TRICKY_TEXT = ["", "<|start|>", "<|end|><|return|>", " to=functions.x", "<|channel|>final", "\n\n  \t",
               "日本語 🎉 👨‍👩‍👧", '{"a": [1, 2], "b": null}', "a\r\nb", "quote \" back\\slash"]
text = st.one_of(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=30), st.sampled_from(TRICKY_TEXT))
names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
# Floats with few significant digits, as defaults are in practice: openai-harmony's JSON reader rounds
# some 17-digit floats (and long integers beyond 64 bits) 1 ulp off, which no renderer of the *given*
# value can reproduce.
short_floats = st.builds(lambda mantissa, exponent: float(f"{mantissa}e{exponent}"),
                         st.integers(-9999, 9999), st.integers(-20, 20))
huge_integers = st.sampled_from([2**64, -(2**63) - 1, 10**20])  # serde_json reads these as floats
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), huge_integers, short_floats,
                         st.text(max_size=8))
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)
schema_keywords = st.fixed_dictionaries({}, optional={
    "description": text, "default": json_values, "nullable": st.booleans(), "title": text,
    "examples": st.lists(json_scalars, max_size=2),
})
leaf_schemas = st.one_of(
    st.sampled_from([{"type": "string"}, {"type": "number"}, {"type": "integer"}, {"type": "boolean"}, {},
                     {"type": "null"}, {"type": ["string", "null"]}, {"type": ["integer", "number"]}]),
    st.lists(st.text(max_size=6), min_size=1, max_size=3).map(lambda values: {"type": "string", "enum": values}),
    st.lists(st.integers(0, 9), min_size=1, max_size=3).map(lambda values: {"type": "integer", "enum": values}),
)


def with_keywords(schemas: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(schemas, schema_keywords).map(lambda pair: {**pair[0], **pair[1]})


def object_schemas(children: st.SearchStrategy) -> st.SearchStrategy:
    def with_required(properties: dict) -> st.SearchStrategy:
        required = st.lists(st.sampled_from(sorted(properties)), unique=True) if properties else st.just([])
        return required.map(lambda r: {"type": "object", "properties": properties, "required": r})

    return st.dictionaries(names, children, max_size=4).flatmap(with_required)


def compound_schemas(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        children.map(lambda items: {"type": "array", "items": items}),
        st.just({"type": "array"}),
        object_schemas(children),
        st.lists(children, min_size=1, max_size=3).map(lambda variants: {"oneOf": variants}),
    )


schemas = st.recursive(with_keywords(leaf_schemas), lambda c: with_keywords(compound_schemas(c)), max_leaves=8)
# Text made of line breaks of every kind: Rust's str::lines (which openai-harmony uses on descriptions)
# splits on \n only, where Python's splitlines also splits on \r, \x0b, \x0c, \x1c-\x1e, \x85, \u2028, \u2029.
LINE_PIECES = ["a", "b c", " ", "\r", "\n", "\r\n", "\n\r", "\r\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
               "\u2028", "\u2029", "// x"]
lined_text = st.lists(st.sampled_from(LINE_PIECES), max_size=8).map("".join)
descriptions = st.one_of(text, lined_text)
tools = st.builds(h.ToolDescription, names, descriptions,
                  st.one_of(st.none(), object_schemas(schemas), schemas))
namespace_names = st.one_of(names, st.sampled_from(["functions", "browser", "python", "container", "Zeta", "é"]))
namespaces = st.one_of(
    st.builds(h.ToolNamespace, namespace_names, st.none() | descriptions, st.lists(tools, max_size=2)),
    st.sampled_from([h.ToolNamespace.browser, h.ToolNamespace.python]).map(lambda builtin: builtin()),
)
namespace_lists = st.lists(namespaces, max_size=3, unique_by=lambda namespace: namespace.name)
system_contents = st.builds(
    h.SystemContent,
    model_identity=st.none() | text, knowledge_cutoff=st.none() | text, conversation_start_date=st.none() | text,
    reasoning_effort=st.none() | st.sampled_from(list(h.ReasoningEffort)) | st.sampled_from(["low", "high"]),
    valid_channels=st.lists(st.sampled_from(h.CHANNELS + ("extra",)), unique=True, max_size=4).map(tuple),
    channel_required=st.booleans(),
    namespaces=st.one_of(st.just([]), namespace_lists),
)


@st.composite
def developer_contents(draw: st.DrawFn) -> h.DeveloperContent:
    """Instructions, functions, and other namespaces (a `functions` one only when there are no functions)."""
    functions = draw(st.lists(tools, max_size=3))
    others = draw(st.one_of(st.just([]), namespace_lists))
    others = [namespace for namespace in others if not (functions and namespace.name == "functions")]
    return h.DeveloperContent(draw(st.none() | text), functions, others)


channels = st.sampled_from(h.CHANNELS)
function_names = st.one_of(names.map(lambda n: f"functions.{n}"),
                           st.sampled_from(["browser.search", "browser.open", "python", "container.exec"]))


@st.composite
def assistant_messages(draw: st.DrawFn, well_formed: bool = False) -> h.Message:
    """An assistant message; well_formed ones parse back to themselves (a content type needs a
    recipient or the <|constrain|> marker, else the parser reads it as the recipient)."""
    recipient = draw(st.none() | function_names | (st.nothing() if well_formed else st.just("all")))
    content_types = [None, h.JSON_CONTENT_TYPE] + (["json"] if recipient or not well_formed else [])
    channel = draw(channels if well_formed else st.none() | channels)
    return h.Message(h.Role.ASSISTANT, draw(text), channel=channel, recipient=recipient,
                     content_type=draw(st.sampled_from(content_types)))


tool_messages = st.builds(lambda name, body, channel: h.Message(h.Role.TOOL, body, name=name, channel=channel,
                                                                recipient="assistant"),
                          function_names, text, channels)
user_messages = st.builds(lambda body, name: h.Message(h.Role.USER, body, name=name), text, st.none() | names)


@st.composite
def conversations(draw: st.DrawFn) -> list[h.Message]:
    head = []
    if draw(st.booleans()):
        head.append(h.Message(h.Role.SYSTEM, draw(system_contents)))
    if draw(st.booleans()):
        head.append(h.Message(h.Role.DEVELOPER, draw(developer_contents())))
    body = draw(st.lists(st.one_of(user_messages, assistant_messages(), tool_messages), max_size=6))
    return head + body


completions = st.lists(st.one_of(assistant_messages(well_formed=True), tool_messages), min_size=1, max_size=4)


# ---------------------------------------------------------------------------------------------------
# Rendering is token-identical
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(messages=conversations(), next_role=st.sampled_from(list(h.Role)), auto_drop=st.booleans())
def test_render_conversation_for_completion_matches(oh: Any, reference: Any, messages: list[h.Message],
                                                    next_role: h.Role, auto_drop: bool) -> None:
    config = oh.RenderConversationConfig(auto_drop_analysis=auto_drop)
    their_conversation = conversation(oh, messages)
    expected = reference.render_conversation_for_completion(their_conversation, oh.Role(next_role.value), config)
    assert h.render_conversation_for_completion(messages, next_role, auto_drop_analysis=auto_drop) == expected
    expected = reference.render_conversation(their_conversation, config)
    assert h.render_conversation(messages, auto_drop_analysis=auto_drop) == expected


@SETTINGS
@given(message=st.one_of(user_messages, assistant_messages(), tool_messages, system_contents.map(h.Message.system),
                         developer_contents().map(lambda content: h.Message(h.Role.DEVELOPER, content))),
       has_tools=st.booleans())
def test_render_message_matches(oh: Any, reference: Any, message: h.Message, has_tools: bool) -> None:
    options = oh.RenderOptions(conversation_has_function_tools=has_tools)
    expected = reference.render(to_reference(oh, message), options)
    assert h.render_message(message, has_function_tools=has_tools) == expected


@SETTINGS
@given(schema=schemas)
def test_any_schema_renders_like_openai_harmony(oh: Any, reference: Any, schema: dict) -> None:
    message = h.Message.developer(tools=[h.ToolDescription("f", "desc", schema)])
    assert h.render_message(message) == reference.render(to_reference(oh, message))


@settings(max_examples=150, deadline=None)
@given(description=descriptions, namespace_description=st.none() | descriptions, with_tools=st.booleans())
@example(description="a\r", namespace_description="b\r", with_tools=True)  # a last \r without \n stays
@example(description="a\r\n\nb\n\r", namespace_description="\n", with_tools=False)
@example(description="a\x0bb\x0cc\x1cd\x85e\u2028f\u2029g", namespace_description="x\x1d\x1e", with_tools=True)
def test_descriptions_split_into_lines_as_rust_does(oh: Any, reference: Any, description: str,
                                                    namespace_description: str | None, with_tools: bool) -> None:
    """One `// ` line per line of a tool's or a namespace's description, split as Rust's str::lines splits."""
    tools = [h.ToolDescription("f", description)] if with_tools else []
    namespace = h.ToolNamespace("ns", namespace_description, tools)
    message = h.Message.developer(tools=[h.ToolDescription("g", description)], namespaces=[namespace])
    assert h.render_message(message) == reference.render(to_reference(oh, message))


@settings(max_examples=100, deadline=None)
@given(system=system_contents, developer=developer_contents(), next_role=st.sampled_from(list(h.Role)))
def test_system_and_developer_messages_match(oh: Any, reference: Any, system: h.SystemContent,
                                             developer: h.DeveloperContent, next_role: h.Role) -> None:
    """Identity, cutoff, date, effort, channels and every kind of tool namespace, token for token (the
    system message names the functions channel rule only when the developer message has functions)."""
    messages = [h.Message(h.Role.SYSTEM, system), h.Message(h.Role.DEVELOPER, developer), h.Message.user("Hi")]
    expected = reference.render_conversation_for_completion(conversation(oh, messages), oh.Role(next_role.value))
    assert h.render_conversation_for_completion(messages, next_role) == expected


def test_builtin_tools_are_openai_harmonys(oh: Any, reference: Any) -> None:
    assert namespace_to_reference(oh, h.ToolNamespace.browser()) == oh.ToolNamespaceConfig.browser()
    assert namespace_to_reference(oh, h.ToolNamespace.python()) == oh.ToolNamespaceConfig.python()
    h.ToolNamespace.browser().tools[0].parameters["required"].append("topn")  # each call gives a fresh copy
    assert h.ToolNamespace.browser().tools[0].parameters["required"] == ["query"]

    system = h.SystemContent(conversation_start_date="2025-08-05",
                             namespaces=[h.ToolNamespace.python(), h.ToolNamespace.browser()])
    messages = [h.Message.system(system), h.Message.developer("Be brief.", [h.ToolDescription("f", "Does f.")]),
                h.Message.user("Look it up.")]
    theirs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new().with_conversation_start_date(
                  "2025-08-05").with_python_tool().with_browser_tool()),
              oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(
                  "Be brief.").with_function_tools([oh.ToolDescription.new("f", "Does f.")])),
              oh.Message.from_role_and_content(oh.Role.USER, "Look it up.")]
    ids = h.render_conversation_for_completion(messages)
    assert ids == reference.render_conversation_for_completion(oh.Conversation.from_messages(theirs), oh.Role.ASSISTANT)
    rendered = get_tokenizer().decode(ids)
    assert "Reasoning: medium\n\n# Tools\n\n## browser\n\n// Tool for browsing.\n" in rendered
    assert "} // namespace browser\n\n## python\n\nUse this tool to execute Python code" in rendered  # no `//`
    assert "Depends on the cluster.\n\n# Valid channels: analysis, commentary, final. Channel must be included " \
           "for every message.\nCalls to these tools must go to the commentary channel: 'functions'.<|end|>" in rendered


def test_empty_tool_list_renders_like_openai_harmony(oh: Any, reference: Any) -> None:
    messages = [h.Message.system(), h.Message.developer("Hi.", namespaces=[h.ToolNamespace("functions")])]
    theirs = [oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new()),
              oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(
                  "Hi.").with_function_tools([]))]
    ids = h.render_conversation(messages)
    assert ids == reference.render_conversation(oh.Conversation.from_messages(theirs))
    rendered = get_tokenizer().decode(ids)
    assert rendered.endswith("<|message|># Instructions\n\nHi.\n\n# Tools\n\n## functions\n<|end|>")
    assert "Calls to these tools" not in rendered  # no functions, so no rule for calling them
    assert h.tools_section([]) == "# Tools\n\n## functions\n"


def test_namespace_with_description_renders_like_openai_harmony(oh: Any, reference: Any) -> None:
    weather = h.ToolDescription("get", "Gets the weather.", {"type": "object", "properties": {}})
    namespaces = [h.ToolNamespace("weather", "Weather tools.\nMetric units.", [weather]),
                  h.ToolNamespace("functions", "Plain functions.", [h.ToolDescription("f", "Does f.")])]
    message = h.Message.developer(namespaces=namespaces)
    assert h.render_message(message) == reference.render(to_reference(oh, message))
    assert get_tokenizer().decode(h.render_message(message)) == (
        "<|start|>developer<|message|># Tools\n\n## functions\n\n// Plain functions.\nnamespace functions {\n\n"
        "// Does f.\ntype f = () => any;\n\n} // namespace functions\n\n## weather\n\n// Weather tools.\n"
        "// Metric units.\nnamespace weather {\n\n// Gets the weather.\ntype get = (_: {\n}) => any;\n\n"
        "} // namespace weather<|end|>")
    assert h.tools_section(namespaces) in get_tokenizer().decode(h.render_message(message))


def test_known_conversation_renders_as_documented(oh: Any, reference: Any) -> None:
    weather = h.ToolDescription("get_weather", "Gets the weather.", {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "City and country"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            "days": {"type": "array", "items": {"type": "integer"}},
            "options": {"type": "object", "properties": {"hourly": {"type": "boolean"}}, "required": ["hourly"]},
        },
        "required": ["location"],
    })
    messages = [
        h.Message.system(h.SystemContent(conversation_start_date="2025-08-05", reasoning_effort="high")),
        h.Message.developer("Answer briefly.", [weather]),
        h.Message.user("Weather in Paris?"),
        h.Message.assistant("Need the tool.", channel="analysis"),
        h.Message.tool_call("get_weather", '{"location":"Paris"}'),
        h.Message.tool_result("get_weather", '{"temp": 20}'),
    ]
    ids = h.render_conversation_for_completion(messages)
    assert ids == reference.render_conversation_for_completion(conversation(oh, messages), oh.Role.ASSISTANT)
    rendered = get_tokenizer().decode(ids)
    assert rendered.endswith(
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        '{"location":"Paris"}<|call|><|start|>functions.get_weather to=assistant<|channel|>commentary'
        '<|message|>{"temp": 20}<|end|><|start|>assistant'
    )
    assert (
        "namespace functions {\n\n// Gets the weather.\ntype get_weather = (_: {\n// City and country\n"
        'location: string,\nunit?: "celsius" | "fahrenheit", // default: celsius\ndays?: number[],\n'
        "options?: {\n    hourly: boolean,\n    },\n}) => any;\n\n} // namespace functions<|end|>"
    ) in rendered
    assert "Reasoning: high\n\n# Valid channels: analysis, commentary, final. Channel must be included for " \
           "every message.\nCalls to these tools must go to the commentary channel: 'functions'.<|end|>" in rendered


def test_old_analysis_is_dropped_once_there_is_a_final_answer() -> None:
    messages = [h.Message.user("q1"), h.Message.assistant("thinking 1", "analysis"), h.Message.assistant("a1"),
                h.Message.user("q2"), h.Message.assistant("thinking 2", "analysis"), h.Message.assistant("a2")]
    text = get_tokenizer().decode(h.render_conversation(messages))
    assert "thinking 1" not in text and "thinking 2" in text  # as openai-harmony: only before the first final
    assert "thinking 1" in get_tokenizer().decode(h.render_conversation(messages, auto_drop_analysis=False))


def test_agrees_with_the_checkpoint_chat_template() -> None:
    """The HF chat template shipped with gpt-oss-20b gives the same text, except that it writes a call's
    content type as plain `json` where openai-harmony writes `<|constrain|>json`."""
    jinja2 = pytest.importorskip("jinja2")
    environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    environment.globals["strftime_now"] = lambda fmt: "2025-08-05"
    environment.filters["tojson"] = lambda value, **_: json.dumps(value, ensure_ascii=False)
    template = environment.from_string((DATA / "gpt_oss_20b_chat_template.jinja").read_text())
    parameters = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                  "unit": {"type": "string", "enum": ["c", "f"]}, "days": {"type": "integer"}}, "required": ["city"]}
    expected = template.render(
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "thinking": "need tool",
                   "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "sunny"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                                                 "parameters": parameters}}],
        add_generation_prompt=True, reasoning_effort="low",
    )
    call = h.Message.tool_call("get_weather", json.dumps({"city": "Paris"}))
    call.content_type = "json"
    messages = [h.Message.system(h.SystemContent(conversation_start_date="2025-08-05", reasoning_effort="low")),
                h.Message.developer("Be brief.", [h.ToolDescription("get_weather", "Get the weather", parameters)]),
                h.Message.user("Weather in Paris?"), h.Message.assistant("need tool", "analysis"), call,
                h.Message.tool_result("get_weather", json.dumps("sunny"))]
    assert get_tokenizer().decode(h.render_conversation_for_completion(messages)) == expected


def test_render_errors_are_clear() -> None:
    with pytest.raises(h.HarmonyError, match="tool's name"):
        h.render_message(h.Message(h.Role.TOOL, "result"))
    with pytest.raises(h.HarmonyError, match="SystemContent"):
        h.render_message(h.Message(h.Role.USER, h.SystemContent()))
    with pytest.raises(h.HarmonyError, match="DeveloperContent"):
        h.render_message(h.Message(h.Role.ASSISTANT, h.DeveloperContent()))
    with pytest.raises(h.HarmonyError, match="'browser' is given twice"):
        h.render_message(h.Message.system(h.SystemContent(namespaces=[h.ToolNamespace.browser()] * 2)))
    with pytest.raises(h.HarmonyError, match="'functions' is given twice"):
        h.render_message(h.Message.developer(tools=[h.ToolDescription("f", "")],
                                             namespaces=[h.ToolNamespace("functions", "Functions.")]))
    assert issubclass(h.HarmonyError, TinyossError)


# ---------------------------------------------------------------------------------------------------
# Rendering for training: a final answer ends with <|return|>
# ---------------------------------------------------------------------------------------------------


@SETTINGS
@given(messages=conversations(), last=st.none() | text.map(h.Message.assistant) | assistant_messages(),
       auto_drop=st.booleans())
def test_render_conversation_for_training_matches(oh: Any, reference: Any, messages: list[h.Message],
                                                  last: h.Message | None, auto_drop: bool) -> None:
    messages = messages + ([last] if last is not None else [])
    config = oh.RenderConversationConfig(auto_drop_analysis=auto_drop)
    expected = reference.render_conversation_for_training(conversation(oh, messages), config)
    assert h.render_conversation_for_training(messages, auto_drop_analysis=auto_drop) == expected


def test_training_ends_a_final_answer_with_return(oh: Any, reference: Any) -> None:
    messages = [h.Message.user("Hi"), h.Message.assistant("greet", "analysis"), h.Message.assistant("Hello!")]
    ids = h.render_conversation_for_training(messages)
    assert ids == reference.render_conversation_for_training(conversation(oh, messages))
    assert get_tokenizer().decode(ids) == ("<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final"
                                           "<|message|>Hello!<|return|>")  # analysis before the answer dropped
    assert h.render_conversation_for_training(messages[:2]) == h.render_conversation(messages[:2])  # no answer yet
    assert h.render_conversation_for_training([]) == []


@SETTINGS
@given(messages=completions, answer=text)
def test_training_rendering_parses_back(oh: Any, reference: Any, messages: list[h.Message], answer: str) -> None:
    messages = messages + [h.Message.assistant(answer)]
    ids = h.render_conversation_for_training(messages, auto_drop_analysis=False)
    assert ids[-1] == RETURN
    assert h.parse_messages_from_completion_tokens(ids, None) == messages
    assert [from_reference(m) for m in reference.parse_messages_from_completion_tokens(ids, None)] == messages


# ---------------------------------------------------------------------------------------------------
# Parsing recovers the same messages
# ---------------------------------------------------------------------------------------------------


def completion_tokens(messages: list[h.Message]) -> list[int]:
    """What a model would write after `<|start|>assistant`: the rendering minus those first tokens."""
    ids = h.render_conversation(messages, auto_drop_analysis=False)
    prefix = [START] + get_tokenizer().encode_ordinary("assistant")
    assert ids[: len(prefix)] == prefix
    return ids[len(prefix):]


@SETTINGS
@given(messages=completions)
def test_parse_recovers_rendered_messages(oh: Any, reference: Any, messages: list[h.Message]) -> None:
    ids = h.render_conversation(messages, auto_drop_analysis=False)
    assert h.parse_messages_from_completion_tokens(ids, None) == messages
    assert [from_reference(m) for m in reference.parse_messages_from_completion_tokens(ids, None)] == messages
    if messages[0].role is h.Role.ASSISTANT:
        parsed = h.parse_messages_from_completion_tokens(completion_tokens(messages), h.Role.ASSISTANT)
        assert parsed == messages


def stream_view(parser: Any) -> tuple:
    """What a streaming parser exposes, with from_reference's recipient/content-type fix applied."""
    role = None if parser.current_role is None else h.Role(parser.current_role.value)
    recipient, content_type = parser.current_recipient, parser.current_content_type
    if recipient is not None and recipient.startswith("<|constrain|>") and content_type is None:
        recipient, content_type = None, recipient
    return (role, parser.current_channel, recipient, content_type, parser.current_content,
            parser.last_content_delta)


def assert_same_stream(oh: Any, reference: Any, tokens: list[int], role: h.Role | None, strict: bool) -> None:
    """Feed both parsers token by token; while neither fails, everything they expose must agree."""
    ours = h.StreamParser(role, strict=strict)
    theirs = oh.StreamableParser(reference, None if role is None else oh.Role(role.value), strict=strict)
    for token in tokens + [None]:
        step = (lambda p: p.process_eos()) if token is None else (lambda p: p.process(token))
        our_error, their_error = outcome(lambda: step(ours)), outcome(lambda: step(theirs))
        assert isinstance(our_error, tuple) == isinstance(their_error, tuple), (token, our_error, their_error)
        if isinstance(our_error, tuple):
            assert our_error[0] == "error" and our_error[1] == "HarmonyError"
            return
        our_view, their_view = stream_view(ours), stream_view(theirs)
        if "\ufffd" in our_view[4] + their_view[4]:
            # After invalid UTF-8, openai-harmony holds back the rest of that token's text until the next
            # token; we emit it at once. Deltas differ in timing only: the finished messages are equal.
            our_view, their_view = our_view[:4], their_view[:4]
        assert our_view == their_view
        assert ours.messages == [from_reference(m) for m in theirs.messages]


@SETTINGS
@given(messages=completions)
def test_stream_parser_matches_step_by_step(oh: Any, reference: Any, messages: list[h.Message]) -> None:
    assert_same_stream(oh, reference, h.render_conversation(messages, auto_drop_analysis=False), None, True)
    if messages[0].role is h.Role.ASSISTANT:
        assert_same_stream(oh, reference, completion_tokens(messages), h.Role.ASSISTANT, True)


@functools.cache
def pieces() -> list[list[int]]:
    """Building blocks of plausible and implausible model output, including bytes of split characters."""
    enc = get_tokenizer()
    words = ["assistant", "user", "tool", "final", "analysis", "commentary", " to=functions.f", " to=assistant",
             "functions.f", " ", "json", " json", "Hello", " world", "bogus", "to=x"]
    specials = [[t] for t in (START, END, RETURN, CALL, MESSAGE, CHANNEL, CONSTRAIN, END_OF_TEXT)]
    split_bytes = [[enc.encode_single_token(bytes([b]))] for b in (0xE6, 0x97, 0xA5, 0xC3, 0xA9, 0xFF, 0x80)]
    return [enc.encode_ordinary(w) for w in words] + specials + split_bytes


some_piece = st.deferred(lambda: st.sampled_from(pieces()))  # built on first use, not at import
piece_soup = st.lists(some_piece, max_size=25).map(lambda picks: [t for piece in picks for t in piece])


@st.composite
def damaged_completions(draw: st.DrawFn) -> list[int]:
    """Well-formed output with a few tokens inserted, deleted, or the end cut off."""
    tokens = h.render_conversation(draw(completions), auto_drop_analysis=False)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(tokens)))
        damage = draw(st.sampled_from(["insert", "delete", "truncate"]))
        if damage == "insert":
            tokens = tokens[:at] + draw(some_piece) + tokens[at:]
        else:
            tokens = tokens[:at] + (tokens[at + 1:] if damage == "delete" else [])
    return tokens


@st.composite
def fuzz_streams(draw: st.DrawFn) -> tuple[list[int], h.Role | None]:
    """Output to parse, and the role the prompt gave (ASSISTANT when the stream's own was cut off)."""
    tokens = draw(st.one_of(piece_soup, damaged_completions()))
    prefix = [START] + get_tokenizer().encode_ordinary("assistant")
    if tokens[: len(prefix)] == prefix and draw(st.booleans()):
        return tokens[len(prefix):], h.Role.ASSISTANT
    return tokens, draw(st.sampled_from([None, h.Role.ASSISTANT]))


@settings(max_examples=300, deadline=None)
@given(stream=fuzz_streams())
def test_strict_parser_agrees_with_openai_harmony_on_any_stream(oh: Any, reference: Any,
                                                                 stream: tuple[list[int], h.Role | None]) -> None:
    """Same messages, same streaming state, and an error exactly when openai-harmony errs."""
    tokens, role = stream
    assert_same_stream(oh, reference, tokens, role, strict=True)
    theirs_role = None if role is None else oh.Role(role.value)
    theirs = outcome(lambda: [from_reference(m) for m in
                              reference.parse_messages_from_completion_tokens(tokens, theirs_role, strict=True)])
    ours = outcome(lambda: h.parse_messages_from_completion_tokens(tokens, role))
    assert ours == theirs or (ours == ("error", "HarmonyError") and theirs[0] == "error")


@settings(max_examples=300, deadline=None)
@given(stream=fuzz_streams())
def test_lenient_parser_recovers_at_least_what_openai_harmony_does(oh: Any, reference: Any,
                                                                    stream: tuple[list[int], h.Role | None]) -> None:
    tokens, role = stream
    theirs_role = None if role is None else oh.Role(role.value)
    theirs = outcome(lambda: [from_reference(m) for m in
                              reference.parse_messages_from_completion_tokens(tokens, theirs_role, strict=False)])
    ours = outcome(lambda: h.parse_messages_from_completion_tokens(tokens, role, strict=False))
    if isinstance(ours, tuple):
        assert ours == ("error", "HarmonyError")
    if not isinstance(theirs, tuple):
        assert not isinstance(ours, tuple), "openai-harmony recovered this stream; we must too"
        remaining = iter(ours)
        assert all(any(m == candidate for candidate in remaining) for m in theirs)  # theirs is a subsequence


# ---------------------------------------------------------------------------------------------------
# Malformed model output: a clear result or a clear HarmonyError, never a crash
# ---------------------------------------------------------------------------------------------------


def model_output(text: str) -> list[int]:
    return get_tokenizer().encode(text, allowed_special="all")


FINAL_HI = h.Message(h.Role.ASSISTANT, "Hi", channel="final")
CALL_F = h.Message(h.Role.ASSISTANT, "{}", channel="commentary", recipient="functions.f",
                   content_type=h.JSON_CONTENT_TYPE)
MALFORMED = {  # name: (output after <|start|>assistant, strict result, lenient result); "error" = HarmonyError
    "return after end": ("<|channel|>final<|message|>Hi<|end|><|return|>", "error", [FINAL_HI]),
    "call after end": ("<|channel|>final<|message|>Hi<|end|><|call|>", "error", [FINAL_HI]),
    "missing message token": ("<|channel|>final Hi<|end|>", "error", [FINAL_HI]),
    "missing message token, later message": (
        "<|channel|>final<|message|>Hi<|end|><|start|>assistant<|channel|>final Hi<|return|>",
        "error", [FINAL_HI, FINAL_HI]),
    "recipient in the role header": (" to=functions.f<|channel|>commentary <|constrain|>json<|message|>{}<|call|>",
                                     [CALL_F], [CALL_F]),
    "recipient after the channel": ("<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>",
                                    [CALL_F], [CALL_F]),
    "constrain glued to recipient": (" to=functions.f<|channel|>commentary<|constrain|>json<|message|>{}<|call|>",
                                     [CALL_F], [CALL_F]),
    "truncated content": ("<|channel|>final<|message|>Hi", [FINAL_HI], [FINAL_HI]),
    "truncated header": ("<|channel|>final Hi", "error", [FINAL_HI]),
    "truncated multi-byte character": ("<|channel|>final<|message|>Hi\xe9", None, None),
    "nothing at all": ("", "error", []),
    "text after the end": ("<|channel|>final<|message|>Hi<|end|>garbage", "error", "error"),
    "empty channel name": ("<|channel|><|message|>Hi<|end|>", "error", "error"),
    "unknown role in a later message": ("<|channel|>final<|message|>Hi<|end|><|start|>robot<|message|>x<|end|>",
                                        "error", "error"),
    "too many header words": (" a b c<|message|>x<|end|>", "error", "error"),
    "start inside content stays text": ("<|channel|>final<|message|>H<|start|>i<|end|>",
                                        [h.Message(h.Role.ASSISTANT, "H<|start|>i", channel="final")],
                                        [h.Message(h.Role.ASSISTANT, "H<|start|>i", channel="final")]),
}


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_output(name: str, strict: bool) -> None:
    text, strict_result, lenient_result = MALFORMED[name]
    expected = strict_result if strict else lenient_result
    tokens = model_output(text)
    if name == "truncated multi-byte character":  # cut "é" after its first byte
        tokens = model_output("<|channel|>final<|message|>Hi") + [get_tokenizer().encode_single_token(b"\xc3")]
        expected = [h.Message(h.Role.ASSISTANT, "Hi\ufffd", channel="final")]
    if expected == "error":
        with pytest.raises(h.HarmonyError):
            h.parse_messages_from_completion_tokens(tokens, h.Role.ASSISTANT, strict=strict)
    else:
        assert h.parse_messages_from_completion_tokens(tokens, h.Role.ASSISTANT, strict=strict) == expected


def test_malformed_errors_say_what_is_wrong() -> None:
    with pytest.raises(h.HarmonyError, match=r"expected <\|start\|>.*<\|return\|>"):
        h.parse_messages_from_completion_tokens(model_output("<|channel|>final<|message|>Hi<|end|><|return|>"),
                                                h.Role.ASSISTANT)
    with pytest.raises(h.HarmonyError, match="ended inside a message header"):
        h.parse_messages_from_completion_tokens(model_output("<|channel|>final Hi<|end|>"), h.Role.ASSISTANT)
    with pytest.raises(h.HarmonyError, match="outside the vocabulary"):
        h.StreamParser(h.Role.ASSISTANT).process(10**7)


def test_stream_parser_reports_deltas_and_header_as_it_goes() -> None:
    tokens = completion_tokens([h.Message.assistant("plan", "analysis"), h.Message.tool_call("f", '{"a": 1}')])
    parser = h.StreamParser(h.Role.ASSISTANT)
    seen = []
    for token in tokens:
        parser.process(token)
        if parser.last_content_delta:
            seen.append((parser.current_channel, parser.current_recipient, parser.last_content_delta))
    assert "".join(d for c, r, d in seen if c == "analysis") == "plan"
    assert "".join(d for c, r, d in seen if r == "functions.f") == '{"a": 1}'
    assert tokens[-1] == CALL and parser.state == "expect_start"
    assert parser.messages == [h.Message.assistant("plan", "analysis"), h.Message.tool_call("f", '{"a": 1}')]


def test_split_character_waits_for_its_last_byte() -> None:
    enc = get_tokenizer()
    parser = h.StreamParser(h.Role.ASSISTANT)
    for token in model_output("<|channel|>final<|message|>"):
        parser.process(token)
    deltas = []
    for byte in "日".encode():
        parser.process(enc.encode_single_token(bytes([byte])))
        deltas.append(parser.last_content_delta)
    assert deltas == [None, None, "日"]
    parser.process(RETURN)
    assert parser.messages[0].text == "日" and parser.last_content_delta is None


def test_stop_token_sets() -> None:
    assert set(h.ASSISTANT_STOP_TOKENS) == {RETURN, CALL}
    assert set(h.STOP_TOKENS) == {END, RETURN, CALL}


def test_stop_tokens_match_openai_harmony(reference: Any) -> None:
    assert set(reference.stop_tokens()) == set(h.STOP_TOKENS)
    assert set(reference.stop_tokens_for_assistant_actions()) == set(h.ASSISTANT_STOP_TOKENS)


# ---------------------------------------------------------------------------------------------------
# Python functions as tools
# ---------------------------------------------------------------------------------------------------


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


@dataclass
class Place:
    city: str
    country: Optional[str] = None


def get_weather(place: Place, unit: Unit = Unit.CELSIUS, days: list[int] = [1],  # noqa: B006
                detail: Literal["short", "long"] = "short", when: int | str | None = None, extra=None) -> str:
    """Get the weather forecast.

    Uses the national weather service.

    Args:
        place: Where to look up,
            city first.
        unit (Unit): Temperature unit.
        days: Days ahead, 1 = tomorrow.

    Returns:
        A text forecast.
    """
    return ""


def test_tool_from_function_builds_the_schema() -> None:
    tool = h.tool_from_function(get_weather)
    assert tool.name == "get_weather"
    assert tool.description == "Get the weather forecast.\n\nUses the national weather service."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "place": {"type": "object", "properties": {"city": {"type": "string"},
                                                       "country": {"type": "string", "nullable": True}},
                      "required": ["city"], "description": "Where to look up, city first."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit.",
                     "default": "celsius"},
            "days": {"type": "array", "items": {"type": "integer"}, "description": "Days ahead, 1 = tomorrow.",
                     "default": [1]},
            "detail": {"type": "string", "enum": ["short", "long"], "default": "short"},
            "when": {"oneOf": [{"type": "integer"}, {"type": "string"}], "nullable": True},
            "extra": {},
        },
        "required": ["place"],
    }


def test_tool_from_function_renders_like_openai_harmony(oh: Any, reference: Any) -> None:
    def no_arguments() -> str:
        """Say hi."""
        return "hi"

    message = h.Message.developer(tools=[h.tool_from_function(get_weather), h.tool_from_function(no_arguments)])
    assert h.render_message(message) == reference.render(to_reference(oh, message))
    assert "type no_arguments = () => any;" in get_tokenizer().decode(h.render_message(message))


def test_tool_from_function_refuses_what_it_cannot_describe() -> None:
    def star(*values: int) -> None: ...

    def odd(value: complex) -> None: ...

    with pytest.raises(h.HarmonyError, match=r"\*values"):
        h.tool_from_function(star)
    with pytest.raises(h.HarmonyError, match="'value'.*complex"):
        h.tool_from_function(odd)


@pytest.mark.parametrize(("hint", "schema"), [
    (str, {"type": "string"}), (bool, {"type": "boolean"}), (int, {"type": "integer"}), (float, {"type": "number"}),
    (Any, {}), (list, {"type": "array"}), (dict, {"type": "object"}),
    (Sequence[int], {"type": "array", "items": {"type": "integer"}}),
    (tuple[str, ...], {"type": "array", "items": {"type": "string"}}), (tuple[int, str], {"type": "array"}),
    (Mapping[str, int], {"type": "object"}), (Literal[1, 2], {"type": "integer", "enum": [1, 2]}),
    (Literal["a", 1], {"enum": ["a", 1]}),
    (Optional[list[bool]], {"type": "array", "items": {"type": "boolean"}, "nullable": True}),
])
def test_type_to_schema(hint: Any, schema: dict) -> None:
    assert h.type_to_schema(hint) == schema
