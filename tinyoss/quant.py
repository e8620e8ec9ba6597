"""Optional int8 dense weights (`dense="q8"`): the numpy definition of the format, and the copy
kept on disk.

Each row is cut in blocks of 32 values with one scale = max|w| / 127, kept as a bf16 (rounded to
nearest), and q = round(w / scale) as int8 against that rounded scale: llama.cpp's Q8_0, whose
scale is a float16 (the same two bytes; bf16 has float32's range, so no block's scale underflows,
and it widens by a shift). It halves the bytes a decoded token reads from the dense (attention,
unembedding) weights; the expert weights stay MXFP4 as published. (Until tinyoss-q8-2 the scales
were float32: 2 bytes more a block of 32, 5.6 % of the int8 copies' bytes.)
The numba twins are kernels.bf16_to_q8_into and kernels.f32_q8w_matvec.

The same rounding, applied to activations, is `expert_input="q8"` (`x8_quantize`): the inputs of
the routed experts' matmuls in int8 blocks, as llama.cpp feeds its MXFP4 matvecs (numba twins:
kernels.x8_quantize_lanes, f32_swiglu_x8, f32_mf4w_q8x_moe_matvec).

Quantizing at every load took ~2 s for the 20b (most of it the first touch of 1.4 GB of fresh
memory), so the int8 copies are made once, straight into a file in a cache folder, and every load
memory-maps that file (`q8_copies`): TINYOSS_CACHE_DIR, else $XDG_CACHE_HOME/tinyoss or ~/.cache/tinyoss;
TINYOSS_CACHE_DIR="" turns it off. A cache file is named by the checkpoint it came from (the
shards' paths, sizes and modification times): an edited checkpoint is quantized afresh into a new
file, and the old one deleted; an unreadable, incomplete or altered file (its data no longer
sums to the checksum written with it) is rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .errors import CheckpointError, TinyossError, expect_type
from .store import (Checkpoint, SafetensorsFile, bf16_to_f32, f32_to_bf16, header_metadata,
                    nearest_existing, safetensors_header)

CACHE_FORMAT = "tinyoss-q8-3"  # bump when the int8 format or its tensor names change (-3: the
# data's checksum in the metadata)
_NO_SUM = "0" * 16  # the checksum's place in a header being written: the same width as a sum


def _q8_blocks(x: np.ndarray, bf16_scales: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, C] -> (int8 [n, C], float32 [n, C/32] or, with bf16_scales, their bf16 bits):
    Q8_0, scale = max|x| / 127 a block of 32 (rounded to bf16 with bf16_scales), q = round(x *
    (1 / scale)) within +-127 (a rounded scale can fall short of max|x| / 127). A block holding
    NaN or inf gets q = 0 and a NaN or inf scale (its products come out NaN, as a float path's
    would). A block so small (every |x| under ~3.7e-37) that 1 / scale overflows gets q = 0 too,
    keeping its scale: its values are 0 to int8's precision, and rounding infinities to int8 is
    undefined (CPUs differ)."""
    blocks = x.reshape(x.shape[0], -1, 32)  # [n, C/32, 32]
    with np.errstate(invalid="ignore"):
        scale = np.abs(blocks).max(axis=-1) / np.float32(127.0)  # [n, C/32]
    if bf16_scales:
        bits = f32_to_bf16(scale)
        scale = bf16_to_f32(bits)
    with np.errstate(invalid="ignore"):
        ok = (scale > 0) & (scale < np.inf)
    with np.errstate(over="ignore"):
        inv = np.divide(np.float32(1.0), scale, out=np.zeros_like(scale), where=ok)
    ok &= inv < np.inf
    with np.errstate(invalid="ignore"):
        q = np.where(ok[..., None], np.clip(np.rint(blocks * inv[..., None]), -127, 127), 0)
    return q.astype(np.int8).reshape(x.shape), bits if bf16_scales else scale.astype(np.float32)


def q8_quantize(w_bf16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bf16 [R, C] -> (int8 [R, C], bf16 scales [R, C/32] as uint16 bits)."""
    expect_type(w_bf16, np.ndarray, "w_bf16")
    if w_bf16.dtype != np.uint16 or w_bf16.ndim != 2 or w_bf16.shape[1] % 32:
        raise TinyossError(f"w_bf16 must be bf16 bits (uint16) [R, C] with C a multiple of 32, "
                           f"got {w_bf16.dtype} {list(w_bf16.shape)}")
    return _q8_blocks(bf16_to_f32(w_bf16), bf16_scales=True)


def x8_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 activations [n, C] -> (int8 [n, C], float32 scales [n, C/32]), the rounding of
    q8_quantize: expert_input="q8", the inputs of the routed experts' matvecs."""
    return _q8_blocks(np.asarray(x, np.float32))


def x8_round_trip(x: np.ndarray) -> np.ndarray:
    """x as expert_input="q8" hands it to an expert: quantized and dequantized (float32)."""
    return q8_dequantize(*x8_quantize(x))


def q8_dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(int8 [R, C], scales [R, C/32]: float32, or bf16 bits as the weights' copies keep them)
    -> float32 [R, C]."""
    if scale.dtype == np.uint16:
        scale = bf16_to_f32(scale)
    return (q.reshape(q.shape[0], -1, 32).astype(np.float32) * scale[..., None]).reshape(q.shape)


def cache_dir() -> Path | None:
    """Where q8 copies are kept (None: nowhere)."""
    env = os.environ.get("TINYOSS_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home folder to be found
        return None
    return Path(base) / "tinyoss"


def cache_path(ckpt: Checkpoint, folder: Path) -> tuple[Path, str]:
    """The cache file of a checkpoint's q8 copies, and the key its metadata must hold."""
    shards = []
    for f in sorted(ckpt.files.values(), key=lambda f: f.path.name):
        st = os.stat(f.path)
        shards.append([str(f.path.resolve()), st.st_size, st.st_mtime_ns])
    key = json.dumps([CACHE_FORMAT, ckpt.layout, shards])
    return folder / f"q8-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors", key


def q8_copies(ckpt: Checkpoint, mats: dict[str, np.ndarray], folder: Path | None
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (int8 [R, C], bf16 scales [R, C/32]) for each bf16 matrix in `mats`: read-only views
    of the cache file in `folder`, which is written first if it does not hold them yet; without
    a folder (or when the file can't be written) arrays quantized in memory."""
    from .kernels import bf16_to_q8

    for name, w in mats.items():
        if w.shape[1] % 32:
            raise TinyossError(f"dense='q8' quantizes rows in blocks of 32 values; '{name}' has "
                               f"{w.shape[1]} columns (use the default dense='bf16')")
    if folder is not None:
        path, key = cache_path(ckpt, folder)
        if path.exists():
            cached = _read_cache(path, key, mats)
            if cached is not None:
                return cached
        try:
            _write_cache(path, key, mats)
            cached = _read_cache(path, key, mats)
            if cached is not None:
                return cached
        except OSError as e:
            why, blocker = e.strerror or e, nearest_existing(path.parent)
            if not blocker.is_dir():  # ("File exists": mkdir's words)
                why = f"{blocker} is a file, not a folder"
            warnings.warn(f"tinyoss: could not write the q8 cache {path} ({why}); "
                          f"the int8 copies will be made again at the next load", stacklevel=3)
    return {name: bf16_to_q8(w) for name, w in mats.items()}


def _write_cache(path: Path, key: str, mats: dict[str, np.ndarray]) -> None:
    """Quantize straight into a new file's memory map (no second copy of 1.4 GB to write out),
    flushed to disk and only then renamed into place: a crash leaves a temporary file, never a
    cache of zeros. Then older copies of the same checkpoint are deleted."""
    from .budget import q8_nbytes  # (budget imports model, which imports this module)
    from .kernels import bf16_to_q8_into

    entries, places, size = [], [], 0
    for name, w in mats.items():
        R, C = w.shape
        entries += [(f"{name}.q8", "I8", (R, C)), (f"{name}.scales", "BF16", (R, C // 32))]
        places.append((w, size, size + R * C))  # where its int8 values and scales start
        size += q8_nbytes((R, C))
    header = safetensors_header(entries, {"format": CACHE_FORMAT, "source": key,
                                          "checksum": _NO_SUM})
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(p for p in path.parent.glob(".q8-*.tmp")  # left by a killed process
            if time.time() - p.stat().st_mtime > 3600)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with open(fd, "r+b") as f:
            f.write(header)
            f.flush()
            _reserve(f.fileno(), len(header) + size)
            mm = mmap.mmap(f.fileno(), len(header) + size)
            try:
                for w, at, scales_at in places:
                    R, C = w.shape
                    q = np.frombuffer(mm, np.int8, R * C, len(header) + at).reshape(R, C)
                    s = np.frombuffer(mm, np.uint16, R * (C // 32), len(header) + scales_at)
                    bf16_to_q8_into(w, q, s.reshape(R, C // 32))
                    del q, s
                place = f'"checksum":"{_NO_SUM}"'.encode()  # (the source key may hold 16 zeros)
                at = header.index(place) + len(place) - len(_NO_SUM) - 1  # (its closing quote)
                data = np.frombuffer(mm, np.uint8, offset=len(header))
                mm[at:at + 16] = data_checksum(data).encode()
                del data
                mm.flush()
            finally:
                try:
                    mm.close()
                except BufferError:  # an exception's traceback still holds a view: the map
                    pass  # closes when that goes; the exception itself is what matters
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _remove(p for p in path.parent.glob("q8-*.safetensors")
            if p != path and _same_checkpoint(_source(p), key))


def data_checksum(data: np.ndarray) -> str:
    """The sum of the bytes `data` (uint8) as little-endian uint64 words (a short last word padded
    with zeros), modulo 2**64, in 16 hex digits: any one changed byte changes it. ~0.05 s for the
    20b's 1.3 GB once its pages are mapped (the first token reads them all anyway)."""
    words = data[:len(data) // 8 * 8].view("<u8")
    total = int(words.sum(dtype=np.uint64)) if len(words) else 0
    tail = bytes(data[len(words) * 8:])
    total += int.from_bytes(tail + bytes(8 - len(tail)), "little") if tail else 0
    return f"{total % 2**64:016x}"


def cache_files(folder: Path | None) -> list[tuple[Path, int, list[str]]]:
    """The q8 cache files in `folder`: (path, bytes, the shard files they were made from; empty
    if unreadable), largest first."""
    folder = _folder(folder)
    if folder is None or not folder.is_dir():
        return []
    found = []
    for p in _own_files(folder):
        try:
            _, _, shards = json.loads(_source(p))
            sources = [s[0] for s in shards]
        except (ValueError, TypeError):
            sources = []
        found.append((p, p.stat().st_size, sources))
    return sorted(found, key=lambda f: -f[1])


def clear_cache(folder: Path | None) -> int:
    """Delete every q8 cache file (and writers' leftovers) in `folder`; returns the bytes freed.
    Only files tinyoss wrote: a folder shared with other files (TINYOSS_CACHE_DIR may name any)
    loses none of them. A running process that maps one keeps its copy until it exits."""
    folder = _folder(folder)
    if folder is None or not folder.is_dir():
        return 0
    paths = [*_own_files(folder), *folder.glob(".q8-*.tmp")]  # (a writer's names: mkstemp's)
    freed = sum(p.stat().st_size for p in paths)
    _remove(paths)
    return freed


def _own_files(folder: Path) -> list[Path]:
    """The cache files in `folder`: named as this module names them and written by it."""
    return [p for p in folder.glob("q8-*.safetensors") if _is_own(p)]


def _is_own(path: Path) -> bool:
    """Whether a file's safetensors header says this module wrote it (any CACHE_FORMAT, in
    whole or in part: a truncated or altered data section still counts)."""
    return str(header_metadata(path).get("format", "")).startswith("tinyoss-q8")


def _folder(folder) -> Path | None:
    return None if folder is None else Path(expect_type(folder, (str, os.PathLike), "folder"))


def _source(path: Path) -> str:
    return str(header_metadata(path).get("source", ""))


def _same_checkpoint(a: str, b: str) -> bool:
    """Whether two cache keys name the same shard files (maybe since edited, or another
    format): the older copy is then of no use."""
    try:
        (_, layout_a, shards_a), (_, layout_b, shards_b) = json.loads(a), json.loads(b)
        return layout_a == layout_b and [s[0] for s in shards_a] == [s[0] for s in shards_b]
    except (ValueError, TypeError, IndexError):
        return False


def _remove(paths) -> None:
    for p in paths:
        try:
            p.unlink()
        except OSError:  # gone already, or not ours to delete
            pass


def _reserve(fd: int, size: int) -> None:
    """Give the file its size with the disk blocks allocated: a full disk is an OSError now,
    not a SIGBUS when the map is written."""
    try:
        os.posix_fallocate(fd, 0, size)
    except AttributeError:  # no posix_fallocate (macOS)
        os.ftruncate(fd, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)  # a filesystem without fallocate


def _read_cache(path: Path, key: str, mats: dict[str, np.ndarray]
                ) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The copies in a cache file, or None (with a warning) if it is not a complete cache of
    this checkpoint."""
    try:
        f = SafetensorsFile(path)
        if f.metadata.get("format") != CACHE_FORMAT or f.metadata.get("source") != key:
            raise CheckpointError(f"{path}: written for another checkpoint or format")
        if f.metadata.get("checksum") != data_checksum(f.data()):
            raise CheckpointError(f"{path}: its data changed since it was written (checksum)")
        copies = {}
        for name, w in mats.items():
            R, C = w.shape
            q, s = f.array(f"{name}.q8"), f.array(f"{name}.scales")
            if q.dtype != np.int8 or q.shape != (R, C) or s.dtype != np.uint16 \
                    or s.shape != (R, C // 32):
                raise CheckpointError(f"{path}: tensor '{name}' has the wrong shape or dtype")
            copies[name] = (q, s)
        return copies
    except (CheckpointError, KeyError, OSError) as e:
        warnings.warn(f"tinyoss: ignoring the q8 cache {path} ({e}); quantizing again",
                      stacklevel=4)
        return None
