"""The weight store: zero-copy views, both layouts, and a clear error for every lie a file can tell."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
from safetensors import safe_open

import tinyoss
from tinyoss.errors import CheckpointError, ConfigError, TinyossError
from tinyoss.store import Checkpoint, SafetensorsFile, bf16_to_f32, f32_to_bf16

SMALL = dict(vocab_size=300, num_hidden_layers=2)


@pytest.fixture
def hf_copy(make_checkpoint, tmp_path):
    """A private copy of a small HF-root checkpoint (two shards + index) to damage."""
    src = make_checkpoint("hf", seed=1, **SMALL)
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def orig_copy(make_checkpoint, tmp_path):
    src = make_checkpoint("original", seed=1, **SMALL)
    dst = tmp_path / "orig"
    shutil.copytree(src, dst)
    return dst


def read_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path, header, data):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def shard_holding(folder, name):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def test_views_are_zero_copy_and_typed(make_checkpoint):
    ckpt = Checkpoint(make_checkpoint("both", seed=1, **SMALL))
    for name, arr in ckpt.tensors.items():
        assert not arr.flags.owndata and not arr.flags.writeable, name
        kind = name.split(".")[-1]
        assert arr.dtype == (np.uint8 if kind.endswith(("blocks", "scales")) else np.uint16), name


def test_both_layouts_expose_the_same_bytes(make_checkpoint):
    root = make_checkpoint("both", seed=1, **SMALL)
    hf, orig = Checkpoint(root), Checkpoint(root, layout="original")
    assert (hf.layout, orig.layout) == ("hf", "original")
    assert hf.tensors.keys() == orig.tensors.keys()
    for name in hf.tensors:
        np.testing.assert_array_equal(hf[name], orig[name], err_msg=name)


def test_files_are_real_safetensors(make_checkpoint):
    """safetensors' own parser reads what we wrote, and our views hold the same bytes."""
    root = make_checkpoint("both", seed=1, **SMALL)
    path = root / "original" / "model.safetensors"
    ours = SafetensorsFile(path)
    with safe_open(str(path), framework="np") as f:
        assert set(f.keys()) == set(ours.tensors)
        for name in f.keys():
            if ours.tensors[name].dtype == "U8":  # numpy has no bfloat16: U8 here, BF16 below
                np.testing.assert_array_equal(f.get_tensor(name), ours.array(name))
    torch = pytest.importorskip("torch")
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if ours.tensors[name].dtype == "BF16":
                theirs = f.get_tensor(name).view(torch.int16).numpy().view(np.uint16)
                np.testing.assert_array_equal(theirs, ours.array(name))


def test_bf16_conversions_match_torch():
    """Widening every one of the 65536 bf16 patterns, and rounding float32 to bf16, as torch does."""
    torch = pytest.importorskip("torch")
    bits = np.arange(65536, dtype=np.uint16)
    want = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16_to_f32(bits).view(np.uint32), want.view(np.uint32))
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 10000),
                        np.array([np.inf, -np.inf, 0.0, -0.0, 3.3895314e38], np.float32)]).astype(np.float32)
    want16 = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16(x), want16)


def test_layout_resolution(make_checkpoint, tmp_path):
    root = make_checkpoint("both", seed=1, **SMALL)
    assert Checkpoint(root / "original").layout == "original"
    with pytest.raises(CheckpointError, match="asked for the hf layout"):
        Checkpoint(root / "original", layout="hf")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)
    only_orig = tmp_path / "repo"
    shutil.copytree(root / "original", only_orig / "original")
    assert Checkpoint(only_orig).layout == "original"  # a root holding just original/


def test_truncated_file(hf_copy):
    shard = shard_holding(hf_copy, "model.embed_tokens.weight")
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=f"{shard.name}: tensor '.*': data_offsets .* run past the end"):
        tinyoss.load(hf_copy)


def test_truncated_inside_header(orig_copy):
    f = orig_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="model.safetensors: header length .* runs past the end"):
        tinyoss.load(orig_copy)
    f.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated file"):
        tinyoss.load(orig_copy)


def test_non_json_header(orig_copy):
    f = orig_copy / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8] = ord("!")
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: header is not valid JSON"):
        tinyoss.load(orig_copy)


def test_overlapping_ranges(orig_copy):
    f = orig_copy / "model.safetensors"
    header, data = read_header(f)
    a, b = "block.0.attn.sinks", "block.1.attn.sinks"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    write_header(f, header, data)
    with pytest.raises(CheckpointError, match="overlap"):
        tinyoss.load(orig_copy)


def test_byte_count_mismatch(orig_copy):
    f = orig_copy / "model.safetensors"
    header, data = read_header(f)
    begin, end = header["norm.scale"]["data_offsets"]
    header["norm.scale"]["data_offsets"] = [begin, end - 2]
    write_header(f, header, data)
    with pytest.raises(CheckpointError, match="tensor 'norm.scale': .* bytes stored but shape"):
        tinyoss.load(orig_copy)


def test_wrong_dtype(orig_copy):
    f = orig_copy / "model.safetensors"
    header, data = read_header(f)
    header["norm.scale"]["dtype"] = "F16"  # same byte count, wrong type
    write_header(f, header, data)
    with pytest.raises(CheckpointError, match="tensor 'norm.scale' has dtype F16, expected BF16"):
        tinyoss.load(orig_copy)


def test_wrong_shape(orig_copy):
    f = orig_copy / "model.safetensors"
    header, data = read_header(f)
    shape = header["block.0.mlp.gate.bias"]["shape"]
    header["block.0.mlp.gate.bias"]["shape"] = [shape[0] // 2, 2]  # same bytes, wrong shape
    write_header(f, header, data)
    with pytest.raises(CheckpointError, match="'block.0.mlp.gate.bias' has shape .* config expects"):
        tinyoss.load(orig_copy)


def test_missing_tensor(orig_copy):
    f = orig_copy / "model.safetensors"
    header, data = read_header(f)
    del header["block.1.mlp.mlp2_weight.scales"]
    write_header(f, header, data)
    with pytest.raises(CheckpointError, match="tensor 'block.1.mlp.mlp2_weight.scales' is missing"):
        tinyoss.load(orig_copy)


def test_missing_shard(hf_copy):
    shard = shard_holding(hf_copy, "lm_head.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard listed in .* is missing"):
        tinyoss.load(hf_copy)


def test_a_shard_that_is_a_link_to_nothing_is_named(hf_copy):
    shard = shard_holding(hf_copy, "lm_head.weight")
    shard.unlink()
    shard.symlink_to(shard.name)  # a loop (was reported as "missing")
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard listed in .* is a symbolic link to "
                                              "nothing"):
        tinyoss.load(hf_copy)


def test_an_index_listing_a_tensor_no_shard_holds_is_warned(hf_copy):
    path = hf_copy / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.bogus.weight"] = shard  # (was accepted silently)
    path.write_text(json.dumps(index))
    with pytest.warns(UserWarning, match=f"lists 1 tensor.s. that no shard holds: 'model.bogus.weight' "
                                         f"in {shard}"):
        tinyoss.load(hf_copy)


def test_index_that_lies(hf_copy):
    path = hf_copy / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"says '{name}' is in {files[1]}"):
        tinyoss.load(hf_copy)
    path.write_text("nope")
    with pytest.raises(ConfigError, match="index.json: not valid JSON"):
        tinyoss.load(hf_copy)


def test_config_that_disagrees_with_tensors(orig_copy):
    path = orig_copy / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), num_experts=9)))
    with pytest.raises(CheckpointError, match="has shape .* config expects"):
        tinyoss.load(orig_copy)


def test_bad_config(orig_copy):
    path = orig_copy / "config.json"
    raw = json.loads(path.read_text())
    del raw["head_dim"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="config.json: missing required key 'head_dim'"):
        tinyoss.load(orig_copy)


def test_bad_token_ids(make_checkpoint):
    model = tinyoss.load(make_checkpoint("both", seed=1, **SMALL))
    with pytest.raises(TinyossError, match="token id 300 is outside the vocabulary"):
        model.forward([1, 300])
    with pytest.raises(TinyossError, match="token id -1"):
        model.forward([-1])
    with pytest.raises(TinyossError, match="non-empty"):
        model.forward([])
    with pytest.raises(TinyossError, match="integers"):
        model.forward([1.5])


def test_context_overflow(make_checkpoint):
    model = tinyoss.load(make_checkpoint("both", seed=1, **SMALL))
    cache = model.new_cache(max_tokens=8)
    model.forward([1, 2, 3, 4, 5], cache)
    with pytest.raises(TinyossError, match="context overflow: 5 cached \\+ 4 new tokens exceed the limit of 8"):
        model.forward([1, 2, 3, 4], cache)
    assert cache.n_tokens == 5  # nothing half-applied
    with pytest.raises(TinyossError, match="max_tokens must be in"):
        model.new_cache(max_tokens=10 ** 7)


def test_a_bad_kv_cache_kind_is_one_clear_error(make_checkpoint):
    root = make_checkpoint("both", seed=1, **SMALL)
    with pytest.raises(TinyossError, match="kv must be one of 'f32', 'bf16', got 'f16'"):
        tinyoss.load(root, kv="f16")
    with pytest.raises(TinyossError, match="kv must be one of 'f32', 'bf16', got 'int8'"):
        tinyoss.load(root).new_cache(kv="int8")


def test_a_bad_expert_input_is_one_clear_error(make_checkpoint):
    root = make_checkpoint("both", seed=1, **SMALL)
    with pytest.raises(TinyossError, match="expert_input must be 'f32' or 'q8', got 'int4'"):
        tinyoss.load(root, expert_input="int4")


def test_release_keeps_the_data_readable(make_checkpoint):
    """Dropping a tensor's pages from the process (dense='q8' does it) loses nothing: the next
    read faults them back in from the page cache, bytes unchanged."""
    ckpt = Checkpoint(make_checkpoint("both", seed=1, **SMALL))
    arr = ckpt["unembed"]
    before = arr.copy()
    ckpt.release(arr)
    np.testing.assert_array_equal(arr, before)
    ckpt.release(np.zeros(4))  # not in any file: ignored


def _mapped_fraction(arr) -> float:
    """The fraction of arr's pages present in this process's page tables (/proc/self/pagemap:
    one 64-bit entry per virtual page, bit 63 = present)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = arr.ctypes.data // page, (arr.ctypes.data + arr.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), np.uint64)
    return float(np.mean(entries >> np.uint64(63)))


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="Linux /proc needed")
@pytest.mark.parametrize("madvise", [True, False])
def test_map_pages_maps_the_weights_in_one_call(make_checkpoint, monkeypatch, madvise):
    """Model.prefault / store.map_pages map a tensor's pages into the process without reading
    it element by element (madvise, or one byte per page where that is missing); the bytes
    are unchanged."""
    from tinyoss import store

    if madvise:  # this kernel has MADV_POPULATE_READ (Linux >= 5.14), or the test is moot
        fn = store._libc_madvise()
        if fn is None or fn(0, 0, store.MADV_POPULATE_READ) != 0:
            pytest.skip("no madvise(MADV_POPULATE_READ) here")
    else:
        monkeypatch.setattr(store, "_libc_madvise", lambda: None)
    ckpt = Checkpoint(make_checkpoint("both", seed=1, **SMALL))
    arr = ckpt["unembed"]
    ckpt.release(arr)
    assert _mapped_fraction(arr) < 0.5
    before = arr.copy()
    store.map_pages([arr])
    assert _mapped_fraction(arr) == 1.0
    np.testing.assert_array_equal(arr, before)
    model = tinyoss.load(make_checkpoint("both", seed=1, **SMALL))
    names = ("0.mlp1_blocks", "1.mlp2_blocks", "1.q_w", "unembed")
    for n in names:
        model.checkpoint.release(model.checkpoint[n])
    assert max(_mapped_fraction(model.checkpoint[n]) for n in names) < 0.5
    model.prefault()
    assert all(_mapped_fraction(model.checkpoint[n]) == 1.0 for n in names)
