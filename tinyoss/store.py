"""The weight store: safetensors files memory-mapped, every tensor a zero-copy numpy view.

Nothing is upcast or copied at load: BF16 tensors appear as uint16 (widened to float32 by a 16-bit
shift where they are used), MXFP4 blocks/scales as uint8, F32 as float32. Opening the 20b maps three
files and reads only their JSON headers.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data
(offsets are relative to the end of the header). We parse that header ourselves, so a lying header
(offsets past the end, overlapping ranges, byte counts that don't match the shape) is caught with
the file and tensor named, and nothing in a file is ever executed.

One rename table (`layout_table`) maps both published layouts onto one internal naming:

    internal              HF root                                  original/
    embed                 model.embed_tokens.weight                embedding.weight
    L.attn_norm           model.layers.L.input_layernorm.weight    block.L.attn.norm.scale
    L.q_w / q_b           ...self_attn.q_proj.{weight,bias}        block.L.attn.qkv.* rows [0, q)
    L.k_w / k_b           ...self_attn.k_proj.{weight,bias}        block.L.attn.qkv.* rows [q, q+kv)
    L.v_w / v_b           ...self_attn.v_proj.{weight,bias}        block.L.attn.qkv.* rows [q+kv, ..)
    L.sinks               ...self_attn.sinks                       block.L.attn.sinks
    L.o_w / o_b           ...self_attn.o_proj.{weight,bias}        block.L.attn.out.{weight,bias}
    L.mlp_norm            ...post_attention_layernorm.weight       block.L.mlp.norm.scale
    L.router_w / _b       ...mlp.router.{weight,bias}              block.L.mlp.gate.{weight,bias}
    L.mlp1_blocks/scales  ...experts.gate_up_proj_{blocks,scales}  block.L.mlp.mlp1_weight.{blocks,scales}
    L.mlp1_bias           ...experts.gate_up_proj_bias             block.L.mlp.mlp1_bias
    L.mlp2_blocks/scales  ...experts.down_proj_{blocks,scales}     block.L.mlp.mlp2_weight.{blocks,scales}
    L.mlp2_bias           ...experts.down_proj_bias                block.L.mlp.mlp2_bias
    norm                  model.norm.weight                        norm.scale
    unembed               lm_head.weight                           unembedding.weight

(L = layer index; the original qkv tensor is split into row-range views, still zero-copy.)
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import mmap
import os
import struct
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from . import mxfp4
from .config import Config, is_hf_config, load_config, open_regular_file, read_json, short_repr
from .errors import CheckpointError, ConfigError, TinyossTypeError, expect_type

# safetensors dtype string -> the numpy dtype we view it as
DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(np.uint16),  # bfloat16 bits; widen with `bf16_to_f32`
    "U8": np.dtype(np.uint8),  # MXFP4 blocks (2 x E2M1 per byte) and E8M0 scales
    "F32": np.dtype(np.float32),
    "I8": np.dtype(np.int8),  # tinyoss's own q8 cache files (quant.py)
}
_KNOWN_DTYPES = {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
                 "U32", "F32", "F64", "I64", "U64"}
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

HF_INDEX = "model.safetensors.index.json"


def bf16_to_f32(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: the bf16 bits are the top half of the float32."""
    return (x.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (as torch does). NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = np.isnan(x)
    return np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# one safetensors file


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """A memory-mapped safetensors file with a validated header."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_regular_file(self.path, "safetensors file", CheckpointError) as f:
            size = os.fstat(f.fileno()).st_size
            self.tensors, self.metadata = parse_header(f, size, self.path)
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        if self._mmap is not None and hasattr(mmap, "MADV_HUGEPAGE"):
            # where the page cache holds large folios, map them with 2 MiB entries: fewer TLB
            # misses when a token streams through gigabytes of weights
            try:
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass

    def release(self, arr: np.ndarray) -> bool:
        """Drop `arr`'s pages from this process (they stay in the OS page cache): for weights that
        will not be read again, e.g. bf16 matrices once dense='q8' made int8 copies. Returns
        whether `arr` lies in this file."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return False
        base = np.frombuffer(self._mmap, np.uint8).ctypes.data
        start = arr.ctypes.data - base
        if not 0 <= start < len(self._mmap):
            return False
        page = mmap.PAGESIZE
        first = -(-start // page) * page  # whole pages inside the array only
        last = (start + arr.nbytes) // page * page
        if last > first:
            self._mmap.madvise(mmap.MADV_DONTNEED, first, last - first)
        return True

    def data(self) -> np.ndarray:
        """The bytes after the header (every tensor's), a read-only uint8 view."""
        if self._mmap is None:
            return np.empty(0, np.uint8)
        return np.frombuffer(self._mmap, np.uint8, offset=8 + int.from_bytes(self._mmap[:8], "little"))

    def array(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of one tensor."""
        info = self.tensors[name]
        if info.dtype not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported dtype {info.dtype}")
        dtype = DTYPES[info.dtype]
        count = (info.end - info.begin) // dtype.itemsize
        arr = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=info.begin)
        return arr.reshape(info.shape)


MADV_POPULATE_READ = 22  # Linux >= 5.14: fault a range in, read-only, in one call


def map_pages(arrays) -> None:
    """Map every page under these memory-mapped arrays into the process now: one call per array
    instead of a page fault at a time as tokens first read them (pages in the OS page cache are
    only mapped; others are read from disk). Where madvise(MADV_POPULATE_READ) is missing (old
    Linux, macOS, Windows) one byte per page is read instead. Releases the GIL throughout."""
    madvise = _libc_madvise()
    page = mmap.PAGESIZE
    for arr in arrays:
        if arr.nbytes == 0:
            continue
        start = arr.ctypes.data // page * page
        length = arr.ctypes.data + arr.nbytes - start
        if madvise is None or madvise(start, length, MADV_POPULATE_READ) != 0:
            flat = arr.reshape(-1).view(np.uint8)  # (views of a checkpoint are contiguous)
            _ = int(flat[::page].max()) + int(flat[-1])  # a byte of every page, the last too


_SCRATCH = threading.local()


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest of its parents that exists (a link to nothing counts: it is in the
    way as much): where a folder about to be made would meet what is there, e.g. a file."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return Path(path.anchor or ".")


def scratch(name: str, n: int) -> np.ndarray:
    """This thread's reused float32 buffer `name`, as n values (uninitialized). A fresh array of
    a few hundred KB or more is fresh memory, page-faulted in on every decoded token (glibc gives
    blocks that size back to the OS when they are freed): sampling's 800 KB temporaries took 1.6
    ms a token where their arithmetic takes 0.25. Two buffers of one name on one thread are one
    buffer: callers give each live buffer its own name."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 2 * (0 if buf is None else buf.size)), np.float32)
        setattr(_SCRATCH, name, buf)
    return buf[:n]


def proc_kib(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a Linux /proc file, in bytes (None where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """Bytes this process could hold without swapping: Linux MemAvailable, or its memory cgroup's
    room where that is smaller (a container's or `systemd-run -p MemoryMax=` limit). None where
    neither is known."""
    known = [m for m in (proc_kib("/proc/meminfo", "MemAvailable"), cgroup_room()) if m is not None]
    return min(known) if known else None


def _cgroup_dir() -> Path | None:
    """This process's memory cgroup folder (v2 unified, or v1's memory controller)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            return Path("/sys/fs/cgroup") / path.lstrip("/")
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" else int(text) if text.isdigit() else None


def cgroup_room() -> int | None:
    """Bytes this process's memory cgroup may still fill with memory it cannot reclaim: its
    limit minus what its processes hold (page cache excluded: it is reclaimed). None without a
    limit."""
    folder = _cgroup_dir()
    if folder is None:
        return None
    for limit_file, usage_file, cache_key in (("memory.max", "memory.current", "file"),
                                             ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                              "total_cache")):
        limit = _read_int(folder / limit_file)
        usage = _read_int(folder / usage_file)
        if limit is None or usage is None:
            continue
        if limit >= 1 << 60:  # v1's "no limit"
            return None
        cache = _stat_value(folder / "memory.stat", cache_key) or 0
        return max(0, limit - (usage - cache))
    return None


def _stat_value(path: Path, key: str) -> int | None:
    """A `key N` line of a cgroup's memory.stat (bytes)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


@functools.cache
def _libc_madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def safetensors_header(entries, metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header of a safetensors file whose tensors (name, dtype,
    shape), in this order, are stored back to back after it."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        n = _ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def header_metadata(path: Path) -> dict:
    """A safetensors file's `__metadata__`, read from its header alone ({} if there is none or
    the file is no safetensors): whatever its tensors' data (a truncated file still says who
    wrote it). Not a regular file: {} (a FIFO would block the open)."""
    try:
        if not path.is_file():
            return {}
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > MAX_HEADER_BYTES:
                return {}
            metadata = json.loads(f.read(n)).get("__metadata__", {})
        return metadata if isinstance(metadata, dict) else {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return {}


def parse_header(f, size: int, path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Read and check a safetensors header; every failure names the file (and tensor)."""
    if size < 8:
        raise CheckpointError(f"{path}: truncated file ({size} bytes, no safetensors header)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{path}: header length {n} runs past the end of the file "
                              f"({size} bytes): truncated or not a safetensors file")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    except RecursionError:  # [[[[...]]]] thousands deep: json recurses once per level
        raise CheckpointError(f"{path}: header nests JSON too deeply to parse") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: header's __metadata__ is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_start, data_len)
    _check_no_overlap(path, tensors)
    return tensors, metadata


def _check_entry(path: Path, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {short_repr(name)}"  # (a name from the file: cut, escaped)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(dtype, str) and dtype in _KNOWN_DTYPES):
        raise CheckpointError(f"{where}: unknown dtype {short_repr(dtype)}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: bad shape {short_repr(shape)}")
    # exact (Python ints): numpy's int64 product wraps around or overflows; numpy refuses arrays
    # whose non-zero dimensions multiply past 2**63 bytes, even empty ones
    if math.prod(d for d in shape if d) * _ITEMSIZE[dtype] >= 2**63:
        raise CheckpointError(f"{where}: shape {short_repr(shape)} is too large (a dimension "
                              f"or the byte count reaches 2**63)")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets)):
        raise CheckpointError(f"{where}: bad data_offsets {short_repr(offsets)}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{where}: data_offsets {offsets} are reversed or negative")
    if end > data_len:
        raise CheckpointError(f"{where}: data_offsets {offsets} run past the end of the file "
                              f"({data_len} data bytes): truncated file?")
    n_bytes = math.prod(shape) * _ITEMSIZE[dtype]
    if end - begin != n_bytes:
        raise CheckpointError(f"{where}: {end - begin} bytes stored but shape {shape} of {dtype} "
                              f"needs {n_bytes}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors '{a}' and '{b}' overlap in the file")


# ---------------------------------------------------------------------------------------------
# the rename table


@dataclasses.dataclass(frozen=True)
class Spec:
    """One tensor as a layout stores it, and the internal tensors that are views of it."""
    name: str  # name in the checkpoint
    dtype: str  # published dtype
    shape: tuple[int, ...]
    views: tuple[tuple[str, int, int], ...]  # (internal name, first row, end row)


def layout_table(c: Config, layout: str) -> list[Spec]:
    """Every tensor a checkpoint of `layout` ('hf' or 'original') must hold for config `c`."""
    D, V, E = c.hidden_size, c.vocab_size, c.num_experts
    I2, I, Q, KV = 2 * c.intermediate_size, c.intermediate_size, c.q_dim, c.kv_dim
    specs: list[Spec] = []

    def add(name: str, dtype: str, shape: tuple[int, ...], internal: str) -> None:
        specs.append(Spec(name, dtype, shape, ((internal, 0, shape[0]),)))

    hf = layout == "hf"
    add("model.embed_tokens.weight" if hf else "embedding.weight", "BF16", (V, D), "embed")
    for L in range(c.num_hidden_layers):
        p = f"model.layers.{L}." if hf else f"block.{L}."
        add(p + ("input_layernorm.weight" if hf else "attn.norm.scale"), "BF16", (D,),
            f"{L}.attn_norm")
        if hf:
            for x, rows in (("q", Q), ("k", KV), ("v", KV)):
                add(f"{p}self_attn.{x}_proj.weight", "BF16", (rows, D), f"{L}.{x}_w")
                add(f"{p}self_attn.{x}_proj.bias", "BF16", (rows,), f"{L}.{x}_b")
        else:
            for part in ("weight", "bias"):
                s = part[0]
                shape = (Q + 2 * KV, D) if part == "weight" else (Q + 2 * KV,)
                specs.append(Spec(f"{p}attn.qkv.{part}", "BF16", shape, (
                    (f"{L}.q_{s}", 0, Q), (f"{L}.k_{s}", Q, Q + KV), (f"{L}.v_{s}", Q + KV, Q + 2 * KV))))
        add(p + ("self_attn.sinks" if hf else "attn.sinks"), "BF16", (c.num_attention_heads,),
            f"{L}.sinks")
        add(p + ("self_attn.o_proj.weight" if hf else "attn.out.weight"), "BF16", (D, Q), f"{L}.o_w")
        add(p + ("self_attn.o_proj.bias" if hf else "attn.out.bias"), "BF16", (D,), f"{L}.o_b")
        add(p + ("post_attention_layernorm.weight" if hf else "mlp.norm.scale"), "BF16", (D,),
            f"{L}.mlp_norm")
        add(p + ("mlp.router.weight" if hf else "mlp.gate.weight"), "BF16", (E, D), f"{L}.router_w")
        add(p + ("mlp.router.bias" if hf else "mlp.gate.bias"), "BF16", (E,), f"{L}.router_b")
        for n, (hf_n, rows, cols) in (("1", ("gate_up_proj", I2, D)), ("2", ("down_proj", D, I))):
            base = f"{p}mlp.experts.{hf_n}_" if hf else f"{p}mlp.mlp{n}_"
            add(base + "blocks" if hf else base + "weight.blocks", "U8", (E, rows, cols // 32, 16),
                f"{L}.mlp{n}_blocks")
            add(base + "scales" if hf else base + "weight.scales", "U8", (E, rows, cols // 32),
                f"{L}.mlp{n}_scales")
            add(base + "bias", "BF16", (E, rows), f"{L}.mlp{n}_bias")
    add("model.norm.weight" if hf else "norm.scale", "BF16", (D,), "norm")
    add("lm_head.weight" if hf else "unembedding.weight", "BF16", (V, D), "unembed")
    return specs


# ---------------------------------------------------------------------------------------------
# a whole checkpoint


def resolve_checkpoint_dir(path: str | Path, layout: str | None = None) -> tuple[Path, str]:
    """Find the folder holding config.json + safetensors, and its layout ('hf' or 'original').

    Accepts an HF repo root, an `original/` folder, or a repo root with layout='original'.
    """
    root = Path(expect_type(path, (str, os.PathLike), "path"))
    if layout is not None and not isinstance(layout, str):
        raise TinyossTypeError(f"layout must be 'hf', 'original' or None, got "
                               f"{type(layout).__name__}")
    if layout not in (None, "hf", "original"):
        raise CheckpointError(f"layout must be 'hf' or 'original', got {layout!r}")
    if not root.exists():
        raise CheckpointError(f"{root}: no such checkpoint folder")
    if not root.is_dir():
        raise CheckpointError(f"{root}: a checkpoint is a folder (HF repo root or original/)")
    if layout == "original" and (root / "original" / "config.json").exists():
        root = root / "original"
    config_path = root / "config.json"
    if not config_path.exists():
        if (root / "original" / "config.json").exists() and layout != "hf":
            root, config_path = root / "original", root / "original" / "config.json"
        else:
            raise CheckpointError(f"{root}: no config.json (expected an HF repo root or an "
                                  f"original/ folder)")
    found = "hf" if is_hf_config(read_json(config_path, "config.json")) else "original"
    if layout is not None and layout != found:
        raise CheckpointError(f"{config_path}: asked for the {layout} layout but this is an "
                              f"{found}-layout config")
    return root, found


class Checkpoint:
    """An opened checkpoint: config + every internal tensor as a zero-copy view.

    `tensors[name]` uses the internal names of `layout_table` (e.g. '3.mlp1_blocks', 'embed').
    """

    def __init__(self, path: str | Path, layout: str | None = None):
        self.path, self.layout = resolve_checkpoint_dir(path, layout)
        try:
            self.config = load_config(self.path / "config.json")
        except ConfigError:
            raise
        self.files = self._open_files()
        self.tensors = self._check_and_view()

    def _open_files(self) -> dict[str, SafetensorsFile]:
        """Every safetensors file, found through the index if present, else by scanning."""
        index_path = self.path / HF_INDEX
        if index_path.exists():
            index = read_json(index_path, "index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map' object")
            for tensor, name in weight_map.items():
                if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                    raise CheckpointError(f"{index_path}: bad shard file name "
                                          f"{short_repr(name)} for tensor {short_repr(tensor)}")
            names = sorted(set(weight_map.values()))
        else:
            weight_map = None
            names = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not names:
                raise CheckpointError(f"{self.path}: no .safetensors files and no {HF_INDEX}")
        files = {}
        for name in names:
            if not (self.path / name).exists():
                if (self.path / name).is_symlink():  # (a loop or a dangling link: not "missing")
                    raise CheckpointError(f"{self.path / name}: shard listed in {HF_INDEX} is a "
                                          "symbolic link to nothing (dangling, or a loop)")
                raise CheckpointError(f"{self.path / name}: shard listed in {HF_INDEX} is missing")
            files[name] = SafetensorsFile(self.path / name)
        self._weight_map = weight_map
        return files

    def _locate(self) -> dict[str, SafetensorsFile]:
        """tensor name -> the file holding it; a name in two files is an error."""
        where: dict[str, SafetensorsFile] = {}
        for f in self.files.values():
            for name in f.tensors:
                if name in where:
                    raise CheckpointError(f"tensor '{name}' appears in both {where[name].path} "
                                          f"and {f.path}")
                where[name] = f
        if self._weight_map is not None:
            for name, shard in self._weight_map.items():
                f = where.get(name)
                if f is not None and f.path.name != shard:
                    raise CheckpointError(f"{self.path / HF_INDEX}: says '{name}' is in {shard} "
                                          f"but it is in {f.path.name}")
        return where

    def _check_and_view(self) -> dict[str, np.ndarray]:
        where = self._locate()
        views: dict[str, np.ndarray] = {}
        specs = layout_table(self.config, self.layout)
        known = {spec.name for spec in specs}
        unknown = [name for name in where if name not in known]
        if unknown:  # harmless (never read), but a sign of another model or a damaged file
            listed = ", ".join(f"{short_repr(n)} in {where[n].path.name}" for n in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            warnings.warn(f"tinyoss: {self.path}: ignoring {len(unknown)} tensor(s) that a "
                          f"gpt-oss {self.layout}-layout checkpoint does not have: {listed}{more}",
                          stacklevel=3)
        for spec in specs:
            f = where.get(spec.name)
            if f is None:
                shard = (self._weight_map or {}).get(spec.name)
                place = f" (index says {shard})" if shard else ""
                raise CheckpointError(f"{self.path}: tensor '{spec.name}' is missing{place}")
            info = f.tensors[spec.name]
            if info.dtype != spec.dtype:
                raise CheckpointError(f"{f.path}: tensor '{spec.name}' has dtype {info.dtype}, "
                                      f"expected {spec.dtype}")
            if info.shape != spec.shape:
                raise CheckpointError(f"{f.path}: tensor '{spec.name}' has shape "
                                      f"{list(info.shape)}, config expects {list(spec.shape)}")
            arr = f.array(spec.name)
            for internal, lo, hi in spec.views:
                views[internal] = arr[lo:hi]
        # every tensor the model reads is there; what else the index lists and no shard holds
        # (harmless, but a sign of a damaged download) is said once
        absent = [(n, shard) for n, shard in (self._weight_map or {}).items() if n not in where]
        if absent:
            listed = ", ".join(f"{short_repr(n)} in {shard}" for n, shard in absent[:5])
            warnings.warn(f"tinyoss: {self.path / HF_INDEX}: lists {len(absent)} tensor(s) that no "
                          f"shard holds: {listed}", stacklevel=3)
        return views

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def release(self, arr: np.ndarray) -> None:
        """Drop a tensor's pages from this process's memory (see SafetensorsFile.release)."""
        for f in self.files.values():
            if f.release(arr):
                return

    def scan(self, progress: Callable[[int], None] = lambda n: None) -> list[NonFinite]:
        """Every tensor holding NaN or inf values, in checkpoint order (empty: all finite).

        Reads the bf16 tensors and the MXFP4 scales, not the MXFP4 blocks (E2M1 has no NaN or
        inf: a block is NaN only through its E8M0 scale, 255; scales 253 and 254 overflow to inf
        with large enough elements, so those blocks are decoded). About a third of the bytes.
        progress(n): n more bytes scanned."""
        where, found = self._locate(), []
        scratch = np.empty(SCAN_CHUNK, np.uint16)
        for spec in layout_table(self.config, self.layout):
            if spec.name.endswith("blocks"):
                continue
            f = where[spec.name]
            arr = f.array(spec.name)
            flat = arr.reshape(-1)
            if spec.dtype == "BF16":
                count, first = _scan_bf16(flat, scratch, progress)
                what = "NaN/inf value(s)"
            else:  # E8M0 scales: their blocks, as the internal name says
                internal = spec.views[0][0]
                blocks = self.tensors[internal.replace("_scales", "_blocks")].reshape(-1, 16)
                count, first = _scan_scales(flat, blocks, progress)
                what = "MXFP4 block(s) whose E8M0 scale makes them NaN/inf"
            if count:
                found.append(NonFinite(f.path, spec.name, count,
                                       tuple(int(i) for i in np.unravel_index(first, arr.shape)),
                                       what))
            f.release(arr)  # read once: keep the process small (the page cache keeps them)
        return found


SCAN_CHUNK = 1 << 19  # elements a step of Checkpoint.scan (1 MiB of bf16: the scratch stays in L2)


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """A tensor holding NaN or inf (Checkpoint.scan)."""
    file: Path
    tensor: str  # its name in the checkpoint
    count: int  # how many values (bf16) or blocks (MXFP4 scales) are NaN/inf
    first: tuple[int, ...]  # the index of the first one ([expert, row, block] for scales)
    what: str

    def __str__(self) -> str:
        return (f"{self.file}: tensor '{self.tensor}' holds {self.count} {self.what}, the first "
                f"at {list(self.first)}")


def _scan_bf16(flat: np.ndarray, scratch: np.ndarray,
               progress: Callable[[int], None]) -> tuple[int, int]:
    """(how many, first flat index) of the NaN/inf values of bf16 bits (exponent all ones)."""
    count, first = 0, -1
    for start in range(0, flat.size, SCAN_CHUNK):
        chunk = flat[start:start + SCAN_CHUNK]
        magnitude = np.bitwise_and(chunk, 0x7FFF, out=scratch[:chunk.size])  # sign dropped
        if magnitude.max() >= 0x7F80:
            bad = np.flatnonzero(magnitude >= 0x7F80)
            first = start + int(bad[0]) if first < 0 else first
            count += bad.size
        progress(chunk.nbytes)
    return count, first


def _scan_scales(flat: np.ndarray, blocks: np.ndarray,
                 progress: Callable[[int], None]) -> tuple[int, int]:
    """(how many, first flat index) of the MXFP4 blocks [n, 16] that decode to NaN/inf through
    their E8M0 scale (flat [n]): 255 always (E8M0's NaN), 253/254 with large elements."""
    count, first = 0, -1
    for start in range(0, flat.size, SCAN_CHUNK):
        chunk = flat[start:start + SCAN_CHUNK]
        if chunk.max() >= 253:
            suspects = start + np.flatnonzero(chunk >= 253)
            with np.errstate(over="ignore", invalid="ignore"):
                values = mxfp4.decode(blocks[suspects][:, None, :], flat[suspects][:, None])
            bad = suspects[~np.isfinite(values).all(axis=-1)]
            if bad.size:
                first = int(bad[0]) if first < 0 else first
                count += bad.size
        progress(chunk.nbytes)
    return count, first
