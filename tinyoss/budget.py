"""Know before you load: what a decoded token reads, what must stay in memory, and what that means
on this machine (`tinyoss info MODEL --memory`).

Decode reads, every token: all dense weights (attention, router, norms, the unembedding; int8 with
dense="q8"), one embedding row, the top-k experts of every layer, and the KV cache. The dense
weights and the KV cache are read by every token, so they must stay resident; the experts are
read k of E a layer, so a machine whose memory holds only part of them still runs, reading the
missing ones from disk again and again (the page cache evicts what it can't hold). With uniform
routing (random weights; real models are more skewed, so this is the pessimistic case) a token
finds a fraction f = held / all experts of its experts in memory, and

    seconds a token = (dense + KV + f * experts read) / memory bandwidth
                      + (1 - f) * experts read / disk bandwidth

The memory this process may use is the smaller of the machine's available memory and its
cgroup's limit (containers, `systemd-run -p MemoryMax=`): `store.available_memory`.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import time
from pathlib import Path

import numpy as np

from .config import Config
from .errors import TinyossError
from .model import KV_DTYPES, Weights
from .store import Checkpoint

# what a process running the model holds besides the weights and the KV cache: Python, numpy,
# numba and its compiled kernels, the tokenizer, buffers: an allowance, not a measurement
PROCESS_BYTES = 600 << 20


def q8_nbytes(shape: tuple[int, ...]) -> int:
    """Bytes of a bf16 [R, C] matrix as int8 blocks of 32 with a bf16 scale (quant.py)."""
    rows, cols = shape
    return rows * cols + rows * (cols // 32) * 2


@dataclasses.dataclass(frozen=True)
class Budget:
    """The bytes of one decoded token, and what must stay resident, for a checkpoint run with
    `dense` weights and a `kv` cache of `ctx` tokens."""
    dense: int  # read by every token: attention, router, norms, unembedding (+ an embedding row)
    experts: int  # every expert of every layer (MXFP4: blocks, scales, biases)
    experts_read: int  # the k experts of every layer one token reads
    kv: int  # the KV cache at ctx tokens, allocated
    kv_read: int  # what the token at position ctx - 1 reads of it
    files: int  # the checkpoint's safetensors files on disk

    @property
    def token(self) -> int:
        """Bytes one decoded token reads (at the end of the context)."""
        return self.dense + self.experts_read + self.kv_read

    @property
    def resident(self) -> int:
        """What must stay in memory for decode not to read dense weights from disk."""
        return PROCESS_BYTES + self.dense + self.kv

    @property
    def everything(self) -> int:
        """What decode at full speed holds: the resident part and every expert."""
        return self.resident + self.experts

    def experts_held(self, memory: int) -> float:
        """The fraction of the experts `memory` bytes hold beside the resident part."""
        return float(np.clip((memory - self.resident) / self.experts, 0.0, 1.0))

    def tokens_per_second(self, memory: int, memory_bw: float, disk_bw: float) -> float:
        """Expected decode rate with `memory` bytes, reading RAM at memory_bw and the disk at
        disk_bw bytes/s (0 when the resident part does not fit)."""
        if memory < self.resident:
            return 0.0
        held = self.experts_held(memory)
        from_memory = self.dense + self.kv_read + held * self.experts_read
        return 1.0 / (from_memory / memory_bw + (1 - held) * self.experts_read / disk_bw)


def budget(ckpt: Checkpoint, ctx: int, dense: str = "bf16", kv: str = "f32") -> Budget:
    """The Budget of `ckpt` decoding at `ctx` tokens of context (the shapes are read from the
    checkpoint's headers: nothing is loaded)."""
    c: Config = ckpt.config
    if not 1 <= ctx <= c.max_position_embeddings:
        raise TinyossError(f"--ctx must be in 1..{c.max_position_embeddings}, got {ctx}")
    if dense not in ("bf16", "q8") or kv not in KV_DTYPES:
        raise TinyossError(f"dense must be bf16 or q8 and kv f32 or bf16, got {dense!r}, {kv!r}")
    w = Weights.from_checkpoint(ckpt)
    matrix = (lambda a: q8_nbytes(a.shape)) if dense == "q8" else (lambda a: a.nbytes)
    read = matrix(w.unembed) + w.norm.nbytes + w.embed[0].nbytes
    experts = 0
    for lw in w.layers:
        read += sum(matrix(m) for m in (lw.q_w, lw.k_w, lw.v_w, lw.o_w))
        read += sum(a.nbytes for a in (lw.q_b, lw.k_b, lw.v_b, lw.o_b, lw.sinks, lw.attn_norm,
                                       lw.mlp_norm, lw.router_w, lw.router_b))
        experts += sum(a.nbytes for a in (lw.mlp1_blocks, lw.mlp1_scales, lw.mlp1_bias,
                                          lw.mlp2_blocks, lw.mlp2_scales, lw.mlp2_bias))
    kv_row = 2 * c.kv_dim * np.dtype(KV_DTYPES[kv]).itemsize  # a position's keys and values
    kept = [min(ctx, c.sliding_window) if s else ctx for s in c.layer_sliding]
    return Budget(dense=read, experts=experts,
                  experts_read=experts * c.experts_per_token // c.num_experts,
                  kv=sum(kept) * kv_row, kv_read=sum(kept) * kv_row,
                  files=sum(f.path.stat().st_size for f in ckpt.files.values()))


# ---------------------------------------------------------------------------------------------
# this machine


def disk_bandwidth(path: Path, n_reads: int = 16, chunk: int = 8 << 20) -> float | None:
    """Bytes/s at which evicted weights come back from the disk, read as decode reads them: page
    faults on a memory map of `path` (with the kernel's readahead), `chunk`-sized ranges spread
    over the file, each dropped from the page cache first (posix_fadvise DONTNEED). Faults read
    slower than large direct reads (0.7 against 1.4 GB/s on our machines), so the smaller of
    the two is taken: a range another process keeps mapped is not dropped, and would read at
    memory speed. None where the OS has neither way (then pass --disk-bw)."""
    speeds = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < chunk:
            return None
        offsets = [(size - chunk) * i // max(n_reads - 1, 1) // mmap.PAGESIZE * mmap.PAGESIZE
                   for i in range(n_reads)]
        if hasattr(os, "posix_fadvise"):
            for offset in offsets:
                os.posix_fadvise(fd, offset, chunk, os.POSIX_FADV_DONTNEED)
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
                pages = np.frombuffer(mapped, np.uint8)
                start = time.perf_counter()
                for offset in offsets:
                    int(pages[offset:offset + chunk:mmap.PAGESIZE].max())  # a byte a page
                speeds.append(n_reads * chunk / (time.perf_counter() - start))
                del pages
        direct = _direct_read_speed(path, offsets, chunk)
        if direct is not None:
            speeds.append(direct)
    except (OSError, ValueError, BufferError):
        pass
    finally:
        os.close(fd)
    return min(speeds) if speeds else None


def _direct_read_speed(path: Path, offsets: list[int], chunk: int) -> float | None:
    """Bytes/s reading `chunk` at each offset with O_DIRECT (past the page cache), or None."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
        start = time.perf_counter()
        done = sum(os.preadv(fd, [buf], offset) for offset in offsets)
        seconds = time.perf_counter() - start
    except OSError:
        return None
    finally:
        os.close(fd)
    return done / seconds if done and seconds > 0 else None


def report(b: Budget, ctx: int, dense: str, kv: str, experts_per_token: int, n_experts: int,
           memory: int | None, memory_bw: float | None, disk_bw: float | None,
           measured: set[str]) -> list[str]:
    """`tinyoss info --memory`'s lines. `measured` names the figures measured here (the others
    were given)."""
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    how = lambda name: "measured" if name in measured else "given"  # noqa: E731
    lines = [f"memory budget (dense {dense}, KV cache {kv}, {ctx} tokens of context):",
             f"  a decoded token reads   {gb(b.token)}: dense weights {gb(b.dense)}, experts "
             f"{gb(b.experts_read)} ({experts_per_token} of {n_experts} a layer), KV cache "
             f"{gb(b.kv_read)}",
             f"  must stay resident      {gb(b.resident)}: dense weights, KV cache {gb(b.kv)}, "
             f"the process ~{gb(PROCESS_BYTES)}",
             f"  all experts             {gb(b.experts)} (kept on disk, memory-mapped; the page "
             "cache holds what fits)"]
    if memory is None:
        lines.append("  this machine's memory is unknown: pass --available GB")
        return lines
    lines.append(f"  memory available        {gb(memory)} ({how('memory')})")
    if memory < b.resident:
        lines.append(f"  too little memory: the dense weights and the KV cache alone need "
                     f"{gb(b.resident)} (try --dense q8, --kv bf16 or a smaller --ctx)")
        return lines
    held = b.experts_held(memory)
    if held >= 1:
        lines.append("  every expert fits: nothing is read from disk after the first pass")
    else:
        lines.append(f"  {held:.0%} of the experts fit: a token reads ~{gb((1 - held) * b.experts_read)} "
                     "from disk (routing spread evenly; real models reuse experts more)")
    if memory_bw is None or (held < 1 and disk_bw is None):
        lines.append("  expected decode: pass --memory-bw (and --disk-bw) in GB/s")
        return lines
    rate = b.tokens_per_second(memory, memory_bw, disk_bw or 1.0)
    speeds = f"memory {memory_bw / 1e9:.1f} GB/s ({how('memory_bw')})"
    if held < 1:
        speeds += f", disk {disk_bw / 1e9:.2f} GB/s ({how('disk_bw')})"
    lines.append(f"  expected decode         about {rate:.2f} tok/s ({speeds}); an estimate: "
                 "`tinyoss bench` measures" + (" (disk speed moves 2x between runs)" if held < 1
                                               else ""))
    return lines
