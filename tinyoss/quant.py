"""Optional int8 dense weights (`dense="q8"`): the numpy definition of the format, and the copy
kept on disk.

Each row is cut in blocks of 32 values with one float32 scale = max|w| / 127, and
q = round(w / scale) as int8: llama.cpp's Q8_0. It halves the bytes a decoded token reads from the
dense (attention, unembedding) weights; the expert weights stay MXFP4 as published.
The numba twins are kernels.bf16_to_q8_into and kernels.f32_q8w_matvec.

Quantizing at every load took ~2 s for the 20b (most of it the first touch of 1.3 GB of fresh
memory), so the int8 copies are made once, straight into a file in a cache folder, and every load
memory-maps that file (`q8_copies`): TINYOSS_CACHE_DIR, else $XDG_CACHE_HOME/tinyoss or ~/.cache/tinyoss;
TINYOSS_CACHE_DIR="" turns it off. A cache file is named by the checkpoint it came from (the
shards' paths, sizes and modification times), so an edited checkpoint is quantized afresh; a
stale, unreadable or incomplete one is simply rebuilt.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .store import Checkpoint, SafetensorsFile, bf16_to_f32, safetensors_header

CACHE_FORMAT = "tinyoss-q8-1"  # bump when the int8 format or its tensor names change


def q8_quantize(w_bf16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bf16 [R, C] -> (int8 [R, C], float32 [R, C/32])."""
    w = bf16_to_f32(w_bf16).reshape(w_bf16.shape[0], -1, 32)  # [R, C/32, 32]
    scale = np.abs(w).max(axis=-1) / np.float32(127.0)  # [R, C/32]
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0).astype(np.float32)
    q = np.rint(w * inv[..., None]).astype(np.int8)
    return q.reshape(w_bf16.shape), scale.astype(np.float32)


def q8_dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(int8 [R, C], float32 [R, C/32]) -> float32 [R, C]."""
    return (q.reshape(q.shape[0], -1, 32).astype(np.float32) * scale[..., None]).reshape(q.shape)


def cache_dir() -> Path | None:
    """Where q8 copies are kept (None: nowhere)."""
    env = os.environ.get("TINYOSS_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
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
    """name -> (int8 [R, C], scales [R, C/32]) for each bf16 matrix in `mats`: read-only views
    of the cache file in `folder`, which is written first if it does not hold them yet; without
    a folder (or when the file can't be written) arrays quantized in memory."""
    from .kernels import bf16_to_q8

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
            warnings.warn(f"tinyoss: could not write the q8 cache {path} ({e.strerror or e}); "
                          f"the int8 copies will be made again at the next load", stacklevel=3)
    return {name: bf16_to_q8(w) for name, w in mats.items()}


def _write_cache(path: Path, key: str, mats: dict[str, np.ndarray]) -> None:
    """Quantize straight into a new cache file's memory map (no second copy of 1.3 GB to
    write out), renamed into place once complete."""
    from .kernels import bf16_to_q8_into

    entries = []
    for name, w in mats.items():
        R, C = w.shape
        entries += [(f"{name}.q8", "I8", (R, C)), (f"{name}.scales", "F32", (R, C // 32))]
    header = safetensors_header(entries, {"format": CACHE_FORMAT, "source": key})
    total = len(header) + sum(w.size + w.size // 32 * 4 for w in mats.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w+b") as f:
            f.write(header)
            _reserve(f.fileno(), total)
            with mmap.mmap(f.fileno(), total) as mm:
                offset = len(header)
                for w in mats.values():
                    R, C = w.shape
                    bf16_to_q8_into(w, np.frombuffer(mm, np.int8, R * C, offset).reshape(R, C),
                                    np.frombuffer(mm, np.float32, R * C // 32, offset + R * C
                                                  ).reshape(R, C // 32))
                    offset += R * C + R * C // 32 * 4
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        copies = {}
        for name, w in mats.items():
            R, C = w.shape
            q, s = f.array(f"{name}.q8"), f.array(f"{name}.scales")
            if q.dtype != np.int8 or q.shape != (R, C) or s.dtype != np.float32 \
                    or s.shape != (R, C // 32):
                raise CheckpointError(f"{path}: tensor '{name}' has the wrong shape or dtype")
            copies[name] = (q, s)
        return copies
    except (CheckpointError, KeyError, OSError) as e:
        warnings.warn(f"tinyoss: ignoring the q8 cache {path} ({e}); quantizing again",
                      stacklevel=4)
        return None
