"""Synthetic checkpoints in exactly the published layouts, streamed to disk.

Real weights can't be downloaded everywhere, so tests and benchmarks run on random checkpoints that
have the published names, dtypes, shapes, shard files, index and configs. The values are random but
scaled so activations stay sane (unit-scale residual stream, attention logits ~1) and the router
spreads tokens over all experts (router logits ~N(0, 1)).

Values depend only on (seed, internal tensor name, chunk), never on the layout, so the HF root and
`original/` of one seed hold the same bytes, as the published repos do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .config import MAX_LAYERS, Config, config_from_dict, to_hf_dict, to_original_dict
from .errors import ConfigError, TinyossError, TinyossTypeError, expect_type
from .store import (_ITEMSIZE, HF_INDEX, Spec, f32_to_bf16, layout_table, nearest_existing,
                    safetensors_header)

ROWS_PER_CHUNK = 8192  # rows of a 2-D tensor generated at once (bounded memory)


def _data(name: str) -> str:
    return resources.files("tinyoss").joinpath("data", name).read_text(encoding="utf-8")


def _preset_20b() -> Config:
    return config_from_dict(json.loads(_data("gpt-oss-20b.config.json")), "gpt-oss-20b config")


def preset_config(preset: str, **overrides) -> Config:
    """The config of a preset ('tiny', '20b', '120b'), with fields overridden (None = keep)."""
    base = _preset_20b()
    if preset == "120b":
        base = dataclasses.replace(base, num_hidden_layers=36, num_experts=128)
    elif preset == "tiny":
        base = dataclasses.replace(base, num_hidden_layers=4, num_experts=8, hidden_size=64,
                                   intermediate_size=64, head_dim=16, num_attention_heads=8,
                                   num_key_value_heads=2, sliding_window=16)
    elif preset != "20b":
        expect_type(preset, str, "preset")
        raise TinyossError(f"unknown preset {preset!r} (choose tiny, 20b or 120b)")
    kinds = {f.name: {"int": int, "float": (int, float), "bool": bool}.get(
        f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        for f in dataclasses.fields(Config)}  # (layer_sliding: None, set from num_hidden_layers)
    for key, value in overrides.items():
        if kinds.get(key) is None:
            raise TinyossTypeError(f"preset_config() has no config field {key!r} to override")
        if value is not None:
            expect_type(value, kinds[key], key)
    changes = {k: v for k, v in overrides.items() if v is not None}
    n_layers = changes.get("num_hidden_layers", base.num_hidden_layers)
    if n_layers > MAX_LAYERS:  # (before a tuple of that many; config_from_dict checks the rest)
        raise ConfigError(f"preset {preset}: key 'num_hidden_layers' must be at most "
                          f"{MAX_LAYERS}, got {n_layers}")
    changes["layer_sliding"] = tuple(i % 2 == 0 for i in range(n_layers))
    # round-trip through the HF dict so overrides get the same validation as a config.json
    return config_from_dict(to_hf_dict(dataclasses.replace(base, **changes)), f"preset {preset}")


# ---------------------------------------------------------------------------------------------
# the plan: which tensors go in which file


@dataclasses.dataclass(frozen=True)
class FilePlan:
    name: str  # file name inside the checkpoint folder
    specs: tuple[Spec, ...]  # in file order

    @property
    def n_bytes(self) -> int:
        return sum(spec_bytes(s) for s in self.specs)


def spec_bytes(s: Spec) -> int:
    return math.prod(s.shape) * _ITEMSIZE[s.dtype]


def _in_file_order(specs) -> tuple[Spec, ...]:
    """safetensors' own order: wider dtypes first (keeps every tensor aligned), then by name."""
    return tuple(sorted(specs, key=lambda s: (-_ITEMSIZE[s.dtype], s.name)))


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "block"):
            return int(parts[i + 1])
    return None


def _split_evenly(specs: list[Spec], n_files: int) -> list[list[Spec]]:
    """Consecutive tensors into n_files files of about equal size (120b: shard map unknown)."""
    total = sum(spec_bytes(s) for s in specs)
    files: list[list[Spec]] = [[]]
    done = 0
    for s in specs:
        if done >= total * len(files) / n_files and len(files) < n_files:
            files.append([])
        files[-1].append(s)
        done += spec_bytes(s)
    while len(files) < n_files:
        files.append([])
    return files


def plan_files(c: Config, layout: str, preset: str) -> list[FilePlan]:
    """The files of a checkpoint, named and sharded as published."""
    specs = layout_table(c, layout)
    if layout == "hf":
        if preset == "20b" and c == preset_config("20b"):
            weight_map = json.loads(_data("gpt-oss-20b.model.safetensors.index.json"))["weight_map"]
            names = sorted(set(weight_map.values()))
            return [FilePlan(n, _in_file_order(s for s in specs if weight_map[s.name] == n))
                    for n in names]
        n_files = 15 if preset == "120b" else 2
        last = n_files - 1  # HF names count from 0: "-of-" carries the last index, not the count
        groups = _split_evenly(specs, n_files)
        return [FilePlan(f"model-{i:05d}-of-{last:05d}.safetensors", _in_file_order(g))
                for i, g in enumerate(groups)]
    if preset == "120b":
        groups = _split_evenly(specs, 7)  # note the double dash and 1-based names
        return [FilePlan(f"model--{i + 1:05d}-of-00007.safetensors", _in_file_order(g))
                for i, g in enumerate(groups)]
    return [FilePlan("model.safetensors", _in_file_order(specs))]


def needs_index(layout: str, files: list[FilePlan]) -> bool:
    return len(files) > 1


# ---------------------------------------------------------------------------------------------
# random values


def _rng(seed: int, internal: str, chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(internal.encode()), chunk])


def _kind(internal: str) -> str:
    return internal.split(".")[-1]


def _normal_std(c: Config, kind: str) -> tuple[float, float]:
    """(mean, std) of a bf16 tensor kind, chosen for unit-scale activations."""
    D = c.hidden_size
    return {
        "embed": (0.0, 1.0),
        "attn_norm": (1.0, 0.1), "mlp_norm": (1.0, 0.1), "norm": (1.0, 0.1),
        "q_w": (0.0, D ** -0.5), "k_w": (0.0, D ** -0.5), "v_w": (0.0, D ** -0.5),
        "q_b": (0.0, 0.1), "k_b": (0.0, 0.1), "v_b": (0.0, 0.1),
        "sinks": (0.0, 1.0),
        "o_w": (0.0, c.q_dim ** -0.5), "o_b": (0.0, 0.02),
        "router_w": (0.0, D ** -0.5), "router_b": (0.0, 0.1),
        "mlp1_bias": (0.0, 0.1), "mlp2_bias": (0.0, 0.02),
        "unembed": (0.0, D ** -0.5),
    }[kind]


def _mxfp4_scale_centre(fan_in: int) -> int:
    """E8M0 byte giving weights of rms ~1/sqrt(fan_in) from uniform random nibbles (rms 2.93)."""
    rms_fp4 = math.sqrt(np.mean(np.array([0, .25, 1, 2.25, 4, 9, 16, 36])))
    return 127 + round(math.log2(1 / (rms_fp4 * math.sqrt(fan_in))))


def generate_rows(c: Config, seed: int, internal: str, shape: tuple[int, ...],
                  dtype: str) -> Iterator[np.ndarray]:
    """The values of one internal tensor, in chunks of its first dimension (bounded memory)."""
    kind = _kind(internal)
    rows = shape[0]
    per_chunk = 1 if len(shape) >= 3 else ROWS_PER_CHUNK  # experts: one expert at a time
    for i, r in enumerate(range(0, rows, per_chunk)):
        rng = _rng(seed, internal, i)
        sub = (min(per_chunk, rows - r), *shape[1:])
        if kind.endswith("_blocks"):
            yield rng.integers(0, 256, size=sub, dtype=np.uint8)
        elif kind.endswith("_scales"):
            fan_in = shape[-1] * 32
            centre = _mxfp4_scale_centre(fan_in)
            yield rng.integers(centre - 1, centre + 2, size=sub, dtype=np.uint8)
        else:
            mean, std = _normal_std(c, kind)
            x = rng.standard_normal(size=sub, dtype=np.float32) * np.float32(std) + np.float32(mean)
            yield f32_to_bf16(x)


# ---------------------------------------------------------------------------------------------
# writing


def write_safetensors(path: Path, c: Config, seed: int, fp: FilePlan,
                      progress: Callable[[int], None]) -> None:
    with open(path, "wb") as f:
        f.write(safetensors_header([(s.name, s.dtype, s.shape) for s in fp.specs],
                                   {"format": "pt"}))
        for s in fp.specs:
            for internal, lo, hi in s.views:
                shape = (hi - lo, *s.shape[1:])
                for chunk in generate_rows(c, seed, internal, shape, s.dtype):
                    f.write(np.ascontiguousarray(chunk).data)
                    progress(chunk.nbytes)


def _write_layout(folder: Path, c: Config, layout: str, preset: str, seed: int,
                  progress: Callable[[int], None]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = plan_files(c, layout, preset)
    for fp in files:
        write_safetensors(folder / fp.name, c, seed, fp, progress)
    if needs_index(layout, files):
        index = {"metadata": {"total_size": sum(fp.n_bytes for fp in files)},
                 "weight_map": {s.name: fp.name for fp in files for s in fp.specs}}
        (folder / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if layout == "hf":
        (folder / "config.json").write_text(json.dumps(to_hf_dict(c), indent=2) + "\n")
        (folder / "generation_config.json").write_text(_data("generation_config.json"))
    else:
        (folder / "config.json").write_text(json.dumps(to_original_dict(c), indent=2) + "\n")
        dtypes = {s.name: {"U8": "FP4" if s.name.endswith("blocks") else "UE8"}.get(s.dtype, s.dtype)
                  for s in layout_table(c, "original")}
        (folder / "dtypes.json").write_text(json.dumps(dtypes, indent=2) + "\n")


def total_bytes(c: Config, layout: str) -> int:
    layouts = ["hf", "original"] if layout == "both" else [layout]
    return sum(spec_bytes(s) for lay in layouts for s in layout_table(c, lay))


# written into every checkpoint synth makes: `--force` replaces only a folder holding it (and
# nothing but checkpoint files), never a folder of anything else
MARKER = ".tinyoss-synth"
_CHECKPOINT_FILES = ("config.json", "generation_config.json", "dtypes.json", HF_INDEX)


def in_the_way(out: Path) -> str | None:
    """Why `--force` must not replace `out` (None: it may): anything but an empty folder or
    one synth wrote (its MARKER file, and nothing but checkpoint files and original/)."""
    if out.is_symlink():
        return f"{out}: already exists, a symbolic link, not a checkpoint tinyoss synth wrote"
    if not out.is_dir():
        return f"{out}: already exists, a file, not a checkpoint folder tinyoss synth wrote"
    entries = list(out.iterdir())
    if not entries:
        return None
    if not (out / MARKER).is_file() or (out / MARKER).is_symlink():
        return (f"{out}: already exists, and is not a checkpoint tinyoss synth wrote (no "
                f"{MARKER} file in it): delete it yourself, or choose another folder")
    strangers = _strangers(out, entries, top=True)
    if strangers:
        listed = ", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more"
                                             if len(strangers) > 5 else "")
        return (f"{out}: already exists, and holds {listed} besides a checkpoint tinyoss synth "
                f"wrote: move {'it' if len(strangers) == 1 else 'them'} away, or choose another "
                f"folder")
    return None


def _strangers(folder: Path, entries: list[Path], top: bool) -> list[str]:
    """The entries of a folder synth did not write (names relative to the checkpoint)."""
    strangers = []
    for e in entries:
        name = e.name if top else f"original/{e.name}"
        if top and e.name == "original" and e.is_dir() and not e.is_symlink():
            strangers += _strangers(e, list(e.iterdir()), top=False)
        elif e.is_symlink() or not e.is_file():
            strangers.append(name + ("/" if e.is_dir() else ""))
        elif not (e.name in _CHECKPOINT_FILES or (top and e.name == MARKER)
                  or (e.name.startswith("model") and e.name.endswith(".safetensors"))):
            strangers.append(name)
    return sorted(strangers)


def free_bytes(folder: Path) -> int:
    """Bytes free for this user on the filesystem of `folder` (or of its nearest existing
    parent, a folder: write_checkpoint checks that first)."""
    return shutil.disk_usage(nearest_existing(folder)).free


def write_checkpoint(out: str | Path, c: Config, layout: str = "hf", preset: str = "tiny",
                     seed: int = 0, force: bool = False,
                     progress: Callable[[int], None] = lambda n: None) -> Path:
    """Write a random checkpoint to `out` ('hf' root, 'original' folder, or 'both': a root with
    an original/ subfolder, as published). Written to a temporary sibling folder and renamed at
    the end, so a failure never leaves a half-written checkpoint. force: replace `out` if it is
    a checkpoint synth wrote (nothing else: see `in_the_way`). The free space is checked first."""
    expect_type(out, (str, os.PathLike), "out")
    expect_type(c, Config, "config")
    expect_type(layout, str, "layout")
    expect_type(seed, int, "seed")
    if layout not in ("hf", "original", "both"):
        raise TinyossError(f"layout must be hf, original or both, got {layout!r}")
    if seed < 0:
        raise TinyossError(f"seed must be at least 0, got {seed}")
    out = Path(out)
    target = Path(os.path.abspath(out))  # "x/.." and "." have a name and a parent to write beside
    if target.exists() or target.is_symlink():
        reason = in_the_way(target)  # (even without --force: say why --force would not do)
        if reason is not None:
            raise TinyossError(reason)
        if not force and any(target.iterdir()):
            raise TinyossError(f"{out}: already exists (use --force to replace it)")
    above = nearest_existing(target.parent)
    if not above.is_dir():  # (mkdir would say only "File exists")
        raise TinyossError(f"{out}: {above} is a file, not a folder")
    needed = total_bytes(c, layout) + (1 << 20)  # + headers and configs: kilobytes
    free = free_bytes(target.parent)
    if needed > free:
        raise TinyossError(f"{out}: the checkpoint needs {needed / 1e9:.2f} GB and its disk has "
                           f"{free / 1e9:.2f} GB free")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        if layout in ("hf", "both"):
            _write_layout(tmp, c, "hf", preset, seed, progress)
        if layout == "original":
            _write_layout(tmp, c, "original", preset, seed, progress)
        if layout == "both":
            _write_layout(tmp / "original", c, "original", preset, seed, progress)
        (tmp / MARKER).write_text(json.dumps({"written_by": "tinyoss synth", "preset": preset,
                                              "layout": layout, "seed": seed}) + "\n")
        _replace(target, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(target: Path, new: Path) -> None:
    """Rename `new` to `target`; what `target` held (checked again now: it may have changed
    while the checkpoint was written) is moved aside first, and deleted only once `new` is in
    its place."""
    if not (target.exists() or target.is_symlink()):
        os.replace(new, target)
        return
    reason = in_the_way(target)
    if reason is not None:
        raise TinyossError(reason)
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old)  # onto the empty folder mkdtemp made
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old)


@contextlib.contextmanager
def temporary_tiny(seed: int = 0) -> Iterator[Path]:
    """A tiny random checkpoint in a temporary folder, removed afterwards (the examples)."""
    with tempfile.TemporaryDirectory(prefix="tinyoss-tiny-") as tmp:
        yield write_checkpoint(Path(tmp) / "tiny", preset_config("tiny"), "hf", "tiny", seed)


def run_example(main: Callable[[str], None]) -> None:
    """An example's entry point: main(model) on the model named on the command line, else on a
    tiny random checkpoint made for the run (its text is noise)."""
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with temporary_tiny() as path:
            main(str(path))


def listing(c: Config, layout: str, preset: str) -> list[dict]:
    """What write_checkpoint would write, tensor by tensor (the dry run)."""
    rows = []
    layouts = [("", "hf"), ("original/", "original")] if layout == "both" else [("", layout)]
    for prefix, lay in layouts:
        for fp in plan_files(c, lay, preset):
            for s in fp.specs:
                rows.append({"file": prefix + fp.name, "name": s.name, "dtype": s.dtype,
                             "shape": list(s.shape), "bytes": spec_bytes(s)})
    return rows
