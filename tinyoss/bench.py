"""`tinyoss bench`: prefill and decode speed, measured against this machine's memory bandwidth.

Decode is memory-bound: every token reads all dense weights, the routed experts' weights and the
KV cache. So next to tok/s we report the bytes a token reads, the memory read bandwidth measured
right before and after every decode run (a 1 GiB buffer streamed by all threads), and the
fraction of that roofline each run reached.
Decode at a context depth D fills the KV cache with D random keys/values first (decode speed
depends on the cache's size, not its content), so depth costs no D-token prefill.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from typing import Callable

import numba
import numpy as np

from .budget import budget
from .fast import warm_up
from .errors import TinyossError
from .kernels import f32_bf16w_matvec, read_streams
from .runtime import Model
from .store import proc_kib


PROBE_COLS = 4096  # the probe's rows: 8 KiB of weights against a 16 KiB x that stays in L1. (It
# was 32768, a 128 KiB x: each row then read twice its bytes of x from L2, and the probe reported
# 20-27 GB/s where the 20b's unembedding matvec read 35-49 in the same process.)


PROBE_WAYS = [(streams, ahead) for streams in (1, 2, 4) for ahead in (0, 16)]  # read_streams


def memory_bandwidth(n_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """Bytes/s the CPU reads from RAM with all threads: the best of a few ways to read a 1 GiB
    buffer, `repeats` times each. The ceiling a decoded token's bytes are held to, so it must be
    what the fastest reader here reaches, not what ours does (llama.cpp once decoded at 32.4 GB/s
    where the older probe, our bf16 matvec alone, said 30-31): one to four sequential streams a
    thread, with and without software prefetch (kernels.read_streams: one vector xor a 64-byte
    line, nothing to compute), and the bf16 matvec kernel (rows split across the threads, x in
    L1), which some CPUs' prefetchers like better.
    """
    # bf16 1.0 (written: the pages are real; not 0x0001, a denormal, slow on some CPUs)
    w = np.full((n_bytes // (2 * PROBE_COLS), PROBE_COLS), 0x3F80, np.uint16)
    x = np.ones(PROBE_COLS, np.float32)
    out, no_bias = np.empty(w.shape[0], np.float32), np.zeros(0, np.uint16)
    words, tasks = w.reshape(-1).view(np.uint64), numba.get_num_threads()
    xors = np.empty(tasks, np.uint64)
    ways = [lambda: f32_bf16w_matvec(w, x, no_bias, out)] + [
        lambda s=streams, a=ahead: read_streams(words, tasks, s, a, xors)
        for streams, ahead in PROBE_WAYS]
    best = float("inf")
    for way in ways:
        way()  # compiled, and the buffer's pages in the TLB
        for _ in range(repeats):
            t = time.perf_counter()
            way()
            best = min(best, time.perf_counter() - t)
    return w.nbytes / best


def bytes_per_token(model: Model, depth: int, kv: str | None = None) -> int:
    """Bytes one decoded token reads at `depth` tokens of context: dense weights, k routed
    experts per layer, KV cache (of kind kv, default the model's). budget.Budget.token, as
    `tinyoss info --memory` counts it."""
    return budget(model.checkpoint, depth + 1, model.dense, kv or model.kv).token


def fill_cache(model: Model, cache, depth: int, seed: int = 0) -> None:
    """Pretend `depth` tokens were seen: random keys/values in every layer's cache."""
    if depth == 0:
        return
    rng = np.random.default_rng(seed)
    positions = np.arange(depth)
    shape = (depth, model.config.num_key_value_heads, model.config.head_dim)
    for layer in range(model.config.num_hidden_layers):
        k = rng.standard_normal(shape, dtype=np.float32)
        cache.write(layer, positions, k, k)
    cache.n_tokens = depth


class PeakRSS:
    """This process's peak resident memory, with stretches left out (the bandwidth probe's 1 GiB
    buffer is the bench's, not the model's). Linux: VmHWM of /proc/self/status, reset after a
    left-out stretch by writing 5 to /proc/self/clear_refs; elsewhere (or if that is refused)
    ru_maxrss, which counts everything."""

    def __init__(self):
        self.peak = 0
        self.exact = self._reset()

    def _hwm(self) -> int:
        hwm = proc_kib("/proc/self/status", "VmHWM")
        if hwm is not None:
            return hwm
        self.exact = False  # ru_maxrss is never reset: it counts the left-out stretches too
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes there, KiB on Linux

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def leave_out(self, fn: Callable[[], float]) -> float:
        """fn(), its memory not counted (if it frees what it allocates)."""
        self.peak = max(self.peak, self._hwm())
        result = fn()
        self._reset()
        return result

    def bytes(self) -> int:
        return max(self.peak, self._hwm())


def seconds_since_process_start() -> float | None:
    """Wall time since this process started (Linux /proc), else None."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start
    except (OSError, ValueError, IndexError):
        return None


@dataclasses.dataclass
class BenchResult:
    model: str
    dense: str
    kv: str  # the KV cache's kind: f32 or bf16
    expert_input: str  # f32 (exact) or q8 (int8 activations into the experts)
    threads: int
    load_s: float  # opening the checkpoint (+ the int8 copies with dense=q8: mapped from the
    # cache file, or made at a checkpoint's first q8 load)
    compile_s: float  # every kernel compiled, or loaded from numba's cache (fast.warm_up)
    ready_s: float | None  # process start -> checkpoint open and kernels ready to prefill
    prompt_tokens: int
    prefill_tok_s: float
    decode: list[dict]  # per depth: depth, tokens, tok_s (the median of tok_s_runs),
    # bytes_per_token, bandwidth_gb_s and roofline_tok_s (medians over the runs of the better
    # probe beside each run), fraction_of_roofline (the median of fraction_runs: each run's
    # tok/s against its own roofline), ratio (the median of ratio_runs: each run's tok/s over
    # the same run's at the first depth)
    bandwidth_gb_s: float  # the best sample of the whole bench
    bandwidth_samples_gb_s: list[float]  # before the first decode run and after each (a run:
    # decode_tokens tokens at every depth, token by token in turn)
    peak_rss_gib: float  # the model's: without the bandwidth probe's buffer (PeakRSS)
    peak_rss_with_probe: bool  # True where the OS could not leave the probe out


def check_lengths(limit: int, prompt_tokens: int, depths, decode_tokens: int) -> None:
    """Every cache the bench makes fits the model's context of `limit` tokens: the prompt's
    (prompt + decoded tokens) and each depth's (depth + decoded tokens + the untimed first one).
    Checked before anything is compiled or run, naming the CLI option to change."""
    if prompt_tokens + decode_tokens > limit:
        raise TinyossError(f"--prompt {prompt_tokens} + --decode-tokens {decode_tokens} tokens "
                           f"exceed the model's context limit ({limit} tokens)")
    for depth in depths:
        if depth + decode_tokens + 1 > limit:
            raise TinyossError(f"--depths {depth}: that depth + --decode-tokens {decode_tokens} "
                               f"+ 1 untimed token exceed the model's context limit ({limit} "
                               "tokens)")


def run(path, prompt_tokens: int = 512, depths=(0,), decode_tokens: int = 16, dense: str = "bf16",
        seed: int = 0, progress: Callable[[str], None] = lambda s: None, repeat: int = 1,
        kv: str = "f32", expert_input: str = "f32") -> BenchResult:
    """repeat: decode at every depth that many times, the depths taking turns token by token (a
    slow second of a noisy machine then hits every depth alike); each reports the median and
    every run. kv: the KV cache's kind ("f32" or "bf16", see model.KVCache); expert_input:
    "f32" or "q8" (runtime.Model)."""
    from . import load

    depths = list(dict.fromkeys(depths))  # each once: a depth's cache takes one turn a token
    threads = numba.get_num_threads()
    rss = PeakRSS()
    progress("opening the checkpoint")
    t = time.perf_counter()
    model = load(path, dense=dense, kv=kv, expert_input=expert_input)
    load_s = time.perf_counter() - t
    c = model.config
    check_lengths(c.max_position_embeddings, prompt_tokens, depths, decode_tokens)
    rng = np.random.default_rng(seed)
    vocab = min(c.vocab_size, 199998)  # ordinary text tokens

    progress("compiling / loading kernels")
    t = time.perf_counter()
    warm_up(dense, kv, expert_input)
    compile_s = time.perf_counter() - t
    ready_s = seconds_since_process_start()
    # every weight page mapped, outside the timing: decode then measures compute and memory, not
    # page faults or disk reads of experts the first tokens did not choose (see Model.prefault)
    progress("mapping the weights")
    model.prefault()
    # and the other first-call costs (BLAS, buffers); within a model's context however small
    warm = model.new_cache(min(16, c.max_position_embeddings))
    if warm.max_tokens > 1:
        model.forward(rng.integers(0, vocab, min(8, warm.max_tokens - 1)), warm, last_only=True)
    model.forward(rng.integers(0, vocab, 1), warm, last_only=True)

    progress(f"prefill of {prompt_tokens} tokens")
    cache = model.new_cache(prompt_tokens + decode_tokens)
    prompt = rng.integers(0, vocab, prompt_tokens)
    t = time.perf_counter()
    model.forward(prompt, cache, last_only=True)
    prefill_tok_s = prompt_tokens / (time.perf_counter() - t)

    # this machine's read bandwidth moves with its neighbours' load: sample it before the first
    # decode run and after each (each run is held to the samples beside it, below)
    progress("measuring memory bandwidth")
    samples = [rss.leave_out(memory_bandwidth)]

    # each depth's cache is made and filled once, before any timing: a run only rewinds it (fresh
    # memory of a few hundred MB just before a timed run had the kernel faulting and compacting
    # pages while it ran). So the peak RSS holds every depth's cache at once.
    progress("filling the KV caches")
    caches = {}
    for depth in depths:
        caches[depth] = model.new_cache(depth + decode_tokens + 1)
        fill_cache(model, caches[depth], depth)
    runs: dict[int, list[float]] = {depth: [] for depth in depths}
    beside: dict[int, list[float]] = {depth: [] for depth in depths}  # bandwidth beside each run
    for i in range(repeat):
        progress(f"decode at depth{'s' if len(depths) > 1 else ''} "
                 + ", ".join(map(str, depths)) + (f" ({i + 1} of {repeat})" if repeat > 1 else ""))
        tokens, spent = {}, dict.fromkeys(depths, 0.0)
        for depth in depths:
            caches[depth].n_tokens = depth  # the tokens a previous run appended are forgotten
            tokens[depth] = rng.integers(0, vocab, 1)
            model.forward(tokens[depth], caches[depth], last_only=True)  # first step untimed
        # the depths take turns token by token: this machine's speed moves by 2x within seconds
        # (its neighbours), and a run of each depth in turn left a depth's ratio to another to
        # luck (0.79-0.95 in four benches of one hour); token by token both see the same
        for _ in range(decode_tokens):
            for depth in depths:
                t = time.perf_counter()
                logits = model.forward(tokens[depth], caches[depth], last_only=True)
                tokens[depth] = [int(np.argmax(logits[-1]))]
                spent[depth] += time.perf_counter() - t
        progress("measuring memory bandwidth")
        samples.append(rss.leave_out(memory_bandwidth))
        for depth in depths:
            runs[depth].append(decode_tokens / spent[depth])
            # a run is held to the better of the probes just before and just after it: the
            # bandwidth moves by 2x within a minute here, so a sample minutes away says little
            beside[depth].append(max(samples[-2], samples[-1]))
    decode = []
    for depth, tok_s_runs in runs.items():
        tok_s = float(np.median(tok_s_runs))
        bpt = bytes_per_token(model, depth, caches[depth].kv)  # of the cache that was timed
        fractions = [r * bpt / b for r, b in zip(tok_s_runs, beside[depth])]
        decode.append({"depth": depth, "tokens": decode_tokens, "tok_s": tok_s,
                       "tok_s_runs": tok_s_runs, "bytes_per_token": bpt,
                       "bandwidth_gb_s": float(np.median(beside[depth])) / 1e9,
                       "roofline_tok_s": float(np.median(beside[depth])) / bpt,
                       "fraction_of_roofline": float(np.median(fractions)),
                       "fraction_runs": fractions})
        # against the first depth: run i of both decoded their tokens in turn, so their ratio
        # sees one state of the machine (a ratio of the two medians can pair a fast run with a
        # slow one: 0.81 where the runs' ratios were 0.81, 0.90, 0.91)
        ratios = [r / r0 for r, r0 in zip(tok_s_runs, runs[depths[0]])]
        decode[-1].update(ratio=float(np.median(ratios)), ratio_runs=ratios)
    bandwidth = max(samples)
    return BenchResult(str(path), dense, kv, expert_input, threads, load_s, compile_s, ready_s,
                       prompt_tokens, prefill_tok_s, decode, bandwidth / 1e9,
                       [b / 1e9 for b in samples], rss.bytes() / 2**30, not rss.exact)


def format_result(r: BenchResult) -> str:
    lines = [f"model {r.model}  dense {r.dense}  kv {r.kv}  expert input {r.expert_input}  "
             f"threads {r.threads}",
             f"  load {r.load_s:.2f} s   kernels ready {r.compile_s:.2f} s"
             + (f"   process start -> ready {r.ready_s:.2f} s" if r.ready_s is not None else ""),
             f"  prefill {r.prompt_tokens} tokens: {r.prefill_tok_s:.2f} tok/s",
             "  memory read bandwidth, before the first decode run and after each: "
             + ", ".join(f"{b:.1f}" for b in r.bandwidth_samples_gb_s) + " GB/s"]
    for d in r.decode:
        runs = d["tok_s_runs"]
        spread = (f" (median of {len(runs)}: {min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1
                  else "")
        lines.append(f"  decode @ depth {d['depth']:>6}: {d['tok_s']:.2f} tok/s{spread}   "
                     f"{d['bytes_per_token'] / 1e9:.3f} GB/token   roofline "
                     f"{d['roofline_tok_s']:.2f} tok/s at {d['bandwidth_gb_s']:.1f} GB/s   "
                     f"{100 * d['fraction_of_roofline']:.0f} %"
                     + (f"   {d['ratio']:.3f}x depth {r.decode[0]['depth']}"
                        if d is not r.decode[0] else ""))
    lines.append(f"  peak RSS {r.peak_rss_gib:.2f} GiB" + (
        " (with the bandwidth probe's 1 GiB buffer)" if r.peak_rss_with_probe else ""))
    return "\n".join(lines)
