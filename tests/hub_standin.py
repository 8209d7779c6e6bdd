"""A stand-in Hugging Face Hub for tests: an http.server on 127.0.0.1 answering the requests
huggingface_hub's download functions make (docs: /work/shared/docs/FACTS.md), from folders
written at test time.

- ``GET /api/models/{repo}/revision/{rev}``: the commit (``sha``) and ``siblings``;
- ``GET /api/models/{repo}/tree/{sha}``: every file with its size;
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: the bytes, with ``X-Repo-Commit``, an
  ``ETag`` that is the file's sha256 (as the Hub's for LFS files) and ``Content-Length``;
  ``Range: bytes=N-`` is answered 206, as the client asks when it resumes a download.

A gated repository is answered 401 with ``X-Error-Code: GatedRepo``; an unknown repository,
revision or file 404 with ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``. A file
named in ``cut`` has its first GET cut off half-way (the connection closed after half the
body), one in ``cut_always`` every GET; ``ranges`` records each GET's Range header. The
server refuses to answer more than ``max_requests`` requests (429) or any request after
``deadline_s`` seconds (503), drops a connection silent for 10 s, and is shut down when the
fixture's ``with`` ends.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # commit sha -> path -> bytes
    branches: dict[str, str]  # branch -> commit
    gated: bool = False


@dataclass
class StandInHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)  # "repo/path" cut off on their first GET
    cut_always: set[str] = field(default_factory=set)  # "repo/path" cut off on every GET
    ranges: list[tuple[str, str | None]] = field(default_factory=list)  # GETs' Range headers
    max_requests: int = 2000
    # seconds from the server's start after which every request is answered 503: a client that
    # loops (retries without end) fails the test instead of hanging it
    deadline_s: float = 300.0
    started: float = 0.0
    requests: Counter = field(default_factory=Counter)  # (method, kind) -> count
    gets: Counter = field(default_factory=Counter)  # "repo/path" -> GETs of its bytes
    url: str = ""

    def add_folder(
        self, repo: str, folder: Path, *, gated: bool = False, commit: str | None = None
    ) -> str:
        """Publish ``folder``'s files as a new commit of ``repo`` on main; returns its sha."""
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return self.add_files(repo, files, gated=gated, commit=commit)

    def add_files(
        self, repo: str, files: dict[str, bytes], *, gated: bool = False, commit: str | None = None
    ) -> str:
        """Publish ``files`` as a new commit of ``repo`` on main: ``commit`` (a pinned
        default's), else a sha made from the contents; returns it."""
        digest = hashlib.sha1(repo.encode())
        for name, data in sorted(files.items()):
            digest.update(name.encode() + hashlib.sha256(data).digest())
        entry = self.repos.setdefault(repo, Repo({}, {}, gated))
        digest.update(str(len(entry.commits)).encode())
        sha = commit or digest.hexdigest()
        entry.commits[sha] = dict(files)
        entry.branches["main"] = sha
        entry.gated = gated
        return sha


def _handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a connection may stay silent before its thread gives up

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _error(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _json(self, doc: object) -> None:
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _commit(self, repo: str, rev: str) -> tuple[Repo, str] | None:
            entry = hub.repos.get(repo)
            if entry is None:
                self._error(404, "RepoNotFound")
                return None
            if entry.gated:
                self._error(401, "GatedRepo")
                return None
            sha = entry.branches.get(rev, rev)
            if sha not in entry.commits:
                self._error(404, "RevisionNotFound")
                return None
            return entry, sha

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            with lock:
                total = sum(hub.requests.values())
                if total >= hub.max_requests:
                    self._error(429, "TooManyRequests")
                    return
            if time.monotonic() - hub.started > hub.deadline_s:
                self._error(503, "StandInDeadline")
                return
            # split before unquoting: a revision refs/pr/1 comes quoted as one part
            raw = urllib.parse.urlsplit(self.path).path.strip("/").split("/")
            parts = [urllib.parse.unquote(p) for p in raw]
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
                with lock:
                    hub.requests[(self.command, kind)] += 1
                found = self._commit(repo, rev)
                if found is None:
                    return
                entry, sha = found
                files = entry.commits[sha]
                if kind == "revision":
                    self._json(
                        {
                            "id": repo,
                            "sha": sha,
                            "siblings": [
                                {"rfilename": n, "size": len(b)} for n, b in files.items()
                            ],
                        }
                    )
                elif kind == "tree":
                    self._json(
                        [
                            {
                                "type": "file",
                                "path": n,
                                "size": len(b),
                                "oid": hashlib.sha1(b).hexdigest(),
                            }
                            for n, b in files.items()
                        ]
                    )
                else:
                    self._error(404, "NotFound")
                return
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                with lock:
                    hub.requests[(self.command, "resolve")] += 1
                found = self._commit(repo, rev)
                if found is None:
                    return
                entry, sha = found
                data = entry.commits[sha].get(name)
                if data is None:
                    self._error(404, "EntryNotFound")
                    return
                self._file(f"{repo}/{name}", sha, data)
                return
            self._error(404, "NotFound")

        def _file(self, key: str, sha: str, data: bytes) -> None:
            start = 0
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes=") and self.command == "GET":
                start = int(ranged[len("bytes=") :].split("-")[0] or 0)
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            with lock:
                hub.gets[key] += 1
                hub.ranges.append((key, self.headers.get("Range")))
                cut = (key in hub.cut and hub.gets[key] == 1) or key in hub.cut_always
            body = data[start:]
            if cut:  # half the body, then the connection drops
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


class serve:
    """``with serve(hub) as url:`` runs the stand-in on 127.0.0.1 (a free port) in a thread,
    and shuts it down on exit."""

    def __init__(self, hub: StandInHub):
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        self.server.timeout = 10
        self.server.daemon_threads = True

    def __enter__(self) -> str:
        self.hub.started = time.monotonic()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        host, port = self.server.server_address[:2]
        self.hub.url = f"http://{host}:{port}"
        return self.hub.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def point_at(monkeypatch, url: str, cache: Path, *, offline: bool = False) -> None:
    """huggingface_hub (in this process) downloads from ``url`` into ``cache``; it reads these
    settings into its constants once, at import, so both are set."""
    import huggingface_hub.constants as constants

    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    for name, value in (("HF_ENDPOINT", url), ("HF_HUB_CACHE", str(cache)),
                        ("HF_HUB_OFFLINE", "1" if offline else "0"),
                        ("HF_HOME", str(cache.parent / "hf_home"))):  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HOME", str(cache.parent / "hf_home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("SQDF_CACHE", str(cache.parent / "sqdf_cache"))
    # the client still retries a 429 or 5xx five times, but without its backoff's waits
    # (1 to 8 s each, 23 s in all): the stand-in's refusals are final
    import types

    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http, "time", types.SimpleNamespace(sleep=lambda _seconds: None))


def subprocess_env(url: str, cache: Path, *, offline: bool = False) -> dict[str, str]:
    """The environment for a ``sqdf`` subprocess downloading from the stand-in."""
    import os

    env = dict(os.environ)
    env.update(HF_ENDPOINT=url, HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"),
               HF_HUB_OFFLINE="1" if offline else "0", HF_HUB_DISABLE_PROGRESS_BARS="1",
               SQDF_CACHE=str(cache.parent / "sqdf_cache"))  # fmt: skip
    env.pop("HF_TOKEN", None)
    return env
