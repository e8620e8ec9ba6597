"""Inspection: record what the forward pass computes, layer by layer, and look at it.

    rec = record(model, tokens)       # runs model.forward_reference with a Recorder attached
    rec.sink_mass                     # [L, Hq, n]  the share of attention each head gives its sink
    rec.expert_counts                 # [L, E]      tokens routed to each expert
    rec.lens_ids[:, -1, 0]            # [L]         the logit lens' top token at the last position
    rec.save("run.npz"); Recording.load("run.npz")

model.forward_reference calls `recorder(layer, name, value)` at each step (layer -1 outside the
blocks); without a recorder that costs one `is None` test per step. Per layer it reports

    resid_pre      [n, D]      the residual stream entering the block
    key_positions  [T]         positions of the keys attention reads (cached + new)
    visible        [n, T]      bool: may query i see key j (causal; banded layers: the last `window`)
    attn_weights   [Hq, n, T]  softmax weights over the keys (the sink's column dropped)
    sink_mass      [Hq, n]     the sink's share: 1 - attn_weights.sum(-1)
    resid_mid      [n, D]      after attention
    router_logits  [n, E]
    experts        [n, k]      the top-k experts, best first
    expert_weights [n, k]      their mixing weights (softmax over the top-k logits only)
    resid_post     [n, D]      after the mixture of experts

and `logits` [n, V] at the end. Derived here: residual norms, router probabilities, per-expert token
counts, and the logit lens: the final norm + unembedding applied to each layer's residual stream,
as if the model stopped there (the last layer's lens is the logits themselves).

Recording keeps the whole [heads, n, T] attention picture of every layer, and the logit lens is one
unembedding per layer: it is meant for prompts of tens to hundreds of tokens, not long contexts.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import TinyossError, expect_type
from .model import KVCache, linear, rmsnorm
from .runtime import Model, check_tokens

FORMAT = "tinyoss-recording-1"  # written into every .npz, checked on load
LAYER_NAMES = ("resid_pre", "key_positions", "visible", "attn_weights", "sink_mass", "resid_mid",
               "router_logits", "experts", "expert_weights", "resid_post")


class Recorder:
    """The callable forward_reference is given: keeps a copy of every value, per layer."""

    def __init__(self, n_layers: int):
        self.layers: list[dict[str, np.ndarray]] = [{} for _ in range(n_layers)]
        self.final: dict[str, np.ndarray] = {}  # layer -1: the logits

    def __call__(self, layer: int, name: str, value: np.ndarray) -> None:
        store = self.final if layer < 0 else self.layers[layer]
        assert name not in store, f"{name} recorded twice in layer {layer}"
        store[name] = np.array(value, copy=True)  # the model may reuse its buffers


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, V] -> (ids [n, k], values [n, k]): the k largest per row, largest first.

    argpartition is O(V) per row: a full sort of 201088 logits per layer and token would dominate.
    """
    k = min(k, x.shape[-1])
    part = np.argpartition(-x, k - 1, axis=-1)[:, :k]  # [n, k] unordered
    vals = np.take_along_axis(x, part, axis=-1)
    order = np.lexsort((part, -vals), axis=-1)  # by value descending; equal values: lower id first
    ids = np.take_along_axis(part, order, axis=-1)
    return ids, np.take_along_axis(x, ids, axis=-1)


def logit_lens(model: Model, x: np.ndarray) -> np.ndarray:
    """Any residual stream [n, D] -> logits [n, V]: the final rmsnorm and unembedding of the model.

    On the last layer's output this is exactly model.forward_reference's logits.
    """
    w, c = model.weights, model.config
    return linear(rmsnorm(x, w.norm, c.rms_norm_eps), w.unembed)


def _softmax(x: np.ndarray) -> np.ndarray:
    """Along the last axis (sampling.softmax takes one vector)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclasses.dataclass(eq=False)  # arrays: no elementwise ==
class Recording:
    """Everything one forward pass computed, per layer, plus the views below."""

    tokens: np.ndarray  # [n] the ids run
    positions: np.ndarray  # [n] their positions (0.. unless a cache held tokens before)
    sliding: np.ndarray  # [L] bool: banded (sliding window) layers
    window: int  # band width of the banded layers (counts the current token)
    layers: list[dict[str, np.ndarray]]  # per layer: the LAYER_NAMES arrays (see the module doc)
    logits: np.ndarray  # [n, V] float32
    lens_ids: np.ndarray  # [L, n, top] the logit lens' best tokens after each layer, best first
    lens_logits: np.ndarray  # [L, n, top] their logits

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def stack(self, name: str) -> np.ndarray:
        """One recorded value of every layer, stacked: [L, ...] (not for key_positions, visible and
        attn_weights, whose key count T may differ between banded and dense layers with a cache)."""
        return np.stack([layer[name] for layer in self.layers])

    # attention ---------------------------------------------------------------------------------

    def attn_weights(self, layer: int) -> np.ndarray:
        """[Hq, n, T]: how much query i of head h reads key j (columns: key_positions(layer))."""
        return self.layers[layer]["attn_weights"]

    def key_positions(self, layer: int) -> np.ndarray:
        """[T]: the positions of the keys `layer` attended over."""
        return self.layers[layer]["key_positions"]

    def visible(self, layer: int) -> np.ndarray:
        """[n, T] bool: which keys each query could see (a band on banded layers)."""
        return self.layers[layer]["visible"]

    @property
    def sink_mass(self) -> np.ndarray:
        """[L, Hq, n]: the attention each head gives its sink (attends to nothing)."""
        return self.stack("sink_mass")

    # residual stream ---------------------------------------------------------------------------

    def resid_norm(self, which: str = "resid_post") -> np.ndarray:
        """[L, n]: the L2 norm of each token's residual stream (resid_pre, resid_mid or resid_post)."""
        return np.linalg.norm(self.stack(which), axis=-1)

    # mixture of experts ------------------------------------------------------------------------

    @property
    def router_logits(self) -> np.ndarray:
        """[L, n, E]"""
        return self.stack("router_logits")

    @property
    def router_probs(self) -> np.ndarray:
        """[L, n, E]: softmax over all experts, how the router ranks them. The model mixes only the
        top-k, renormalized among themselves: that is `expert_weights`."""
        return _softmax(self.router_logits)

    @property
    def experts(self) -> np.ndarray:
        """[L, n, k] the experts each token was routed to, best first."""
        return self.stack("experts")

    @property
    def expert_weights(self) -> np.ndarray:
        """[L, n, k] their weights (each row sums to 1)."""
        return self.stack("expert_weights")

    @property
    def expert_counts(self) -> np.ndarray:
        """[L, E]: how many tokens each expert processed; each row sums to n * k."""
        n_experts = self.layers[0]["router_logits"].shape[-1]
        return np.stack([np.bincount(layer["experts"].ravel(), minlength=n_experts)
                         for layer in self.layers])

    # one line per layer ------------------------------------------------------------------------

    def summary(self) -> list[dict]:
        """Per layer: attention kind, mean residual norm, sink mass mean/max, expert counts, and the
        logit lens' top token at the last position."""
        norms, sinks, counts = self.resid_norm(), self.sink_mass, self.expert_counts
        return [{"layer": L,
                 "attention": "banded" if self.sliding[L] else "dense",
                 "resid_norm": float(norms[L].mean()),
                 "sink_mean": float(sinks[L].mean()),
                 "sink_max": float(sinks[L].max()),
                 "expert_counts": counts[L],
                 "lens_top": int(self.lens_ids[L, -1, 0]) if self.lens_ids.shape[-1] else None}
                for L in range(self.n_layers)]

    # NaN and inf -------------------------------------------------------------------------------

    def first_non_finite(self) -> tuple[int, str, int] | None:
        """Where the recording first holds NaN or inf: (layer, value name, position), layer -1
        for the logits; None when every value is finite. Layers in order, and in a layer the
        values in the order they are computed (LAYER_NAMES)."""
        values = [(L, name, layer[name]) for L, layer in enumerate(self.layers)
                  for name in LAYER_NAMES] + [(-1, "logits", self.logits)]
        for L, name, value in values:
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                token_axis = 1 if name in ("attn_weights", "sink_mass") else 0  # [Hq, n, ...]
                rows = np.moveaxis(~np.isfinite(value), token_axis, 0).reshape(len(self.tokens), -1)
                return L, name, int(self.positions[np.flatnonzero(rows.any(axis=1))[0]])
        return None

    # files -------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write every array to one .npz file (compressed), at exactly `path`: a new file, or an
        earlier recording replaced; any other file there is left as it is (TinyossError)."""
        path = check_target(path)
        arrays = {"format": np.array(FORMAT), "tokens": self.tokens, "positions": self.positions,
                  "sliding": self.sliding, "window": np.array(self.window), "logits": self.logits,
                  "lens_ids": self.lens_ids, "lens_logits": self.lens_logits}
        for L, layer in enumerate(self.layers):
            arrays.update({f"layer{L}.{name}": value for name, value in layer.items()})
        try:
            fd, part = _new_file_beside(path)
        except OSError as e:  # (a name near the system's limit: ours is ~15 characters longer)
            raise TinyossError(f"{path}: can't write beside it ({e.strerror or e})") from None
        try:  # into a file beside it, then renamed: never half a recording at `path`
            with os.fdopen(fd, "wb") as f:  # (a file object: numpy would append .npz to a name)
                np.savez_compressed(f, **arrays)
            os.replace(part, path)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recording":
        path = Path(expect_type(path, (str, os.PathLike), "path"))
        if not path.is_file():  # missing, or a folder, FIFO or device (np.load would block)
            raise TinyossError(f"{path}: no such recording file" if not path.exists() else
                               f"{path}: a recording is a regular file, this is not one")
        try:
            with _npz(path) as f:
                data = {key: f[key] for key in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            # (numpy calls any file that is not .npy/.npz "pickled data": not what it is)
            why = "" if "pickled" in str(e) else f" ({e})"
            raise TinyossError(f"{path}: not a .npz recording{why}") from None
        if "format" not in data or str(data["format"]) != FORMAT:
            raise TinyossError(f"{path}: not a tinyoss recording (expected format {FORMAT})")
        try:
            n_layers = len(data["sliding"])
            layers = [{name: data[f"layer{L}.{name}"] for name in LAYER_NAMES}
                      for L in range(n_layers)]
            return cls(data["tokens"], data["positions"], data["sliding"], int(data["window"]),
                       layers, data["logits"], data["lens_ids"], data["lens_logits"])
        except KeyError as e:
            raise TinyossError(f"{path}: an incomplete recording (no {e.args[0]!r})") from None
        except (TypeError, ValueError) as e:
            raise TinyossError(f"{path}: a damaged recording ({e})") from None


def record(model: Model, tokens, cache: KVCache | None = None, lens_top: int = 5) -> Recording:
    """Run `tokens` through model.forward_reference, recording every layer.

    Without a cache the tokens are a whole sequence from position 0; with one, they follow the
    cached tokens (and extend the cache), so keys include the cached positions.
    lens_top: how many of the logit lens' best tokens to keep per layer and position (0: no lens).
    """
    expect_type(model, Model, "model")
    expect_type(lens_top, int, "lens_top")
    c = model.config
    tokens = check_tokens(tokens, c.vocab_size)
    first = 0 if cache is None else cache.n_tokens
    recorder = Recorder(c.num_hidden_layers)
    model.forward_reference(tokens, cache, recorder=recorder)
    lens = [top_k(logit_lens(model, layer["resid_post"]), lens_top) if lens_top > 0
            else (np.zeros((len(tokens), 0), np.int64), np.zeros((len(tokens), 0), np.float32))
            for layer in recorder.layers]
    return Recording(tokens=tokens,
                     positions=np.arange(first, first + len(tokens)),
                     sliding=np.array(c.layer_sliding),
                     window=c.sliding_window,
                     layers=recorder.layers,
                     logits=recorder.final["logits"],
                     lens_ids=np.stack([ids for ids, _ in lens]),
                     lens_logits=np.stack([vals for _, vals in lens]))


def _new_file_beside(path: Path) -> tuple[int, str]:
    """A new empty file in path's folder (a hidden name of its own): (fd, name). Its mode is
    0o666 less the umask, as an ordinary new file's (mkstemp's would be 0o600)."""
    for _ in range(100):
        name = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:
            continue
    raise TinyossError(f"{path.parent}: could not make a temporary file there")


def check_target(path: str | os.PathLike) -> Path:
    """`path` as a place `Recording.save` may write: a new file in a folder that exists, or an
    earlier recording (replaced); anything else is a TinyossError naming it, left as it is.
    `inspect --save` asks before its forward pass."""
    path = Path(expect_type(path, (str, os.PathLike), "path"))
    if path.is_dir():
        raise TinyossError(f"{path} is a folder: give the recording a file name")
    if not path.parent.is_dir():
        raise TinyossError(f"{path}: no such folder {path.parent}")
    if path.exists() and not path.is_file():  # (a FIFO: np.load would block)
        raise TinyossError(f"{path}: not a regular file; give the recording a new name")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TinyossError(f"{path}: not writable")
    if path.exists() and not is_recording(path):
        raise TinyossError(f"{path}: the file exists and is not a tinyoss recording: give a new "
                           "name (it is left as it is)")
    return path


def _npz(path) -> np.lib.npyio.NpzFile:
    """np.load of an .npz archive; ValueError for anything else (a .npy is one array)."""
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("one array, not an archive of them")
    return loaded


def is_recording(path: str | os.PathLike) -> bool:
    """Whether the file at path is a tinyoss recording (what `Recording.save` may replace)."""
    try:
        if not Path(path).is_file():  # (a FIFO would block)
            return False
        with _npz(path) as f:
            return "format" in f.files and str(f["format"]) == FORMAT
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def format_summary(rec: Recording, token_text: Callable[[int], str] = str,
                   busiest: int = 3) -> str:
    """The table `tinyoss inspect` prints: one line per layer, then the top next tokens."""
    lines = [f"{rec.n_tokens} tokens, {rec.n_layers} layers (banded layers see the last "
             f"{rec.window} positions)",
             f"{'layer':>5}  {'attention':9}  {'|resid|':>8}  {'sink mean/max':>13}  "
             f"{'experts used, busiest (tokens)':32}  lens top token (last position)"]
    for s in rec.summary():
        counts = s["expert_counts"]
        top = np.argsort(-counts, kind="stable")[:busiest]
        busy = " ".join(f"e{e}:{counts[e]}" for e in top if counts[e])
        used = f"{np.count_nonzero(counts)}/{len(counts)}"
        lens = "" if s["lens_top"] is None else repr(token_text(s["lens_top"]))
        lines.append(f"{s['layer']:>5}  {s['attention']:9}  {s['resid_norm']:8.2f}  "
                     f"{s['sink_mean']:6.3f}/{s['sink_max']:.3f}  {used:>6} {busy:25}  {lens}")
    ids, logits = top_k(rec.logits[-1:], 5)
    lines.append("next token: " + "  ".join(f"{token_text(int(i))!r} {v:.2f}"
                                            for i, v in zip(ids[0], logits[0])))
    return "\n".join(lines)
