"""The README runs as written: its ```python blocks are executed on the tiny synthetic checkpoint
(the server block against the real server, tests/serving.py), and every `tinyoss ...` command line
it shows is parsed by the command line's own parser (option names, choices, value types)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from tinyoss import generate as g
from tinyoss.cli import app

README = Path(__file__).parent.parent / "README.md"
MODEL_PATH = "path/to/gpt-oss-20b"  # what the README's Python loads: replaced by the tiny checkpoint
SERVER_URL = "http://127.0.0.1:8000"  # where the README's client connects: replaced by the test server's
REPLY = ("<|channel|>analysis<|message|>A greeting.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)


def command_lines() -> list[str]:
    """Every `tinyoss ...` command of the README: the lines of its shell blocks (indented, or fenced
    but not python; a deeper-indented line of `[...]` continues the one above; `$ ` and what comes
    before `&&` dropped), and inline code."""
    lines: list[str] = []
    fence = None  # the language of the fenced block we are in
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else (line[3:].strip() or "text")
            continue
        if fence == "python":
            continue
        code = line if fence is not None else (line[4:] if line.startswith("    ") else None)
        if code is None:
            lines += [span for span in re.findall(r"`([^`]+)`", line) if span.startswith("tinyoss ")]
        elif code.strip().startswith("[") and code.startswith(" ") and lines:
            lines[-1] += " " + code.strip()  # a continuation of the command above
        else:
            parts = [part.strip().removeprefix("$ ") for part in code.split("&&")]
            lines += [part for part in parts if part.startswith("tinyoss ") or part == "tinyoss"]
    return lines


# the README's placeholders, and a value of each the parser accepts
PLACEHOLDERS = {"MODEL": "./gpt-oss-20b", "OUT": "./out", "PROMPT": "hi", "H": "127.0.0.1", "KEY": "secret",
                "N": "16", "ORIGIN": "http://localhost:3000", "ID": "openai/gpt-oss-20b", "GB": "8"}


def arguments(line: str) -> list[str]:
    """A README command line as the arguments it stands for: `[--flag X]` given, `a|b` the first
    choice, placeholders filled in."""
    words = []
    for word in shlex.split(line, comments=True)[1:]:
        word = word.strip("[]")
        if word in PLACEHOLDERS:
            word = PLACEHOLDERS[word]
        elif "|" in word:
            word = word.split("|")[0]
        if word:
            words.append(word)
    return words


def test_the_readme_shows_the_command_lines():
    commands = {arguments(line)[0] for line in command_lines()}
    assert {"run", "chat", "serve", "bench", "inspect", "synth", "info", "cache"} <= commands


@pytest.mark.parametrize("line", command_lines())
def test_each_command_line_of_the_readme_parses(line):
    """The parser takes every option and value of the line (the command is not run)."""
    args = arguments(line)
    assert not any(re.fullmatch(r"[A-Z][A-Z_]*", a) for a in args), f"a placeholder to add: {line}"
    group = typer.main.get_command(app)
    if args[0].startswith("-"):  # an option of tinyoss itself (--version)
        from typer.testing import CliRunner

        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        return
    assert args[0] in group.commands, f"no command {args[0]!r}: {line}"
    group.commands[args[0]].make_context(args[0], args[1:])  # raises on an unknown option, a bad value


def run_block(code: str) -> None:
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})


@pytest.fixture
def short_replies(monkeypatch):
    """The README's calls sample at most 16 tokens: random weights write noise, and 2048 tokens of
    it (generate's default max_tokens) would only take time."""
    monkeypatch.setitem(g.generate.__kwdefaults__, "max_tokens", 16)


def test_the_python_api_block_runs(tiny_checkpoint, short_replies, capsys):
    (block,) = [b for b in python_blocks() if MODEL_PATH in b]
    run_block(block.replace(MODEL_PATH, str(tiny_checkpoint)))
    printed = capsys.readouterr().out
    assert printed.strip(), "print(reply.text) printed nothing"


def test_the_client_block_runs_against_the_server(tiny_checkpoint, capsys):
    """The openai client block, against the real server on a free port, steered to write a reply
    with reasoning (tests/serving.py): it prints the answer and the reasoning."""
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    import tinyoss
    from serving import Scripted, serve

    (block,) = [b for b in python_blocks() if SERVER_URL in b]
    model = Scripted(tinyoss.load(tiny_checkpoint), {"Hi": REPLY})
    with serve(model, model_id="gpt-oss-20b", ctx=1024) as (url, _):
        run_block(block.replace(SERVER_URL, url))
    assert capsys.readouterr().out == "Hello! A greeting.\n"


def test_every_python_block_is_run_by_a_test():
    blocks = python_blocks()
    assert blocks and all(MODEL_PATH in b or SERVER_URL in b for b in blocks), \
        "a new ```python block: run it here"
