"""dense='q8' keeps its int8 copies in a cache file: reused when it is this checkpoint's and
complete, rebuilt otherwise, never half-written, and never needed (a load works without it)."""

from __future__ import annotations

import errno
import os
import warnings

import numpy as np
import pytest

import tinyoss
from tinyoss import kernels, quant

TOKENS = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint):
    return make_checkpoint("hf", seed=5)


def _logits(model):
    return model.forward(TOKENS)


def _no_quantizing(monkeypatch):
    def refuse(*args):
        raise AssertionError("quantized although the cache holds the copies")
    for module, name in ((kernels, "bf16_to_q8"), (kernels, "bf16_to_q8_into"),
                         (quant, "_write_cache")):
        monkeypatch.setattr(module, name, refuse)


def test_copies_are_written_once_then_mapped_from_the_file(checkpoint, tmp_path, monkeypatch):
    first = tinyoss.load(checkpoint, dense="q8", q8_cache=tmp_path)
    files = list(tmp_path.glob("q8-*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp"))
    want = _logits(first)
    _no_quantizing(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = tinyoss.load(checkpoint, dense="q8", q8_cache=tmp_path)
    q, s = again.fast_weights.unembed.q8
    assert not q.flags.writeable and not q.flags.owndata  # a view of the mapped file
    ref_q, ref_s = quant.q8_quantize(again.weights.unembed)  # the numpy definition
    assert np.array_equal(q, ref_q) and np.array_equal(s, ref_s)
    assert np.array_equal(_logits(again), want)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_a_bit(path):
    """One flipped bit in the int8 copies (a bad disk, a stray write): the copy it maps would be
    wrong with every header check passing; the checksum written with it tells."""
    at = os.path.getsize(path) - 1000
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("damage,warning", [(_truncate, "ignoring the q8 cache"),
                                            (_flip_a_bit, "data changed since it was written")])
def test_a_damaged_cache_file_is_rebuilt(checkpoint, tmp_path, damage, warning):
    want = _logits(tinyoss.load(checkpoint, dense="q8", q8_cache=tmp_path))
    (path,) = tmp_path.glob("q8-*.safetensors")
    damage(path)
    with pytest.warns(UserWarning, match=warning):
        model = tinyoss.load(checkpoint, dense="q8", q8_cache=tmp_path)
    assert np.array_equal(_logits(model), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten whole
        tinyoss.load(checkpoint, dense="q8", q8_cache=tmp_path)


def test_a_checkpoint_path_with_sixteen_zeros_keeps_its_cache(checkpoint, tmp_path_factory, tmp_path):
    """The checksum's place in the header was found as the first run of 16 zeros: one inside the
    source key (a folder's name, a modification time) put it there, and the cache was rebuilt at
    every load."""
    import shutil

    folder = tmp_path_factory.mktemp("z") / ("m" + "0" * 16)
    shutil.copytree(checkpoint, folder)
    tinyoss.load(folder, dense="q8", q8_cache=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tinyoss.load(folder, dense="q8", q8_cache=tmp_path)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 24, 31])
def test_the_checksum_counts_every_byte(size):
    data = np.arange(1, size + 1, dtype=np.uint8)
    padded = np.concatenate([data, np.zeros(-size % 8, np.uint8)])
    want = sum(int.from_bytes(bytes(padded[i:i + 8]), "little") for i in range(0, len(padded), 8))
    assert quant.data_checksum(data) == f"{want % 2**64:016x}"
    for i in range(size):  # any one byte changed: another sum
        changed = data.copy()
        changed[i] ^= 1
        assert quant.data_checksum(changed) != quant.data_checksum(data)


def test_a_cache_file_of_another_checkpoint_is_not_used(make_checkpoint, tmp_path):
    a, b = make_checkpoint("hf", seed=5), make_checkpoint("hf", seed=6)
    want_b = _logits(tinyoss.load(b, dense="q8", q8_cache=False))
    tinyoss.load(a, dense="q8", q8_cache=tmp_path)
    (path_a,) = tmp_path.glob("q8-*.safetensors")
    path_b, _ = quant.cache_path(tinyoss.load(b).checkpoint, tmp_path)
    os.link(path_a, path_b)  # b's name, a's copies: the recorded source tells them apart
    with pytest.warns(UserWarning, match="another checkpoint"):
        model = tinyoss.load(b, dense="q8", q8_cache=tmp_path)
    assert np.array_equal(_logits(model), want_b)


def test_an_edited_checkpoint_gets_a_new_cache_file(make_checkpoint, tmp_path, tmp_path_factory):
    import shutil

    folder = tmp_path_factory.mktemp("edited") / "m"
    shutil.copytree(make_checkpoint("hf", seed=5), folder)
    tinyoss.load(folder, dense="q8", q8_cache=tmp_path)
    (old,) = tmp_path.glob("q8-*.safetensors")
    shard = next(folder.glob("*.safetensors"))
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    tinyoss.load(folder, dense="q8", q8_cache=tmp_path)
    (new,) = tmp_path.glob("q8-*.safetensors")  # the old copy deleted
    assert new != old


def test_an_unwritable_cache_folder_only_warns(checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match=f"could not write the q8 cache .*{blocker} is a file, not a "
                                         "folder"):  # (it said "File exists")
        model = tinyoss.load(checkpoint, dense="q8", q8_cache=blocker / "cache")
    want = _logits(tinyoss.load(checkpoint, dense="q8", q8_cache=False))
    assert np.array_equal(_logits(model), want)


def test_a_full_disk_leaves_no_file(checkpoint, tmp_path, monkeypatch):
    def full(fd, size):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(quant, "_reserve", full)
    with pytest.warns(UserWarning, match="No space left"):
        model = tinyoss.load(checkpoint, dense="q8", q8_cache=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert np.array_equal(_logits(model), _logits(tinyoss.load(checkpoint, dense="q8",
                                                                q8_cache=False)))


def test_an_error_while_quantizing_is_not_hidden_and_leaves_no_file(checkpoint, tmp_path,
                                                                    monkeypatch):
    """The map can't close while the failed call's traceback holds views of it: the error
    raised is the real one, not a BufferError, and the temporary file is gone."""
    def broken(w, q, s):
        raise ZeroDivisionError("inside the kernel")
    monkeypatch.setattr(kernels, "bf16_to_q8_into", broken)
    with pytest.raises(ZeroDivisionError, match="inside the kernel"):
        tinyoss.load(checkpoint, dense="q8", q8_cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_q8_needs_rows_in_blocks_of_32(make_checkpoint):
    from tinyoss.errors import TinyossError

    odd = make_checkpoint("hf", seed=5, num_attention_heads=4, num_key_value_heads=2, head_dim=10)
    with pytest.raises(TinyossError, match="blocks of 32 values; '0.o_w' has 40 columns"):
        tinyoss.load(odd, dense="q8", q8_cache=False)


def test_the_cache_folder_setting(monkeypatch, tmp_path, checkpoint):
    monkeypatch.setenv("TINYOSS_CACHE_DIR", str(tmp_path / "here"))
    assert quant.cache_dir() == tmp_path / "here"
    tinyoss.load(checkpoint, dense="q8")
    assert len(list((tmp_path / "here").glob("q8-*.safetensors"))) == 1
    monkeypatch.setenv("TINYOSS_CACHE_DIR", "")  # off
    assert quant.cache_dir() is None
    monkeypatch.delenv("TINYOSS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert quant.cache_dir() == tmp_path / "xdg" / "tinyoss"
    tinyoss.load(checkpoint, dense="q8", q8_cache=False)
    assert not (tmp_path / "xdg").exists()


def test_temporary_files_of_killed_writers_are_cleared(checkpoint, tmp_path):
    """A process killed while writing leaves its temporary file: the next writer deletes those
    older than an hour (a younger one may be another process's write in progress)."""
    old, young = tmp_path / ".q8-dead.1234.tmp", tmp_path / ".q8-busy.5678.tmp"
    for p in (old, young):
        p.write_bytes(b"partial")
    os.utime(old, (0, 0))
    tinyoss.load(checkpoint, dense="q8", q8_cache=tmp_path)
    assert not old.exists() and young.exists()
