"""Hugging Face ids: the cache lookup, and the download path for real. huggingface_hub talks over
HTTP (HF_ENDPOINT) to FakeHub, a small imitation of the Hub on 127.0.0.1 that serves a tiny
synthetic checkpoint as the Hub serves files to huggingface_hub 2.x; `tinyoss pull` and `run` run
in their own processes, as users run them. Nothing leaves the machine."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from tinyoss import hub
from tinyoss import load as tinyoss_load
from tinyoss.cli import app

runner = CliRunner()
REPO = "someone/tiny"
ROOT_FILES = ["config.json", "generation_config.json", "model-00000-of-00001.safetensors",
              "model-00001-of-00001.safetensors", "model.safetensors.index.json"]


class FakeHub:
    """The endpoints huggingface_hub calls to download a model, for one repo:
    - GET /api/models/{repo}: `sha` (the commit of main) and, with ?blobs=True, each file's size;
    - HEAD and GET /{repo}/resolve/{revision}/{file}: X-Repo-Commit, ETag (the git blob id) and,
      for LFS files (the safetensors), X-Linked-Etag (the sha256) and X-Linked-Size; GET answers a
      Range request `bytes=N-` with 206 and Content-Range. No X-Xet-* headers: a plain HTTP download.
    `cut_after[file] = n`: the next GET of that file sends n bytes and drops the connection; the
    Hub then answers 503 to everything until `down` is set False. `requests`: (method, path, Range)."""

    def __init__(self, repo_id: str, folder: Path):
        self.repo_id, self.commit = repo_id, hashlib.sha1(repo_id.encode()).hexdigest()
        self.files = {p.relative_to(folder).as_posix(): p.read_bytes()
                      for p in sorted(folder.rglob("*")) if p.is_file()}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_after: dict[str, int] = {}
        self.down = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_HubHandler,), {"hub": self}))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def file_headers(self, name: str) -> dict:
        data = self.files[name]
        git_blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        headers = {"X-Repo-Commit": self.commit, "Accept-Ranges": "bytes", "ETag": f'"{git_blob_id}"'}
        if name.endswith(".safetensors"):
            headers |= {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                        "X-Linked-Size": str(len(data))}
        return headers

    def model_info(self) -> dict:
        siblings = [{"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
                    | ({"lfs": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}}
                       if name.endswith(".safetensors") else {})
                    for name, data in self.files.items()]
        return {"id": self.repo_id, "sha": self.commit, "private": False, "gated": False, "siblings": siblings}


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self.answer(with_body=False)

    def do_GET(self) -> None:
        self.answer(with_body=True)

    def answer(self, with_body: bool) -> None:
        hub, path = self.hub, urlsplit(self.path).path
        hub.requests.append((self.command, path, self.headers.get("Range")))
        resolve = f"/{hub.repo_id}/resolve/"
        if hub.down:
            self.send(503, b"the Hub is down", {}, with_body)
        elif path == f"/api/models/{hub.repo_id}":
            self.send(200, json.dumps(hub.model_info()).encode(), {"Content-Type": "application/json"}, with_body)
        elif path.startswith(resolve):
            revision, _, name = path[len(resolve):].partition("/")
            if revision in (hub.commit, "main") and name in hub.files:
                self.send_file(name, with_body)
            else:
                self.send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": hub.commit}, with_body)
        else:
            self.send(404, b"", {"X-Error-Code": "RepoNotFound"}, with_body)

    def send(self, status: int, body: bytes, headers: dict, with_body: bool) -> None:
        self.send_response(status)
        for key, value in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def send_file(self, name: str, with_body: bool) -> None:
        data, headers, start = self.hub.files[name], self.hub.file_headers(name), 0
        asked = self.headers.get("Range")
        if asked:
            start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1))
            if start >= len(data):
                return self.send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, with_body)
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status, body = (206 if asked else 200), data[start:]
        cut = self.hub.cut_after.pop(name, None) if with_body else None
        if cut is None:
            return self.send(status, body, headers, with_body)
        self.send_response(status)  # the whole length announced, `cut` bytes sent, then the line drops
        for key, value in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.hub.down = True
        self.close_connection = True


@pytest.fixture
def fake_hub(tiny_checkpoint):
    served = FakeHub(REPO, tiny_checkpoint)  # the root files, and original/ beside them
    yield served
    served.stop()


def hf_env(tmp_path: Path, endpoint: str, **more: str) -> dict:
    """The environment of a tinyoss process: its own HF cache (tmp_path/hf), the Hub at `endpoint`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"} | more


def tinyoss(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyoss.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture
def same_cache(tmp_path, monkeypatch):
    """This process looks at the cache the tinyoss processes of the test write (tmp_path/hf/hub)."""
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_HUB_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}"


def list_json() -> dict:
    r = runner.invoke(app, ["list", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def the_one_error(stderr: str) -> str:
    """The error line of a failed command: one, the last; no traceback, no retry warnings."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], stderr
    assert not re.search(r"Traceback|Retry|retry|resume download|Warning", stderr), stderr
    return errors[0]


# ---------------------------------------------------------------------------------------------------
# the download path, against FakeHub
# ---------------------------------------------------------------------------------------------------


def test_pull_downloads_the_root_files_then_run_list_and_pull_need_no_network(
        fake_hub, tiny_checkpoint, tmp_path, same_cache):
    env = hf_env(tmp_path, fake_hub.url)
    r = tinyoss(env, "pull", REPO)
    assert r.returncode == 0, r.stderr
    snapshot = same_cache / "snapshots" / fake_hub.commit
    assert r.stdout == f"{snapshot}\n"
    total = sum((tiny_checkpoint / name).stat().st_size for name in ROOT_FILES)
    assert f"downloading {REPO} ({hub.format_size(total)}) into {tmp_path / 'hf' / 'hub'}:" in r.stderr
    assert sorted(p.name for p in snapshot.iterdir()) == ROOT_FILES  # not original/
    for name in ROOT_FILES:
        assert (snapshot / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    assert not any("original" in path for _, path, _ in fake_hub.requests)
    assert (same_cache / "refs" / "main").read_text() == fake_hub.commit

    fake_hub.stop()  # from now on any request would fail
    r = tinyoss(env, "run", "-m", REPO, "hi", "-n", "4", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "downloading" not in r.stderr

    tinyoss_load(snapshot, dense="q8")  # makes its int8 copy, which list names by the model's id
    listing = list_json()
    assert listing["models"] == [{"id": REPO, "path": str(snapshot), "bytes": total, "complete": True,
                                  "missing": [], "partial_bytes": 0}]
    assert [f["checkpoint"] for f in listing["q8_files"]].count(REPO) == 1
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0 and re.search(rf"{REPO} +{hub.format_size(total)} +complete", r.stdout), r.output
    assert re.search(rf"q8-\w+\.safetensors +[\d.]+ MB +of {REPO}", r.stdout), r.output
    r = runner.invoke(app, ["pull", REPO])
    assert r.exit_code == 0 and r.stdout == f"{snapshot}\n", r.output
    assert f"{REPO}: already downloaded" in r.stderr


def test_an_interrupted_download_resumes_where_it_stopped(fake_hub, tiny_checkpoint, tmp_path, same_cache):
    """The line drops in the middle of a shard: huggingface_hub's own retry gets a 503, the command
    fails with one line and keeps the part; the next pull asks for the rest with a Range request."""
    env = hf_env(tmp_path, fake_hub.url)
    shard = "model-00000-of-00001.safetensors"
    data = fake_hub.files[shard]
    fake_hub.cut_after[shard] = 15_000_000
    r = tinyoss(env, "pull", REPO)
    assert r.returncode == 1
    error = the_one_error(r.stderr)
    assert f"{REPO}: the download of {shard} stopped at" in error and f"`tinyoss pull {REPO}` resumes it" in error
    part = same_cache / "blobs" / f"{hashlib.sha256(data).hexdigest()}.incomplete"
    kept = part.stat().st_size
    assert 0 < kept < len(data) and part.read_bytes() == data[:kept]
    listing = list_json()["models"]
    assert [(m["complete"], m["missing"], m["partial_bytes"]) for m in listing] == [(False, [shard], kept)]

    fake_hub.down = False
    fake_hub.requests.clear()
    r = tinyoss(env, "pull", REPO)
    assert r.returncode == 0, r.stderr
    assert ("GET", f"/{REPO}/resolve/{fake_hub.commit}/{shard}", f"bytes={kept}-") in fake_hub.requests
    assert f"resuming {shard} at {hub.format_size(kept)}" in r.stderr
    snapshot = Path(r.stdout.strip())
    for name in ROOT_FILES:
        assert (snapshot / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    assert not list((same_cache / "blobs").glob("*.incomplete"))


def test_a_resumed_file_that_does_not_match_its_sha256_is_removed(fake_hub, tmp_path, same_cache):
    shard = "model-00000-of-00001.safetensors"
    blobs = same_cache / "blobs"
    blobs.mkdir(parents=True)
    part = blobs / f"{hashlib.sha256(fake_hub.files[shard]).hexdigest()}.incomplete"
    part.write_bytes(b"\0" * 1000)  # not what the file starts with
    r = tinyoss(hf_env(tmp_path, fake_hub.url), "pull", REPO)
    assert r.returncode == 1
    assert f"{REPO}: {shard} arrived corrupted" in the_one_error(r.stderr)
    assert ("GET", f"/{REPO}/resolve/{fake_hub.commit}/{shard}", "bytes=1000-") in fake_hub.requests
    assert not part.exists()


def test_a_hub_that_cannot_be_reached_is_one_line(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = tinyoss(hf_env(tmp_path, f"http://127.0.0.1:{port}"), "run", "-m", REPO, "hi")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"error: {REPO}: not a local folder, and not in the Hugging Face cache "
                               f"({tmp_path / 'hf' / 'hub'}), and 127.0.0.1:{port} cannot be reached (")
    assert r.stderr.endswith("check the network, or pass a local checkpoint folder with -m\n")


# ---------------------------------------------------------------------------------------------------
# no download: offline, names
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["pull", REPO], ["run", "-m", REPO, "hi"]])
def test_offline_and_not_cached_says_so(tmp_path, same_cache, monkeypatch, args):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert (f"error: {REPO}: not a local folder, and not in the Hugging Face cache ({tmp_path / 'hf' / 'hub'}), "
            f"and downloads are off (HF_HUB_OFFLINE is set): unset it and run `tinyoss pull {REPO}`") in r.stderr


@pytest.mark.parametrize("args", [["run", "-m", "", "hi"], ["info", "-m", ""], ["info", ""], ["chat", "-m", " "]])
def test_an_empty_model_name_is_an_error(args):
    r = runner.invoke(app, args, input="")
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: the model name is empty") and r.stderr.count("\n") == 1


def test_pull_takes_only_hugging_face_ids(tmp_path):
    r = runner.invoke(app, ["pull", str(tmp_path)])
    assert r.exit_code == 1 and "is not a Hugging Face id (owner/name" in r.stderr, r.output


def test_an_empty_cache_lists_nothing(same_cache):
    assert list_json()["models"] == []
    r = runner.invoke(app, ["list"])
    assert r.exit_code == 0 and "no gpt-oss models" in r.stdout, r.output
