"""Decode on a machine with less memory than the model: `tinyoss bench` inside a memory cgroup of
each size, beside what `tinyoss info --memory` expects there.

    sudo python benchmarks/memory_limit.py ./20b --limits 8,5 --dense q8

Linux, as root (it makes a cgroup: v2 `memory.max`, or v1's `memory.limit_in_bytes`). Before each
run the checkpoint's pages (and the q8 cache file's) are dropped from the page cache
(posix_fadvise DONTNEED): pages cached outside the cgroup would not count against its limit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def cgroup_root() -> tuple[Path, str, str]:
    """(folder to make groups in, limit file, processes file)."""
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists():
        return v2, "memory.max", "cgroup.procs"
    return v2 / "memory", "memory.limit_in_bytes", "cgroup.procs"


def drop_from_page_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def in_cgroup(limit_bytes: int, argv: list[str]) -> subprocess.CompletedProcess:
    root, limit_file, procs = cgroup_root()
    group = root / f"tinyoss-memory-limit-{os.getpid()}"
    group.mkdir()
    try:
        (group / limit_file).write_text(str(limit_bytes))
        return subprocess.run(["sh", "-c", f'echo $$ > {group / procs} && exec "$@"', "sh", *argv],
                              capture_output=True, text=True)
    finally:
        group.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--limits", default="8,5", help="cgroup sizes in GiB, comma-separated")
    parser.add_argument("--dense", default="q8")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens a run")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    model = Path(args.model)
    tinyoss = [sys.executable, "-m", "tinyoss.cli"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    cache = os.environ.get("TINYOSS_CACHE_DIR") or str(Path.home() / ".cache" / "tinyoss")
    files = list(model.glob("*.safetensors")) + list(Path(cache).glob("q8-*.safetensors"))
    for gib in [float(x) for x in args.limits.split(",")]:
        drop_from_page_cache(files)
        info = in_cgroup(int(gib * 2**30), [*tinyoss, "info", "-m", str(model), "--memory",
                                            "--dense", args.dense])
        drop_from_page_cache(files)
        bench = in_cgroup(int(gib * 2**30), [*tinyoss, "bench", "-m", str(model), "--dense",
                                             args.dense, "--prompt", "16", "--decode-tokens",
                                             str(args.tokens), "--json", *threads])
        print(f"== {gib:g} GiB cgroup, dense {args.dense}")
        print(info.stdout.strip() or info.stderr.strip())
        if bench.returncode != 0:
            print("bench failed:", bench.stderr.strip()[-2000:])
            continue
        result = json.loads(bench.stdout)
        decode = result["decode"][0]
        print(f"  measured decode         {decode['tok_s']:.2f} tok/s ({args.tokens} tokens; "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB)")


if __name__ == "__main__":
    main()
