"""Generation: the tool loop, streaming deltas, stop reasons and the prompt, on a scripted stand-in
model (deterministic harmony output); determinism and the KV cache wiring on the tiny random model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

import tinyoss
from tinyoss import generate as g
from tinyoss import harmony as h
from tinyoss.sampling import Sampler
from tinyoss.tokenizer import CALL, RETURN, START, get_tokenizer

GREEDY = Sampler(temperature=0)
DATE = "2025-08-05"

WEATHER_CALL = ('<|channel|>analysis<|message|>Need the weather.<|end|>'
                '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
                '<|message|>{"city": "Paris"}<|call|>')
FINAL = '<|channel|>final<|message|>It is 20°C in Paris.<|return|>'


class ScriptedCache:
    """The stand-in's KV cache: it holds nothing, so it can go back to any point."""

    def __init__(self, max_tokens):
        self.max_tokens = max_tokens

    def ring_copy(self):
        return SimpleNamespace(at=-1)

    def rewind(self, n_tokens, copies=()):
        return n_tokens


class ScriptedModel:
    """A stand-in for a Model that writes scripted replies, whatever it is asked.

    A forward pass whose tokens end with `<|start|>assistant` starts the next reply; each later one
    (the token just sampled) moves one token on. The logits put all weight on the reply's next token.
    `fed` records the tokens of every forward call.
    """

    def __init__(self, *replies: str, max_position_embeddings: int = 131072):
        tokenizer = get_tokenizer()
        self.replies = [tokenizer.encode(r, allowed_special="all") for r in replies]
        self.turn_start = [START] + tokenizer.encode_ordinary("assistant")
        self.config = SimpleNamespace(vocab_size=tokenizer.n_vocab,
                                      max_position_embeddings=max_position_embeddings)
        self.fed: list[list[int]] = []
        self.reply, self.position = -1, 0

    def new_cache(self, max_tokens=None):
        return ScriptedCache(max_tokens)

    def forward(self, tokens, cache=None, *, last_only=False):
        tokens = [int(t) for t in tokens]
        self.fed.append(tokens)
        if tokens[-2:] == self.turn_start:
            self.reply, self.position = self.reply + 1, 0
        else:
            self.position += 1
        script = self.replies[self.reply]
        logits = np.full((1, self.config.vocab_size), -np.inf, np.float32)
        logits[0, script[min(self.position, len(script) - 1)]] = 0.0
        return logits


def get_weather(city: str, unit: str = "celsius") -> dict:
    """Current weather in a city.

    Args:
        city: The city's name.
        unit: celsius or fahrenheit.
    """
    get_weather.calls.append((city, unit))
    return {"city": city, "temperature": 20, "unit": unit}


@pytest.fixture(autouse=True)
def _reset_calls():
    get_weather.calls = []


def decode(ids) -> str:
    return get_tokenizer().decode(list(ids))


# ---------------------------------------------------------------------------------------------------
# Function tools, on the scripted model
# ---------------------------------------------------------------------------------------------------


def test_a_tool_call_round_trips_to_a_final_answer():
    model = ScriptedModel(WEATHER_CALL, FINAL)
    events = list(g.generate(model, "Weather in Paris?", tools=[get_weather], sampler=GREEDY, date=DATE))
    reply = events[-1]
    assert isinstance(reply, g.Reply) and reply.stats.stop_reason == "return"
    assert reply.text == "It is 20°C in Paris." and reply.analysis == "Need the weather."
    assert get_weather.calls == [("Paris", "celsius")]
    [tool] = [e for e in events if isinstance(e, g.ToolEvent)]
    assert (tool.recipient, json.loads(tool.arguments)) == ("functions.get_weather", {"city": "Paris"})
    assert json.loads(tool.result) == {"city": "Paris", "temperature": 20, "unit": "celsius"}
    kinds = [(m.role.value, m.channel, m.recipient) for m in reply.messages]
    assert kinds == [("assistant", "analysis", None), ("assistant", "commentary", "functions.get_weather"),
                     ("tool", "commentary", "assistant"), ("assistant", "final", None)]
    assert reply.messages[2].name == "functions.get_weather"
    # the tool was described to the model in the developer message
    assert "type get_weather = (_: {\n// The city's name.\ncity: string," in decode(model.fed[0])
    # round 2 ran only what is new: the <|call|> the model wrote, the result, and <|start|>assistant
    second_prefill = model.fed[-len(model.replies[1])]
    assert second_prefill[0] == CALL and second_prefill[-2:] == model.turn_start
    assert decode(second_prefill[1:-2]) == (
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
        '{"city": "Paris", "temperature": 20, "unit": "celsius"}<|end|>')
    assert reply.stats.prefill_tokens == len(model.fed[0]) + len(second_prefill)
    assert reply.stats.generated_tokens == len(reply.tokens) == sum(map(len, model.replies))


@pytest.mark.parametrize("arguments,error", [
    ('{"city": "Paris"', "not valid JSON"),
    ('["Paris"]', "must be a JSON object"),
    ('{"town": "Paris"}', "TypeError"),
])
def test_a_bad_call_is_reported_to_the_model(arguments, error):
    call = WEATHER_CALL.replace('{"city": "Paris"}', arguments)
    model = ScriptedModel(call, FINAL)
    reply = g.chat(model, "Weather?", tools=[get_weather], sampler=GREEDY)
    assert get_weather.calls == [] and reply.text == "It is 20°C in Paris."
    result = reply.messages[2]
    assert result.role == h.Role.TOOL and error in json.loads(result.text)["error"]
    assert error in decode(model.fed[-len(model.replies[1])])  # the model read it


def test_an_unknown_tool_or_a_failing_tool_is_reported_to_the_model():
    def explode(city: str) -> str:
        """Fails."""
        raise RuntimeError("sensor offline")

    unknown = WEATHER_CALL.replace("functions.get_weather", "functions.get_time")
    failing = WEATHER_CALL.replace("functions.get_weather", "functions.explode")
    model = ScriptedModel(unknown, failing, FINAL)
    reply = g.chat(model, "Weather?", tools=[get_weather, explode], sampler=GREEDY)
    results = [json.loads(m.text)["error"] for m in reply.messages if m.role == h.Role.TOOL]
    assert "unknown tool 'functions.get_time'" in results[0] and "functions.explode" in results[0]
    assert results[1] == "RuntimeError: sensor offline"
    assert reply.text == "It is 20°C in Paris." and reply.stats.stop_reason == "return"


def test_tool_rounds_are_bounded():
    model = ScriptedModel(*[WEATHER_CALL] * 4)
    reply = g.chat(model, "Weather?", tools=[get_weather], sampler=GREEDY, max_tool_rounds=2)
    assert reply.stats.stop_reason == "tool_rounds" and len(get_weather.calls) == 2


def test_without_tools_a_call_ends_the_reply():
    reply = g.chat(ScriptedModel(WEATHER_CALL), "Weather?", sampler=GREEDY)
    assert reply.stats.stop_reason == "call" and reply.messages[-1].recipient == "functions.get_weather"


# ---------------------------------------------------------------------------------------------------
# Streaming and stopping, on the scripted model
# ---------------------------------------------------------------------------------------------------


def test_token_events_carry_each_channels_text():
    model = ScriptedModel(WEATHER_CALL.replace("<|call|>", "<|end|><|start|>assistant") + FINAL)
    events = list(g.generate(model, "Hi", sampler=GREEDY, logprobs=2))
    tokens = [e for e in events if isinstance(e, g.TokenEvent)]
    by_channel: dict = {}
    for e in tokens:
        by_channel[e.channel] = by_channel.get(e.channel, "") + e.text
    assert by_channel == {None: "", "analysis": "Need the weather.", "commentary": '{"city": "Paris"}',
                          "final": "It is 20°C in Paris."}
    assert {e.recipient for e in tokens if e.channel == "commentary"} == {"functions.get_weather"}
    assert [e.token for e in tokens] == events[-1].tokens == model.replies[0]
    assert tokens[-1].token == RETURN and tokens[-1].channel == "final"  # a stop token ends its message
    assert all(e.choice.token == e.token and e.choice.logprob == 0.0 and len(e.choice.top_logprobs) == 2
               for e in tokens)


def test_max_tokens_stops_and_keeps_the_partial_message():
    reply = g.chat(ScriptedModel(FINAL), "Hi", sampler=GREEDY, max_tokens=5)
    assert reply.stats.stop_reason == "max_tokens" and len(reply.tokens) == 5
    assert reply.messages[0].channel == "final" and "It is 20°C in Paris.".startswith(reply.text)


def test_a_full_context_stops_cleanly():
    model = ScriptedModel(FINAL)
    n_prompt = len(h.render_conversation_for_completion(g.prepare_conversation("Hi", date=DATE)))
    reply = g.chat(model, "Hi", sampler=GREEDY, date=DATE, context=g.Context(model, n_prompt + 3))
    assert reply.stats.stop_reason == "context" and len(reply.tokens) == 4  # 3 run, the 4th sampled
    with pytest.raises(tinyoss.TinyossError, match="does not fit the context"):
        g.chat(model, "Hi", context=g.Context(model, n_prompt - 1))


def test_a_reply_with_no_final_message_reads_as_what_the_model_wrote():
    """`text` is the final answer; with none (random weights write no harmony; a reply cut off while
    reasoning) it is what was sampled, special tokens written out, and `has_final` says so."""
    noise = "Komponenten aggiorn hierarchy laboratoire"
    n = len(get_tokenizer().encode(noise))
    reply = g.chat(ScriptedModel(noise), "Hi", sampler=GREEDY, max_tokens=n)
    assert not reply.has_final and reply.text == noise and reply.stats.stop_reason == "max_tokens"
    thinking = "<|channel|>analysis<|message|>Let me think about it."
    reply = g.chat(ScriptedModel(thinking + "<|end|>"), "Hi", sampler=GREEDY, max_tokens=6)
    assert not reply.has_final and reply.analysis and reply.text == decode(reply.tokens)
    assert thinking.startswith(reply.text)
    reply = g.chat(ScriptedModel(FINAL), "Hi", sampler=GREEDY)
    assert reply.has_final and reply.text == "It is 20°C in Paris."


def test_output_that_is_not_harmony_stops_cleanly():
    reply = g.chat(ScriptedModel("<|channel|>final<|message|>Hi<|end|>oops"), "Hi", sampler=GREEDY)
    assert reply.stats.stop_reason == "malformed" and reply.text == "Hi"


def test_a_context_reuses_the_cached_prefix_across_turns():
    model = ScriptedModel(FINAL, FINAL, FINAL)
    context = g.Context(model)
    first = g.chat(model, "Hi", sampler=GREEDY, date=DATE, context=context)
    history = [h.Message.user("Hi"), *first.messages, h.Message.user("And now?")]
    second = g.chat(model, history, sampler=GREEDY, date=DATE, context=context)
    assert second.stats.reused_tokens == second.stats.prompt_tokens - second.stats.prefill_tokens > 50
    assert decode(model.fed[len(first.tokens)]).startswith("<|end|><|start|>user<|message|>And now?")
    changed = g.chat(model, history, sampler=GREEDY, date="2030-01-01", context=context)
    before = h.render_conversation(g.prepare_conversation(history, date=DATE))
    after = h.render_conversation(g.prepare_conversation(history, date="2030-01-01"))
    same = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
    assert 0 < changed.stats.reused_tokens == same  # a different date: from the first id that differs


# ---------------------------------------------------------------------------------------------------
# The prompt
# ---------------------------------------------------------------------------------------------------


def test_the_system_message_has_the_date_and_the_reasoning_effort():
    import datetime

    text = decode(h.render_conversation(g.prepare_conversation("Hi", reasoning="high")))
    assert f"Current date: {datetime.date.today().isoformat()}" in text and "Reasoning: high" in text
    mine = h.Message.system(h.SystemContent(conversation_start_date="2001-02-03", reasoning_effort="low"))
    text = decode(h.render_conversation(g.prepare_conversation([mine, h.Message.user("Hi")])))
    assert "Current date: 2001-02-03" in text and "Reasoning: low" in text
    text = decode(h.render_conversation(g.prepare_conversation([mine, h.Message.user("Hi")], date=DATE)))
    assert f"Current date: {DATE}" in text


def test_instructions_and_tools_go_to_the_developer_message():
    conversation = g.prepare_conversation(
        [h.Message.developer("Be brief."), h.Message.user("Hi")],
        tools=[h.tool_from_function(get_weather)])
    assert [m.role.value for m in conversation] == ["system", "developer", "user"]
    assert conversation[1].content.instructions == "Be brief."
    assert [t.name for t in conversation[1].content.tools] == ["get_weather"]
    assert [m.role.value for m in g.prepare_conversation("Hi")] == ["system", "user"]


def test_the_analysis_of_finished_turns_is_left_out():
    history = [h.Message.user("Q1"), h.Message.assistant("think 1", "analysis"), h.Message.assistant("A1"),
               h.Message.user("Q2"), h.Message.assistant("think 2", "analysis"), h.Message.assistant("A2"),
               h.Message.user("Q3"), h.Message.assistant("think 3", "analysis"),
               h.Message.tool_call("get_weather", "{}"), h.Message.tool_result("get_weather", "{}")]
    text = decode(h.render_conversation_for_completion(g.prepare_conversation(history)))
    assert "think 1" not in text and "think 2" not in text  # both finished turns, not just the first
    assert "think 3" in text and "A1" in text and "A2" in text  # the turn in progress keeps its reasoning


# ---------------------------------------------------------------------------------------------------
# The tiny random checkpoint: determinism and the KV cache wiring
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return tinyoss.load(tiny_checkpoint)


def test_greedy_is_deterministic_and_matches_a_differently_chunked_forward(tiny_model):
    reply = g.chat(tiny_model, "Hello", sampler=GREEDY, date=DATE, max_tokens=4)
    assert g.chat(tiny_model, "Hello", sampler=GREEDY, date=DATE, max_tokens=4).tokens == reply.tokens
    prompt = h.render_conversation_for_completion(g.prepare_conversation("Hello", date=DATE))
    cache = tiny_model.new_cache()  # the same ids in other chunks: the prompt but its last id, then the
    tiny_model.forward(prompt[:-1], cache, last_only=True)  # rest at once (not one token at a time)
    logits = tiny_model.forward(prompt[-1:] + reply.tokens[:-1], cache)
    assert np.argmax(logits, axis=-1).tolist() == reply.tokens
    assert reply.stats.prompt_tokens == len(prompt) and reply.stats.generated_tokens == 4
    assert reply.stats.prefill_tok_s > 0 and reply.stats.decode_tok_s > 0


def test_seeded_sampling_is_reproducible(tiny_model):
    def tokens(seed):
        return g.chat(tiny_model, "Hello", sampler=Sampler(temperature=1.0, seed=seed), date=DATE,
                      max_tokens=4).tokens

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)


# ---------------------------------------------------------------------------------------------------
# Bad arguments: one error naming the argument, before any forward pass
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,error,message", [
    ({"reasoning": "bogus"}, g.GenerationError, "reasoning must be one of low, medium, high, got 'bogus'"),
    ({"reasoning": "HIGH"}, g.GenerationError, "reasoning must be one of"),
    ({"date": "garbage"}, g.GenerationError, "date must be YYYY-MM-DD, got 'garbage'"),
    ({"date": "20240101"}, g.GenerationError, "date must be YYYY-MM-DD"),  # (fromisoformat takes it)
    ({"logprobs": 1.5}, TypeError, "logprobs must be None or an int, got float"),
    ({"logprobs": "x"}, TypeError, "logprobs must be None or an int, got str"),
    ({"logprobs": True}, TypeError, "logprobs must be None or an int, got bool"),
    ({"logprobs": -1}, g.GenerationError, "logprobs must be from 0 to"),
    ({"logprobs": 10**9}, g.GenerationError, "logprobs must be from 0 to"),
    ({"max_tool_rounds": "x"}, TypeError, "max_tool_rounds must be an int, got str"),
    ({"max_tool_rounds": -1}, g.GenerationError, "max_tool_rounds must be >= 0, got -1"),
    ({"tools": 5}, TypeError, "tools must be a list of functions, got int"),
])
def test_bad_options_are_named_before_any_work(options, error, message):
    model = ScriptedModel(FINAL)
    with pytest.raises(error, match=message.replace("(", r"\(")):
        g.chat(model, "hi", **options)
    assert model.fed == []


def test_numpy_integers_and_instructions_alone_are_taken():
    model = ScriptedModel(FINAL)
    reply = g.chat(model, [], instructions="Say hi", logprobs=np.int64(2), max_tool_rounds=np.int64(1))
    assert reply.text == "It is 20°C in Paris." and reply.messages[-1].channel == "final"


def test_a_context_of_another_model_is_refused():
    """The reply came from the context's model, the model argument ignored."""
    mine, other = ScriptedModel(FINAL), ScriptedModel(FINAL)
    with pytest.raises(g.GenerationError, match="context was made for another model"):
        g.chat(mine, "hi", context=g.Context(other))
    assert mine.fed == other.fed == []


@pytest.mark.parametrize("args,error,message", [
    ((5,), TypeError, "model must be a loaded model"),
    ((None,), TypeError, "model must be a loaded model"),
    (("MODEL", "5"), TypeError, "max_tokens must be None or an int, got str"),
    (("MODEL", 1.7), TypeError, "max_tokens must be None or an int, got float"),
    (("MODEL", 0), tinyoss.TinyossError, r"max_tokens must be in 1\.\.\d+ \(the context limit\), got 0"),
])
def test_a_context_names_a_bad_argument(tiny_model, args, error, message):
    args = tuple(tiny_model if a == "MODEL" else a for a in args)
    with pytest.raises(error, match=message):
        g.Context(*args)


def test_messages_name_a_bad_role_or_content_and_an_empty_conversation():
    with pytest.raises(h.HarmonyError, match="role must be one of system, developer, user, assistant, "
                                             "tool, got 'bogus'"):
        h.Message("bogus", "hi")
    assert h.Message("user", "hi").role is h.Role.USER  # a role's name is the role
    with pytest.raises(TypeError, match="a user message's content must be a str, got NoneType"):
        h.Message(h.Role.USER, None)
    with pytest.raises(g.GenerationError, match="messages is empty"):
        g.chat(ScriptedModel(FINAL), [])
