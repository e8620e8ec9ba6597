"""Synthetic checkpoints match the published layouts tensor for tensor (checked without writing 13 GB)."""

import json
from pathlib import Path

import numpy as np
import pytest

import tinyoss
from tinyoss import synth
from tinyoss.errors import TinyossError
from tinyoss.store import Checkpoint

MANIFEST = json.loads((Path(__file__).parent / "data" / "manifest.json").read_text())["models"]


@pytest.mark.parametrize("preset,model", [("20b", "gpt-oss-20b"), ("120b", "gpt-oss-120b")])
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_presets_match_the_manifest(preset, model, layout):
    want = MANIFEST[model][layout]
    rows = synth.listing(synth.preset_config(preset), layout, preset)
    got = {r["name"]: r for r in rows}
    assert len(rows) == len(got) == want["tensor_count"]
    assert got.keys() == want["tensors"].keys()
    for name, w in want["tensors"].items():
        assert (got[name]["dtype"], got[name]["shape"]) == (w["dtype"], w["shape"]), name
        if "shard" in w:  # 20b HF: the published shard of every tensor
            assert got[name]["file"] == w["shard"], name
    assert sum(r["bytes"] for r in rows) == want["tensor_data_bytes"]


def test_120b_file_names():
    hf = {r["file"] for r in synth.listing(synth.preset_config("120b"), "hf", "120b")}
    assert hf == {f"model-{i:05d}-of-00014.safetensors" for i in range(15)}
    orig = {r["file"] for r in synth.listing(synth.preset_config("120b"), "original", "120b")}
    assert orig == {f"model--{i:05d}-of-00007.safetensors" for i in range(1, 8)}


def test_tiny_checkpoint_files(tiny_checkpoint):
    files = sorted(p.name for p in tiny_checkpoint.iterdir())
    assert files == [".tinyoss-synth", "config.json", "generation_config.json",
                     "model-00000-of-00001.safetensors", "model-00001-of-00001.safetensors",
                     "model.safetensors.index.json", "original"]
    gen = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [200002, 199999, 200012]
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    ckpt = Checkpoint(tiny_checkpoint)
    stored = sum(t.end - t.begin for f in ckpt.files.values() for t in f.tensors.values())
    assert index["metadata"]["total_size"] == stored
    assert set(index["weight_map"].values()) == set(ckpt.files)
    orig = sorted(p.name for p in (tiny_checkpoint / "original").iterdir())
    assert orig == ["config.json", "dtypes.json", "model.safetensors"]


def test_same_seed_same_bytes_other_seed_other_bytes(make_checkpoint):
    a = Checkpoint(make_checkpoint("hf", seed=4, vocab_size=300))
    b = Checkpoint(make_checkpoint("original", seed=4, vocab_size=300))
    c = Checkpoint(make_checkpoint("hf", seed=5, vocab_size=300))
    for name in ("embed", "0.q_w", "1.mlp1_blocks", "3.sinks"):
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])


def test_router_spreads_tokens_over_all_experts(tiny_checkpoint):
    """Every expert of every layer gets some of 200 random tokens, none gets most of them."""
    model = tinyoss.load(tiny_checkpoint)
    tokens = np.random.default_rng(0).integers(0, 200000, 200)
    counts = np.zeros((model.config.num_hidden_layers, model.config.num_experts), int)
    from tinyoss.model import attention_block, rmsnorm, route, moe_block
    from tinyoss.store import bf16_to_f32
    x = bf16_to_f32(model.weights.embed[tokens])
    cache = model.new_cache(len(tokens))
    pos = np.arange(len(tokens))
    for L, lw in enumerate(model.weights.layers):
        x = attention_block(x, lw, model.config, L, cache, pos)
        experts, _ = route(rmsnorm(x, lw.mlp_norm, 1e-5), lw, model.config.experts_per_token)
        counts[L] = np.bincount(experts.ravel(), minlength=model.config.num_experts)
        x = moe_block(x, lw, model.config)
        assert np.isfinite(x).all() and 0.1 < np.sqrt((x * x).mean()) < 100  # sane activations
    share = counts / counts.sum(axis=1, keepdims=True)
    assert (counts > 0).all() and share.max() < 0.5


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        yield np.zeros(4, np.uint16)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synth, "generate_rows", boom)
    with pytest.raises(OSError):
        synth.write_checkpoint(tmp_path / "m", synth.preset_config("tiny", vocab_size=300))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep").write_text("x")
    with pytest.raises(TinyossError, match="already exists"):
        synth.write_checkpoint(tmp_path / "m", synth.preset_config("tiny", vocab_size=300))
    assert (tmp_path / "m" / "keep").read_text() == "x"


def test_a_folder_under_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TinyossError, match="afile is a file, not a folder"):
        synth.write_checkpoint(tmp_path / "afile" / "sub" / "m", synth.preset_config("tiny", vocab_size=300))
    assert (tmp_path / "afile").read_text() == "x"


def test_an_absurd_layer_count_is_refused_at_once():
    """--layers 10**30 (`preset_config(num_hidden_layers=...)`) is named, not a hang building a
    tuple per layer."""
    from tinyoss.errors import ConfigError

    with pytest.raises(ConfigError, match="'num_hidden_layers' must be at most 4096"):
        synth.preset_config("tiny", num_hidden_layers=10**30)


def test_a_terminated_synth_leaves_nothing_behind(tmp_path):
    """SIGTERM (kill, timeout) mid-write removes the partial folder, as Ctrl-C does (it used to
    leave a hidden .NAME.partial-* folder of hundreds of MB)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "tinyoss.cli", "synth", str(tmp_path / "m"),
                             "--layers", "24", "--hidden", "1024", "--intermediate", "1024",
                             "--experts", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".m.partial-*/*")) and time.monotonic() < deadline:
        time.sleep(0.05)  # until it is writing
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
