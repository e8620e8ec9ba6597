"""budget.py (`tinyoss info --memory`): the bytes it counts are the bytes the checkpoint holds and
the runtime allocates; the machine's memory includes a cgroup's limit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tinyoss
from tinyoss.bench import fill_cache
from tinyoss.budget import PROCESS_BYTES, Budget, budget
from tinyoss.errors import TinyossError
from tinyoss.store import Checkpoint, SafetensorsFile


def test_dense_and_experts_are_every_tensor_but_the_embedding_table(make_checkpoint):
    folder = make_checkpoint("hf")
    ckpt = Checkpoint(folder)
    sizes = {name: info.end - info.begin for f in folder.glob("*.safetensors")
             for name, info in SafetensorsFile(f).tensors.items()}
    experts = sum(n for name, n in sizes.items() if ".mlp.experts." in name)
    embed = sizes["model.embed_tokens.weight"]
    b = budget(ckpt, 64)
    assert b.experts == experts
    row = embed // ckpt.config.vocab_size
    assert b.dense == sum(sizes.values()) - experts - embed + row
    assert b.experts_read * ckpt.config.num_experts == experts * ckpt.config.experts_per_token
    assert b.files == sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_q8_dense_bytes_are_those_of_the_int8_copies(make_checkpoint):
    folder = make_checkpoint("hf")
    model = tinyoss.load(folder, dense="q8", q8_cache=False)
    copies = model.fast_weights.q8_bytes
    replaced = sum(d.w.nbytes for d in model.fast_weights.dense())
    bf16, q8 = budget(model.checkpoint, 64, "bf16"), budget(model.checkpoint, 64, "q8")
    assert bf16.dense - q8.dense == replaced - copies


@pytest.mark.parametrize("kv", ["f32", "bf16"])
@pytest.mark.parametrize("ctx", [5, 16, 40])  # under, at and past the tiny model's window of 16
def test_kv_bytes_are_what_a_full_cache_allocates(make_checkpoint, kv, ctx):
    model = tinyoss.load(make_checkpoint("hf"))
    cache = model.new_cache(ctx, kv)
    fill_cache(model, cache, ctx)
    allocated = sum(a.nbytes for a in cache.k + cache.v)
    assert budget(model.checkpoint, ctx, kv=kv).kv == allocated


def test_expected_rate_reads_the_missing_experts_from_disk():
    b = Budget(dense=2_000, experts=10_000, experts_read=1_000, kv=500, kv_read=500, files=0)
    memory_bw, disk_bw = 1_000.0, 100.0
    everything = PROCESS_BYTES + 2_000 + 500 + 10_000
    assert b.tokens_per_second(everything, memory_bw, disk_bw) == pytest.approx(1 / 3.5)
    # 40 % of the experts held: 60 % of the 1000 expert bytes come from disk
    assert b.experts_held(PROCESS_BYTES + 2_500 + 4_000) == pytest.approx(0.4)
    assert b.tokens_per_second(PROCESS_BYTES + 2_500 + 4_000, memory_bw, disk_bw) == \
        pytest.approx(1 / (2.9 + 6.0))
    assert b.tokens_per_second(PROCESS_BYTES + 2_000, memory_bw, disk_bw) == 0.0


def test_a_context_beyond_the_model_is_refused(make_checkpoint):
    with pytest.raises(TinyossError, match="--ctx must be in 1..131072, got 200000"):
        budget(Checkpoint(make_checkpoint("hf")), 200_000)


CGROUP_V1 = Path("/sys/fs/cgroup/memory")


@pytest.mark.skipif(not (CGROUP_V1 / "cgroup.procs").exists() or os.geteuid() != 0,
                    reason="needs root and a cgroup v1 memory controller")
def test_available_memory_is_the_cgroups_room(tmp_path):
    group = CGROUP_V1 / f"tinyoss-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(1 << 30))
        code = ("from tinyoss.store import available_memory; print(available_memory())")
        r = subprocess.run(["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" -c "$1"',
                            sys.executable, code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        room = int(r.stdout)
        assert (1 << 30) - (200 << 20) < room <= 1 << 30  # the limit, less what python holds
    finally:
        group.rmdir()


def test_info_memory_plans_for_the_memory_and_speeds_given(make_checkpoint):
    """`tinyoss info --memory` with everything given measures nothing: the tiny model (dense
    bytes D, experts E) in just enough memory for the resident part and half the experts."""
    folder = make_checkpoint("hf")
    b = budget(Checkpoint(folder), 32, "bf16", "f32")
    memory = (b.resident + b.experts // 2) / 1e9
    r = subprocess.run([sys.executable, "-m", "tinyoss.cli", "info", "-m", str(folder), "--memory",
                        "--ctx", "32", "--available", str(memory), "--memory-bw", "10",
                        "--disk-bw", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"a decoded token reads   {b.token / 1e9:.2f} GB" in out
    assert "50% of the experts fit" in out
    assert "memory available        " in out and "(given)" in out and "(measured)" not in out
    seconds = (b.dense + b.kv_read + 0.5 * b.experts_read) / 10e9 + 0.5 * b.experts_read / 1e9
    assert f"about {1 / seconds:.2f} tok/s" in out
    r = subprocess.run([sys.executable, "-m", "tinyoss.cli", "info", "-m", str(folder), "--memory",
                        "--available", "0.1", "--memory-bw", "10"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "too little memory" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tinyoss.cli", "info", "-m", str(folder), "--memory",
                        "--disk-bw", "-1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == ("error: --disk-bw must be a positive number up to "
                                                      "100000, got -1.0")
    # (inf, then 1e300 / 1e308: a traceback each, an overflow and a 0 / 0; 1e200 printed 200 digits)
    for flag, most, value in (("--available", "1e+06", "inf"), ("--memory-bw", "100000", "inf"),
                              ("--available", "1e+06", "1e300"), ("--memory-bw", "100000", "1e308"),
                              ("--memory-bw", "100000", "1e200")):
        r = subprocess.run([sys.executable, "-m", "tinyoss.cli", "info", "-m", str(folder), "--memory",
                            flag, value], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.strip() == (f"error: {flag} must be a positive number up to "
                                                          f"{most}, got {float(value)}")
