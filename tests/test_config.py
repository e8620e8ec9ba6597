import json
from pathlib import Path

import pytest

from tinyoss.config import Config, config_from_dict, load_config, to_hf_dict, to_original_dict
from tinyoss.errors import ConfigError

MANIFEST = json.loads((Path(__file__).parent / "data" / "manifest.json").read_text())["models"]


@pytest.mark.parametrize("model", ["gpt-oss-20b", "gpt-oss-120b"])
def test_both_published_configs_give_the_same_config(model):
    hf = config_from_dict(MANIFEST[model]["hf"]["config"])
    original = config_from_dict(MANIFEST[model]["original"]["config"])
    assert hf == original
    assert hf.layer_sliding == tuple(i % 2 == 0 for i in range(hf.num_hidden_layers))
    assert (hf.num_experts, hf.experts_per_token, hf.rope_ntk_beta, hf.rope_ntk_alpha) == \
        ({"gpt-oss-20b": 32, "gpt-oss-120b": 128}[model], 4, 32.0, 1.0)


@pytest.mark.parametrize("model", ["gpt-oss-20b", "gpt-oss-120b"])
def test_configs_are_written_back_as_published(model):
    c = config_from_dict(MANIFEST[model]["hf"]["config"])
    assert to_hf_dict(c) == MANIFEST[model]["hf"]["config"]
    assert to_original_dict(c) == MANIFEST[model]["original"]["config"]


def test_config_is_frozen():
    c = config_from_dict(MANIFEST["gpt-oss-20b"]["original"]["config"])
    with pytest.raises(Exception):
        c.hidden_size = 1  # type: ignore[misc]
    assert isinstance(c, Config) and c.q_mult == 8


def test_unknown_keys_are_ignored():
    raw = dict(MANIFEST["gpt-oss-20b"]["original"]["config"], something_new=[1, 2])
    assert config_from_dict(raw) == config_from_dict(MANIFEST["gpt-oss-20b"]["original"]["config"])


@pytest.mark.parametrize("layout,key,path", [
    ("original", "num_experts", ("num_experts",)),
    ("hf", "num_local_experts", ("num_local_experts",)),
    ("hf", "rope_scaling.factor", ("rope_scaling", "factor")),
    ("original", "rope_ntk_beta", ("rope_ntk_beta",)),
])
def test_missing_key_is_named(layout, key, path):
    raw = json.loads(json.dumps(MANIFEST["gpt-oss-20b"][layout]["config"]))
    node = raw
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    with pytest.raises(ConfigError, match=f"missing required key '{key}'"):
        config_from_dict(raw, "x/config.json")


@pytest.mark.parametrize("key,value,why", [
    ("hidden_size", "2880", "must be a int"),
    ("hidden_size", 2881, "multiple of 32"),
    ("num_key_value_heads", 7, "must divide"),
    ("experts_per_token", 64, "must not exceed"),
    ("head_dim", 0, "must be positive"),
    ("num_experts", True, "must be a int"),
    ("rope_theta", -1, "must be positive"),
    ("num_hidden_layers", 10**30, "must be at most 2147483647"),  # (was a hang)
    ("num_hidden_layers", 5000, "must be at most 4096"),
    ("sliding_window", 10**30, "must be at most 2147483647"),  # (was an OverflowError later)
    ("sliding_window", 1e30, "must be at most 2147483647"),
    ("swiglu_limit", 1e308, "must be at most 3.403e"),  # (was inf in float32, and warnings)
])
def test_invalid_value_is_named(key, value, why):
    raw = dict(MANIFEST["gpt-oss-20b"]["original"]["config"], **{key: value})
    with pytest.raises(ConfigError, match=f"x/config.json: key '{key}'.*{why}"):
        config_from_dict(raw, "x/config.json")


def test_bad_layer_types():
    raw = dict(MANIFEST["gpt-oss-20b"]["hf"]["config"], layer_types=["sliding_attention"])
    with pytest.raises(ConfigError, match="layer_types"):
        config_from_dict(raw)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: config.json not found"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(tmp_path / "config.json")


@pytest.mark.parametrize("change,message", [
    # the published HF config spells the experts a token takes twice: they must agree
    (lambda raw: raw.update(num_experts_per_tok=2),
     r"keys 'num_experts_per_tok' \(2\) and 'experts_per_token' \(4\) disagree"),
    (lambda raw: raw.update(initial_context_length=8192),
     r"keys 'rope_scaling.original_max_position_embeddings' \(4096\) and 'initial_context_length' "
     r"\(8192\) disagree"),
    # a rope other than YaRN was read as YaRN
    (lambda raw: raw["rope_scaling"].update(rope_type="linear"),
     r"key 'rope_scaling.rope_type' must be \"yarn\" .*got 'linear'"),
])
def test_an_hf_config_that_contradicts_itself_is_named(change, message):
    raw = json.loads(json.dumps(MANIFEST["gpt-oss-20b"]["hf"]["config"]))
    change(raw)
    with pytest.raises(ConfigError, match=f"x/config.json: {message}"):
        config_from_dict(raw, "x/config.json")


def test_a_key_written_twice_is_named(tmp_path):
    """json keeps the last of two equal keys silently; the error that followed blamed a tensor."""
    text = json.dumps(MANIFEST["gpt-oss-20b"]["hf"]["config"])
    (tmp_path / "config.json").write_text(text.replace('"hidden_size": 2880',
                                                       '"hidden_size": 2880, "hidden_size": 2048'))
    with pytest.raises(ConfigError, match="config.json: key 'hidden_size' appears more than once in one object"):
        load_config(tmp_path / "config.json")


def test_another_models_config_is_named():
    """A llama config: 'missing required key num_local_experts' said less than it knew."""
    raw = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32}
    with pytest.raises(ConfigError, match="x/config.json: not a gpt-oss config .model_type 'llama'"):
        config_from_dict(raw, "x/config.json")
