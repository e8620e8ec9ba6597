"""The `tinyoss` command line (typer). Every user error is one clear line and a non-zero exit."""

from __future__ import annotations

import functools
import json
import sys
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


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
