"""Where a model's weights are: a local checkpoint folder, or a Hugging Face id in the hub's cache.

`resolve_model(name)` treats `name` as a folder when one exists at that path (an HF repo root or an
`original/` folder; `tinyoss.load` checks it). Otherwise a name like `openai/gpt-oss-20b` is a
Hugging Face id, looked up in huggingface_hub's cache (HF_HUB_CACHE, by default
~/.cache/huggingface/hub) with no network. When it is not there, and HF_HUB_OFFLINE is not set, it
is downloaded (`pull`): only the files tinyoss reads (config.json, generation_config.json, the
safetensors index and shards at the repo root; not original/ or metal/), listed with their sizes
first, then with huggingface_hub's progress bars.

The download resumes. huggingface_hub 2.x resumes only within one process (its http_get retries a
broken transfer with a Range request, five times, warning each time); a new process starts the file
over, and a failed one deletes its part. So tinyoss fetches each file itself with huggingface_hub's
pieces: get_hf_file_metadata (HEAD: etag, size, where the bytes are), then http_get into
`blobs/<etag>.incomplete` of the cache, resuming from that file's size with `Range: bytes=N-`. A
finished file is checked against its sha256 (a Hub LFS file's etag), moved to `blobs/<etag>` and
linked from `snapshots/<commit>/`; `refs/main` is written once every file is there. This is the
cache layout huggingface_hub writes and reads, so `hf` and transformers find the model too. Files
come over plain HTTPS (the Hub redirects Xet-stored files to its CDN), not through hf_xet.

huggingface_hub is imported only for a Hugging Face id: local folders never pay for it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from tinyoss.errors import TinyossError

DEFAULT_MODEL = "openai/gpt-oss-20b"
# the files tinyoss reads, at the repo root (the `original/` copy of the weights is not needed)
NEEDED_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "model*.safetensors")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
_TRUE = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads a boolean environment variable
_SHA256 = re.compile(r"[0-9a-f]{64}")  # the etag of a Hub LFS file is its content's sha256


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
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def format_size(n_bytes: float) -> str:
    """13.8 GB, 51.9 MB, 6.5 kB: decimal units, as the Hub shows sizes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} B"


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
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return [index.name]  # unreadable: treat as missing, a download replaces it
    return [name for name in shards if not (snapshot / name).is_file()]


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of `repo_id`'s `main` revision, if its config.json is cached
    (the folder may still lack shards: see `missing_files`)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir())
    return Path(config).parent if isinstance(config, str) else None


def _is_needed(path: str) -> bool:
    return "/" not in path and any(fnmatch.fnmatch(path, pattern) for pattern in NEEDED_FILES)


def resolve_model(name: str, announce: Callable[[str], None] = print) -> Path:
    """The checkpoint folder `name` stands for: a local folder, or a Hugging Face id's cached
    snapshot, downloaded first when it is not cached and HF_HUB_OFFLINE is not set. `announce`
    receives the lines saying what will be downloaded."""
    if not name.strip():  # Path("") is the current folder
        raise ModelNotFoundError(f"the model name is empty: give a checkpoint folder or a Hugging Face "
                                 f"id such as {DEFAULT_MODEL}")
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not is_repo_id(name):
        raise ModelNotFoundError(f"{name}: no such checkpoint folder (give an HF repo root, an original/ "
                                 f"folder, or a Hugging Face id such as {DEFAULT_MODEL})")
    return pull(name, announce)[0]


def pull(repo_id: str, announce: Callable[[str], None] = print) -> tuple[Path, bool]:
    """`repo_id`'s cached snapshot folder, and whether it had to be downloaded (or the rest of
    it: an interrupted download resumes). A complete cached copy needs no network."""
    if not is_repo_id(repo_id):
        raise ModelNotFoundError(f"{repo_id!r} is not a Hugging Face id (owner/name, such as {DEFAULT_MODEL})")
    snapshot = cached_snapshot(repo_id)
    missing = missing_files(snapshot) if snapshot is not None else ["config.json"]
    if not missing:
        return snapshot, False
    why = _not_cached(snapshot, missing)
    if offline():
        raise ModelNotFoundError(f"{repo_id}: {why}, and downloads are off (HF_HUB_OFFLINE is set): unset "
                                 f"it and run `tinyoss pull {repo_id}`, or pass a local checkpoint folder "
                                 "with -m")
    return download(repo_id, announce, why), True


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs a warning for every retry ("Retrying in 1s [Retry 1/5]", "Trying to
    resume download..."); tinyoss says how it ended in one line instead. Its progress bars stay
    (they go off only at log level NOTSET). With HF_HUB_VERBOSITY set, its logs are as asked."""
    from huggingface_hub.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if not os.environ.get("HF_HUB_VERBOSITY"):
        hf_logging.set_verbosity(hf_logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _problem(err: Exception, repo_id: str) -> str:
    """What went wrong in asking the Hub about `repo_id`, and what to do, in a few words."""
    from huggingface_hub import constants
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        return (f"the repo is gated: accept its conditions at {constants.ENDPOINT}/{repo_id} and log in "
                "(`hf auth login`)")
    if isinstance(err, RepositoryNotFoundError):
        return "the Hugging Face Hub has no such model (or it is private: log in with `hf auth login`)"
    if isinstance(err, HfHubHTTPError):
        return f"{_reason(err)}: try again later"
    # no answer at all: no network, DNS, refused, timed out, TLS, proxy
    return (f"{urlsplit(constants.ENDPOINT).netloc} cannot be reached ({_first_line(err)}): check the "
            "network, or pass a local checkpoint folder with -m")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _reason(err: Exception) -> str:
    """An HTTP error as its status (huggingface_hub's message repeats the long URL), others as
    their first line."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    return f"the server answered HTTP {status}" if status else _first_line(err)


def download(repo_id: str, announce: Callable[[str], None], why: str = "not cached") -> Path:
    """Download (or finish downloading) the needed files of `repo_id`'s main revision into the
    cache, first announcing each with its size. -> the snapshot folder
    `why` says why it is needed, for the error when the Hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.file_download import repo_folder_name

    with _quiet_hub():
        try:  # one request, not retried (list_repo_tree would retry 5 times, 23 s, when offline)
            info = HfApi().model_info(repo_id, files_metadata=True)
        except Exception as err:  # huggingface_hub has many error types, and they change with versions
            raise ModelNotFoundError(f"{repo_id}: {why}, and {_problem(err, repo_id)}") from None
        if not info.sha:
            raise ModelNotFoundError(f"{repo_id}: the Hub named no commit: is HF_ENDPOINT a Hugging Face Hub?")
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or [] if _is_needed(s.rfilename)}
        if not any(name.endswith(".safetensors") for name in sizes):
            raise ModelNotFoundError(f"{repo_id}: no safetensors files at the root of this Hugging Face repo")
        repo = cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")
        snapshot = repo / "snapshots" / info.sha
        # small files first, so an interrupted download leaves a config.json that `tinyoss list` reads
        todo = sorted((name for name in sizes if not (snapshot / name).exists()), key=lambda n: (sizes[n], n))
        announce(f"downloading {repo_id} ({format_size(sum(sizes[n] for n in todo))}) into {cache_dir()}:")
        for name in todo:
            announce(f"  {name:45s} {format_size(sizes[name]):>9s}")
        for name in todo:
            _fetch(repo_id, info.sha, name, repo, announce)
    _write_ref(repo, info.sha)  # now `main` names a complete snapshot
    return snapshot


def _fetch(repo_id: str, commit: str, name: str, repo: Path, announce: Callable[[str], None]) -> None:
    """One file of `repo_id` at `commit` into the cache folder `repo`: blobs/<etag>, resumed from
    blobs/<etag>.incomplete, then linked from snapshots/<commit>/<name>."""
    from filelock import FileLock, Timeout  # what huggingface_hub locks a blob with, on the same file
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, name, revision=commit)
    try:
        meta = get_hf_file_metadata(url)
    except Exception as err:
        raise ModelNotFoundError(f"{repo_id}: cannot download {name}: {_problem(err, repo_id)}") from None
    if not meta.etag:
        raise ModelNotFoundError(f"{repo_id}: the Hub gave no etag for {name}: is HF_ENDPOINT a Hugging Face Hub?")
    blob = repo / "blobs" / meta.etag
    if not blob.is_file():
        lock_file = repo.parent / ".locks" / repo.name / f"{meta.etag}.lock"
        for folder in (blob.parent, lock_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file)
        try:
            lock.acquire(timeout=1)
        except Timeout:
            raise ModelNotFoundError(f"{repo_id}: another process is downloading {name} "
                                     f"(it holds {lock_file})") from None
        part = blob.with_name(blob.name + ".incomplete")  # the name huggingface_hub 0.x-1.x resumed from too
        try:
            if not blob.is_file():  # (unless the process that held the lock just finished it)
                _download_blob(repo_id, name, url, meta, part, announce)
                _check_sha256(repo_id, name, part, meta.etag)
                os.replace(part, blob)
        finally:
            lock.release()
    _link(blob, repo / "snapshots" / commit / name)


def _download_blob(repo_id: str, name: str, url: str, meta, part: Path,
                   announce: Callable[[str], None]) -> None:
    """Append the rest of the file at `meta.location` to `part` (a Range request from its size),
    with huggingface_hub's progress bar. `meta`: its HfFileMetadata."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN address: the token stays with the Hub
    with open(part, "ab") as out:
        done = out.tell()
        if meta.size is not None and done > meta.size:  # not a part of this file: start over
            out.truncate(0)
            out.seek(0)
            done = 0
        if done:
            announce(f"  resuming {name} at {format_size(done)} of {format_size(meta.size or 0)}")
        free = shutil.disk_usage(part.parent).free
        if meta.size is not None and meta.size - done > free:
            raise ModelNotFoundError(f"{repo_id}: {name} needs {format_size(meta.size - done)} more, and "
                                     f"{part.parent} has {format_size(free)} free")
        try:
            http_get(meta.location, out, resume_size=done, headers=headers, expected_size=meta.size,
                     displayed_filename=name)
        except Exception as err:  # the connection dropped (after huggingface_hub's own retries), ...
            out.flush()
            got, total = part.stat().st_size, f" of {format_size(meta.size)}" if meta.size else ""
            raise ModelNotFoundError(f"{repo_id}: the download of {name} stopped at {format_size(got)}{total} "
                                     f"({_reason(err)}); `tinyoss pull {repo_id}` resumes it") from None


def _check_sha256(repo_id: str, name: str, part: Path, etag: str) -> None:
    """A Hub LFS file's etag is its sha256: a resumed file whose parts do not fit is caught here
    (and removed, so that the next try starts it over)."""
    if not _SHA256.fullmatch(etag):
        return  # a small file in git: its etag is a git hash, and it came in one piece
    with open(part, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != etag:
        part.unlink()
        raise ModelNotFoundError(f"{repo_id}: {name} arrived corrupted (its sha256 is not the Hub's); it "
                                 f"was removed: `tinyoss pull {repo_id}` downloads it again")


def _link(blob: Path, pointer: Path) -> None:
    """snapshots/<commit>/<name> -> ../../blobs/<etag>, as huggingface_hub links its cache (where
    the file system has no symlinks, the blob moves there, as huggingface_hub does)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.exists():
        return
    if pointer.is_symlink():  # to a blob deleted by hand
        pointer.unlink()
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        os.replace(blob, pointer)


def _write_ref(repo: Path, commit: str) -> None:
    """refs/main, written whole (a reader never sees it empty); the temporary file outside refs/,
    where huggingface_hub would read it as a ref."""
    tmp = repo / f".main.{os.getpid()}.tmp"
    tmp.write_text(commit)
    (repo / "refs").mkdir(exist_ok=True)
    os.replace(tmp, repo / "refs" / "main")


# ---------------------------------------------------------------------------------------------------
# tinyoss list: the gpt-oss models in the cache


@dataclass(frozen=True)
class CachedModel:
    """A gpt-oss model in the Hugging Face cache: one whose config.json says model_type gpt_oss."""
    repo_id: str
    folder: Path            # the repo's cache folder, models--owner--name
    snapshot: Path          # the revision `main` names, else the newest
    size: int               # bytes on disk: every cached revision, interrupted downloads included
    missing: list[str]      # what the snapshot lacks (see missing_files): [] when it is complete
    partial: int            # bytes of interrupted downloads (blobs/*.incomplete), resumed by pull


def cached_models() -> tuple[list[CachedModel], list[str]]:
    """The gpt-oss models in the Hugging Face cache, by id, and the cache folders
    huggingface_hub could not read (a blob deleted by hand, ...). Repos of other models are left
    out: tinyoss runs only gpt-oss."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        scan = scan_cache_dir(cache_dir())
    except CacheNotFound:
        return [], []
    models = []
    for repo in scan.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = max(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        if _model_type(revision.snapshot_path / "config.json") != "gpt_oss":
            continue
        partial = sum(p.stat().st_size for p in (repo.repo_path / "blobs").glob("*.incomplete"))
        models.append(CachedModel(repo.repo_id, repo.repo_path, revision.snapshot_path,
                                  repo.size_on_disk + partial, missing_files(revision.snapshot_path), partial))
    return sorted(models, key=lambda m: m.repo_id), [_first_line(w) for w in scan.warnings]


def _model_type(config: Path) -> str | None:
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
