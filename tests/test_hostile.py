"""Hostile input (issue 20): every bad file, folder, stream or argument is answered with one clear
line naming what is wrong, never a traceback, a hang or a lost folder.

The fixtures build each bad input from a small synthetic checkpoint copied into tmp_path. What
the command line does is tested in a real subprocess (exit status, stderr); what the Python API
does, through the API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import tinyoss
from tinyoss import synth
from tinyoss.config import config_from_dict, load_config
from tinyoss.errors import CheckpointError, ConfigError, TinyossError, TinyossTypeError
from tinyoss.store import Checkpoint

SMALL = dict(vocab_size=300, num_hidden_layers=2)
DEEP = 100_000  # levels of [[[...]]]: far past Python's recursion limit


# ---------------------------------------------------------------------------------------------
# helpers


def cli(*args, timeout: int = 60, **kwargs) -> subprocess.CompletedProcess:
    """`tinyoss ARGS` in a real process (the console script's main()), stdin empty."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("cwd", Path(__file__).parent.parent)  # (a test may chdir elsewhere)
    return subprocess.run([sys.executable, "-m", "tinyoss.cli", *map(str, args)], text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


def one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    """A failed command's stderr is exactly one 'error: ...' line holding every needle."""
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_raw_header(path: Path, header: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def write_header(path: Path, header: dict, data: bytes) -> None:
    write_raw_header(path, json.dumps(header).encode(), data)


def shard_of(folder: Path, tensor: str) -> Path:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return folder / json.loads(index.read_text())["weight_map"][tensor]
    return folder / "model.safetensors"


def poke(folder: Path, tensor: str, index: tuple[int, ...], value: bytes) -> Path:
    """Overwrite one element of a stored tensor with the bytes `value` (its itemsize)."""
    path = shard_of(folder, tensor)
    header, _ = read_header(path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    entry = header[tensor]
    flat = int(np.ravel_multi_index(index, entry["shape"]))
    with open(path, "r+b") as f:
        f.seek(8 + n + entry["data_offsets"][0] + flat * len(value))
        f.write(value)
    return path


BF16_NAN = np.array([0x7FC0], np.uint16).tobytes()


def within(seconds: float, fn):
    """fn() in a daemon thread: its result or exception, or a failure if it takes longer (a
    blocked open() of a FIFO would hang the test run)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (handed back to the test)
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: it hangs"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def hf_copy(make_checkpoint, tmp_path):
    """A private copy of a small HF-root checkpoint (two shards + index) to damage."""
    return Path(shutil.copytree(make_checkpoint("hf", seed=1, **SMALL), tmp_path / "model"))


@pytest.fixture
def orig_copy(make_checkpoint, tmp_path):
    """A private copy of a small original/ checkpoint (one model.safetensors) to damage."""
    return Path(shutil.copytree(make_checkpoint("original", seed=1, **SMALL), tmp_path / "orig"))


# ---------------------------------------------------------------------------------------------
# item 7: deep JSON, huge shapes, unknown tensors


def test_deeply_nested_shard_header_is_one_line(orig_copy):
    path = orig_copy / "model.safetensors"
    _, data = read_header(path)
    write_raw_header(path, b'{"x":' + b"[" * DEEP + b"]" * DEEP + b"}", data)
    one_error_line(cli("info", orig_copy), str(path), "header nests JSON too deeply")
    with pytest.raises(CheckpointError, match="model.safetensors: header nests JSON too deeply"):
        Checkpoint(orig_copy)


def test_deeply_nested_config_json_is_one_line(orig_copy):
    path = orig_copy / "config.json"
    path.write_text('{"num_experts": ' + "[" * DEEP + "]" * DEEP + "}")
    one_error_line(cli("info", orig_copy), str(path), "nests JSON too deeply")
    with pytest.raises(ConfigError, match="config.json: config.json nests JSON too deeply"):
        load_config(path)


def test_deeply_nested_index_is_one_line(hf_copy):
    path = hf_copy / "model.safetensors.index.json"
    path.write_text('{"weight_map": ' + "[" * DEEP + "]" * DEEP + "}")
    one_error_line(cli("info", hf_copy), str(path), "index nests JSON too deeply")


def test_a_deep_value_in_an_error_message_is_cut_short(orig_copy):
    """A bad value nested hundreds deep (within the parser's reach) is shown a few levels
    deep: the message stays one short line."""
    raw = json.loads((orig_copy / "config.json").read_text())
    raw["num_experts"] = json.loads("[" * 500 + "]" * 500)
    with pytest.raises(ConfigError, match=r"key 'num_experts' must be a int, got \[\[\[") as err:
        config_from_dict(raw, "x/config.json")
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("shape", [[2**63], [2**64, 1], [2**32, 2**32]])
def test_a_used_tensor_whose_shape_overflows_is_refused(orig_copy, shape):
    path = orig_copy / "model.safetensors"
    header, data = read_header(path)
    header["block.0.attn.sinks"]["shape"] = shape
    write_header(path, header, data)
    one_error_line(cli("info", orig_copy), str(path), "tensor 'block.0.attn.sinks'",
                   f"shape {shape} is too large")
    with pytest.raises(CheckpointError, match="'block.0.attn.sinks': shape .* is too large"):
        tinyoss.load(orig_copy)


@pytest.mark.parametrize("shape", [[2**63], [0, 2**64], [2**40, 2**40, 0]])
def test_an_unused_extra_tensor_whose_shape_overflows_is_refused(orig_copy, shape):
    """Zero bytes stored and a zero in the shape: the byte count matches, yet numpy can't make
    such an array, and an int64 product of the shape wraps around: refused, by name."""
    path = orig_copy / "model.safetensors"
    header, data = read_header(path)
    header["extra.huge"] = {"dtype": "BF16", "shape": shape, "data_offsets": [len(data)] * 2}
    write_header(path, header, data)
    one_error_line(cli("info", orig_copy), str(path), "tensor 'extra.huge'", "is too large")


def test_an_unknown_extra_tensor_is_a_warning_naming_it(orig_copy):
    path = orig_copy / "model.safetensors"
    header, data = read_header(path)
    header["extra.weight"] = {"dtype": "BF16", "shape": [4],
                              "data_offsets": [len(data), len(data) + 8]}
    write_header(path, header, data + bytes(8))
    with pytest.warns(UserWarning, match="ignoring 1 tensor.*'extra.weight' in model.safetensors"):
        Checkpoint(orig_copy)
    r = cli("info", orig_copy)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    warning = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("warning: ")
    assert "'extra.weight'" in warning[0] and str(orig_copy) in warning[0]


def test_a_tensor_name_with_a_newline_stays_one_short_line(orig_copy):
    path = orig_copy / "model.safetensors"
    header, data = read_header(path)
    header["evil\nname" + "x" * 100_000] = {"dtype": "F99", "shape": [1], "data_offsets": [0, 1]}
    write_header(path, header, data)
    line = one_error_line(cli("info", orig_copy), str(path), "tensor 'evil\\nname", "unknown dtype 'F99'")
    assert len(line) < 400


def test_an_index_with_a_shard_name_of_the_wrong_type_is_one_line(hf_copy):
    path = hf_copy / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = [1, 2]  # unhashable: set() of the names would raise TypeError
    path.write_text(json.dumps(index))
    one_error_line(cli("info", hf_copy), str(path), "bad shard file name [1, 2]", name)


# ---------------------------------------------------------------------------------------------
# item 8: FIFOs, sockets and devices where files should be


def test_a_fifo_as_config_json_is_refused_at_once(orig_copy):
    path = orig_copy / "config.json"
    path.unlink()
    os.mkfifo(path)
    one_error_line(cli("info", orig_copy), str(path), "is a FIFO (named pipe), not a regular file")
    with pytest.raises(ConfigError, match="config.json is a FIFO"):
        within(30, lambda: load_config(path))


def test_a_fifo_as_a_shard_is_refused_at_once(hf_copy):
    path = shard_of(hf_copy, "lm_head.weight")
    path.unlink()
    os.mkfifo(path)
    one_error_line(cli("info", hf_copy), str(path), "safetensors file is a FIFO")
    with pytest.raises(CheckpointError, match="safetensors file is a FIFO"):
        within(30, lambda: Checkpoint(hf_copy))


def test_a_fifo_found_by_its_name_is_refused_at_once(orig_copy):
    """Without an index every *.safetensors file is opened: a FIFO among them too."""
    os.mkfifo(orig_copy / "model-extra.safetensors")
    one_error_line(cli("info", orig_copy), "model-extra.safetensors", "is a FIFO")


def test_a_fifo_as_the_index_is_refused_at_once(hf_copy):
    path = hf_copy / "model.safetensors.index.json"
    path.unlink()
    os.mkfifo(path)
    one_error_line(cli("info", hf_copy), str(path), "index is a FIFO")


def test_a_fifo_as_generation_config_json_is_never_read(hf_copy):
    """tinyoss reads no generation_config.json: a FIFO there changes nothing."""
    path = hf_copy / "generation_config.json"
    path.unlink()
    os.mkfifo(path)
    r = cli("info", hf_copy)
    assert r.returncode == 0 and "all 41 tensors present" in r.stdout, r.stderr


def test_a_socket_as_a_shard_is_refused(orig_copy, monkeypatch):
    path = orig_copy / "model.safetensors"
    path.unlink()
    monkeypatch.chdir(orig_copy)  # bind a short relative name: socket paths are limited to ~107
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("model.safetensors")
        one_error_line(cli("info", orig_copy), str(path), "is a socket, not a regular file")


@pytest.mark.parametrize("name,what", [("config.json", "config.json"),
                                       ("model.safetensors", "safetensors file")])
def test_a_device_is_refused(orig_copy, name, what):
    """/dev/zero never ends: read as a file it would fill the memory."""
    path = orig_copy / name
    path.unlink()
    path.symlink_to("/dev/zero")
    one_error_line(cli("info", orig_copy), str(path), f"{what} is a character device")


def test_a_fifo_as_a_recording_is_refused(tmp_path):
    from tinyoss.recorder import Recording

    path = tmp_path / "run.npz"
    os.mkfifo(path)
    with pytest.raises(TinyossError, match="run.npz: a recording is a regular file"):
        within(30, lambda: Recording.load(path))


# ---------------------------------------------------------------------------------------------
# item 9: NaN and inf in the weights


def test_info_scan_of_a_clean_checkpoint(hf_copy):
    r = cli("info", hf_copy, "--scan")
    assert r.returncode == 0, r.stderr
    assert "all finite" in r.stdout


def test_info_scan_names_a_nan_bf16_value(hf_copy):
    name = "model.layers.1.self_attn.q_proj.weight"
    path = poke(hf_copy, name, (2, 5), BF16_NAN)
    one_error_line(cli("info", hf_copy, "--scan"), str(path), f"tensor '{name}'",
                   "holds 1 NaN/inf value(s), the first at [2, 5]")


def test_info_scan_names_every_tensor_holding_nan(hf_copy):
    """An E8M0 scale of 255 is NaN (the block's E2M1 elements have no NaN of their own); an inf
    in a bf16 bias too; each tensor is one error line, in checkpoint order."""
    poke(hf_copy, "model.layers.0.mlp.experts.down_proj_scales", (3, 7, 1), b"\xff")
    poke(hf_copy, "model.layers.1.mlp.router.bias", (4,), np.array([0xFF80], np.uint16).tobytes())
    r = cli("info", hf_copy, "--scan")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), r.stderr
    assert "'model.layers.0.mlp.experts.down_proj_scales' holds 1 MXFP4 block(s)" in lines[0]
    assert "the first at [3, 7, 1]" in lines[0]
    assert "'model.layers.1.mlp.router.bias' holds 1 NaN/inf value(s), the first at [4]" in lines[1]


def test_scan_of_scales_that_overflow_only_with_large_elements(orig_copy):
    """E8M0 254 is 2**127: a block of 0.5s stays finite, a 6.0 in it overflows to inf."""
    scales, blocks = "block.1.mlp.mlp1_weight.scales", "block.1.mlp.mlp1_weight.blocks"
    poke(orig_copy, scales, (2, 9, 0), bytes([254]))
    for j in range(16):
        poke(orig_copy, blocks, (2, 9, 0, j), b"\x11")  # every element 0.5
    assert Checkpoint(orig_copy).scan() == []
    poke(orig_copy, blocks, (2, 9, 0, 5), b"\x71")  # element 11 is 6.0
    [bad] = Checkpoint(orig_copy).scan()
    assert (bad.tensor, bad.count, bad.first) == (scales, 1, (2, 9, 0))


def test_scan_names_the_fused_qkv_tensor_of_the_original_layout(orig_copy):
    name = "block.0.attn.qkv.weight"
    q_dim = tinyoss.load(orig_copy).config.q_dim
    path = poke(orig_copy, name, (q_dim + 3, 1), BF16_NAN)  # a row of k
    [bad] = Checkpoint(orig_copy).scan()
    assert (bad.file, bad.tensor, bad.count, bad.first) == (path, name, 1, (q_dim + 3, 1))


@pytest.fixture
def nan_model(tiny_checkpoint, tmp_path):
    """The tiny model (full vocabulary: inspect renders harmony), one NaN in layer 2's o_proj."""
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "nan",
                                  ignore=shutil.ignore_patterns("original")))
    poke(folder, "model.layers.2.self_attn.o_proj.weight", (7, 3), BF16_NAN)
    return folder


def test_the_recording_names_where_it_turned_nan(nan_model):
    from tinyoss.recorder import record

    recording = record(tinyoss.load(nan_model), [200006, 1234, 5678])
    assert recording.first_non_finite() == (2, "resid_mid", 0)


def test_inspect_refuses_to_print_nan(nan_model):
    r = cli("inspect", nan_model, "Hello")
    line = one_error_line(r, str(nan_model), "NaN/inf in layer 2 (resid_mid) at position 0",
                          "--scan")
    assert "nan" not in r.stdout.lower(), r.stdout
    assert line


# ---------------------------------------------------------------------------------------------
# item 11: synth --force deletes only what synth wrote; the space is checked first


def test_synth_force_never_deletes_a_folder_of_documents(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    one_error_line(cli("synth", docs, "--vocab", "300", "--layers", "2", "--force"), str(docs),
                   "not a checkpoint tinyoss synth wrote")
    assert (docs / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]  # no leftovers beside it


def test_synth_force_never_deletes_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    one_error_line(cli("synth", notes, "--vocab", "300", "--force"), str(notes), "a file, not a")
    assert notes.read_text() == "keep"


def test_synth_without_force_says_why_force_would_not_do(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    one_error_line(cli("synth", docs, "--vocab", "300"), str(docs), "already exists, and is not "
                   "a checkpoint tinyoss synth wrote")
    mine = tmp_path / "m"
    assert cli("synth", mine, "--vocab", "300", "--layers", "2").returncode == 0
    one_error_line(cli("synth", mine, "--vocab", "300"), "already exists (use --force to replace it)")


def test_synth_force_refuses_a_checkpoint_with_other_files_in_it(tmp_path):
    out = tmp_path / "m"
    assert cli("synth", out, "--vocab", "300", "--layers", "2", "--layout", "both").returncode == 0
    (out / "original" / "notes.md").write_text("mine")
    (out / "README.md").write_text("mine too")
    one_error_line(cli("synth", out, "--vocab", "300", "--layers", "2", "--force"), str(out),
                   "holds README.md, original/notes.md besides a checkpoint")
    assert (out / "README.md").exists() and (out / "original" / "notes.md").exists()


def test_synth_force_refuses_a_checkpoint_it_did_not_write(orig_copy):
    """A real original/ download holds exactly the files synth writes: only the marker tells
    them apart."""
    (orig_copy / synth.MARKER).unlink()
    before = sorted(p.name for p in orig_copy.iterdir())
    one_error_line(cli("synth", orig_copy, "--vocab", "300", "--force"), str(orig_copy),
                   f"no {synth.MARKER} file")
    assert sorted(p.name for p in orig_copy.iterdir()) == before


def test_synth_force_replaces_its_own_checkpoint(tmp_path):
    out = tmp_path / "m"
    args = ("synth", out, "--vocab", "300", "--layers", "2", "--layout", "both")
    assert cli(*args, "--seed", "1").returncode == 0
    old = Checkpoint(out)["embed"].copy()
    r = cli(*args, "--seed", "2", "--force")
    assert r.returncode == 0, r.stderr
    assert not np.array_equal(Checkpoint(out)["embed"], old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the old one gone, no leftovers


def test_a_failed_synth_force_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "m"
    config = synth.preset_config("tiny", **SMALL)
    synth.write_checkpoint(out, config, seed=1)
    old = Checkpoint(out)["embed"].copy()

    def boom(*a, **k):
        yield np.zeros(4, np.uint16)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synth, "generate_rows", boom)
    with pytest.raises(OSError):
        synth.write_checkpoint(out, config, seed=2, force=True)
    np.testing.assert_array_equal(Checkpoint(out)["embed"], old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_synth_checks_the_free_space_first(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "free_bytes", lambda folder: 10_000)
    with pytest.raises(TinyossError, match=r"m: the checkpoint needs 0\.\d\d GB and its disk has "
                                           r"0\.00 GB free"):
        synth.write_checkpoint(tmp_path / "m", synth.preset_config("tiny", **SMALL))
    assert list(tmp_path.iterdir()) == []


def test_synth_command_checks_the_free_space_first(tmp_path):
    """The command line in a real process whose disk_usage says 1 kB is free."""
    code = ("import collections, shutil, sys\n"
            "Usage = collections.namedtuple('Usage', 'total used free')\n"
            "shutil.disk_usage = lambda path: Usage(10**12, 10**12 - 1000, 1000)\n"
            "from tinyoss.cli import main\n"
            "sys.argv = ['tinyoss'] + sys.argv[1:]\n"
            "main()\n")
    out = tmp_path / "sub" / "m"
    r = subprocess.run([sys.executable, "-c", code, "synth", str(out), "--preset", "20b"],
                       capture_output=True, text=True, timeout=60)
    one_error_line(r, str(out), "the checkpoint needs 13.76 GB and its disk has 0.00 GB free")
    assert list(tmp_path.iterdir()) == []  # not even the parent folder


# ---------------------------------------------------------------------------------------------
# item 12: the right key blamed; stdout closed or full


def test_zero_layers_blames_num_hidden_layers(hf_copy):
    path = hf_copy / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), num_hidden_layers=0)))
    one_error_line(cli("info", hf_copy), str(path), "key 'num_hidden_layers' must be positive, got 0")


@pytest.mark.parametrize("key,value,message", [
    ("num_local_experts", 0, "key 'num_local_experts' must be positive"),
    ("rope_scaling", {"factor": -1.0, "beta_fast": 32.0, "beta_slow": 1.0,
                      "original_max_position_embeddings": 4096}, "key 'rope_scaling.factor' must be positive"),
    ("num_experts_per_tok", 99, "key 'num_experts_per_tok' (99) must not exceed"),
])
def test_hf_config_errors_name_the_hf_key(make_checkpoint, key, value, message):
    raw = json.loads((make_checkpoint("hf", seed=1, **SMALL) / "config.json").read_text())
    raw[key] = value
    if key == "num_experts_per_tok":  # (the HF config spells it twice; the two must agree)
        raw["experts_per_token"] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(raw)


def closed_pipe():
    """The write end of a pipe whose reader is gone (`| head` that has exited)."""
    read, write = os.pipe()
    os.close(read)
    return write


def quiet(r: subprocess.CompletedProcess) -> None:
    assert "Broken pipe" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "error" not in r.stderr.lower() and "Exception ignored" not in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["info", "{ckpt}"], ["synth", "x", "--dry-run"],
                                  ["synth", "x", "--dry-run", "--json"], ["--help"]])
def test_a_closed_pipe_ends_quietly(hf_copy, args):
    write = closed_pipe()
    try:
        r = cli(*[a.format(ckpt=hf_copy) for a in args], stdout=write, stderr=subprocess.PIPE,
                capture_output=False)
    finally:
        os.close(write)
    quiet(r)


def test_run_into_a_closed_pipe_ends_quietly(tiny_checkpoint):
    """`tinyoss run ... | head -c 10`: the reply streams to stdout, token by token."""
    write = closed_pipe()
    try:
        r = cli("run", "-m", tiny_checkpoint, "--raw", "-t", "0", "-n", "4", "--threads", "1",
                "Hello", stdout=write, stderr=subprocess.PIPE, capture_output=False, timeout=300)
    finally:
        os.close(write)
    quiet(r)


def test_head_of_a_long_listing_ends_quietly():
    """A real `| head -1` on 90 kB of listing: more than a pipe buffers, so the writer meets the
    closed pipe."""
    command = f"'{sys.executable}' -m tinyoss.cli synth x --preset 120b --dry-run | head -1"
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert r.stdout.count("\n") == 1 and "model.embed_tokens.weight" in r.stdout
    quiet(r)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", [["info", "{ckpt}"], ["synth", "x", "--dry-run"], ["--help"]])
def test_a_full_disk_on_stdout_says_stdout(hf_copy, args):
    with open("/dev/full", "w") as full:
        r = cli(*[a.format(ckpt=hf_copy) for a in args], stdout=full, stderr=subprocess.PIPE,
                capture_output=False)
    one_error_line(r, "error: cannot write to stdout: No space left on device")


# ---------------------------------------------------------------------------------------------
# item 13: bad input through the API is a ValueError, a wrong type a TypeError


def test_bad_input_is_a_value_error(tmp_path, orig_copy):
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        tinyoss.load(tmp_path / "nothing")
    (orig_copy / "config.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        tinyoss.load(orig_copy)


@pytest.mark.parametrize("call,message", [
    (lambda: tinyoss.load(123), "path must be a str or PathLike, got int"),
    (lambda: tinyoss.load(None), "path must be a str or PathLike, got NoneType"),
    (lambda: load_config(1.5), "path must be a str or PathLike, got float"),
    (lambda: synth.preset_config("tiny", vocab_size="300"), "vocab_size must be a int, got str"),
    (lambda: synth.preset_config("tiny", num_hidden_layers=True), "must be a int, got bool"),
    (lambda: synth.preset_config(20), "preset must be a str, got int"),
    (lambda: synth.preset_config("tiny", layers=2), "no config field 'layers'"),
    (lambda: synth.write_checkpoint(123, synth.preset_config("tiny")), "out must be a str"),
    (lambda: synth.write_checkpoint("x", {"hidden_size": 64}), "config must be a Config, got dict"),
    (lambda: synth.write_checkpoint("x", synth.preset_config("tiny"), seed="0"),
     "seed must be a int, got str"),
    (lambda: tinyoss.Sampler(temperature="hot"), "temperature must be a number, got str"),
    (lambda: tinyoss.Sampler(seed="lucky"), "seed must be an integer, a numpy Generator or None"),
    (lambda: tinyoss.Sampler(seed=0).sample("abc"), "logits must be a vector of numbers"),
    (lambda: tinyoss.Recording.load(5), "path must be a str or PathLike, got int"),
    (lambda: tinyoss.record("model", [1]), "model must be a Model, got str"),
])
def test_a_wrong_type_is_a_type_error(call, message):
    with pytest.raises(TypeError, match=message) as err:
        call()
    assert isinstance(err.value, TinyossTypeError) and isinstance(err.value, ValueError)


def test_a_wrong_layout_type_is_a_type_error(make_checkpoint):
    with pytest.raises(TinyossTypeError, match="layout must be 'hf', 'original' or None, got int"):
        tinyoss.load(make_checkpoint("hf", seed=1, **SMALL), layout=3)
