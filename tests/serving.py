"""Test helpers for `tinyoss serve`: the real server on 127.0.0.1 (a free port) in a thread of the
test process, and a model that writes scripted harmony replies.

`serve(model, **Server options)` starts `tinyoss.server` exactly as `tinyoss serve` does (the same
app, uvicorn, engine), and yields its base URL ("http://127.0.0.1:PORT").

`Scripted(model, replies)` wraps a real (tiny, random) model: every forward pass runs for real (KV
caches, batching, the prompt cache are all exercised), then the logits of the reply being written
get +100 on the next token of a scripted reply, chosen by a keyword of the last user or tool
message. A random model writes junk; this one writes the harmony that gpt-oss writes (reasoning,
tool calls on either channel, ...), so the server's mapping can be driven end to end.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np

from tinyoss.tokenizer import START, get_tokenizer

MODEL_ID = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model, **options):
    """The real server over `model` in a background thread. -> base URL; stops it after."""
    import uvicorn

    from tinyoss import server as srv

    cors = options.pop("cors_origins", None)
    server = srv.Server(model, options.pop("model_id", MODEL_ID), **options)
    port = free_port()
    config = srv.uvicorn_config(server, "127.0.0.1", port, cors, timeout_graceful_shutdown=2)
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not runner.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.engine.cancel_all()
        runner.should_exit = True
        thread.join(timeout=30)
        server.engine.close()


class Scripted:
    """A real model whose replies follow a script (see the module docstring).

    replies: {keyword: harmony text of the reply, as the model samples it after
    `<|start|>assistant`}. The reply is the one whose keyword the last user/tool message contains;
    with none, the model's own logits are left alone.
    """

    BOOST = 100.0

    def __init__(self, model, replies: dict[str, str]):
        self.model = model
        self.config = model.config
        self.kv = model.kv
        tokenizer = get_tokenizer()
        self.tokenizer = tokenizer
        self.replies = {key: tokenizer.encode(text, allowed_special="all") for key, text in replies.items()}
        self.assistant = tokenizer.encode_ordinary("assistant")
        self.history: dict[int, list[int]] = {}  # id(cache) -> the ids it holds
        self.prompts: list[str] = []  # each prefilled prompt, whole (cached part included), as text

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)

    def _steer(self, cache, tokens: list[int], logits: np.ndarray) -> None:
        held = self.history.get(id(cache), [])[:cache.n_tokens - len(tokens)] + tokens
        self.history[id(cache)] = held
        if len(tokens) > 1:
            self.prompts.append(self.tokenizer.decode(held))
        reply_at, said_by = self._reply_start(held)
        if reply_at is None:
            return
        said = self.tokenizer.decode(held[said_by:reply_at])
        script = next((ids for key, ids in self.replies.items() if key in said), None)
        sampled = held[reply_at:]
        if script is None or script[:len(sampled)] != sampled or len(sampled) >= len(script):
            return
        logits[script[len(sampled)]] = logits.max() + self.BOOST

    def _reply_start(self, held: list[int]) -> tuple[int | None, int]:
        """Where the reply being written starts (after the `<|start|>assistant` that follows the
        last message not by the assistant), and where that message starts."""
        starts = [i for i, t in enumerate(held) if t == START]
        for i in reversed(starts):
            role = held[i + 1:i + 1 + len(self.assistant)]
            if len(role) == len(self.assistant) and role != self.assistant:
                later = [j for j in starts if j > i]
                if not later:
                    return None, 0
                return later[0] + 1 + len(self.assistant), i
        return None, 0

    def forward(self, tokens, cache=None, *, last_only=False):
        tokens = [int(t) for t in tokens]
        logits = self.model.forward(tokens, cache, last_only=last_only)
        if cache is not None:
            self._steer(cache, tokens, logits[-1])
        return logits

    def forward_batch(self, tokens, caches):
        logits = self.model.forward_batch(tokens, caches)
        for i, cache in enumerate(caches):
            self._steer(cache, [int(tokens[i])], logits[i])
        return logits
