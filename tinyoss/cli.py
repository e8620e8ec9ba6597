"""The `tinyoss` command line (typer). Every user error is one clear line and a non-zero exit."""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .errors import TinyossError

app = typer.Typer(
    help="tinyoss: run and understand OpenAI's gpt-oss models on a plain CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _main() -> None:
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
            fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))

    return wrapper


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
    out: Path = typer.Argument(..., help="Folder to write the checkpoint to."),
    preset: Preset = typer.Option(Preset.tiny, "--preset", "-p", help="Model size."),
    layout: SynthLayout = typer.Option(SynthLayout.hf, "--layout", "-l",
                                       help="hf root, original/ folder, or both (root + original/)."),
    seed: int = typer.Option(0, "--seed", "-s", help="Random seed."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and tensors, write nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the listing as JSON."),
    layers: Optional[int] = typer.Option(None, help="Override num_hidden_layers."),
    experts: Optional[int] = typer.Option(None, help="Override num_experts."),
    top_k: Optional[int] = typer.Option(None, help="Override experts_per_token."),
    hidden: Optional[int] = typer.Option(None, help="Override hidden_size (multiple of 32)."),
    intermediate: Optional[int] = typer.Option(None, help="Override intermediate_size (multiple of 32)."),
    heads: Optional[int] = typer.Option(None, help="Override num_attention_heads."),
    kv_heads: Optional[int] = typer.Option(None, help="Override num_key_value_heads."),
    head_dim: Optional[int] = typer.Option(None, help="Override head_dim."),
    vocab: Optional[int] = typer.Option(None, help="Override vocab_size."),
    window: Optional[int] = typer.Option(None, help="Override sliding_window."),
) -> None:
    """Write a random checkpoint in exactly the published layout."""
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


class Layout(str, Enum):
    hf = "hf"
    original = "original"


@app.command()
@clean_errors
def info(
    model: Path = typer.Argument(..., help="Checkpoint folder: HF repo root or original/."),
    layout: Optional[Layout] = typer.Option(None, "--layout", "-l",
                                            help="Read this layout (a root may hold both)."),
) -> None:
    """Check a checkpoint (every tensor's presence, dtype and shape) and describe it."""
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
def cache(clear: bool = typer.Option(False, "--clear", help="Delete every q8 cache file.")) -> None:
    """List (or --clear) the int8 copies --dense q8 keeps on disk, one file per checkpoint."""
    from .quant import cache_dir, cache_files, clear_cache

    folder = cache_dir()
    if folder is None:
        typer.echo("the q8 cache is off (TINYOSS_CACHE_DIR is empty)")
        return
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
    model: Path = typer.Argument(..., help="Checkpoint folder: HF repo root or original/."),
    prompt: int = typer.Option(512, "--prompt", "-p", min=1, help="Prefill length in tokens."),
    depths: str = typer.Option("0", "--depths", "-d",
                               help="Comma-separated context depths to time decode at."),
    decode_tokens: int = typer.Option(16, "--decode-tokens", "-n", min=1,
                                      help="Tokens decoded per depth."),
    repeat: int = typer.Option(1, "--repeat", min=1,
                               help="Decode runs per depth (depths take turns token by token); "
                               "reports medians."),
    dense: Dense = typer.Option(Dense.bf16, "--dense", help="Dense weights: bf16 as published, "
                                "or q8 (int8 blocks)."),
    kv: Kv = _KV,
    expert_input: ExpertInput = _EXPERT_INPUT,
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1,
                                          help="Kernel threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Measure prefill and decode speed against this machine's memory bandwidth."""
    import dataclasses

    from . import bench as b

    try:
        depth_list = list(dict.fromkeys(int(d) for d in depths.split(",") if d.strip()))
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

    if threads > numba.config.NUMBA_NUM_THREADS:
        fail(f"--threads {threads}: at most {numba.config.NUMBA_NUM_THREADS} on this machine")
    numba.set_num_threads(threads)


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


# ---------------------------------------------------------------------------------------------
# run and chat: talking to a model (generation lives in generate.py, model lookup in hub.py)

from .hub import DEFAULT_MODEL  # noqa: E402  (stdlib-only module: cheap to import here)

REASONING_LEVELS = ("low", "medium", "high")

_MODEL = typer.Option(DEFAULT_MODEL, "--model", "-m",
                      help="Checkpoint folder (HF repo root or original/) or Hugging Face id, looked up "
                           "in the HF cache and downloaded if missing (not with HF_HUB_OFFLINE=1).")
_MAX_TOKENS = typer.Option(2048, "--max-tokens", "-n", help="Most tokens sampled per reply.")
_TEMPERATURE = typer.Option(1.0, "--temperature", "-t", help="0 = greedy (deterministic).")
_TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep this probability mass (1 = off).")
_TOP_K = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off).")
_MIN_P = typer.Option(0.0, "--min-p", help="Keep tokens at least this fraction as likely as the "
                                           "most likely one (0 = off).")
_SEED = typer.Option(None, "--seed", "-s", help="Random seed: the same seed gives the same reply.")
_REASONING = typer.Option("medium", "--reasoning", "-r", help="Reasoning effort: low, medium or high.")
_SYSTEM = typer.Option(None, "--system", help="The model identity line of the system message.")
_DEVELOPER = typer.Option(None, "--developer", help="Developer instructions (the 'system prompt').")
_DATE = typer.Option(None, "--date", help="Conversation date the model is told, YYYY-MM-DD (default: today).")
_RAW = typer.Option(False, "--raw", help="Print every sampled token as text, harmony headers and "
                                          "special tokens included.")
_HIDE_REASONING = typer.Option(False, "--hide-reasoning", help="Do not show the analysis channel "
                                                                "(shown dimmed on stderr by default).")
_THREADS = typer.Option(None, "--threads", min=1, help="Kernel threads (default: all cores).")
_DENSE = typer.Option(Dense.bf16, "--dense", help="Dense weights: bf16 as published, or q8 (int8 blocks).")
_STATS = typer.Option(False, "--stats", help="After each reply, print token counts and speeds to stderr.")


def _sampler(temperature: float, top_p: float, top_k: int, min_p: float, seed: Optional[int]):
    from .sampling import Sampler

    return Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)


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
                expert_input: ExpertInput = ExpertInput.f32):
    """Find the checkpoint (hub.resolve_model), set the thread count, load it."""
    from .hub import resolve_model
    from .runtime import load

    path = resolve_model(name, announce=lambda line: typer.echo(line, err=True))
    _set_threads(threads)
    with _stderr().status(f"loading {path}"):
        model = load(path, dense=dense.value, kv=kv.value, expert_input=expert_input.value)
    # map the weight pages in the background while the prompt is prepared and prefilled (one
    # call instead of page faults spread over the first tokens); a daemon: exit doesn't wait
    threading.Thread(target=_prefault_quietly, args=(model,), name="tinyoss-prefault",
                     daemon=True).start()
    return model


def _prefault_quietly(model) -> None:
    try:
        model.prefault()
    except Exception:  # an optimization only: the pages then fault in as tokens read them
        pass


class ReplyPrinter:
    """Streams a reply to the terminal as it is sampled.

    The final answer, and commentary addressed to the user, go to stdout; analysis goes to stderr,
    dimmed, unless hidden; a tool call and its result to stderr. With raw, stdout gets the text of
    every sampled token instead (headers and special tokens included).
    """

    def __init__(self, hide_reasoning: bool = False, raw: bool = False):
        import codecs

        from .tokenizer import get_tokenizer

        self.tokenizer = get_tokenizer()
        self.hide_reasoning, self.raw = hide_reasoning, raw
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._open_line_err: Optional[bool] = None  # stream (err?) with an unfinished line

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
        for event in events:
            if isinstance(event, Reply):
                reply = event
            else:
                printer.show(event)
    finally:
        printer.finish()
    note = _STOP_NOTES.get(reply.stats.stop_reason)
    if note:
        typer.secho(f"[{note}]", err=True, dim=True)
    if show_stats:
        typer.secho(_stats_line(reply.stats), err=True, dim=True)
    return reply


def _read_prompt(prompt: Optional[str]) -> str:
    """The PROMPT argument, else stdin when it is piped."""
    if prompt is None:
        if sys.stdin.isatty():
            fail("no prompt: give PROMPT, or pipe it on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        fail("the prompt is empty")
    return prompt


@app.command()
@clean_errors
def run(
    prompt: Optional[str] = typer.Argument(None, help="What to ask (read from stdin when omitted)."),
    model: str = _MODEL,
    max_tokens: int = _MAX_TOKENS,
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    min_p: float = _MIN_P,
    seed: Optional[int] = _SEED,
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

    sampler = _sampler(temperature, top_p, top_k, min_p, seed)
    options = _generation_options(max_tokens, reasoning, developer, date)
    text = _read_prompt(prompt)
    loaded = _open_model(model, dense, threads, kv, expert_input)
    messages = _system_messages(system) + [Message.user(text)]
    _stream(generate(loaded, messages, sampler=sampler, **options), ReplyPrinter(hide_reasoning, raw), stats)


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
        try:
            path.write_text(json.dumps(transcript, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            typer.secho(f"error: {path}: {e.strerror or e}", fg=typer.colors.RED, err=True)
            return
        typer.echo(f"[saved {len(messages)} messages to {path}]", err=True)


@app.command()
@clean_errors
def chat(
    model: str = _MODEL,
    max_tokens: int = _MAX_TOKENS,
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    min_p: float = _MIN_P,
    seed: Optional[int] = _SEED,
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
    sampler = _sampler(temperature, top_p, top_k, min_p, seed)
    options = _generation_options(max_tokens, reasoning, developer, date)
    loaded = _open_model(model, dense, threads, kv, expert_input)
    session = ChatSession(loaded, sampler, options, system, dict(hide_reasoning=hide_reasoning, raw=raw),
                          stats)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    typer.echo("[/help lists the commands; Ctrl-C stops a reply; /quit or Ctrl-D leaves]", err=True)
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
                typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)


# ---------------------------------------------------------------------------------------------
# inspect: one forward pass recorded layer by layer (recorder.py)


@app.command("inspect")
@clean_errors
def inspect_(
    model: str = typer.Argument(..., help="Checkpoint folder (HF repo root or original/) or Hugging "
                                          "Face id (looked up as with run --model)."),
    prompt: str = typer.Argument(..., help="The text to run, as a harmony user message unless --raw."),
    raw: bool = typer.Option(False, "--raw", help="Tokenize PROMPT as it is, with no harmony message "
                                                  "around it (special tokens written out are kept)."),
    save: Optional[Path] = typer.Option(None, "--save", help="Also write the whole recording "
                                                             "(recorder.Recording) to this .npz file."),
) -> None:
    """Run PROMPT through the reference forward pass and summarize each layer: residual norm, sink
    mass, banded or dense attention, expert counts, and the logit lens' top token."""
    from .harmony import Message, render_conversation_for_completion
    from .recorder import format_summary, record
    from .tokenizer import get_tokenizer

    if not prompt.strip():
        fail("the prompt is empty")
    if save is not None:  # fail before the (slow) forward pass, not after it
        if save.is_dir():
            fail(f"--save {save}: is a folder, give a file name")
        if not save.parent.is_dir():
            fail(f"--save {save}: no such folder {save.parent}")
        if not os.access(save.parent, os.W_OK) or (save.exists() and not os.access(save, os.W_OK)):
            fail(f"--save {save}: not writable")
    tokenizer = get_tokenizer()
    if raw:
        tokens = tokenizer.encode(prompt, allowed_special="all")
    else:
        tokens = render_conversation_for_completion([Message.user(prompt)], tokenizer=tokenizer)
    loaded = _open_model(model, Dense.bf16, None)
    with _stderr().status(f"recording {len(tokens)} tokens"):
        recording = record(loaded, tokens)
    typer.echo(format_summary(recording, lambda i: tokenizer.decode([i])))
    if save is not None:
        recording.save(save)
        typer.echo(f"saved the recording to {save}")


@app.command()
@clean_errors
def serve(
    model: str = _MODEL,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every "
                             "interface; give --api-key then)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="Port (0: any free one)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TINYOSS_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 "
                                               "(also from $TINYOSS_API_KEY)."),
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, max=64,
                                           help="Requests decoded at once (default: what fits "
                                                "in memory, at most 4)."),
    ctx: int = typer.Option(16384, "--ctx", min=16, help="Context per request, in tokens "
                            "(prompt + reply)."),
    queue: int = typer.Option(16, "--queue", min=0, help="Requests that may wait for a free slot; "
                              "beyond them: 503."),
    cors: Optional[list[str]] = typer.Option(None, "--cors", help="Allow browser pages from this "
                                             "origin (repeat for more; none by default)."),
    threads: Optional[int] = _THREADS,
    dense: Dense = _DENSE,
    kv: Kv = _KV,
    expert_input: ExpertInput = _EXPERT_INPUT,
) -> None:
    """Serve the model over HTTP: OpenAI's Chat Completions and Responses APIs, and a chat page."""
    import logging

    from . import server as srv
    from .store import available_memory

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.secho(f"warning: listening on {host} without --api-key: anyone who can reach this "
                    f"machine can use the model", fg=typer.colors.YELLOW, err=True)
    loaded = _open_model(model, dense, threads, kv, expert_input)
    limit = loaded.config.max_position_embeddings
    if ctx > limit:
        fail(f"--ctx {ctx}: the model's context limit is {limit}")
    if parallel is None:
        per_slot = srv.kv_bytes_per_slot(loaded, ctx)
        free = available_memory() or 4 * per_slot
        parallel = max(1, min(4, int(free // 2 // per_slot)))
    # every kernel compiled (or loaded from numba's disk cache) before the first request: the
    # engine compiles in its thread holding the GIL, and the server would not answer meanwhile
    from .fast import warm_up

    with _stderr().status("compiling the kernels (once per machine; then loaded from the cache)"):
        warm_up(dense.value, kv.value, expert_input.value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    server = srv.Server(loaded, srv.model_id_for(str(loaded.checkpoint.path)), parallel=parallel,
                        ctx=ctx, max_queue=queue, api_key=api_key)
    typer.echo(f"serving {server.model_id}: {parallel} at once, {ctx} tokens of context each, "
               f"up to {queue} waiting", err=True)
    srv.serve(server, host, port, cors, on_ready=lambda line: typer.echo(line, err=True))


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Library warnings (e.g. a q8 cache that can't be written) as one line, no source dump."""
    typer.secho(f"warning: {str(message).removeprefix('tinyoss: ')}", fg=typer.colors.YELLOW,
                err=True)


def main() -> None:
    warnings.showwarning = _warning_line
    app()


if __name__ == "__main__":
    main()
