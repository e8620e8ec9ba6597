"""Decode through `tinyoss serve`, against `tinyoss bench`, in one run (alternating, same machine).

    python benchmarks/serve_bench.py ./20b [--dense q8] [--expert-input q8] [--tokens 48] [--rounds 2]

Starts `tinyoss serve` (the real command, its own process; clients here, over loopback), then in
each round:
  - bench:   `tinyoss bench MODEL -p 16 -n TOKENS` (another process): decode tok/s with no server
  - one:     one request: its tokens over its time (its prompt cached by a first sending); the
             mean of one such request just before the bench and one just after it
  - four:    four requests at once: their tokens over the time until the last ends (likewise),
             against the mean of the one request just before it and one just after
  - ttft:    a short request (max_tokens 1, a new prompt) alone, then while three others decode
Prints the ratios the server issue asks for (one / bench, four / one, ttft busy / idle) per round.
The model writes whatever it writes (a synthetic checkpoint: random weights); sampling at
temperature 1 with a seed keeps the lengths up (a stop token ends a reply early: it is reported).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
import time

import httpx


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tinyoss.cli", "serve", "-m", args.model, "--port", "0", "--parallel", "4", "--ctx", "4096",
               "--dense", args.dense, "--expert-input", args.expert_input]
    if args.serve_threads:
        command += ["--threads", str(args.serve_threads)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"tinyoss serve exited: {proc.wait()}")
        if line.startswith("ready: "):
            url = line.split()[1]
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain
            return proc, url


def request(url: str, tokens: int, seed: int, prompt: str) -> tuple[int, float]:
    """One chat request. -> (tokens generated, seconds it took)"""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "seed": seed, "reasoning_effort": "low"}
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"], time.perf_counter() - start


# A random model's output is rarely harmony, so it streams few deltas to time tokens by: each
# decode figure is a whole request's tokens over its time instead, sent a second time so that its
# prompt comes from the prompt cache (one token prefilled): the time is the decode's.


def one_stream(url: str, tokens: int) -> tuple[float, int]:
    request(url, tokens, 1, "Tell me a long story.")  # its prompt into a slot's cache
    n, seconds = request(url, tokens, 1, "Tell me a long story.")
    return n / seconds, n


def four_streams(url: str, tokens: int) -> tuple[float, list[int]]:
    prompts = [f"Story number {i}, please." for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: request(url, tokens, 10 + i, prompts[i]), range(4)))  # one per slot
        start = time.perf_counter()
        runs = list(pool.map(lambda i: request(url, tokens, 10 + i, prompts[i]), range(4)))
        seconds = time.perf_counter() - start
    return sum(n for n, _ in runs) / seconds, [n for n, _ in runs]


def ttft(url: str, prompt: str) -> float:
    """The latency of a short request (one token) on a prompt no slot holds."""
    return request(url, 1, 0, prompt)[1]


def ttft_busy(url: str, tokens: int, prompt: str) -> float:
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        others = [pool.submit(request, url, tokens, 20 + i, f"Another story {i}.") for i in range(3)]
        while True:  # the three are admitted and their prompts are in: they decode
            load = httpx.get(f"{url}/health").json()
            if load["running"] >= 3 and load["prefilling"] == 0:
                break
            time.sleep(0.05)
        time.sleep(1.0)  # the three are decoding
        latency = ttft(url, prompt)
        [f.result() for f in others]
    return latency


def bench_decode(args) -> float:
    out = subprocess.run([sys.executable, "-m", "tinyoss.cli", "bench", args.model, "-p", "16", "-n", str(args.tokens), "--dense",
                          args.dense, "--expert-input", args.expert_input, "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["decode"][0]["tok_s"]


MODEL = ""


def main() -> None:
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--dense", default="bf16")
    parser.add_argument("--expert-input", default="f32")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve-threads", type=int, default=None,
                        help="--threads of tinyoss serve (default: all cores)")
    args = parser.parse_args()
    cpu = open("/proc/cpuinfo").read()
    family = re.search(r"cpu family\s*:\s*(\d+)", cpu)
    name = re.search(r"model name\s*:\s*(.*)", cpu)
    print(f"# {os.uname().machine}, cpu family {family.group(1) if family else '?'}, "
          f"{name.group(1) if name else '?'}, {os.cpu_count()} cores; dense={args.dense} "
          f"expert_input={args.expert_input}", flush=True)
    proc, url = start_server(args)
    try:
        MODEL = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        four_streams(url, 8)  # warm: kernels, pages
        for round_ in range(args.rounds):
            # one request on each side of the bench: this machine's memory speed moves within
            # minutes, and a figure taken once before the bench carried that drift into the ratio
            # (and four streams likewise between two single ones: one / bench takes the mean
            # of the single requests around the bench, four / one that of those around four)
            one_before, n_one = one_stream(url, args.tokens)
            bench = bench_decode(args)
            one_after, n_after = one_stream(url, args.tokens)
            four, n_four = four_streams(url, args.tokens)
            one_last, n_last = one_stream(url, args.tokens)
            one, n_one = (one_before + one_after) / 2, min(n_one, n_after, n_last)
            one_four = (one_after + one_last) / 2
            idle = ttft(url, f"Hi {round_}, how are you?")
            busy = ttft_busy(url, args.tokens * 2, f"Hello {round_}, how are you?")
            print(json.dumps({"round": round_, "bench_tok_s": round(bench, 2), "one_tok_s": round(one, 2),
                              "one_tokens": n_one, "four_tok_s": round(four, 2), "four_tokens": n_four,
                              "one_around_four_tok_s": round(one_four, 2),
                              "one/bench": round(one / bench, 3),
                              "four/one": round(four / one_four, 3),
                              "ttft_idle_s": round(idle, 3), "ttft_busy_s": round(busy, 3),
                              "ttft busy/idle": round(busy / idle, 2)}), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
