"""The model config: one frozen dataclass, filled from either layout's config.json.

The Hugging Face root config and the `original/` config name the same facts differently:

    HF root (config.json)                          original/config.json
    num_local_experts                              num_experts
    num_experts_per_tok (or experts_per_token)     experts_per_token
    rope_scaling.factor                            rope_scaling_factor
    rope_scaling.beta_slow                         rope_ntk_alpha
    rope_scaling.beta_fast                         rope_ntk_beta
    rope_scaling.original_max_position_embeddings  initial_context_length
    layer_types ("sliding_attention" / "full")     implicit: even layers are sliding

Field names follow the official reference (`gpt_oss.torch.model.ModelConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import reprlib
import stat
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ConfigError, TinyossError, expect_type

MAX_CONTEXT = 131072  # the published models' max_position_embeddings
MAX_JSON_BYTES = 100_000_000  # a config.json or index is kilobytes; refuse to read gigabytes


@dataclasses.dataclass(frozen=True)
class Config:
    num_hidden_layers: int  # 24 (20b) / 36 (120b)
    num_experts: int  # experts per MoE layer: 32 / 128
    experts_per_token: int  # top-k: 4
    vocab_size: int  # 201088
    hidden_size: int  # d_model: 2880
    intermediate_size: int  # expert hidden width: 2880
    swiglu_limit: float  # clamp of the SwiGLU inputs: 7.0
    head_dim: int  # d_head: 64
    num_attention_heads: int  # query heads: 64
    num_key_value_heads: int  # kv heads: 8 (GQA: query head h reads kv head h // q_mult)
    sliding_window: int  # band width of the sliding layers: 128 (counts the current token)
    initial_context_length: int  # YaRN's original context: 4096
    rope_theta: float  # 150000
    rope_scaling_factor: float  # YaRN factor: 32
    rope_ntk_alpha: float  # YaRN beta_slow: 1
    rope_ntk_beta: float  # YaRN beta_fast: 32
    layer_sliding: tuple[bool, ...]  # per layer: True = banded (sliding) attention
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = MAX_CONTEXT
    rope_truncate: bool = False  # HF's `truncate`: round the YaRN ramp bounds (gpt-oss: False)

    @property
    def q_mult(self) -> int:
        """Query heads per kv head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


# (field, HF key path, original key, type, default or REQUIRED)
REQUIRED = object()
_FIELDS: list[tuple[str, tuple[str, ...], str, type, Any]] = [
    ("num_hidden_layers", ("num_hidden_layers",), "num_hidden_layers", int, REQUIRED),
    ("num_experts", ("num_local_experts",), "num_experts", int, REQUIRED),
    ("experts_per_token", ("num_experts_per_tok",), "experts_per_token", int, REQUIRED),
    ("vocab_size", ("vocab_size",), "vocab_size", int, REQUIRED),
    ("hidden_size", ("hidden_size",), "hidden_size", int, REQUIRED),
    ("intermediate_size", ("intermediate_size",), "intermediate_size", int, REQUIRED),
    ("swiglu_limit", ("swiglu_limit",), "swiglu_limit", float, REQUIRED),
    ("head_dim", ("head_dim",), "head_dim", int, REQUIRED),
    ("num_attention_heads", ("num_attention_heads",), "num_attention_heads", int, REQUIRED),
    ("num_key_value_heads", ("num_key_value_heads",), "num_key_value_heads", int, REQUIRED),
    ("sliding_window", ("sliding_window",), "sliding_window", int, REQUIRED),
    ("initial_context_length", ("rope_scaling", "original_max_position_embeddings"),
     "initial_context_length", int, REQUIRED),
    ("rope_theta", ("rope_theta",), "rope_theta", float, REQUIRED),
    ("rope_scaling_factor", ("rope_scaling", "factor"), "rope_scaling_factor", float, REQUIRED),
    ("rope_ntk_alpha", ("rope_scaling", "beta_slow"), "rope_ntk_alpha", float, REQUIRED),
    ("rope_ntk_beta", ("rope_scaling", "beta_fast"), "rope_ntk_beta", float, REQUIRED),
    ("rms_norm_eps", ("rms_norm_eps",), "rms_norm_eps", float, 1e-5),
    ("max_position_embeddings", ("max_position_embeddings",), "max_position_embeddings", int,
     MAX_CONTEXT),
    ("rope_truncate", ("rope_scaling", "truncate"), "rope_truncate", bool, False),
]


def is_hf_config(raw: dict) -> bool:
    """HF root configs carry `model_type`/`num_local_experts`; original ones `num_experts`."""
    return "num_local_experts" in raw or "model_type" in raw


def _lookup(raw: dict, path: tuple[str, ...]) -> Any:
    node: Any = raw
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return REQUIRED
        node = node[key]
    return node


INT_MAX = 2**31 - 1  # the largest integer a config field may hold
FLOAT32_MAX = 3.4028234663852886e38  # float32's largest: the largest float one may hold
MAX_LAYERS = 4096


def _coerce(value: Any, kind: type, key: str, source: str) -> Any:
    """Accept JSON numbers of the right kind; bool is not an int here."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT_MAX:  # (10**30 layers or slots: a hang or an overflow later)
                raise ConfigError(f"{source}: key '{key}' must be at most {INT_MAX}, got "
                                  f"{short_repr(value)}")
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            if abs(value) > FLOAT32_MAX:  # the kernels take it as a float32
                raise ConfigError(f"{source}: key '{key}' must be at most {FLOAT32_MAX:.4g} (a "
                                  f"float32), got {short_repr(value)}")
            return float(value)
    raise ConfigError(f"{source}: key '{key}' must be a {kind.__name__}, got {short_repr(value)}")


def short_repr(value: Any) -> str:
    """repr() cut to a few levels and characters: a value read from a file, for an error message
    (a list nested 10000 deep or a megabyte string must not become the message)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlist, r.maxdict = 3, 100, 60, 8, 4
    return r.repr(value)


def config_from_dict(raw: Any, source: str = "config.json") -> Config:
    """Build a Config from a parsed config.json of either layout; `source` names it in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    hf = is_hf_config(raw)
    if hf and raw.get("model_type", "gpt_oss") != "gpt_oss":  # (a llama's: "missing 'num_local_experts'")
        raise ConfigError(f"{source}: not a gpt-oss config (model_type {short_repr(raw['model_type'])}; "
                          "tinyoss runs gpt-oss-20b and gpt-oss-120b)")
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}  # field -> the key this file spells it with (errors name that)
    for field, hf_path, orig_key, kind, default in _FIELDS:
        path = hf_path if hf else (orig_key,)
        if hf and field == "experts_per_token" and _lookup(raw, path) is REQUIRED:
            path = ("experts_per_token",)  # the published HF config carries both spellings
        value = _lookup(raw, path)
        key = keys[field] = ".".join(path)
        if value is REQUIRED:
            if default is REQUIRED:
                raise ConfigError(f"{source}: missing required key '{key}'")
            value = default
        values[field] = _coerce(value, kind, key, source)
    if hf:
        _check_hf_extras(raw, values, source)
    n_layers = values["num_hidden_layers"]
    if n_layers <= 0:  # before layer_types, which would otherwise take the blame
        raise ConfigError(f"{source}: key '{keys['num_hidden_layers']}' must be positive, "
                          f"got {n_layers}")
    if n_layers > MAX_LAYERS:  # (gpt-oss has 24 or 36; a tuple per layer is built next)
        raise ConfigError(f"{source}: key '{keys['num_hidden_layers']}' must be at most "
                          f"{MAX_LAYERS}, got {n_layers}")
    values["layer_sliding"] = _layer_sliding(raw, hf, n_layers, source)
    config = Config(**values)
    _validate(config, source, keys)
    return config


# HF configs spell some fields twice (the published one: both experts counts); each copy must agree
_HF_TWINS = (("experts_per_token", ("experts_per_token",)),
             ("initial_context_length", ("initial_context_length",)))


def _check_hf_extras(raw: dict, values: dict[str, Any], source: str) -> None:
    """What an HF config says beside the fields read: a second spelling of a field that disagrees
    with the first, and a rope other than YaRN (the only one gpt-oss has, and the one computed)."""
    for field, path in _HF_TWINS:
        other = _lookup(raw, path)
        if other is not REQUIRED and other != values[field]:
            first = next(".".join(p) for f, p, *_ in _FIELDS if f == field)
            raise ConfigError(f"{source}: keys '{first}' ({short_repr(values[field])}) and "
                              f"'{'.'.join(path)}' ({short_repr(other)}) disagree")
    scaling = raw.get("rope_scaling")
    if isinstance(scaling, dict):
        for key in ("rope_type", "type"):
            if key in scaling and scaling[key] != "yarn":
                raise ConfigError(f"{source}: key 'rope_scaling.{key}' must be \"yarn\" (gpt-oss's "
                                  f"rope, the one computed here), got {short_repr(scaling[key])}")


def _layer_sliding(raw: dict, hf: bool, n_layers: int, source: str) -> tuple[bool, ...]:
    even_rule = tuple(i % 2 == 0 for i in range(n_layers))
    if not hf or "layer_types" not in raw:
        return even_rule  # the reference: sliding window on even layers
    types = raw["layer_types"]
    if not isinstance(types, list) or len(types) != n_layers:
        raise ConfigError(f"{source}: key 'layer_types' must list {n_layers} layer types")
    allowed = {"sliding_attention": True, "full_attention": False}
    for t in types:
        if t not in allowed:
            raise ConfigError(f"{source}: key 'layer_types' has unknown type {short_repr(t)}")
    return tuple(allowed[t] for t in types)


def _validate(c: Config, source: str, keys: dict[str, str]) -> None:
    """Check the values together; a failure names the key as the file spells it (`keys`: field ->
    key, e.g. num_experts -> num_local_experts in an HF config)."""
    def need(ok: bool, field: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: key '{keys.get(field, field)}' {why}")

    for key in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size",
                "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
                "num_key_value_heads", "sliding_window", "initial_context_length",
                "max_position_embeddings"):
        need(getattr(c, key) > 0, key, f"must be positive, got {getattr(c, key)}")
    for key in ("swiglu_limit", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha",
                "rope_ntk_beta", "rms_norm_eps"):
        need(getattr(c, key) > 0, key, f"must be positive, got {getattr(c, key)}")
    need(c.experts_per_token <= c.num_experts, "experts_per_token",
         f"({c.experts_per_token}) must not exceed the number of experts ({c.num_experts})")
    need(c.num_attention_heads % c.num_key_value_heads == 0, "num_key_value_heads",
         f"({c.num_key_value_heads}) must divide num_attention_heads ({c.num_attention_heads})")
    need(c.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {c.head_dim}")
    need(c.hidden_size % 32 == 0, "hidden_size",
         f"must be a multiple of 32 (MXFP4 blocks), got {c.hidden_size}")
    need(c.intermediate_size % 32 == 0, "intermediate_size",
         f"must be a multiple of 32 (MXFP4 blocks), got {c.intermediate_size}")


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO (named pipe)", ...), None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "not a regular file")


def open_regular_file(path: str | os.PathLike, what: str,
                      error: type[TinyossError] = ConfigError) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file (symlinks followed); anything
    else is refused at once with `error` naming it: open() of a FIFO blocks until some writer
    comes (forever), a device may never end, a socket can't be opened."""
    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind is None:
            # O_NONBLOCK: a FIFO swapped in since the stat can't block the open either
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as e:
        raise error(f"{path}: cannot open {what}: {e.strerror or e}") from None
    if kind is None:
        kind = _not_regular(os.fstat(fd).st_mode)
        if kind is None:
            if hasattr(os, "O_NONBLOCK"):
                os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise error(f"{path}: {what} is {kind}, not a regular file")


def read_json(path: Path, what: str = "file") -> Any:
    """Parse a JSON file, turning every failure into a ConfigError naming the file."""
    with open_regular_file(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes is too large for a {what} "
                              f"(at most {MAX_JSON_BYTES:,})")
        try:
            text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read {what}: {e}") from None
    def unique(pairs: list[tuple[str, Any]]) -> dict:
        out = dict(pairs)
        if len(out) < len(pairs):  # (json keeps the last silently: which did the writer mean?)
            seen: set[str] = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise ConfigError(f"{path}: key {short_repr(twice)} appears more than once in one "
                              "object")
        return out

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # e.g. [[[[...]]]] 100000 deep: json recurses once per level
        raise ConfigError(f"{path}: {what} nests JSON too deeply to parse") from None


def load_config(path: str | Path) -> Config:
    """Read a config.json of either layout."""
    path = Path(expect_type(path, (str, os.PathLike), "path"))
    return config_from_dict(read_json(path, "config.json"), str(path))


def to_original_dict(c: Config) -> dict:
    """The config as the `original/config.json` spells it."""
    return {
        "num_hidden_layers": c.num_hidden_layers,
        "num_experts": c.num_experts,
        "experts_per_token": c.experts_per_token,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "swiglu_limit": c.swiglu_limit,
        "head_dim": c.head_dim,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "sliding_window": c.sliding_window,
        "initial_context_length": c.initial_context_length,
        "rope_theta": _num(c.rope_theta),
        "rope_scaling_factor": c.rope_scaling_factor,
        "rope_ntk_alpha": _num(c.rope_ntk_alpha),
        "rope_ntk_beta": _num(c.rope_ntk_beta),
    }


def to_hf_dict(c: Config) -> dict:
    """The config as the HF root config.json spells it (key order of the published file)."""
    return {
        "architectures": ["GptOssForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "eos_token_id": 200002 if c.vocab_size > 200002 else None,  # small test vocabs: none
        "experts_per_token": c.experts_per_token,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initial_context_length": c.initial_context_length,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in c.layer_sliding],
        "max_position_embeddings": c.max_position_embeddings,
        "model_type": "gpt_oss",
        "num_attention_heads": c.num_attention_heads,
        "num_experts_per_tok": c.experts_per_token,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "num_local_experts": c.num_experts,
        "output_router_logits": False,
        "pad_token_id": 199999 if c.vocab_size > 199999 else None,
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        },
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": {
            "beta_fast": c.rope_ntk_beta,
            "beta_slow": c.rope_ntk_alpha,
            "factor": c.rope_scaling_factor,
            "original_max_position_embeddings": c.initial_context_length,
            "rope_type": "yarn",
            "truncate": c.rope_truncate,
        },
        "rope_theta": _num(c.rope_theta),
        "router_aux_loss_coef": 0.9,
        "sliding_window": c.sliding_window,
        "swiglu_limit": c.swiglu_limit,
        "tie_word_embeddings": False,
        "transformers_version": "4.55.0.dev0",
        "use_cache": True,
        "vocab_size": c.vocab_size,
    }


def _num(x: float) -> int | float:
    """Write whole numbers as JSON ints, as the published configs do (rope_theta: 150000)."""
    return int(x) if float(x).is_integer() else x
