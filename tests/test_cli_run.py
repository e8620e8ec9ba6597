"""`tinyoss run` and `tinyoss chat` end to end (typer's runner and one real subprocess), and model
resolution through a fake Hugging Face cache. No network: every hub test sets HF_HUB_OFFLINE=1 (the
download path, against a local imitation of the Hub: test_hub.py)."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tinyoss
from tinyoss import cli
from tinyoss import generate as g
from tinyoss import hub
from tinyoss.cli import app
from tinyoss.sampling import Sampler
from tinyoss.tokenizer import get_tokenizer

from test_generate import FINAL, ScriptedModel

runner = CliRunner()
DATE = "2025-08-05"
N = 5  # tokens per reply: the tiny random model writes noise, so tests are about plumbing
RAW = ["-n", str(N), "--raw", "--date", DATE]  # print the sampled tokens' text
RAW_GREEDY = ["-t", "0", *RAW]


def decode(ids) -> str:
    return get_tokenizer().decode(list(ids))


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return tinyoss.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def api_greedy(tiny_model) -> g.Reply:
    """What the Python API says to "Hello", greedily."""
    return g.chat(tiny_model, "Hello", sampler=Sampler(temperature=0), date=DATE, max_tokens=N)


# ---------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["argument", "stdin"])
def test_run_greedy_is_the_python_apis_output(tiny_checkpoint, api_greedy, how):
    args = ["run", "-m", str(tiny_checkpoint), *RAW_GREEDY]
    r = runner.invoke(app, args + ["Hello"]) if how == "argument" else runner.invoke(app, args, input="Hello")
    assert r.exit_code == 0, r.output
    assert r.stdout == decode(api_greedy.tokens) + "\n"
    assert "[stopped at --max-tokens]" in r.stderr


def test_run_in_a_real_process_with_a_piped_prompt(tiny_checkpoint, api_greedy):
    args = ["run", "-m", str(tiny_checkpoint), *RAW_GREEDY, "--stats", "--threads", "1"]
    r = subprocess.run([sys.executable, "-m", "tinyoss.cli", *args], input="Hello", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == decode(api_greedy.tokens) + "\n"
    assert f"{N} tokens at" in r.stderr and "stop: max_tokens" in r.stderr


@pytest.mark.parametrize("option", [["--top-k", "1"], ["--top-p", "1e-9"], ["--min-p", "1"]])
def test_run_filters_that_keep_one_token_are_greedy(tiny_checkpoint, api_greedy, option):
    r = runner.invoke(app, ["run", "Hello", "-m", str(tiny_checkpoint), *RAW, "-t", "1", "-s", "3", *option])
    assert r.exit_code == 0, r.output
    assert r.stdout == decode(api_greedy.tokens) + "\n"


def test_run_seeded_sampling_is_reproducible(tiny_checkpoint, tiny_model):
    r = runner.invoke(app, ["run", "Hello", "-m", str(tiny_checkpoint), "-s", "7", "-t", "1", "-n", "4",
                            "--raw", "--date", DATE])
    assert r.exit_code == 0, r.output

    def api(seed):
        sampler = Sampler(temperature=1, seed=seed)
        reply = g.chat(tiny_model, "Hello", sampler=sampler, date=DATE, max_tokens=4)
        return decode(reply.tokens) + "\n"

    assert r.stdout == api(7) != api(8)


def test_run_shows_the_final_answer_and_dims_or_hides_the_reasoning(monkeypatch):
    reply = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant" + FINAL
    monkeypatch.setattr(cli, "_open_model", lambda *args: ScriptedModel(reply))
    r = runner.invoke(app, ["run", "Hi", "--stats"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "It is 20°C in Paris.\n" and r.stderr.startswith("Think.\n")
    assert "stop: return" in r.stderr and "[stopped" not in r.stderr
    monkeypatch.setattr(cli, "_open_model", lambda *args: ScriptedModel(reply))
    r = runner.invoke(app, ["run", "Hi", "--hide-reasoning"])
    assert r.stdout == "It is 20°C in Paris.\n" and "Think" not in r.stderr


def test_run_puts_system_and_developer_text_in_the_prompt(monkeypatch):
    model = ScriptedModel(FINAL)
    monkeypatch.setattr(cli, "_open_model", lambda *args: model)
    r = runner.invoke(app, ["run", "Hi", "--system", "You are Tiny.", "--developer", "Be brief.", "-r", "low",
                            "--date", DATE])
    assert r.exit_code == 0, r.output
    prompt = decode(model.fed[0])
    assert prompt.startswith(f"<|start|>system<|message|>You are Tiny.\nKnowledge cutoff: 2024-06\n"
                             f"Current date: {DATE}\n\nReasoning: low\n\n")
    assert ("<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
            "<|start|>user<|message|>Hi<|end|><|start|>assistant") in prompt


# ---------------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------------


def prefills(model: ScriptedModel) -> list[str]:
    """The prompts a scripted model was given (decode steps feed one token)."""
    return [decode(tokens) for tokens in model.fed if len(tokens) > 1]


def test_chat_commands(monkeypatch, tmp_path):
    model = ScriptedModel(FINAL, FINAL)
    monkeypatch.setattr(cli, "_open_model", lambda *args: model)
    script = "\n".join(["/reasoning high", "Hi", "/reasoning extreme", "/help", f"/save {tmp_path}/t.json",
                        "/reset", "Again", "/quit"])
    r = runner.invoke(app, ["chat", "--date", DATE], input=script)
    assert r.exit_code == 0, r.output
    assert r.stdout.count("It is 20°C in Paris.") == 2
    assert "error: /reasoning takes low, medium or high (now high)" in r.stderr and "/save FILE" in r.stderr
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["reasoning"] == "high" and saved["date"] == DATE
    answer = {"role": "assistant", "channel": "final", "content": "It is 20°C in Paris."}
    assert saved["messages"] == [{"role": "user", "content": "Hi"}, answer]
    first, second = prefills(model)
    assert "Reasoning: high" in first and "<|start|>user<|message|>Hi<|end|>" in first
    # /reset forgot "Hi": the second prompt shares the system message and "<|start|>user<|message|>"
    # with the first, so only the rest is run
    assert second == "Again<|end|><|start|>assistant"


def test_chat_save_replaces_a_conversation_but_no_other_file(monkeypatch, tmp_path):
    model = ScriptedModel(FINAL, FINAL)
    monkeypatch.setattr(cli, "_open_model", lambda *args: model)
    mine = tmp_path / "notes.json"
    mine.write_text('{"todo": 1}\n')
    script = "\n".join([f"/save {mine}", "Hi", f"/save {tmp_path}/t.json", "Again",
                        f"/save {tmp_path}/t.json", "/quit"])
    r = runner.invoke(app, ["chat", "--date", DATE], input=script)
    assert r.exit_code == 0, r.output
    assert f"error: {mine} exists and is not a saved conversation" in r.stderr
    assert mine.read_text() == '{"todo": 1}\n'
    r = runner.invoke(app, ["chat", "--date", DATE], input=f"/save {tmp_path}\n/quit\n")
    assert f"error: {tmp_path} is a folder: give /save a file name" in r.stderr
    assert len(json.loads((tmp_path / "t.json").read_text())["messages"]) == 4  # replaced


def test_chat_says_how_to_go_on_when_the_conversation_outgrows_the_context(monkeypatch):
    model = ScriptedModel(FINAL, FINAL, max_position_embeddings=86)  # one exchange fits, not two
    monkeypatch.setattr(cli, "_open_model", lambda *args: model)
    r = runner.invoke(app, ["chat", "--date", DATE], input="Hi\nAgain and again\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("It is 20°C in Paris.") == 1
    assert "does not fit the context (86 tokens) (/reset starts a new conversation)" in r.stderr
    model = ScriptedModel(FINAL, max_position_embeddings=86)
    monkeypatch.setattr(cli, "_open_model", lambda *args: model)
    r = runner.invoke(app, ["chat", "--date", DATE], input="word " * 100 + "\n")
    assert "does not fit the context (86 tokens)" in r.stderr  # a first message: no /reset to try
    assert "/reset" not in r.stderr


def test_chat_keeps_the_history_and_reuses_the_cache(monkeypatch):
    model = ScriptedModel(FINAL, FINAL)
    monkeypatch.setattr(cli, "_open_model", lambda *args: model)
    r = runner.invoke(app, ["chat", "--stats"], input="Hi\nAgain\n")  # EOF leaves too
    assert r.exit_code == 0, r.output
    first, second = prefills(model)
    assert second.startswith("<|end|><|start|>user<|message|>Again")  # only what the cache lacked
    cached = [int(n) for n in re.findall(r"\((\d+) cached\)", r.stderr)]
    assert cached == [0, len(model.fed[0]) + len(model.replies[0]) - 1]  # the reply but its <|return|>


class InterruptedModel(ScriptedModel):
    """Ctrl-C arrives during the first reply's third token."""

    def forward(self, tokens, cache=None, *, last_only=False):
        if len(self.fed) == 3:
            self.fed.append([])
            raise KeyboardInterrupt
        return super().forward(tokens, cache, last_only=last_only)


def test_ctrl_c_stops_a_reply_but_not_the_chat(monkeypatch):
    model = InterruptedModel(FINAL, FINAL)
    monkeypatch.setattr(cli, "_open_model", lambda *args: model)
    r = runner.invoke(app, ["chat"], input="Hi\nAgain\n/quit\n")
    assert r.exit_code == 0, r.output
    assert "[stopped; this exchange is not kept]" in r.stderr
    assert r.stdout.count("It is 20°C in Paris.") == 1
    first, second = prefills(model)
    assert second.startswith("<|start|>system") and "<|message|>Hi<|end|>" not in second  # a fresh cache


def test_chat_on_the_tiny_checkpoint(tiny_checkpoint, api_greedy):
    r = runner.invoke(app, ["chat", "-m", str(tiny_checkpoint), *RAW_GREEDY], input="Hello\n/quit\n")
    assert r.exit_code == 0, r.output
    assert decode(api_greedy.tokens) + "\n" in r.stdout


# ---------------------------------------------------------------------------------------------------
# a reply with no final message
# ---------------------------------------------------------------------------------------------------

NOT_HARMONY = "[no final message: the model's {n} tokens are not harmony; their text follows"


@pytest.mark.parametrize("command", ["run", "chat"])
def test_random_weights_show_what_they_wrote(tiny_checkpoint, api_greedy, command):
    """The noise of random weights opens no harmony channel: without --raw it is shown anyway, as
    text on stdout (what --raw would print), after a note on stderr."""
    args = [command, "-m", str(tiny_checkpoint), "-t", "0", "-n", str(N), "--date", DATE]
    r = runner.invoke(app, args + ["Hello"]) if command == "run" else runner.invoke(app, args, input="Hello\n")
    assert r.exit_code == 0, r.output
    assert not api_greedy.has_final and api_greedy.text == decode(api_greedy.tokens)
    assert decode(api_greedy.tokens) + "\n" in r.stdout
    assert NOT_HARMONY.format(n=N) in r.stderr and "[stopped at --max-tokens]" in r.stderr


def test_a_reply_cut_off_while_reasoning_shows_the_reasoning_only(monkeypatch):
    """A real model's output is unchanged: reasoning dimmed on stderr, no raw text; with the
    reasoning hidden, a note says why nothing shows."""
    reply = "<|channel|>analysis<|message|>Let me think about the weather in Paris.<|end|>"
    monkeypatch.setattr(cli, "_open_model", lambda *args, **kwargs: ScriptedModel(reply))
    r = runner.invoke(app, ["run", "Hi", "-n", "8"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "" and r.stderr.startswith("Let me think") and "no final message" not in r.stderr
    monkeypatch.setattr(cli, "_open_model", lambda *args, **kwargs: ScriptedModel(reply))
    r = runner.invoke(app, ["run", "Hi", "-n", "8", "--hide-reasoning"])
    assert r.stdout == "" and "Let me" not in r.stderr
    assert "[no final message in 8 tokens; the reasoning is hidden (--hide-reasoning)]" in r.stderr


# ---------------------------------------------------------------------------------------------------
# user errors: one line, exit 1, no traceback
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["run", "x", "-r", "extreme"], "--reasoning must be low, medium or high, got 'extreme'"),
    (["run", "x", "-t", "-1"], "--temperature must be at least 0"),
    (["run", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["run", "x", "-n", "0"], "--max-tokens must be at least 1"),
    (["run", "x", "--date", "May 5"], "--date must be YYYY-MM-DD"),
    (["run", "x", "-m", "{tmp}/nothing"], "no such checkpoint folder"),
    (["run", "x", "-m", "{tmp}"], "no config.json"),
    (["chat", "-m", "{tmp}/nothing"], "no such checkpoint folder"),
    (["run", "-m", "{tmp}"], "the prompt is empty"),
    (["run", "x"], "not in the Hugging Face cache"),  # the default model, offline
    (["chat", "-m", "someone/some-model"], "tinyoss pull someone/some-model"),
])
def test_user_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(app, [a.format(tmp=tmp_path) for a in args], input="")
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr
    assert r.stdout == ""


# ---------------------------------------------------------------------------------------------------
# model resolution: a fake Hugging Face cache (the layout huggingface_hub writes), offline
# ---------------------------------------------------------------------------------------------------


def fake_hf_cache(cache, repo_id, checkpoint) -> Path:
    """`cache/models--owner--name/{refs/main, snapshots/<commit>/...}` with links to the checkpoint's
    root files, as huggingface_hub lays a download out (it links to blobs)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in checkpoint.iterdir():
        if f.is_file():
            (snapshot / f.name).symlink_to(f)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_a_cached_hugging_face_id_runs_offline(offline_cache, tiny_checkpoint, api_greedy):
    snapshot = fake_hf_cache(offline_cache, "openai/gpt-oss-20b", tiny_checkpoint)
    assert hub.resolve_model("openai/gpt-oss-20b") == snapshot
    r = runner.invoke(app, ["run", "Hello", *RAW_GREEDY])  # the default --model
    assert r.exit_code == 0, r.output
    assert r.stdout == decode(api_greedy.tokens) + "\n"


def test_an_incomplete_cached_copy_is_named(offline_cache, tiny_checkpoint):
    snapshot = fake_hf_cache(offline_cache, "openai/gpt-oss-20b", tiny_checkpoint)
    shard = sorted(snapshot.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(hub.ModelNotFoundError, match=f"cached copy in .* lacks {shard.name}.*HF_HUB_OFFLINE"):
        hub.resolve_model("openai/gpt-oss-20b")


def test_model_names(tmp_path, monkeypatch):
    assert hub.is_repo_id("openai/gpt-oss-20b") and hub.is_repo_id("someone/model.v2")
    assert not any(map(hub.is_repo_id, ["gpt-oss-20b", "/abs/path", "./rel/path", "a/b/c", "~/m"]))
    assert hub.resolve_model(str(tmp_path)) == tmp_path  # an existing folder is taken as is
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / "hub"
    assert hub._is_needed("model-00001-of-00002.safetensors") and hub._is_needed("config.json")
    assert not hub._is_needed("original/model.safetensors") and not hub._is_needed("metal/model.bin")


def test_a_q8_cache_that_cannot_be_written_is_one_warning_line(tiny_checkpoint, tmp_path):
    """The library warns (and goes on) when the q8 cache folder is unusable; the command line
    shows that as one line, not Python's warning with its source line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = dict(os.environ, TINYOSS_CACHE_DIR=str(blocker / "cache"))
    args = ["run", "-m", str(tiny_checkpoint), "-n", "2", "-t", "0", "--dense", "q8", "Hello"]
    r = subprocess.run([sys.executable, "-m", "tinyoss.cli", *args], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if "q8 cache" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: could not write the q8 cache")
    assert "UserWarning" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", [["run", "Hi"], ["chat"]])
def test_dense_and_kv_options_reach_the_loader(monkeypatch, tiny_checkpoint, command):
    """`--dense`, `--kv` and `--expert-input` of run and chat are what the checkpoint is loaded
    with (so the KV caches of every reply are of that kind: Model.new_cache defaults to the
    model's)."""
    from tinyoss import runtime as model_module

    seen = {}

    def fake_load(path, **options):
        seen.update(options)
        return ScriptedModel(FINAL)

    monkeypatch.setattr(model_module, "load", fake_load)
    r = runner.invoke(app, [*command, "-m", str(tiny_checkpoint), "--dense", "q8", "--kv", "bf16",
                            "--expert-input", "q8"], input="/quit\n")
    assert r.exit_code == 0, r.output
    assert seen == {"dense": "q8", "kv": "bf16", "expert_input": "q8"}


def test_a_terminal_sees_a_status_line_until_the_first_token(monkeypatch):
    """While the prompt is read (seconds for a long one on a big model), a terminal's stderr shows
    what is happening; the events themselves pass through unchanged. Elsewhere nothing is added."""
    import io
    import time

    from rich.console import Console

    def slow_events():
        time.sleep(0.5)  # the prefill
        yield from ("a", "b")

    screen = io.StringIO()
    monkeypatch.setattr(cli, "_stderr", lambda: Console(file=screen, force_terminal=True, width=80))
    assert list(cli._status_until_first(slow_events(), "reading the prompt")) == ["a", "b"]
    assert "reading the prompt ... 0 s" in screen.getvalue()
    screen = io.StringIO()
    monkeypatch.setattr(cli, "_stderr", lambda: Console(file=screen, force_terminal=False))
    assert list(cli._status_until_first(slow_events(), "reading the prompt")) == ["a", "b"]
    assert screen.getvalue() == ""
    assert list(cli._status_until_first(iter(()), "x")) == []
