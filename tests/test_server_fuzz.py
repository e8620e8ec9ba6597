"""`tinyoss serve` under hostile input: every client mistake is an OpenAI-shaped 4xx error body (never
a 500, never a traceback in the log) and the server keeps serving; a client that goes away frees
its slot, streamed or not; one too slow to send its request head holds no socket for long. The
real server on the tiny synthetic checkpoint (tests/serving.py)."""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import time

import httpx
import pytest

pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import tinyoss  # noqa: E402
from serving import MODEL_ID, Scripted, serve  # noqa: E402

CTX = 4096
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"a": {"type": "string"}}}}}]
CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
RESPONSES = {"model": MODEL_ID, "input": "hi", "max_output_tokens": 2}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tinyoss.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def served(model):
    with serve(model, parallel=2, ctx=CTX, max_queue=4) as (url, server):
        yield url, server


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture()
def errors_logged():
    """ERROR records of the server and of uvicorn (its "Exception in ASGI application")."""
    handler = _Errors()
    loggers = [logging.getLogger(name) for name in ("tinyoss.server", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.records
    for logger in loggers:
        logger.removeHandler(handler)


def post(url: str, path: str, data: bytes) -> httpx.Response:
    # a fresh connection each time: after a 500, uvicorn closes the connection it came on
    return httpx.post(url + path, content=data, headers={"content-type": "application/json"},
                      timeout=30)


def assert_client_error(response: httpx.Response, status: int | None = 400, param: str | None = "?"):
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param != "?":
        assert error["param"] == param, error


def assert_healthy(url: str):
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok"


def dumps(body: dict) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate goes as its \\udXXX escape


# ---------------------------------------------------------------------------------------------------
# Bodies the json module rejects with something other than JSONDecodeError
# ---------------------------------------------------------------------------------------------------

BAD_JSON = {
    "an integer of 5000 digits (ValueError)": b'{"model": "tiny", "max_tokens": ' + b"9" * 5000 + b"}",
    "arrays nested 100000 deep (RecursionError)": b"[" * 100_000 + b"]" * 100_000,
    "objects nested 5000 deep (RecursionError)": b'{"a":' * 5000 + b"1" + b"}" * 5000,
}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
@pytest.mark.parametrize("name", list(BAD_JSON))
def test_a_body_json_cannot_decode_is_a_400(served, errors_logged, path, name):
    url, _ = served
    assert_client_error(post(url, path, BAD_JSON[name]), 400, None)
    assert not errors_logged
    assert_healthy(url)


# ---------------------------------------------------------------------------------------------------
# Lone surrogates (valid JSON escapes, not encodable as UTF-8) wherever the server echoes a string
# ---------------------------------------------------------------------------------------------------

SURROGATE = "\ud800"
ECHOED = {
    "an unknown field's name": ("/v1/chat/completions", {**CHAT, SURROGATE: 1}),
    "model": ("/v1/chat/completions", {**CHAT, "model": SURROGATE}),
    "messages[0].role": ("/v1/chat/completions", {**CHAT, "messages": [{"role": SURROGATE, "content": "x"}]}),
    "previous_response_id": ("/v1/responses", {**RESPONSES, "previous_response_id": SURROGATE}),
    "instructions": ("/v1/responses", {**RESPONSES, "instructions": SURROGATE}),
    "instructions, streamed": ("/v1/responses", {**RESPONSES, "instructions": SURROGATE, "stream": True}),
    "tools[0].description": ("/v1/responses", {**RESPONSES, "tools": [
        {"type": "function", "name": "f", "description": SURROGATE}]}),
}


@pytest.mark.parametrize("name", list(ECHOED))
def test_a_lone_surrogate_is_a_400_not_a_500(served, errors_logged, name):
    url, _ = served
    path, body = ECHOED[name]
    assert_client_error(post(url, path, dumps(body)), 400)
    assert not errors_logged
    assert_healthy(url)


# ---------------------------------------------------------------------------------------------------
# Fields that reached code which assumed their shape
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", ["f", ["f"], 5, True])
def test_tool_choice_with_a_function_that_is_no_object_is_a_400(served, errors_logged, function):
    url, _ = served
    body = {**CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": function}}
    assert_client_error(post(url, "/v1/chat/completions", dumps(body)), 400, "tool_choice")
    assert not errors_logged


def test_what_the_second_probe_found_is_named(served, errors_logged):
    """A gzip body (was 'not valid JSON: can't decode byte 0x8b'), a trailing slash (a 307 with an
    empty body), Responses' text as a string (blamed on 'text.format'), a tool message without
    its tool_call_id ('None matches no tool call')."""
    import gzip

    url, _ = served
    r = httpx.post(url + "/v1/chat/completions", content=gzip.compress(dumps(CHAT)),
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert_client_error(r, 415, None)
    assert "Content-Encoding 'gzip' is not supported" in r.json()["error"]["message"]
    for method, path in (("POST", "/v1/chat/completions/"), ("GET", "/v1/models/"), ("GET", "/health/")):
        r = httpx.request(method, url + path, json=CHAT, follow_redirects=False)
        assert_client_error(r, 404)
    r = post(url, "/v1/responses", dumps({**RESPONSES, "text": "x"}))
    assert_client_error(r, 400, "text")
    assert "'text' must be an object" in r.json()["error"]["message"]
    messages = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "20 C"}]
    r = post(url, "/v1/chat/completions", dumps({**CHAT, "messages": messages}))
    assert_client_error(r, 400, "messages[1].tool_call_id")
    assert "tool_call_id is required" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", content=dumps({**CHAT, "max_tokens": 2}),
                   headers={"content-type": "application/json", "content-encoding": ""})
    assert r.status_code == 200, r.text  # an empty Content-Encoding is none
    assert not errors_logged
    assert_healthy(url)


def test_a_request_of_only_a_system_message_is_answered(served, errors_logged):
    """Its text becomes the developer's instructions and the conversation has no other message:
    that is a prompt (OpenAI answers it), not an empty conversation (a 500 for a while)."""
    url, _ = served
    r = post(url, "/v1/chat/completions", dumps({**CHAT, "max_tokens": 2,
                                                "messages": [{"role": "system", "content": "Say hi"}]}))
    assert r.status_code == 200, r.text
    assert not errors_logged


def test_deeply_nested_tool_parameters_are_a_400(served, errors_logged):
    """~330 nested object schemas exhaust the recursion of harmony's TypeScript rendering."""
    url, _ = served
    schema: dict = {"type": "string"}
    for _ in range(450):
        schema = {"type": "object", "properties": {"a": schema}}
    body = {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    assert_client_error(post(url, "/v1/chat/completions", dumps(body)), 400)
    assert not errors_logged
    assert_healthy(url)


# ---------------------------------------------------------------------------------------------------
# Random values for every top-level field
# ---------------------------------------------------------------------------------------------------

_text = st.text(max_size=8) | st.sampled_from(["", "auto", "none", "required", "function", "text", "low",
                                              "f", MODEL_ID, "\x00", "😀", "<|start|>", SURROGATE])
_scalar = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | _text)
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(_text, inner, max_size=3), max_leaves=8)
CHAT_FIELDS = ["model", "messages", "tools", "tool_choice", "reasoning_effort", "reasoning",
               "chat_template_kwargs", "max_tokens", "max_completion_tokens", "temperature", "top_p",
               "top_k", "min_p", "seed", "stop", "logprobs", "top_logprobs", "stream", "n",
               "response_format", "stream_options", "user", "metadata", "logit_bias", "unknown"]
RESPONSES_FIELDS = ["model", "input", "instructions", "tools", "tool_choice", "reasoning",
                    "max_output_tokens", "temperature", "top_p", "store", "previous_response_id",
                    "stream", "text", "include", "metadata", "background", "unknown"]


def _fuzz_one(url: str, path: str, body: dict, max_field: str) -> None:
    if not isinstance(body.get(max_field), int) or isinstance(body.get(max_field), bool):
        body[max_field] = 2  # keep any generation short
    if max_field == "max_tokens":
        body.pop("max_completion_tokens", None)
    response = post(url, path, dumps(body))
    assert response.status_code < 500, (body, response.text[:300])
    if response.status_code >= 400:
        assert_client_error(response, None)
    elif "text/event-stream" in response.headers.get("content-type", ""):
        assert "[DONE]" in response.text or "response.completed" in response.text \
            or "response.incomplete" in response.text, response.text[-300:]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=st.lists(st.tuples(st.sampled_from(CHAT_FIELDS), _json), min_size=1, max_size=2))
def test_random_chat_fields_never_make_a_500(served, changes):
    url, _ = served
    _fuzz_one(url, "/v1/chat/completions", {**CHAT, "tools": TOOLS, **dict(changes)}, "max_tokens")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes=st.lists(st.tuples(st.sampled_from(RESPONSES_FIELDS), _json), min_size=1, max_size=2))
def test_random_responses_fields_never_make_a_500(served, changes):
    url, _ = served
    _fuzz_one(url, "/v1/responses", {**RESPONSES, **dict(changes)}, "max_output_tokens")


# ---------------------------------------------------------------------------------------------------
# A client that goes away
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def endless(model):
    """A server whose replies to "hi" go on (the random model's own may end at any token)."""
    with serve(Scripted(model, {"hi": "<|channel|>final<|message|>" + "la " * 5000}), parallel=1,
               ctx=CTX) as (url, server):
        yield url, server


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_non_streamed_request_whose_client_left_frees_its_slot(endless, path):
    """An HTTP client that times out (the openai client then retries, twice by default) must not
    leave its generation running to max_tokens (by default the whole context)."""
    url, server = endless
    body = dict(CHAT) if path.endswith("completions") else dict(RESPONSES)
    body.pop("max_tokens", None), body.pop("max_output_tokens", None)  # the whole context
    data = dumps(body)
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        deadline = time.monotonic() + 20
        while server.engine.load["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.engine.load["running"] == 1
    deadline = time.monotonic() + 5  # a decode step of the tiny model is milliseconds
    while server.engine.load["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.load["running"] == 0, "the generation went on after its client left"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_client_gone_before_its_body_arrived_is_no_server_error(served, errors_logged, path):
    """Starlette raises ClientDisconnect from request.stream(): a client's doing, not a bug to log
    with a traceback (nor a 500 in the request's log line)."""
    url, _ = served
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 500\r\n\r\n{{\"model\": ".encode())
        time.sleep(0.3)
    time.sleep(0.5)
    assert not errors_logged, [r.getMessage() for r in errors_logged]
    assert_healthy(url)


@pytest.mark.parametrize("head", [
    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    "GET /health HTTP/1.1\r\nHost x\r\n\r\n",  # a header line without its colon
    "NOT A REQUEST LINE\r\n\r\n",
])
def test_a_malformed_http_request_gets_a_json_400(served, errors_logged, head):
    """What h11 can't parse never reaches the app: uvicorn answered it in plain text."""
    url, _ = served
    with socket.create_connection(address(url)) as sock:
        sock.sendall(head.encode())
        reply = b""
        while chunk := sock.recv(4096):  # the server closes after its answer
            reply += chunk
    status, _, body = reply.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in status.lower()
    error = json.loads(body)["error"]
    assert "not a well-formed HTTP/1.1 request" in error["message"] and error["type"] == "invalid_request_error"
    assert not errors_logged, [r.getMessage() for r in errors_logged]
    assert_healthy(url)


# ---------------------------------------------------------------------------------------------------
# A client that never finishes its request head, or drips a body nobody reads; too many clients
# ---------------------------------------------------------------------------------------------------

HEAD_SECONDS = 0.5


@pytest.fixture(scope="module")
def impatient(model):
    """A server that waits HEAD_SECONDS for a request head."""
    with serve(model, ctx=CTX, header_seconds=HEAD_SECONDS) as (url, server):
        yield url, server


def address(url: str) -> tuple[str, int]:
    return "127.0.0.1", int(url.rsplit(":", 1)[1])


def answer(sock: socket.socket, drip: bytes = b"", seconds: float = 5) -> bytes:
    """Everything the server sends until it closes the connection, sending `drip` every 0.1 s
    meanwhile; fails if it is still open after `seconds`."""
    deadline = time.monotonic() + seconds
    data = b""
    while time.monotonic() < deadline:
        if not select.select([sock], [], [], 0.1)[0]:
            try:
                sock.sendall(drip)
            except OSError:  # closed meanwhile: the next recv says so
                pass
            continue
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            piece = b""
        if not piece:
            return data
        data += piece
    pytest.fail(f"the server kept the connection open for {seconds} s")


def test_a_request_head_that_never_completes_is_answered_408_and_closed(impatient, errors_logged, caplog):
    """uvicorn alone would keep each of these sockets for ever (it times only idle keep-alive
    connections, and their next byte stops that timer)."""
    openai = pytest.importorskip("openai")
    url, _ = impatient
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
    with caplog.at_level("INFO", logger="tinyoss.server"):
        start = time.monotonic()
        stalled = [socket.create_connection(address(url)) for _ in range(3)]
        stalled[1].sendall(b"POST /v1/chat/comp")  # part of the request line
        stalled[2].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line
        slowloris = socket.create_connection(address(url))
        slowloris.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
        assert [m.id for m in client.models.list()] == [MODEL_ID]  # meanwhile others are served
        answers = [answer(slowloris, drip=b"a")] + [answer(sock) for sock in stalled]
        for sock in [slowloris, *stalled]:
            sock.close()
        assert HEAD_SECONDS <= time.monotonic() - start < 5
    for data in answers:
        status, _, body = data.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 ") and b"connection: close" in status.lower(), data
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_timeout"
    assert sum(" 408 " in r.getMessage() for r in caplog.records) == 4
    assert not errors_logged, [r.getMessage() for r in errors_logged]
    assert client.chat.completions.create(**CHAT).choices[0].finish_reason == "length"


def test_a_kept_alive_connection_is_timed_only_while_a_request_head_comes(impatient):
    """Idle between requests (uvicorn's timeout_keep_alive, 5 s, closes such connections), or
    sending its body (body_seconds), a connection outlives HEAD_SECONDS."""
    url, _ = impatient
    connection = http.client.HTTPConnection(*address(url), timeout=10)
    connection.request("GET", "/health")
    assert connection.getresponse().read() and connection.sock is not None
    sock = connection.sock
    time.sleep(2 * HEAD_SECONDS)  # idle
    data = dumps(CHAT)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(data)))
    connection.endheaders()
    time.sleep(2 * HEAD_SECONDS)  # the head is complete; the body comes later
    connection.send(data)
    reply = connection.getresponse()
    assert reply.status == 200 and json.loads(reply.read())["choices"]
    assert connection.sock is sock  # one connection all along
    connection.close()


def test_a_body_that_no_endpoint_reads_cannot_hold_its_connection(impatient):
    """GET /health declares a body, then drips it: answered at once, then closed HEAD_SECONDS
    after the drip began (were it silent, uvicorn's keep-alive timeout would close it)."""
    url, _ = impatient
    with socket.create_connection(address(url)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        start = time.monotonic()
        data = answer(sock, drip=b"x")
    assert data.startswith(b"HTTP/1.1 200 ") and data.count(b"HTTP/1.1 ") == 1, data
    assert time.monotonic() - start < 4
    assert_healthy(url)


def test_connections_beyond_the_limit_are_answered_503_at_once(model, errors_logged):
    with serve(model, ctx=CTX, max_connections=2) as (url, _):
        held = [socket.create_connection(address(url)) for _ in range(2)]
        with socket.create_connection(address(url)) as third:
            status, _, body = answer(third, seconds=2).partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in status.lower(), status
        assert json.loads(body)["error"]["code"] == "overloaded"
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 5  # until the server has seen them close
        while httpx.get(f"{url}/health").status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_healthy(url)
    assert not errors_logged, [r.getMessage() for r in errors_logged]
