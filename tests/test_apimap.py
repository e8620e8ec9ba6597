"""tinyoss.apimap: OpenAI's API shapes <-> harmony.

Golden values come from openai-harmony: it renders the model outputs the OutputMapper is fed (what the
model samples after `<|start|>assistant`) and the prompts a request must become, token for token.
Output it cannot render (a recipient after the channel, malformed text) is written by hand.
"""

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tinyoss import generate
from tinyoss import harmony as h
from tinyoss.apimap import (Conversation, Delta, OutputMapper, RequestError, ToolCall, chat_conversation,
                            function_tools, responses_conversation)
from tinyoss.errors import TinyossError
from tinyoss.tokenizer import CALL, END, MESSAGE, RETURN, START, get_tokenizer

DATE = "2025-08-05"
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")
SPECIAL_TEXT = re.compile(r"<\|[a-z_0-9]+\|>")
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                        "unit": {"type": "string", "enum": ["c", "f"]}},
                      "required": ["city"]}
CHAT_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather.",
                                                 "parameters": WEATHER_PARAMETERS, "strict": False}}
RESPONSES_WEATHER = {"type": "function", "name": "get_weather", "description": "Get the weather.",
                     "parameters": WEATHER_PARAMETERS}


# ---------------------------------------------------------------------------------------------------
# Output side: model output rendered by openai-harmony, fed to the OutputMapper
# ---------------------------------------------------------------------------------------------------


def said(oh: Any, text: str, channel: str, recipient: str | None = None, content_type: str | None = None) -> Any:
    """An assistant message, in openai-harmony's types."""
    message = oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)
    if recipient is not None:
        message = message.with_recipient(recipient)
    if content_type is not None:
        message = message.with_content_type(content_type)
    return message


def sampled(reference: Any, messages: list[Any]) -> list[int]:
    """What the model samples after the prompt's `<|start|>assistant`: openai-harmony's rendering of
    `messages` without those two tokens; a final answer ends the turn with `<|return|>`."""
    ids = [token for message in messages for token in reference.render(message)]
    prefix = reference.encode("<|start|>assistant", allowed_special="all")
    assert ids[:len(prefix)] == prefix
    if messages[-1].channel == "final":
        assert ids[-1] == reference.encode("<|end|>", allowed_special="all")[0]
        ids[-1] = reference.encode("<|return|>", allowed_special="all")[0]
    return ids[len(prefix):]


def handwritten(text: str) -> list[int]:
    """Model output that openai-harmony cannot render, as the tokenizer reads it."""
    return get_tokenizer().encode(text, allowed_special="all")


def parsed_by_reference(oh: Any, reference: Any, tokens: list[int]) -> list[h.Message]:
    """openai-harmony's parse of well-formed output, as our Messages."""
    messages = []
    for message in reference.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT):
        [content] = message.content
        messages.append(h.Message(h.Role(message.author.role.value), content.text, name=message.author.name,
                                  channel=message.channel, recipient=message.recipient,
                                  content_type=message.content_type))
    return messages


def run(tokens: list[int], **options: Any) -> tuple[list[Delta], Any]:
    """Feed every token, finish; -> (every delta, the tail included; the Output), checked consistent."""
    mapper = OutputMapper(**options)
    deltas = [delta for token in tokens for delta in mapper.feed(token)]
    output = mapper.finish()
    deltas += output.tail
    assert_consistent(deltas, output)
    return deltas, output


def joined(deltas: list[Delta], kind: str, index: int | None = None) -> str:
    return "".join(d.text for d in deltas if d.kind == kind and (index is None or d.index == index))


def assert_consistent(deltas: list[Delta], output: Any) -> None:
    """The Output says what the deltas streamed; no control token shows up as text."""
    assert joined(deltas, "reasoning") == output.reasoning
    assert joined(deltas, "content") == output.content
    announced = [d for d in deltas if d.kind == "tool_call"]
    assert [(d.index, d.call_id, d.name) for d in announced] == \
           [(i, call.call_id, call.name) for i, call in enumerate(output.tool_calls)]
    for i, call in enumerate(output.tool_calls):
        assert CALL_ID.fullmatch(call.call_id)
        assert joined(deltas, "tool_arguments", i) == call.arguments
    assert len({call.call_id for call in output.tool_calls}) == len(output.tool_calls)
    for delta in deltas:
        assert delta.kind in ("reasoning", "content", "tool_call", "tool_arguments")
        assert not SPECIAL_TEXT.search(delta.text), delta
    for message in output.messages:
        assert not SPECIAL_TEXT.search(message.text), message


def test_reasoning_then_final_answer(oh: Any, reference: Any) -> None:
    analysis = said(oh, "The user greets in Japanese 🤔. Reply kindly.", "analysis")
    tokens = sampled(reference, [analysis, said(oh, "こんにちは, 世界! 👋", "final")])
    deltas, output = run(tokens)
    assert [d.kind for d in deltas] == sorted((d.kind for d in deltas), key=["reasoning", "content"].index)
    assert sum(d.kind == "reasoning" for d in deltas) > 3  # streamed token by token, not at the end
    assert output.reasoning == "The user greets in Japanese 🤔. Reply kindly."
    assert output.content == "こんにちは, 世界! 👋"
    assert output.tool_calls == [] and not output.malformed and output.tail == []
    assert output.messages == parsed_by_reference(oh, reference, tokens)
    assert output.reasoning_tokens == len(reference.render(analysis)) - 2  # all but <|start|>assistant


def test_call_with_recipient_in_the_role_header(oh: Any, reference: Any) -> None:
    """`<|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json<|message|>...<|call|>`"""
    arguments = '{"city":"Paris","unit":"c"}'
    call = said(oh, arguments, "commentary", "functions.get_weather", "<|constrain|>json")
    tokens = sampled(reference, [said(oh, "Need the weather tool.", "analysis"), call])
    mapper = OutputMapper()
    per_token = [mapper.feed(token) for token in tokens]
    announced_at = next(i for i, deltas in enumerate(per_token) if any(d.kind == "tool_call" for d in deltas))
    assert tokens[announced_at] == MESSAGE  # announced as soon as the header is complete
    [announcement] = per_token[announced_at]
    assert (announcement.index, announcement.name) == (0, "get_weather")
    assert CALL_ID.fullmatch(announcement.call_id)
    output = mapper.finish()
    assert output.tool_calls == [ToolCall(announcement.call_id, "get_weather", arguments)]
    assert output.reasoning == "Need the weather tool." and output.content == ""
    assert output.messages == parsed_by_reference(oh, reference, tokens)
    assert tokens[-1] == CALL


def test_call_on_the_analysis_channel(oh: Any, reference: Any) -> None:
    """gpt-oss-120b often writes its calls on analysis: still a call, and not reasoning."""
    thinking = said(oh, "Let me look it up.", "analysis")
    call = said(oh, '{"city":"Oslo"}', "analysis", "functions.get_weather", "<|constrain|>json")
    tokens = sampled(reference, [thinking, call])
    deltas, output = run(tokens)
    assert output.reasoning == "Let me look it up."
    assert [(c.name, c.arguments) for c in output.tool_calls] == [("get_weather", '{"city":"Oslo"}')]
    assert output.reasoning_tokens == len(reference.render(thinking)) - 2
    assert output.messages == parsed_by_reference(oh, reference, tokens)


def test_call_with_recipient_after_the_channel(oh: Any, reference: Any) -> None:
    tokens = handwritten('<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                         '{"city":"Rome"}<|call|>')
    expected = parsed_by_reference(oh, reference, tokens)
    assert expected[0].recipient == "functions.get_weather"  # openai-harmony reads it as a call too
    deltas, output = run(tokens)
    assert [(c.name, c.arguments) for c in output.tool_calls] == [("get_weather", '{"city":"Rome"}')]
    assert output.messages == expected and output.content == "" and not output.malformed


def test_preamble_then_call(oh: Any, reference: Any) -> None:
    tokens = sampled(reference, [said(oh, "I'll check the forecast first.", "commentary"),
                                 said(oh, '{"city":"Lima"}', "commentary", "functions.get_weather",
                                      "<|constrain|>json")])
    deltas, output = run(tokens)
    assert output.content == "I'll check the forecast first."
    assert [(c.name, c.arguments) for c in output.tool_calls] == [("get_weather", '{"city":"Lima"}')]
    assert [d.kind for d in deltas][-1] == "tool_arguments" and deltas[0].kind == "content"


@pytest.mark.parametrize("first_ends_with", ["<|call|>", "<|end|>"])
def test_two_calls(oh: Any, reference: Any, first_ends_with: str) -> None:
    """Two calls in one turn get indices 0 and 1 and their own ids; a call ending in <|end|> is a call."""
    tokens = sampled(reference, [said(oh, '{"city":"Oslo"}', "commentary", "functions.get_weather",
                                      "<|constrain|>json"),
                                 said(oh, '{"tz":"CET"}', "commentary", "functions.get_time", "<|constrain|>json")])
    if first_ends_with == "<|end|>":
        tokens[tokens.index(CALL)] = END
    deltas, output = run(tokens)
    assert [(c.name, c.arguments) for c in output.tool_calls] == [("get_weather", '{"city":"Oslo"}'),
                                                                  ("get_time", '{"tz":"CET"}')]
    assert [d.index for d in deltas if d.kind == "tool_arguments"] == sorted(
        d.index for d in deltas if d.kind == "tool_arguments")


@pytest.mark.parametrize("content_type", ["<|constrain|>json", "json", None])
def test_content_types_of_a_call(oh: Any, reference: Any, content_type: str | None) -> None:
    tokens = sampled(reference, [said(oh, '{"q":1}', "commentary", "functions.search", content_type)])
    deltas, output = run(tokens)
    assert [(c.name, c.arguments) for c in output.tool_calls] == [("search", '{"q":1}')]
    assert output.messages == parsed_by_reference(oh, reference, tokens)


def test_recipient_outside_functions_is_a_call_by_its_full_name(oh: Any, reference: Any) -> None:
    tokens = sampled(reference, [said(oh, '{"query":"news"}', "analysis", "browser.search", "<|constrain|>json")])
    deltas, output = run(tokens)
    assert [(c.name, c.arguments) for c in output.tool_calls] == [("browser.search", '{"query":"news"}')]


def test_calls_not_allowed_become_content(oh: Any, reference: Any) -> None:
    tokens = sampled(reference, [said(oh, "Think.", "analysis"),
                                 said(oh, '{"city":"Oslo"}', "commentary", "functions.get_weather", "json")])
    deltas, output = run(tokens, calls_allowed=False)
    assert output.tool_calls == [] and not any(d.kind.startswith("tool") for d in deltas)
    assert output.reasoning == "Think." and output.content == '{"city":"Oslo"}'


def test_reasoning_tokens_count_every_analysis_message(oh: Any, reference: Any) -> None:
    messages = [said(oh, "First thought.", "analysis"), said(oh, "A preamble.", "commentary"),
                said(oh, "Second thought.", "analysis"), said(oh, "Done.", "final")]
    deltas, output = run(sampled(reference, messages))
    first, second = (len(reference.render(m)) for m in (messages[0], messages[2]))
    assert output.reasoning_tokens == first - 2 + second  # the second's <|start|>assistant is sampled too
    assert output.reasoning == "First thought.Second thought." and output.content == "A preamble.Done."


# --- truncation -------------------------------------------------------------------------------------


def test_cut_anywhere_gives_the_partial_output(oh: Any, reference: Any) -> None:
    """Cut after any token, finish() gives a prefix of every text and never a half-read header."""
    messages = [said(oh, "Plan: call the tool.", "analysis"), said(oh, "Checking.", "commentary"),
                said(oh, '{"city":"Paris"}', "commentary", "functions.get_weather", "<|constrain|>json")]
    tokens = sampled(reference, messages)
    for cut in range(len(tokens) + 1):
        deltas, output = run(tokens[:cut])
        assert "Plan: call the tool.".startswith(output.reasoning)
        assert "Checking.".startswith(output.content)
        assert len(output.tool_calls) <= 1 and not output.malformed
        if output.tool_calls:
            assert output.tool_calls[0].name == "get_weather"
            assert '{"city":"Paris"}'.startswith(output.tool_calls[0].arguments)


def test_cut_mid_reasoning_mid_header_and_mid_arguments(oh: Any, reference: Any) -> None:
    call = said(oh, '{"city":"Paris"}', "commentary", "functions.get_weather", "<|constrain|>json")
    tokens = sampled(reference, [said(oh, "Plan: call the tool.", "analysis"), call])
    enc = get_tokenizer()
    second = tokens.index(START)
    mid_reasoning = tokens[:4]  # <|channel|> analysis <|message|> Plan
    assert run(mid_reasoning)[1].reasoning == enc.decode(tokens[3:4])
    for cut in range(second + 1, tokens.index(MESSAGE, second) + 1):  # <|start|>assistant to=functions.get ...
        _, output = run(tokens[:cut])  # a header cut short says nothing: no `to=functions.get` as content
        assert (output.reasoning, output.content, output.tool_calls) == ("Plan: call the tool.", "", [])
    mid_arguments = tokens[:-3]
    _, output = run(mid_arguments)
    assert output.tool_calls[0].arguments == enc.decode(tokens[tokens.index(MESSAGE, second) + 1:-3])
    assert output.tool_calls[0].arguments and '{"city":"Paris"}'.startswith(output.tool_calls[0].arguments)


# --- split characters ---------------------------------------------------------------------------------


def byte_tokens(text: str) -> list[int]:
    """`text` one byte per token, so that every multi-byte character is split across tokens."""
    enc = get_tokenizer()
    return [enc.encode_single_token(bytes([b])) for b in text.encode()]


def test_multibyte_characters_split_across_tokens_come_out_whole(oh: Any, reference: Any) -> None:
    final_header = sampled(reference, [said(oh, "", "final")])[:-1]  # up to <|message|>
    call_header = reference.render(said(oh, "", "commentary", "functions.lookup", "<|constrain|>json"))[:-1]
    arguments = '{"city":"東京","mood":"🎉"}'
    tokens = final_header + byte_tokens("日本語 👨‍👩‍👧") + [END] + call_header + byte_tokens(arguments) + [CALL]
    deltas, output = run(tokens)
    assert output.content == "日本語 👨‍👩‍👧" and output.tool_calls[0].arguments == arguments
    assert all("\ufffd" not in d.text for d in deltas)
    assert output.messages == parsed_by_reference(oh, reference, tokens)


def test_output_cut_inside_a_character(oh: Any, reference: Any) -> None:
    tokens = sampled(reference, [said(oh, "", "final")])[:-1] + byte_tokens("é日")[:-1]
    deltas, output = run(tokens)
    assert output.content == "é\ufffd" and output.tail == [Delta("content", "\ufffd")]


# --- malformed output ---------------------------------------------------------------------------------

MALFORMED = {  # output after <|start|>assistant: (reasoning, content, calls)
    "text after the end": ("<|channel|>final<|message|>Hi<|end|> there", ("", "Hi there", [])),
    "text after the end, then a message": (
        "<|channel|>final<|message|>Hi<|end|> there<|start|>assistant<|channel|>final<|message|>!<|return|>",
        ("", "Hi there!", [])),
    "garbage first": ("oops<|start|>assistant<|channel|>final<|message|>Hi<|return|>", ("", "oopsHi", [])),
    "too many header words": (" a b c<|message|>text<|end|>", ("", "text", [])),
    "empty channel name": ("<|channel|><|message|>text<|end|>", ("", "text", [])),
    "no <|message|>": ("<|channel|>final Hi<|end|>", ("", "Hi", [])),
    "forgot <|end|>": ("<|channel|>analysis<|message|>think<|start|>assistant<|channel|>final<|message|>Hi<|return|>",
                       ("think", "Hi", [])),
    "control token in text": ("<|channel|>final<|message|>H<|channel|>i<|constrain|><|return|>", ("", "Hi", [])),
    "control token in a header": ("<|channel|>final<|endoftext|><|message|>Hi<|return|>", ("", "Hi", [])),
    "forgot <|end|> before a call": (
        "<|channel|>commentary<|message|>Checking.<|start|>assistant to=functions.f<|channel|>commentary json"
        "<|message|>{}<|call|>", ("", "Checking.", [("f", "{}")])),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_output_is_recovered(name: str) -> None:
    text, expected = MALFORMED[name]
    deltas, output = run(handwritten(text))
    assert (output.reasoning, output.content, [(c.name, c.arguments) for c in output.tool_calls]) == expected
    assert output.malformed


def test_recovered_text_is_stored_as_a_final_message() -> None:
    _, output = run(handwritten("<|channel|>final<|message|>Hi<|end|> there<|start|>assistant<|channel|>final"
                                "<|message|>!<|return|>"))
    assert output.messages == [h.Message.assistant("Hi"), h.Message.assistant(" there"), h.Message.assistant("!")]


@pytest.mark.parametrize("text", ["<|channel|>final<|message|>Hi<|end|><|return|>",  # a stray stop token
                                  "<|start|>assistant<|channel|>final<|message|>Hi<|return|>"])  # the prompt's again
def test_harmless_slips_are_not_malformed(text: str) -> None:
    _, output = run(handwritten(text))
    assert output.content == "Hi" and not output.malformed
    assert output.messages == [h.Message.assistant("Hi")]


def test_finish_is_idempotent_and_feed_takes_numpy_ints() -> None:
    numpy = pytest.importorskip("numpy")
    mapper = OutputMapper()
    for token in numpy.array(handwritten("<|channel|>final<|message|>Hi<|return|>")):
        mapper.feed(token)
    assert mapper.finish() is mapper.finish() and mapper.finish().content == "Hi"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=st.lists(st.one_of(st.sampled_from([START, END, RETURN, CALL, MESSAGE, 200005, 200003, 199999, 200010]),
                                 st.sampled_from(handwritten("assistant analysis final commentary to=functions.f "
                                                             "json { } 日本 🎉")),
                                 st.integers(0, 201087), st.integers(-3, 10**6)), max_size=40))
@example(tokens=[200005, 173781, 200005, 200006])  # <|channel|> in a header cut off by <|start|>: no text
def test_any_token_stream_never_raises(tokens: list[int]) -> None:
    run(tokens)  # consistent, no control text, no exception


# ---------------------------------------------------------------------------------------------------
# Request side: what a request renders to, against openai-harmony rendering the same conversation
# ---------------------------------------------------------------------------------------------------


def ours(conversation: Conversation, reasoning: str = "low") -> list[int]:
    """The prompt the server renders for a Conversation."""
    messages = generate.prepare_conversation(conversation.messages, reasoning=reasoning, date=DATE,
                                             instructions=conversation.instructions, tools=conversation.tools)
    return h.render_conversation_for_completion(messages, auto_drop_analysis=False)


def theirs(oh: Any, reference: Any, messages: list[Any], instructions: str | None = None,
           tools: list[Any] = (), effort: str = "LOW") -> list[int]:
    """openai-harmony's prompt: its system message (date, effort), a developer message, `messages`."""
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort[effort]).with_conversation_start_date(DATE)
    head = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    if instructions is not None or tools:
        developer = oh.DeveloperContent.new()
        developer = developer.with_instructions(instructions) if instructions is not None else developer
        developer = developer.with_function_tools(list(tools)) if tools else developer
        head.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    config = oh.RenderConversationConfig(auto_drop_analysis=False)  # what to drop is part of what we test
    return reference.render_conversation_for_completion(oh.Conversation.from_messages(head + messages),
                                                        oh.Role.ASSISTANT, config)


def user(oh: Any, text: str) -> Any:
    return oh.Message.from_role_and_content(oh.Role.USER, text)


def call(oh: Any, name: str, arguments: str, channel: str = "commentary") -> Any:
    return said(oh, arguments, channel, f"functions.{name}", "<|constrain|>json")


def result(oh: Any, name: str, output: str, channel: str = "commentary") -> Any:
    return oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, f"functions.{name}"), output) \
        .with_recipient("assistant").with_channel(channel)


def weather_tool(oh: Any) -> Any:
    return oh.ToolDescription.new("get_weather", "Get the weather.", parameters=WEATHER_PARAMETERS)


def test_chat_system_prompt_and_user(oh: Any, reference: Any) -> None:
    conversation = chat_conversation([{"role": "system", "content": "Be brief."},
                                      {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
                                      {"role": "user", "content": [{"type": "text", "text": "Hi, "},
                                                                   {"type": "input_text", "text": "how are you?"}]}])
    assert conversation.instructions == "Be brief.\n\nUse metric."
    assert ours(conversation) == theirs(oh, reference, [user(oh, "Hi, how are you?")], "Be brief.\n\nUse metric.")
    assert ours(conversation, "high") == theirs(oh, reference, [user(oh, "Hi, how are you?")],
                                                "Be brief.\n\nUse metric.", effort="HIGH")


def test_chat_tool_loop_keeps_its_reasoning(oh: Any, reference: Any) -> None:
    conversation = chat_conversation([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
    ], tools=[CHAT_WEATHER])
    expected = theirs(oh, reference, [user(oh, "Weather in Paris?"), said(oh, "Need the tool.", "analysis"),
                                      call(oh, "get_weather", '{"city":"Paris"}'),
                                      result(oh, "get_weather", '{"temp": 20}')],
                      "Be brief.", [weather_tool(oh)])
    assert ours(conversation) == expected


def test_chat_finished_turns_drop_their_reasoning(oh: Any, reference: Any) -> None:
    conversation = chat_conversation([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Let me check.", "reasoning": "Use the tool.",
         "tool_calls": [{"id": "a", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "rain"}]},
        {"role": "assistant", "content": "Rain.", "thinking": "Answer."},
        {"role": "user", "content": "Thanks"},
    ], tools=[CHAT_WEATHER])
    expected = theirs(oh, reference, [
        user(oh, "Hi"), said(oh, "Hello!", "final"), user(oh, "Weather in Oslo?"),
        said(oh, "Let me check.", "commentary"), call(oh, "get_weather", json.dumps({"city": "Oslo"})),
        result(oh, "get_weather", "rain"), said(oh, "Rain.", "final"), user(oh, "Thanks")], None, [weather_tool(oh)])
    assert ours(conversation) == expected


def test_chat_later_system_message_is_a_developer_message_in_place(oh: Any, reference: Any) -> None:
    conversation = chat_conversation([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be terse."},
                                      {"role": "user", "content": "Hi again"}])
    developer = oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(
        "Be terse."))
    assert conversation.instructions is None
    assert ours(conversation) == theirs(oh, reference, [user(oh, "Hi"), developer, user(oh, "Hi again")])


def test_chat_tool_message_by_name_and_empty_answers(oh: Any, reference: Any) -> None:
    conversation = chat_conversation([
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_time", "arguments": "{}"}}]},  # no id
        {"role": "tool", "name": "get_time", "content": "noon"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Again?"}])
    assert ours(conversation) == theirs(oh, reference, [
        user(oh, "Time?"), call(oh, "get_time", "{}"), result(oh, "get_time", "noon"), said(oh, "", "final"),
        user(oh, "Again?")])


def test_responses_string_input_and_instructions(oh: Any, reference: Any) -> None:
    conversation = responses_conversation("Hi", instructions="Be brief.", tools=[RESPONSES_WEATHER])
    assert ours(conversation) == theirs(oh, reference, [user(oh, "Hi")], "Be brief.", [weather_tool(oh)])
    conversation = responses_conversation([{"role": "developer", "content": "Use metric."},
                                           {"type": "message", "role": "user",
                                            "content": [{"type": "input_text", "text": "Hi"}]}],
                                          instructions="Be brief.")
    assert ours(conversation) == theirs(oh, reference, [user(oh, "Hi")], "Be brief.\n\nUse metric.")


def test_responses_items_of_a_tool_loop(oh: Any, reference: Any) -> None:
    conversation = responses_conversation([
        {"role": "user", "content": "Hi"},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Greet."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Use"},
                                                        {"type": "summary_text", "text": "the tool."}]},
        {"type": "message", "role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_9", "output": "rain"},
        {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"},  # nothing this model can read
    ], tools=[RESPONSES_WEATHER])
    assert ours(conversation) == theirs(oh, reference, [
        user(oh, "Hi"), said(oh, "Hello!", "final"), user(oh, "Weather in Oslo?"),
        said(oh, "Use\n\nthe tool.", "analysis"), said(oh, "Checking.", "commentary"),
        call(oh, "get_weather", '{"city":"Oslo"}'), result(oh, "get_weather", "rain")], None, [weather_tool(oh)])


def test_responses_previous_conversation_comes_first(oh: Any, reference: Any) -> None:
    """The stored conversation and the model's own output (a call on analysis) go first; the result of
    that call, whose id was the server's, answers it in order and on its channel."""
    tokens = sampled(reference, [said(oh, "Need the tool.", "analysis"),
                                 call(oh, "get_weather", '{"city":"Oslo"}', channel="analysis")])
    previous = [h.Message.user("Weather in Oslo?")] + run(tokens)[1].messages
    conversation = responses_conversation([{"type": "function_call_output", "call_id": "call_x", "output": "rain"}],
                                          tools=[RESPONSES_WEATHER], previous=previous)
    assert ours(conversation) == theirs(oh, reference, [
        user(oh, "Weather in Oslo?"), said(oh, "Need the tool.", "analysis"),
        call(oh, "get_weather", '{"city":"Oslo"}', channel="analysis"), result(oh, "get_weather", "rain", "analysis")],
        None, [weather_tool(oh)])


def test_finished_turn_keeps_its_calls_on_analysis(oh: Any, reference: Any) -> None:
    tokens = sampled(reference, [said(oh, "Need the tool.", "analysis"),
                                 call(oh, "get_weather", '{"city":"Oslo"}', channel="analysis")])
    previous = [h.Message.user("Weather in Oslo?")] + run(tokens)[1].messages
    finished = previous + [h.Message.tool_result("get_weather", "rain"), h.Message.assistant("Rain.", "final")]
    conversation = responses_conversation("And tomorrow?", previous=finished)
    assert ours(conversation) == theirs(oh, reference, [
        user(oh, "Weather in Oslo?"), call(oh, "get_weather", '{"city":"Oslo"}', channel="analysis"),
        result(oh, "get_weather", "rain"), said(oh, "Rain.", "final"), user(oh, "And tomorrow?")])


def test_responses_system_item_after_previous_is_in_place() -> None:
    conversation = responses_conversation([{"role": "system", "content": "Be terse."}],
                                          previous=[h.Message.user("Hi")])
    assert conversation.instructions is None
    assert conversation.messages == [h.Message.user("Hi"), h.Message(h.Role.DEVELOPER, h.DeveloperContent("Be terse."))]


def test_function_tools_of_both_apis() -> None:
    expected = [h.ToolDescription("get_weather", "Get the weather.", WEATHER_PARAMETERS),
                h.ToolDescription("ping", "", None)]
    assert function_tools([CHAT_WEATHER, {"type": "function", "function": {"name": "ping"}}], "chat") == expected
    assert function_tools([RESPONSES_WEATHER, {"type": "function", "name": "ping", "description": None}],
                          "responses") == expected
    assert function_tools(None, "chat") == []


# ---------------------------------------------------------------------------------------------------
# Request validation: 400, a message, and the field's path
# ---------------------------------------------------------------------------------------------------

Q = {"role": "user", "content": "q"}
CALLED = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                               "function": {"name": "f", "arguments": "{}"}}]}


def chat_tool_call(**function: Any) -> list[dict]:
    return [{"role": "system", "content": "s"}, Q,
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": function}]}]


CHAT_ERRORS = [  # (messages, tools, param, message pattern)
    (None, None, "messages", "non-empty array"),
    ([], None, "messages", "non-empty array"),
    (["hi"], None, "messages[0]", "must be an object, got a string"),
    ([{"role": "bot", "content": "x"}], None, "messages[0].role", "'bot' is not one of"),
    ([{"content": "x"}], None, "messages[0].role", "None is not one of"),
    ([{"role": "user"}], None, "messages[0].content", "string or an array of text parts, got null"),
    ([{"role": "user", "content": 5}], None, "messages[0].content", "got a number"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], None,
     "messages[0].content[0].type", "'image_url' is not supported: only text"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]}], None,
     "messages[0].content[1].type", "'input_audio' is not supported"),
    ([{"role": "user", "content": [{"type": "text"}]}], None, "messages[0].content[0].text", "is required"),
    ([{"role": "user", "content": ["x"]}], None, "messages[0].content[0]", "must be an object"),
    ([Q, {"role": "assistant"}], None, "messages[1]", "needs content, tool_calls or reasoning"),
    ([Q, {"role": "assistant", "content": None, "tool_calls": []}], None, "messages[1]", "needs content"),
    ([Q, {"role": "assistant", "tool_calls": {"id": "x"}}], None, "messages[1].tool_calls", "must be an array"),
    ([Q, {"role": "assistant", "reasoning_content": 5}], None, "messages[1].reasoning_content", "must be a string"),
    ([Q, {"role": "assistant", "tool_calls": [{"type": "custom", "function": {"name": "f", "arguments": ""}}]}], None,
     "messages[1].tool_calls[0].type", "'custom' is not supported"),
    ([Q, {"role": "assistant", "tool_calls": [{"type": "function"}]}], None, "messages[1].tool_calls[0].function",
     "must be an object, got null"),
    (chat_tool_call(arguments="{}"), None, "messages[2].tool_calls[0].function.name", "is required"),
    (chat_tool_call(name="", arguments="{}"), None, "messages[2].tool_calls[0].function.name", "must not be empty"),
    (chat_tool_call(name="f", arguments=5), None, "messages[2].tool_calls[0].function.arguments", "string of JSON"),
    # an earlier call's name goes into a header (to=functions.NAME): the tools' own rule (was accepted)
    (chat_tool_call(name="a b<|end|>", arguments="{}"), None, "messages[2].tool_calls[0].function.name",
     r"'a b<\|end\|>' is not a function name"),
    ([Q, {"role": "tool", "name": "x y", "content": "r"}], None, "messages[1].name", "'x y' is not a function name"),
    (chat_tool_call(name="f"), None, "messages[2].tool_calls[0].function.arguments", "got null"),
    ([Q, CALLED, {"role": "tool", "tool_call_id": "c2", "content": "x"}], None, "messages[2].tool_call_id",
     "'c2' matches no tool call"),
    ([Q, {"role": "tool", "content": "x"}], None, "messages[1].tool_call_id", "tool_call_id is required"),
    ([Q, CALLED, {"role": "tool", "tool_call_id": "c1"}], None, "messages[2].content", "got null"),
    ([Q], "x", "tools", "must be an array"),
    ([Q], ["x"], "tools[0]", "must be an object"),
    ([Q], [{"type": "function"}], "tools[0].function", "must be an object"),
    ([Q], [{"type": "function", "function": {"description": "d"}}], "tools[0].function.name", "is required"),
    ([Q], [{"type": "function", "function": {"name": "get weather"}}], "tools[0].function.name",
     r"must match \^\[a-zA-Z0-9_-\]\{1,64\}\$"),
    ([Q], [{"type": "function", "function": {"name": "f" * 65}}], "tools[0].function.name", "must match"),
    ([Q], [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}],
     "tools[1].function.name", "two tools"),
    ([Q], [{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tools[0].function.parameters",
     "JSON schema object"),
    ([Q], [{"type": "function", "function": {"name": "f", "strict": "yes"}}], "tools[0].function.strict", "boolean"),
    ([Q], [{"type": "function", "function": {"name": "f", "description": 5}}], "tools[0].function.description",
     "must be a string"),
] + [([Q], [CHAT_WEATHER, {"type": kind}], "tools[1].type", f"tools\\[1\\].type '{kind}' is not supported: only "
      "function tools") for kind in ("web_search", "file_search", "code_interpreter", "computer_use_preview", "mcp")]


@pytest.mark.parametrize("messages, tools, param, pattern", CHAT_ERRORS)
def test_chat_request_errors(messages: Any, tools: Any, param: str, pattern: str) -> None:
    with pytest.raises(RequestError, match=pattern) as caught:
        chat_conversation(messages, tools)
    assert (caught.value.param, caught.value.status, caught.value.code) == (param, 400, None)
    assert caught.value.message == str(caught.value) and param in caught.value.message


FC = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
RESPONSES_ERRORS = [  # (input, instructions, tools, param, message pattern)
    ([{**FC, "name": "x<|call|>"}], None, None, "input[0].name", r"'x<\|call\|>' is not a function name"),
    (None, None, None, "input", "string or a non-empty array"),
    ([], None, None, "input", "non-empty"),
    (5, None, None, "input", "string or a non-empty array"),
    ("hi", 5, None, "instructions", "must be a string"),
    ([5], None, None, "input[0]", "must be an object"),
    ([{"type": "item_reference", "id": "msg_1"}], None, None, "input[0].type", "'item_reference' is not supported"),
    ([{"type": "web_search_call", "id": "ws"}], None, None, "input[0].type", "is not supported"),
    ([{"role": "tool", "content": "x"}], None, None, "input[0].role", "'tool' is not one of"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], None, None,
     "input[0].content[0].type", "'input_image' is not supported: only text"),
    ([{"role": "user", "content": [{"type": "input_file", "file_id": "x"}]}], None, None,
     "input[0].content[0].type", "'input_file'"),
    ([{"type": "function_call", "name": "f", "arguments": "{}"}], None, None, "input[0].call_id", "is required"),
    ([{"type": "function_call", "call_id": "c1", "arguments": "{}"}], None, None, "input[0].name", "is required"),
    ([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": 5}], None, None, "input[0].arguments",
     "string of JSON"),
    ([FC, {"type": "function_call_output", "call_id": "c2", "output": "x"}], None, None, "input[1].call_id",
     "'c2' matches no function_call"),
    ([FC, {"type": "function_call_output", "call_id": "c1"}], None, None, "input[1].output", "got null"),
    ([{"type": "reasoning", "content": "x"}], None, None, "input[0].content", "must be an array"),
    ([{"type": "reasoning", "content": [{"type": "text", "text": "x"}]}], None, None, "input[0].content[0].type",
     "must be 'reasoning_text'"),
    ([{"type": "reasoning", "summary": [{"type": "summary_text"}]}], None, None, "input[0].summary[0].text",
     "is required"),
    ("hi", None, [{"type": "function"}], "tools[0].name", "is required"),
    ("hi", None, [{"type": "function", "name": "f", "parameters": []}], "tools[0].parameters", "JSON schema"),
    ("hi", None, [{"type": "web_search_preview"}], "tools[0].type", "'web_search_preview' is not supported: only "
                                                                    "function tools"),
]


@pytest.mark.parametrize("input, instructions, tools, param, pattern", RESPONSES_ERRORS)
def test_responses_request_errors(input: Any, instructions: Any, tools: Any, param: str, pattern: str) -> None:
    with pytest.raises(RequestError, match=pattern) as caught:
        responses_conversation(input, instructions, tools)
    assert (caught.value.param, caught.value.status) == (param, 400)


def test_request_error_is_a_tinyoss_error() -> None:
    error = RequestError("nope", status=404, code="not_found")
    assert isinstance(error, TinyossError) and (error.param, error.status, error.code) == (None, 404, "not_found")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
    | st.sampled_from(["user", "assistant", "system", "developer", "tool", "function", "text", "message",
                       "function_call", "function_call_output", "reasoning", "reasoning_text", "summary_text",
                       "c1", "f", "{}"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "content", "type", "text", "tool_calls", "function", "name", "arguments", "id",
                         "tool_call_id", "call_id", "output", "summary", "reasoning_content", "parameters"]),
        inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=json_values, tools=json_values)
def test_any_json_is_a_conversation_or_a_request_error(messages: Any, tools: Any) -> None:
    for build in (lambda: chat_conversation(messages, tools), lambda: responses_conversation(messages, None, tools)):
        try:
            conversation = build()
        except RequestError as error:
            assert error.status == 400 and error.param
            continue
        ours(conversation)  # what we accept renders


def test_a_call_the_server_returned_goes_back_in_the_next_turn() -> None:
    """The server returns a call to `browser.search` as a tool call (a recipient outside
    functions.): the next request carries it back, and must be taken (the tools' own name rule
    refused the dot)."""
    messages = [Q, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "browser.search", "arguments": '{"q": "x"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"}]
    conversation = chat_conversation(messages)
    assert [m.recipient for m in conversation.messages if m.recipient] == ["browser.search", "assistant"]
    items = [{"type": "function_call", "call_id": "c1", "name": "browser.search", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "r"}]
    assert responses_conversation(items).messages[0].recipient == "browser.search"
