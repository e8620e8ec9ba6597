"""Where a model's weights are: a local checkpoint folder, or a Hugging Face id in the hub's cache.

`resolve_model(name)` treats `name` as a folder when one exists at that path (an HF repo root or an
`original/` folder; `tinyoss.load` checks it). Otherwise a name like `openai/gpt-oss-20b` is a
Hugging Face id, looked up in huggingface_hub's cache (HF_HUB_CACHE, by default
~/.cache/huggingface/hub) with no network. When it is not there, and HF_HUB_OFFLINE is not set, it
is downloaded: only the files tinyoss reads (config.json, generation_config.json, the safetensors
index and shards at the repo root; not original/ or metal/), listed with their sizes first, then
with progress bars. Otherwise the error says how to get the weights.

huggingface_hub is optional (`pip install 'tinyoss[hub]'`): local folders never import it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from tinyoss.errors import TinyossError

DEFAULT_MODEL = "openai/gpt-oss-20b"
# the files tinyoss reads, at the repo root (the `original/` copy of the weights is not needed)
NEEDED_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "model*.safetensors")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
_TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads a boolean environment variable


class ModelNotFoundError(TinyossError):
    """Neither a local checkpoint folder nor a Hugging Face model that is cached or downloadable."""


def is_repo_id(name: str) -> bool:
    """`owner/name`, as Hugging Face ids are written."""
    return _REPO_ID.fullmatch(name) is not None


def offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, when imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def cache_dir() -> Path:
    """huggingface_hub's cache folder: HF_HUB_CACHE, else HF_HOME/hub, else its default (read now)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(_hub().constants.HF_HUB_CACHE)


def _hub() -> Any:
    """The huggingface_hub module, or a clear error saying how to do without it."""
    try:
        import huggingface_hub
    except ImportError:
        raise ModelNotFoundError("Hugging Face ids need huggingface_hub: pip install 'tinyoss[hub]', "
                                 "or pass a local checkpoint folder with --model") from None
    return huggingface_hub


def _how_to_get(repo_id: str, why: str) -> str:
    return (f"{repo_id}: {why}. Get the weights with "
            f"`hf download {repo_id} --include config.json 'model*.safetensors*'`, "
            "or pass a local checkpoint folder with --model")


def _not_cached(snapshot: Path | None, missing: list[str]) -> str:
    if snapshot is None:
        return f"not a local folder, and not in the Hugging Face cache ({cache_dir()})"
    return f"the cached copy in {snapshot} lacks {missing[0]}"


def missing_files(snapshot: Path) -> list[str]:
    """The files a checkpoint folder lacks: config.json, and every shard its index names (or any
    safetensors file when it has no index)."""
    if not (snapshot / "config.json").is_file():
        return ["config.json"]
    index = snapshot / "model.safetensors.index.json"
    if not index.is_file():
        return [] if any(snapshot.glob("*.safetensors")) else ["*.safetensors"]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [index.name]  # unreadable: treat as missing, a download replaces it
    return [name for name in shards if not (snapshot / name).is_file()]


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id`'s `main` revision, if its config.json is cached
    (the folder may still lack shards: see `missing_files`)."""
    config = _hub().try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir())
    return Path(config).parent if isinstance(config, str) else None


def _is_needed(path: str) -> bool:
    return "/" not in path and any(fnmatch.fnmatch(path, pattern) for pattern in NEEDED_FILES)


def download(repo_id: str, announce: Callable[[str], None], why: str = "not cached") -> Path:
    """Download the needed files of `repo_id` into the cache, first announcing each with its size.
    `why` says why it is needed, for the error when the Hub cannot be reached."""
    hub = _hub()
    from huggingface_hub.hf_api import RepoFile

    try:
        files = [f for f in hub.HfApi().list_repo_tree(repo_id, recursive=False)
                 if isinstance(f, RepoFile) and _is_needed(f.path)]
    except Exception as err:  # no network, no such repo, gated: huggingface_hub has many error types
        raise ModelNotFoundError(_how_to_get(repo_id, f"{why}, and the Hub cannot list it "
                                                      f"({_first_line(err)})")) from None
    if not any(f.path.endswith(".safetensors") for f in files):
        raise ModelNotFoundError(f"{repo_id}: no safetensors files at the root of this Hugging Face repo")
    total = sum(f.size or 0 for f in files)
    announce(f"downloading {repo_id} ({total / 1e9:.1f} GB) into {cache_dir()}:")
    for f in files:
        announce(f"  {f.path:45s} {(f.size or 0) / 1e9:8.2f} GB")
    try:
        path = hub.snapshot_download(repo_id, allow_patterns=[f.path for f in files], cache_dir=cache_dir())
    except Exception as err:  # as above; a partial download resumes on the next run
        raise ModelNotFoundError(f"{repo_id}: download failed ({_first_line(err)}); "
                                 "run again to resume") from None
    return Path(path)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_model(name: str, announce: Callable[[str], None] = print) -> Path:
    """The checkpoint folder `name` stands for: a local folder, or a Hugging Face id's cached
    snapshot, downloaded first when it is not cached and HF_HUB_OFFLINE is not set. `announce`
    receives the lines saying what will be downloaded."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not is_repo_id(name):
        raise ModelNotFoundError(f"{name}: no such checkpoint folder (give an HF repo root, an original/ "
                                 f"folder, or a Hugging Face id such as {DEFAULT_MODEL})")
    if importlib.util.find_spec("huggingface_hub") is None:
        raise ModelNotFoundError(f"{name}: no such folder; as a Hugging Face id it needs huggingface_hub: "
                                 "pip install 'tinyoss[hub]'")
    snapshot = cached_snapshot(name)
    missing = missing_files(snapshot) if snapshot is not None else ["config.json"]
    if not missing:
        return snapshot
    why = _not_cached(snapshot, missing)
    if offline():
        raise ModelNotFoundError(_how_to_get(name, f"{why}, and downloads are off (HF_HUB_OFFLINE is set)"))
    return download(name, announce, why)
