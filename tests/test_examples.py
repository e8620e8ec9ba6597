"""Every example in examples/ runs as documented (`python examples/NAME.py [MODEL]`) and prints what it says.

Each runs in its own process on the session's tiny synthetic checkpoint; one also runs without a MODEL, which
writes its own tiny checkpoint to a temporary folder. Random weights write noise, so the checks are on the
structure of the output, not on the text.
"""

import os
import re
import subprocess
import sys
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args) -> str:
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_every_example_is_tested():
    tested = {"generate_text.py", "chat_with_tools.py", "reasoning_effort.py", "inspect_routing.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_generate_text(tiny_checkpoint):
    out = run_example("generate_text.py", tiny_checkpoint)
    # random weights may write malformed harmony before the 128th token (the prompt holds today's
    # date, so what is sampled changes from day to day): the stats line says which
    stats = re.search(r"\[(\d+) tokens, prefill \d+ tok/s, decode [\d.]+ tok/s, stop: (\w+)\]", out)
    assert stats, out
    tokens, stop = int(stats[1]), stats[2]
    assert (tokens, stop) == (128, "max_tokens") or (tokens < 128 and stop in ("malformed", "stop"))
    assert "final answer: " in out and "raw: " in out
    assert "greedy tokens: [" in out


def test_generate_text_writes_its_own_checkpoint_without_a_model():
    out = run_example("generate_text.py")
    assert "greedy tokens: [" in out


def test_chat_with_tools(tiny_checkpoint):
    out = run_example("chat_with_tools.py", tiny_checkpoint)
    assert "namespace functions {" in out
    assert "type get_weather = (_: {" in out and '"celsius" | "fahrenheit"' in out
    assert "type add = (_: {" in out
    assert out.count("> ") >= 2 and out.count(" sampled, stop: ") == 2


def test_reasoning_effort(tiny_checkpoint):
    lines = run_example("reasoning_effort.py", tiny_checkpoint).splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["low"], ["medium"], ["high"])]
    assert [row[0] for row in rows] == ["low", "medium", "high"]
    assert all(row[5] in ("return", "call", "max_tokens", "malformed") for row in rows)


def test_inspect_routing(tiny_checkpoint):
    out = run_example("inspect_routing.py", tiny_checkpoint)
    assert out.startswith("layer 2: each token's experts")
    assert "'<|start|>'" in out and "e" in out
    load = [line for line in out.splitlines() if line.strip().startswith("layer ") and "busiest" in line]
    assert len(load) == 4 and all("of 8 experts unused" in line for line in load)
