"""sqdf push against a stand-in Hub on 127.0.0.1: the requests huggingface_hub's upload makes
(repository creation, the card's YAML check, preupload, an NDJSON commit) answered, the
uploaded files compared byte for byte with the run's final/, and a refusal as one line."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sqdf.cli import main

TINY = ["--num-steps", "3", "--steps", "2", "--batch-size", "2", "--buffer-size", "4",
        "--device", "cpu", "--no-progress"]  # fmt: skip
MAX_REQUESTS = 20  # the stand-in refuses anything past this


class StandInHub(BaseHTTPRequestHandler):
    """Answers the upload path of huggingface_hub: every file as a regular (non-LFS) upload."""

    commits: list[list[dict]]  # each commit's NDJSON lines
    requests: list[str]
    refuse: int | None  # answer every request with this status (e.g. 401)
    base: str

    def _reply(self, code: int, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append(self.path)
        if self.refuse or len(self.requests) > MAX_REQUESTS:
            return self._reply(self.refuse or 429, {"error": "refused by the stand-in"})
        if self.path == "/api/repos/create":
            name = json.loads(body)
            return self._reply(200, {"url": f"{self.base}/{name['organization']}/{name['name']}"})
        if self.path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in files]  # fmt: skip
            return self._reply(200, {"files": modes})
        if "/commit/" in self.path:
            self.commits.append([json.loads(line) for line in body.splitlines() if line])
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            url = f"{self.base}/{repo}/commit/{'c' * 40}"
            return self._reply(200, {"commitUrl": url, "commitOid": "c" * 40})
        return self._reply(404, {"error": "not served by the stand-in"})

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(self.path)
        self._reply(404, {"error": "not served by the stand-in"})

    def log_message(self, *args) -> None:  # quiet
        pass


@contextmanager
def stand_in_hub(monkeypatch, refuse: int | None = None) -> Iterator[type[StandInHub]]:
    import huggingface_hub.constants as hub

    handler = type("Hub", (StandInHub,), {"commits": [], "requests": [], "refuse": refuse})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(hub, "ENDPOINT", handler.base)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # the loopback stand-in only
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("push") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


def test_push_uploads_the_final_folder_with_its_card(finished_run, monkeypatch, capsys):
    with stand_in_hub(monkeypatch) as hub:
        assert main(["push", str(finished_run), "me/gmm2d-sqdf"]) == 0
    assert "me/gmm2d-sqdf/commit/" in capsys.readouterr().out
    (commit,) = hub.commits
    assert commit[0]["key"] == "header"
    sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
            for line in commit if line["key"] == "file"}  # fmt: skip
    final = finished_run / "final"
    local = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*")
             if p.is_file()}  # fmt: skip
    assert sent == local and "README.md" in sent and "policy.safetensors" in sent


def test_a_refused_push_is_one_line(finished_run, monkeypatch, capsys):
    with stand_in_hub(monkeypatch, refuse=401):
        assert main(["push", str(finished_run), "me/gmm2d-sqdf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "could not push" in err and "401" in err and "hf auth login" in err


def test_push_of_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["push", str(tmp_path), "me/x"]) == 2
    assert "not an sqdf run folder" in capsys.readouterr().err


def test_a_push_to_a_hub_that_cannot_be_reached_is_one_line(finished_run, monkeypatch, capsys):
    """A connection refused (the HTTP client's own transport error, whichever client
    huggingface_hub uses) is one line, like a refusal of the Hub."""
    import socket

    import huggingface_hub.constants as hub

    with socket.socket() as sock:  # a loopback port with nothing listening on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)  # loopback only
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    assert main(["push", str(finished_run), "me/gmm2d-sqdf"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "could not push" in err, err
