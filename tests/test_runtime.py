"""runtime.Model refuses what it cannot run: another model's KV cache, and weights whose outputs turn
NaN or inf (named by layer, position and generation step rather than found later as NaN logits)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

import tinyoss
from tinyoss.errors import NonFiniteError, TinyossError
from tinyoss.generate import generate
from tinyoss.sampling import Sampler
from tinyoss.store import SafetensorsFile

BF16_NAN = np.array([0x7FC0], np.uint16).tobytes()


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return tinyoss.load(make_checkpoint("hf"))


@pytest.mark.parametrize("override, field", [
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
    ({"sliding_window": 8}, "sliding_window"),
    ({"num_key_value_heads": 4}, "num_key_value_heads"),
    ({"rope_theta": 10000.0}, "rope_theta"),
])
def test_a_cache_made_by_another_model_is_refused(model, make_checkpoint, override, field):
    other = tinyoss.load(make_checkpoint("hf", **override))
    cache = other.new_cache(64)
    other.forward([1, 2, 3], cache)
    with pytest.raises(TinyossError, match=f"made for another model: its {field} is"):
        model.forward([4], cache)
    with pytest.raises(TinyossError, match=f"its {field} is"):
        model.forward_batch([4], [cache])
    with pytest.raises(TinyossError, match=f"its {field} is"):
        model.forward_reference([4], cache)
    assert cache.n_tokens == 3  # untouched


def test_a_cache_of_another_load_of_the_same_checkpoint_is_fine(model, make_checkpoint):
    again = tinyoss.load(make_checkpoint("hf"))
    cache = again.new_cache(64)
    again.forward([1, 2, 3], cache)
    np.testing.assert_allclose(model.forward([4], cache), model.forward([1, 2, 3, 4])[-1:],
                               atol=1e-4)


def test_a_cache_with_replaced_buffers_or_of_another_type_is_refused(model):
    cache = model.new_cache(64)
    cache.k[1] = np.zeros((3, 16, 5), np.float32)
    with pytest.raises(TinyossError, match="buffers do not match"):
        model.forward([1], cache)
    with pytest.raises(TinyossError, match="cache must be a KVCache"):
        model.forward([1], {"k": []})


def _poison(folder, tensor: str) -> None:
    """Write NaN into the first element of a bf16 tensor, in place."""
    for shard in folder.glob("*.safetensors"):
        info = SafetensorsFile(shard).tensors.get(tensor)
        if info is not None:
            assert info.dtype == "BF16"
            with open(shard, "r+b") as f:
                f.seek(info.begin)
                f.write(BF16_NAN)
            return
    raise AssertionError(f"{tensor} not found")


@pytest.fixture(scope="module")
def nan_in_layer_2(make_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(make_checkpoint("hf"), folder)
    _poison(folder, "model.layers.2.self_attn.o_proj.bias")
    return folder


@pytest.fixture(scope="module")
def nan_in_one_embedding(make_checkpoint, tmp_path_factory):
    """The embedding row of token 1000 is NaN: only a step that runs that token goes wrong."""
    folder = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(make_checkpoint("hf"), folder)
    info = SafetensorsFile(folder / "model-00000-of-00001.safetensors").tensors[
        "model.embed_tokens.weight"]
    with open(folder / "model-00000-of-00001.safetensors", "r+b") as f:
        f.seek(info.begin + 1000 * info.shape[1] * 2)
        f.write(BF16_NAN)
    return folder


def test_nan_weights_are_named_by_layer_and_position(nan_in_layer_2):
    model = tinyoss.load(nan_in_layer_2)
    cache = model.new_cache(64)
    with pytest.raises(NonFiniteError, match=r"output of layer 2 \(of 0\.\.3\) is not finite .* "
                                             r"at position 0") as err:
        model.forward([5, 6, 7], cache)
    assert (err.value.layer, err.value.position) == (2, 0)


def test_the_first_position_whose_output_is_not_finite_is_named(nan_in_one_embedding):
    model = tinyoss.load(nan_in_one_embedding)
    cache = model.new_cache(64)
    model.forward([5, 6, 7], cache)
    with pytest.raises(NonFiniteError, match="output of layer 0 .* at position 4") as err:
        model.forward([8, 1000, 9], cache)
    assert err.value.position == 4
    with pytest.raises(NonFiniteError, match="at position 3"):  # batched decode too
        fresh = model.new_cache(64)
        model.forward([5, 6, 7], fresh)
        model.forward_batch([1000], [fresh])


class _Always:
    """A sampler that always picks one token (the poisoned one)."""

    def __init__(self, token: int):
        self.token = token

    def sample(self, logits):
        return self.token


def test_generate_names_the_step(nan_in_layer_2, nan_in_one_embedding):
    with pytest.raises(NonFiniteError, match=r"^reading the prompt: the output of layer 2"):
        list(generate(tinyoss.load(nan_in_layer_2), "hi", sampler=Sampler(temperature=0)))
    with pytest.raises(NonFiniteError, match=r"^decode step 1 \(after the reply's token 0\): the "
                                             r"output of layer 0"):
        list(generate(tinyoss.load(nan_in_one_embedding), "hi", sampler=_Always(1000),
                      max_tokens=5))


def test_run_names_layer_and_step_without_a_traceback(nan_in_layer_2):
    r = subprocess.run([sys.executable, "-m", "tinyoss.cli", "run", "-m", str(nan_in_layer_2),
                        "hi", "-n", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "reading the prompt: the output of layer 2 (of 0..3) is not finite" in r.stderr


def test_overflowing_expert_scales_are_one_error_without_numpy_warnings(make_checkpoint, tmp_path):
    """MXFP4 scale bytes of 254 (2**127 times values up to 6: inf): prefill's BLAS products
    printed numpy's overflow / invalid warnings before the error naming the layer."""
    folder = tmp_path / "model"
    shutil.copytree(make_checkpoint("hf"), folder)
    name = "model.layers.0.mlp.experts.gate_up_proj_scales"
    for shard in folder.glob("*.safetensors"):
        info = SafetensorsFile(shard).tensors.get(name)
        if info is not None:
            with open(shard, "r+b") as f:
                f.seek(info.begin)
                f.write(bytes([254]) * (info.end - info.begin))
    r = subprocess.run([sys.executable, "-m", "tinyoss.cli", "run", "-m", str(folder), "hi", "-n", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "reading the prompt: the output of layer 0 (of 0..3) is not finite" in r.stderr
    assert "warning" not in r.stderr.lower() and "encountered" not in r.stderr


@pytest.mark.parametrize("call", [
    lambda m, path: tinyoss.load(123),
    lambda m, path: tinyoss.load(path, dense=3),
    lambda m, path: tinyoss.load(path, kv=None),
    lambda m, path: tinyoss.load(path, q8_cache=1.5),
    lambda m, path: m.forward("abc"),
    lambda m, path: m.forward([1.5, 2.0]),
    lambda m, path: m.forward([True]),
    lambda m, path: m.new_cache("10"),
    lambda m, path: m.new_cache(10, kv=16),
    lambda m, path: tinyoss.chat(m, [{"role": "user", "content": "hi"}]),
    lambda m, path: tinyoss.chat(m, "hi", max_tokens="5"),
    lambda m, path: tinyoss.chat(m, "hi", reasoning=2),
    lambda m, path: tinyoss.chat(m, "hi", sampler=0.5),
    lambda m, path: m.forward([1, 2], last_only=5),  # (was taken as true)
    lambda m, path: m.forward_batch([1], None),  # (was len() of None)
    lambda m, path: m.forward_reference([1], recorder=5),  # (was functools.partial's error)
])
def test_a_wrong_type_is_a_type_error_and_a_tinyoss_error(model, make_checkpoint, call):
    with pytest.raises(TypeError) as err:
        call(model, make_checkpoint("hf"))
    assert isinstance(err.value, TinyossError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("call", [
    lambda m: m.forward([]),
    lambda m: m.forward([[1, 2], [3]]),
    lambda m: m.forward([m.config.vocab_size]),
    lambda m: m.new_cache(0),
    lambda m: tinyoss.load(m.checkpoint.path, dense="q4"),
    lambda m: tinyoss.chat(m, "hi", max_tokens=0),
])
def test_a_bad_value_is_a_value_error(model, call):
    with pytest.raises(ValueError) as err:
        call(model)
    assert isinstance(err.value, TinyossError) and not isinstance(err.value, TypeError)
