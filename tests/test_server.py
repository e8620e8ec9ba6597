"""`tinyoss serve` driven by the official `openai` client over a real socket (127.0.0.1, a free port),
on the tiny synthetic checkpoint: the real model where the output may be anything (greedy equality,
batching, load, disconnects), the same model steered to write scripted harmony (tests/serving.py)
where the mapping is under test (reasoning, tool calls, the Responses items)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import tinyoss  # noqa: E402
from serving import MODEL_ID, Scripted, serve  # noqa: E402
from tinyoss.tokenizer import get_tokenizer  # noqa: E402

REASONED = ("<|channel|>analysis<|message|>The user greets me.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Hello there! 👋<|return|>")
# the call as harmony renders it (`to=` in the role header), so the next turn continues the cache
CALL = ('<|channel|>analysis<|message|>Need the weather.<|end|>'
        '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json'
        '<|message|>{"city": "Paris"}<|call|>')
# 120b writes about half its calls on analysis, `to=` after the channel
CALL_ON_ANALYSIS = ('<|channel|>analysis to=functions.get_weather <|constrain|>json'
                    '<|message|>{"city": "Lyon"}<|call|>')
ANSWER = "<|channel|>analysis<|message|>It is 20.<|end|><|start|>assistant<|channel|>final<|message|>It is 20°C in Paris.<|return|>"
PREAMBLE = ("<|channel|>commentary<|message|>Let me check.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{\"city\": \"Nice\"}<|call|>")
# characters split across tokens: `\xa6` and `\xf0\x9d`, `\x84` are bytes of a character and no text
BIRDS = "<|channel|>final<|message|>A 🦩 or ℵ, 𝄞!<|return|>"
SECOND_THOUGHTS = ("<|channel|>commentary<|message|>Let me think.<|end|>"
                   "<|start|>assistant<|channel|>analysis<|message|>Thinking it over.<|end|>"
                   "<|start|>assistant<|channel|>final<|message|>Done.<|return|>")
SCRIPT = {"Hello": REASONED, "weather in Paris": CALL, "weather in Lyon": CALL_ON_ANALYSIS,
          '"temp": 20': ANSWER, "weather in Nice": PREAMBLE, "birds": BIRDS, "Think": SECOND_THOUGHTS}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
RESPONSES_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tinyoss.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def scripted(model):
    return Scripted(model, SCRIPT)


@pytest.fixture(scope="module")
def served(scripted):
    with serve(scripted, parallel=2, ctx=4096, max_queue=8) as (url, server):
        yield url, server


def client(url: str, key: str = "none", **options) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60, **options)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------------
# Chat Completions
# ---------------------------------------------------------------------------------------------------


def test_models_and_health(served):
    url, _ = served
    assert [m.id for m in client(url).models.list()] == [MODEL_ID]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["slots"] == 2


def test_reasoning_and_answer_come_apart(served):
    url, _ = served
    reply = client(url).chat.completions.create(model=MODEL_ID, messages=user("Hello"))
    message = reply.choices[0].message
    assert message.content == "Hello there! 👋"
    extra = message.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == "The user greets me."
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert usage.completion_tokens == len(tinyoss_tokens(REASONED))
    assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def tinyoss_tokens(text: str) -> list[int]:
    from tinyoss.tokenizer import get_tokenizer

    return get_tokenizer().encode(text, allowed_special="all")


def test_streaming_sends_role_reasoning_content_then_usage_and_done(served):
    url, _ = served
    chunks = list(client(url).chat.completions.create(
        model=MODEL_ID, messages=user("Hello"), stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == "The user greets me." and content == "Hello there! 👋"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tinyoss_tokens(REASONED))
    with httpx.stream("POST", f"{url}/v1/chat/completions",
                      json={"model": MODEL_ID, "messages": user("Hello"), "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_a_tool_call_round_trip_reuses_the_cache(served):
    url, _ = served
    c = client(url)
    messages = user("What is the weather in Paris?")
    first = c.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert first.choices[0].message.model_extra["reasoning_content"] == "Need the weather."
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 20}'}]
    second = c.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == "It is 20°C in Paris."
    # the reasoning before the call was rendered back (a tool loop keeps it), so the whole first
    # prompt and reply (all but its <|call|>, never run) came from the cache
    assert second.usage.prompt_tokens_details.cached_tokens == \
        first.usage.prompt_tokens + first.usage.completion_tokens - 1


def test_tool_calls_stream_name_first_then_arguments_in_pieces(served):
    url, _ = served
    chunks = list(client(url).chat.completions.create(
        model=MODEL_ID, messages=user("What is the weather in Paris?"), tools=TOOLS, stream=True))
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert all(c.function.name is None and c.id is None for c in calls[1:]) and len(calls) > 3
    assert json.loads("".join(c.function.arguments for c in calls)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_call_on_the_analysis_channel_is_a_tool_call(served):
    url, _ = served
    reply = client(url).chat.completions.create(model=MODEL_ID, messages=user("And the weather in Lyon?"),
                                                tools=TOOLS)
    message = reply.choices[0].message
    assert message.tool_calls[0].function.arguments == '{"city": "Lyon"}'
    assert message.content is None and "reasoning_content" not in message.model_extra
    assert reply.choices[0].finish_reason == "tool_calls"


def test_a_commentary_preamble_is_content(served):
    url, _ = served
    reply = client(url).chat.completions.create(model=MODEL_ID, messages=user("weather in Nice?"), tools=TOOLS)
    message = reply.choices[0].message
    assert message.content == "Let me check."
    assert message.tool_calls[0].function.arguments == '{"city": "Nice"}'


def test_reasoning_effort_in_every_dialect_reaches_the_prompt(served, scripted):
    url, _ = served
    c = client(url)
    for i, extra in enumerate(({"reasoning_effort": "high"}, {"reasoning": {"effort": "high"}},
                               {"chat_template_kwargs": {"reasoning_effort": "high"}})):
        before = len(scripted.prompts)
        c.chat.completions.create(model=MODEL_ID, messages=user(f"Hello {i}"), max_tokens=2, extra_body=extra)
        assert "Reasoning: high" in scripted.prompts[before], extra
    c.chat.completions.create(model=MODEL_ID, messages=user("Hello 4"), max_tokens=2)
    assert "Reasoning: medium" in scripted.prompts[-1]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL_ID, messages=user("Hello"), reasoning_effort="extreme")
    assert err.value.body["param"] == "reasoning_effort"
    with pytest.raises(openai.BadRequestError, match="disagree"):
        c.chat.completions.create(model=MODEL_ID, messages=user("Hello"), reasoning_effort="low",
                                  extra_body={"reasoning": {"effort": "high"}})


def test_a_named_tool_choice_forces_the_call(served):
    url, _ = served
    reply = client(url).chat.completions.create(
        model=MODEL_ID, messages=user("Hello"), tools=TOOLS, max_tokens=12, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_stop_strings_max_tokens_logprobs_and_seed(served):
    url, _ = served
    c = client(url)
    stopped = c.chat.completions.create(model=MODEL_ID, messages=user("Hello"), stop=["there"])
    assert stopped.choices[0].message.content == "Hello " and stopped.choices[0].finish_reason == "stop"
    short = c.chat.completions.create(model=MODEL_ID, messages=user("Hello"), max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    with_logprobs = c.chat.completions.create(model=MODEL_ID, messages=user("Hello"), logprobs=True,
                                              top_logprobs=2)
    entries = with_logprobs.choices[0].logprobs.content
    assert bytes(b for e in entries for b in e.bytes).decode() == "Hello there! 👋"  # 👋: two tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    plain = [c.chat.completions.create(model=MODEL_ID, messages=user("Hi"), max_tokens=8, seed=7,
                                       logprobs=True).choices[0].logprobs.content for _ in range(2)]
    assert [e.token for e in plain[0]] == [e.token for e in plain[1]]


def streamed_logprobs(c, **kwargs) -> tuple[str, list]:
    """A streamed reply's content and logprobs entries; checks that each entry came in the chunk
    that holds the first of its token's text."""
    content, entries = b"", []
    for chunk in c.chat.completions.create(model=MODEL_ID, stream=True, logprobs=True, **kwargs):
        content += (chunk.choices[0].delta.content or "").encode()
        entries += chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else []
        covered = b"".join(bytes(e.bytes) for e in entries)
        assert covered.startswith(content)
        assert not entries or len(covered) - len(entries[-1].bytes) < len(content)
    return content.decode(), entries


def test_logprobs_one_entry_per_content_token_held_back_or_not(served):
    url, _ = served
    c = client(url)
    ids = tinyoss_tokens(BIRDS)[3:-1]  # the content's: after <|channel|>final<|message|>
    raw = [get_tokenizer().decode_single_token_bytes(i) for i in ids]
    expected = [(r.decode(errors="replace"), list(r)) for r in raw]
    # no stop string, one that holds text back but never comes, two that cut the content
    for stop, content, n in [(None, "A 🦩 or ℵ, 𝄞!", len(ids)), ("ℵ, 𝄞?", "A 🦩 or ℵ, 𝄞!", len(ids)),
                             (", 𝄞", "A 🦩 or ℵ", 7), ("r ℵ", "A 🦩 o", 5)]:
        reply = c.chat.completions.create(model=MODEL_ID, messages=user("birds?"), logprobs=True, stop=stop)
        assert reply.choices[0].message.content == content
        assert [(e.token, e.bytes) for e in reply.choices[0].logprobs.content] == expected[:n], stop
        text, entries = streamed_logprobs(c, messages=user("birds?"), stop=stop)
        assert text == content and [(e.token, e.bytes) for e in entries] == expected[:n], stop


def test_nothing_streams_after_a_stop_string(served, monkeypatch):
    from tinyoss import server as srv

    url, server = served
    found = srv.StopStrings.feed

    def feed(self, *args):
        out = found(self, *args)
        if self.hit:  # the event loop is held (as on a busy server) while the engine writes the rest
            deadline = time.monotonic() + 10
            while server.engine.load["running"] and time.monotonic() < deadline:
                time.sleep(0.01)
        return out

    monkeypatch.setattr(srv.StopStrings, "feed", feed)
    c = client(url)
    for prompt, stop in [("weather in Nice?", "check"), ("Think first", "think")]:  # a call, reasoning
        reply = c.chat.completions.create(model=MODEL_ID, messages=user(prompt), tools=TOOLS, stop=stop)
        message = reply.choices[0].message
        assert (message.content, message.tool_calls, reply.choices[0].finish_reason) == ("Let me ", None, "stop")
        assert "reasoning_content" not in message.model_extra
        chunks = list(c.chat.completions.create(model=MODEL_ID, messages=user(prompt), tools=TOOLS, stop=stop,
                                                stream=True, stream_options={"include_usage": True}))
        deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
        assert "".join(d.content or "" for d in deltas) == "Let me "
        assert not any(d.tool_calls or d.model_extra.get("reasoning_content") for d in deltas), deltas
        assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage is not None


# ---------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------


def test_responses_previous_response_id_continues_a_tool_loop(served):
    url, _ = served
    c = client(url)
    first = c.responses.create(model=MODEL_ID, input="What is the weather in Paris?", tools=RESPONSES_TOOLS)
    kinds = [item.type for item in first.output]
    assert kinds == ["reasoning", "function_call"] and first.status == "completed"
    assert first.output[0].content[0].text == "Need the weather."
    call = first.output[1]
    second = c.responses.create(model=MODEL_ID, previous_response_id=first.id, tools=RESPONSES_TOOLS,
                                input=[{"type": "function_call_output", "call_id": call.call_id,
                                        "output": '{"temp": 20}'}])
    assert second.output_text == "It is 20°C in Paris."
    assert second.usage.input_tokens_details.cached_tokens == \
        first.usage.input_tokens + first.usage.output_tokens - 1
    assert c.responses.retrieve(second.id).output_text == "It is 20°C in Paris."
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=MODEL_ID, input="Hi", previous_response_id="resp_nope")


def test_responses_stream_events(served):
    url, _ = served
    with client(url).responses.stream(model=MODEL_ID, input="Hello", reasoning={"effort": "low"}) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_response()
    assert events[:2] == ["response.created", "response.in_progress"]
    assert events[-1] == "response.completed"
    for kind in ("output_item.added", "content_part.added", "reasoning_text.delta", "reasoning_text.done",
                 "output_text.delta", "output_text.done", "content_part.done", "output_item.done"):
        assert f"response.{kind}" in events
    assert final.output_text == "Hello there! 👋" and final.reasoning.effort == "low"
    with client(url).responses.stream(model=MODEL_ID, input="What is the weather in Paris?",
                                      tools=RESPONSES_TOOLS) as stream:
        events = [event.type for event in stream]
    assert "response.function_call_arguments.delta" in events
    assert "response.function_call_arguments.done" in events


# ---------------------------------------------------------------------------------------------------
# Errors: the client's exception types, OpenAI's error body, the server keeps serving
# ---------------------------------------------------------------------------------------------------


def test_errors_have_the_status_and_name_the_field(served):
    url, _ = served
    c = client(url)
    with pytest.raises(openai.NotFoundError) as err:
        c.chat.completions.create(model="gpt-5", messages=user("Hi"))
    assert err.value.body["code"] == "model_not_found"
    for kwargs, param in [({"n": 2}, "n"), ({"temperature": 5}, "temperature"),
                          ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
                          ({"extra_body": {"frobnicate": True}}, "frobnicate"),
                          ({"response_format": {"type": "json_object"}}, "response_format"),
                          ({"logit_bias": {"1": 5}}, "logit_bias"),
                          ({"max_tokens": 10**6}, "max_tokens")]:
        kwargs = {"model": MODEL_ID, "messages": user("Hi"), **kwargs}
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(**kwargs)
        assert err.value.body["param"] == param, kwargs
        assert err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="4096") as err:  # the counts
        c.chat.completions.create(model=MODEL_ID, messages=user("word " * 5000))
    r = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": 5, "messages": user("Hi")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert r.json()["error"]["message"].startswith("'model' must be a string")
    r = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (5 * 1024 * 1024))
    assert r.status_code == 413
    assert httpx.get(f"{url}/nowhere").json()["error"]["message"].startswith("no route")
    assert httpx.get(f"{url}/health").status_code == 200  # still serving


def test_a_stalled_upload_is_answered_408_and_closed(scripted, caplog):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")

    def answer(sock: socket.socket) -> bytes:
        """Everything the server sends until it closes the connection."""
        sock.settimeout(10)
        data = b""
        while piece := sock.recv(65536):
            data += piece
        return data

    with caplog.at_level("INFO", logger="tinyoss.server"), serve(scripted, body_seconds=2) as (url, _):
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        start = time.monotonic()
        stalled = socket.create_connection(address)
        stalled.sendall(head + b'{"model": ')  # and never the rest
        slow = socket.create_connection(address)
        slow.sendall(head)
        # meanwhile other clients are served
        assert [m.id for m in client(url).models.list()] == [MODEL_ID]
        assert client(url).chat.completions.create(model=MODEL_ID, messages=user("Hello")).choices[0]
        while not select.select([slow], [], [], 0.2)[0] and time.monotonic() < start + 10:
            slow.sendall(b" ")  # a byte at a time until the server answers
        for sock in (stalled, slow):
            with sock:
                status, _, body = answer(sock).partition(b"\r\n\r\n")
                assert status.startswith(b"HTTP/1.1 408 ")
                error = json.loads(body)["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_timeout"
        assert 2 <= time.monotonic() - start < 10
    assert sum(" 408 " in r.getMessage() for r in caplog.records) == 2


def test_an_api_key_is_required_and_checked(scripted):
    with serve(scripted, api_key="sekrit") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert [m.id for m in client(url, key="sekrit").models.list()] == [MODEL_ID]
        assert httpx.get(f"{url}/health").status_code == 200  # health needs no key
    with serve(scripted, api_key="clé-🔑") as (url, _):  # a key beyond ASCII, sent as UTF-8
        auth = {"authorization": "Bearer clé-🔑".encode()}
        assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"authorization": b"Bearer cle-x"}).status_code == 401


def test_overload_is_a_503_with_retry_after(model):
    with serve(model, parallel=1, max_queue=0) as (url, server):
        c = client(url)
        long = c.chat.completions.create(model=MODEL_ID, messages=user("Hi"), max_tokens=400, stream=True)
        next(iter(long))  # the one slot is taken
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL_ID, "messages": user("Hi")})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "overloaded"
        # the limits as `serve` announced them (it said '1 requests are running and 0 waiting')
        assert "all 1 of its slots (--parallel) are taken and 0 requests wait" in r.json()["error"]["message"]
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model=MODEL_ID, messages=user("Hi"))
        long.close()


def test_a_client_that_goes_away_frees_its_stream(model):
    # a reply that goes on (a random model's own may end at any token: then nothing was tested,
    # and the check that it still runs failed now and then)
    endless = Scripted(model, {"Hi": "<|channel|>final<|message|>" + "la " * 3000})
    with serve(endless, parallel=1) as (url, server):
        stream = client(url).chat.completions.create(model=MODEL_ID, messages=user("Hi"), max_tokens=3000,
                                                     stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        assert server.engine.load["running"] == 1
        stream.close()
        deadline = time.monotonic() + 5
        while server.engine.load["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.load["running"] == 0
        generated = len(server.engine.slots[0].tokens)
        assert generated < 3000  # it stopped long before max_tokens


# ---------------------------------------------------------------------------------------------------
# Streams decoded together equal each alone; a bounded load
# ---------------------------------------------------------------------------------------------------

PROMPTS = [f"Tell me about {x}" for x in ("cats", "the sea", "numbers", "Paris", "rain", "owls", "tea", "time")]


def greedy(c, prompt: str, n: int = 12):
    reply = c.chat.completions.create(model=MODEL_ID, messages=user(prompt), max_tokens=n, temperature=0,
                                      logprobs=True, extra_body={"reasoning_effort": "low"})
    return reply.choices[0].message.content, [e.logprob for e in reply.choices[0].logprobs.content or []]


def test_streams_decoded_together_equal_each_alone(model):
    with serve(model, parallel=1) as (url, _):
        alone = [greedy(client(url), p) for p in PROMPTS[:4]]
    with serve(model, parallel=4) as (url, server):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda p: greedy(client(url), p), PROMPTS[:4]))
    for (text, logprobs), (text2, logprobs2) in zip(alone, together):
        assert text == text2
        assert logprobs == pytest.approx(logprobs2, abs=1e-4)


def test_a_bounded_load_with_cancellations(model):
    with serve(model, parallel=1) as (url, _):
        expected = {p: greedy(client(url), p) [0] for p in PROMPTS}
    with serve(model, parallel=4, max_queue=40) as (url, server):
        def one(i: int):
            c = client(url)
            prompt = PROMPTS[i % len(PROMPTS)]
            if i % 5 == 4:  # cancelled midway
                stream = c.chat.completions.create(model=MODEL_ID, messages=user(prompt), max_tokens=200,
                                                   temperature=0, stream=True)
                for k, _ in enumerate(stream):
                    if k == 2:
                        break
                stream.close()
                return "cancelled"
            return greedy(c, prompt)[0] == expected[prompt]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(40)))
        assert results.count("cancelled") == 8 and results.count(True) == 32
        deadline = time.monotonic() + 5
        while server.engine.load["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.load == {"running": 0, "waiting": 0, "prefilling": 0, "slots": 4}
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def test_tinyoss_serve_starts_serves_and_stops_on_ctrl_c(tiny_checkpoint):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinyoss.cli", "serve", "-m", str(tiny_checkpoint),
                             "--port", "0", "--parallel", "2", "--ctx", "2048"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not any(line.startswith("ready: ") for line in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = lines[-1].split()[1]
        assert url.startswith("http://127.0.0.1:")
        c = client(url)
        assert c.models.list().data[0].id == "model"
        stream = c.chat.completions.create(model="model", messages=user("Hi"), max_tokens=1900, stream=True)
        next(iter(stream))
        proc.send_signal(signal.SIGINT)  # mid-stream: the stream ends, the server exits 0
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
        assert "POST /v1/chat/completions 200" in log and "Traceback" not in log
    finally:
        proc.kill()


def test_serving_on_every_interface_without_a_key_warns(tiny_checkpoint):
    """An empty --api-key is no key, as the warning says (it was a key of nothing: a request
    without one got 401, one with `Bearer ` got in)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tinyoss.cli", "serve", "-m", str(tiny_checkpoint),
                             "--host", "0.0.0.0", "--port", "0", "--api-key", ""],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [proc.stderr.readline()]
        assert "without --api-key" in lines[0]
        while not lines[-1].startswith("ready: "):
            lines.append(proc.stderr.readline())
            assert lines[-1], "".join(lines)
        port = lines[-1].split()[1].rsplit(":", 1)[1].rstrip("/")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
