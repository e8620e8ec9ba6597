"""The recording is faithful: attention rows are distributions, bands hold, the logits are the
model's, the lens ends at the logits, routing adds up, files round-trip, and `inspect` works."""

import os

import numpy as np
import pytest
from typer.testing import CliRunner

import tinyoss
from tinyoss.cli import app
from tinyoss.errors import TinyossError
from tinyoss.harmony import Message, render_conversation_for_completion
from tinyoss.recorder import LAYER_NAMES, Recording, logit_lens, record, top_k

N = 40  # longer than the tiny preset's window of 16


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tinyoss.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(3).integers(0, 199998, N)


@pytest.fixture(scope="module")
def rec(model, tokens):
    return record(model, tokens)


def test_everything_is_recorded_with_its_shape(model, rec):
    c = model.config
    assert rec.n_layers == c.num_hidden_layers and rec.n_tokens == N
    for layer in rec.layers:
        assert set(layer) == set(LAYER_NAMES)
    assert rec.sink_mass.shape == (c.num_hidden_layers, c.num_attention_heads, N)
    assert rec.attn_weights(0).shape == (c.num_attention_heads, N, N)
    assert rec.router_logits.shape == (c.num_hidden_layers, N, c.num_experts)
    assert rec.experts.shape == rec.expert_weights.shape == (c.num_hidden_layers, N, c.experts_per_token)
    assert rec.resid_norm().shape == (c.num_hidden_layers, N)
    assert rec.logits.shape == (N, c.vocab_size)
    assert list(rec.sliding) == list(c.layer_sliding)


def test_attention_weights_and_sink_mass_sum_to_one(rec):
    for L in range(rec.n_layers):
        total = rec.attn_weights(L).sum(axis=-1) + rec.layers[L]["sink_mass"]  # [Hq, n]
        np.testing.assert_allclose(total, 1.0, atol=1e-5)
        assert (rec.attn_weights(L) >= 0).all()
    assert ((rec.sink_mass > 0) & (rec.sink_mass < 1)).all()


def test_banded_layers_see_only_their_window(rec):
    q_pos = rec.positions[:, None]
    for L in range(rec.n_layers):
        k_pos = rec.key_positions(L)[None, :]
        causal = k_pos <= q_pos
        expected = causal & (k_pos > q_pos - rec.window) if rec.sliding[L] else causal
        assert (rec.visible(L) == expected).all()
        assert (rec.attn_weights(L)[:, ~expected] == 0).all()  # zero weight outside the band
        assert (rec.attn_weights(L)[:, expected] > 0).all()
    assert rec.visible(0).sum(axis=1).max() == rec.window  # the band counts the current token
    assert rec.visible(1).sum(axis=1).max() == N


def test_recorded_logits_are_the_models(model, tokens, rec):
    assert np.abs(rec.logits - model.forward(tokens)).max() <= 1e-4
    assert np.array_equal(rec.logits, model.forward_reference(tokens))  # recorder=None: same bits


def test_residual_stream_is_continuous(model, tokens, rec):
    from tinyoss.store import bf16_to_f32

    assert np.array_equal(rec.layers[0]["resid_pre"], bf16_to_f32(model.weights.embed[tokens]))
    for L in range(1, rec.n_layers):
        assert np.array_equal(rec.layers[L]["resid_pre"], rec.layers[L - 1]["resid_post"])
    np.testing.assert_allclose(rec.resid_norm()[0],
                               np.linalg.norm(rec.layers[0]["resid_post"], axis=-1))


def test_logit_lens_of_the_last_layer_is_the_logits(model, rec):
    assert np.array_equal(logit_lens(model, rec.layers[-1]["resid_post"]), rec.logits)
    ids, values = top_k(rec.logits, rec.lens_ids.shape[-1])
    assert np.array_equal(rec.lens_ids[-1], ids) and np.array_equal(rec.lens_logits[-1], values)
    assert np.array_equal(ids[:, 0], rec.logits.argmax(axis=-1))
    assert (np.diff(rec.lens_logits, axis=-1) <= 0).all()  # best first
    assert not np.array_equal(rec.lens_ids[0], rec.lens_ids[-1])  # earlier layers do differ


def test_routing_adds_up(model, rec):
    c = model.config
    counts = rec.expert_counts
    assert counts.shape == (c.num_hidden_layers, c.num_experts)
    assert (counts.sum(axis=1) == N * c.experts_per_token).all()
    np.testing.assert_allclose(rec.expert_weights.sum(axis=-1), 1.0, rtol=1e-6)
    best = np.argsort(-rec.router_logits, axis=-1, kind="stable")[..., :c.experts_per_token]
    assert np.array_equal(rec.experts, best)
    np.testing.assert_allclose(rec.router_probs.sum(axis=-1), 1.0, rtol=1e-6)
    # the top-k weights are the router probabilities renormalized over the chosen experts
    chosen = np.take_along_axis(rec.router_probs, rec.experts, axis=-1)
    np.testing.assert_allclose(rec.expert_weights, chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)


def test_recording_after_a_cache_sees_the_cached_keys(model, tokens):
    cache = model.new_cache(N)
    model.forward(tokens[:30], cache)
    rec = record(model, tokens[30:], cache)
    assert list(rec.positions) == list(range(30, N))
    banded, dense = rec.key_positions(0), rec.key_positions(1)
    assert banded[0] == 30 - rec.window and banded[-1] == N - 1  # the ring held the last window
    assert rec.visible(0)[0].sum() == rec.window and not rec.visible(0)[0, 0]  # 14 is out of band
    assert list(dense) == list(range(N))
    assert np.abs(rec.logits - model.forward(tokens)[30:]).max() <= 1e-4


def test_save_load_round_trip(rec, tmp_path):
    path = tmp_path / "run"  # no suffix: written at exactly this name
    rec.save(path)
    back = Recording.load(path)
    for field in ("tokens", "positions", "sliding", "logits", "lens_ids", "lens_logits"):
        assert np.array_equal(getattr(back, field), getattr(rec, field)), field
    assert back.window == rec.window
    for a, b in zip(back.layers, rec.layers):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert back.summary()[0]["lens_top"] == rec.summary()[0]["lens_top"]


def test_save_replaces_only_a_recording(rec, tmp_path):
    """Recording.save, as `inspect --save`: a file that is not a recording is never replaced
    (a checkpoint's config.json became an npz); a folder, a missing folder, a path of the wrong
    type: one TinyossError naming the path, and nothing written."""
    config = tmp_path / "config.json"
    config.write_text('{"mine": true}')
    with pytest.raises(TinyossError, match="exists and is not a tinyoss recording"):
        rec.save(config)
    assert config.read_text() == '{"mine": true}'
    with pytest.raises(TinyossError, match="is a folder"):
        rec.save(tmp_path)
    with pytest.raises(TinyossError, match="no such folder"):
        rec.save(tmp_path / "nowhere" / "r.npz")
    with pytest.raises(TypeError, match="path"):
        rec.save(5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no leftovers
    mine = tmp_path / "r.npz"
    rec.save(mine)
    rec.save(mine)  # an earlier recording is replaced
    assert Recording.load(mine).n_tokens == rec.n_tokens
    umask = os.umask(0o022)
    os.umask(umask)
    assert mine.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary new file's mode


def test_a_npy_file_is_neither_replaced_nor_loaded(rec, tmp_path):
    """np.load of a .npy is an array, not an archive: `with` on it was a TypeError traceback."""
    npy = tmp_path / "a.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(TinyossError, match="exists and is not a tinyoss recording"):
        rec.save(npy)
    assert np.array_equal(np.load(npy), np.arange(3))
    with pytest.raises(TinyossError, match="not a .npz recording"):
        Recording.load(npy)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(TinyossError, match="not a regular file"):  # (is_recording blocked on it)
        rec.save(fifo)
    with pytest.raises(TinyossError, match="can't write beside it"):  # a name near the limit
        rec.save(tmp_path / ("r" * 250))


def test_load_names_an_incomplete_recording(rec, tmp_path):
    path = tmp_path / "r.npz"
    rec.save(path)
    with np.load(path) as f:
        data = {k: f[k] for k in f.files if k != "layer0.resid_pre"}
    np.savez(tmp_path / "part.npz", **data)
    with pytest.raises(TinyossError, match="incomplete recording .no 'layer0.resid_pre'"):
        Recording.load(tmp_path / "part.npz")
    (tmp_path / "j.npz").write_text('{"a": 1}')
    with pytest.raises(TinyossError) as err:
        Recording.load(tmp_path / "j.npz")
    assert "pickled" not in str(err.value)


def test_load_rejects_what_is_not_a_recording(tmp_path):
    with pytest.raises(TinyossError, match="no such recording"):
        Recording.load(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(TinyossError, match="not a .npz recording"):
        Recording.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(TinyossError, match="not a tinyoss recording"):
        Recording.load(tmp_path / "other.npz")


runner = CliRunner()


def test_inspect_prints_one_line_per_layer_and_saves(tiny_checkpoint, tmp_path):
    out = tmp_path / "rec.npz"
    r = runner.invoke(app, ["inspect", str(tiny_checkpoint), "What is MXFP4?", "--save", str(out)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    expected = render_conversation_for_completion([Message.user("What is MXFP4?")])
    assert lines[0].startswith(f"{len(expected)} tokens, 4 layers")
    rows = [line.split() for line in lines[2:6]]
    assert [row[:2] for row in rows] == [["0", "banded"], ["1", "dense"], ["2", "banded"], ["3", "dense"]]
    assert lines[6].startswith("next token: ")
    assert list(Recording.load(out).tokens) == expected  # <|start|>user<|message|>... assistant


def test_inspect_raw_tokenizes_the_text_as_it_is(tiny_checkpoint):
    r = runner.invoke(app, ["inspect", str(tiny_checkpoint), "hello world", "--raw"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("2 tokens, 4 layers")


def test_inspect_save_replaces_a_recording_but_no_other_file(tiny_checkpoint, tmp_path):
    """--save never overwrites a file that is not a tinyoss recording (nothing is run or
    written); an earlier recording is replaced, and no temporary file is left beside it."""
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me\n")
    r = runner.invoke(app, ["inspect", str(tiny_checkpoint), "hi", "--save", str(mine)])
    assert r.exit_code == 1 and "exists and is not a tinyoss recording" in r.output
    assert mine.read_text() == "keep me\n"
    out = tmp_path / "rec.npz"
    for prompt in ("hi", "hello world"):
        r = runner.invoke(app, ["inspect", str(tiny_checkpoint), prompt, "--raw", "--save", str(out)])
        assert r.exit_code == 0, r.output
    assert len(Recording.load(out).tokens) == 2  # the second run's "hello world"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "rec.npz"]


@pytest.mark.parametrize("args,message", [
    (["{ckpt}", "  "], "the prompt is empty"),
    (["{tmp}/nothing", "hi"], "no such checkpoint folder"),
    (["{ckpt}", "hi", "--save", "{ckpt}/config.json/out.npz"], "no such folder"),
    (["{ckpt}", "hi", "--save", "{tmp}"], "is a folder"),
])
def test_inspect_errors_are_one_line(tiny_checkpoint, tmp_path, args, message):
    r = runner.invoke(app, ["inspect"] + [a.format(ckpt=tiny_checkpoint, tmp=tmp_path) for a in args])
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
