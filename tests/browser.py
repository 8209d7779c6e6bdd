"""Open a self-contained HTML page in a real headless Chromium and report what a reader sees.

`open_page(path)` loads the file from a file:// URL and returns a `PageCheck`: the JavaScript
exceptions, console errors and failed loads it raised, how many <img> elements it has and how
many decoded (naturalWidth > 0), its title and its visible text (document.body.innerText).
`open_urls(urls)` does the same for several pages (a served site) in one browser, optionally
waiting for a JavaScript condition (search results filled in) and reading a JavaScript value
(the links a page offers). Tests call them directly; without a browser they skip the test,
or under CI fail it (see `chromium_or_skip`).

The browser is driven over the DevTools protocol on `--remote-debugging-pipe` (fds 3 and 4,
NUL-separated JSON), with the standard library only: no websocket client, no Playwright with
its Node driver, and nothing tied to one Chromium version, as the few protocol methods used
here (Target, Page, Runtime, Log) have been stable for years.

Why these flags:
  --headless                  no display on test machines or CI.
  --no-sandbox                Chromium refuses to start as root with its sandbox on, and the
                              tests and CI run as root.
  --disable-gpu               no GPU here; software rendering is enough for this check.
  --disable-quic, --disable-background-networking, --disable-component-update, --disable-sync
                              stop the browser's own calls to Google hosts (updates, field trials,
                              sync): the network is closed, and these calls would only hang
                              or log noise. The page itself needs no network.
  --no-first-run              no first-run UI or default-browser prompt.
  --user-data-dir=<fresh tmp> each call starts from an empty profile, which is removed after,
                              so no state leaks between tests and no lock blocks a parallel run.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SKIP_REASON = (
    "needs Chromium: apt-get install chromium (Debian), or bash scripts/setup.sh --browser"
)

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

# Chromium's names on Debian (and the Ubuntu/Fedora package), searched on PATH.
_NAMES = ("chromium", "chromium-browser")

# Runs in a short-lived Python between fork and Chromium: puts the two pipe ends on the fds
# that --remote-debugging-pipe reads (3) and writes (4), then becomes the browser. Doing this
# in a separate process keeps it safe in a test process with threads (unlike preexec_fn).
_TRAMPOLINE = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.dup2(int(sys.argv[2]), 4)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)

# Counts images and reads the text once the load event has fired (all inline images have
# then loaded or failed).
_PROBE = """(() => {
  const imgs = Array.from(document.querySelectorAll("img"));
  return {
    images: imgs.length,
    loaded: imgs.filter((i) => i.complete && i.naturalWidth > 0).length,
    title: document.title,
    text: document.body ? document.body.innerText : "",
  };
})()"""


@dataclass
class PageCheck:
    """What a headless Chromium saw on one page."""

    errors: list[str]  # uncaught JS exceptions, console.error/assert, failed loads
    images: int  # <img> elements in the document
    images_loaded: int  # of those, how many decoded (complete and naturalWidth > 0)
    text: str  # document.body.innerText: the text a reader sees (CSS-hidden text excluded)
    title: str = ""  # document.title
    probed: Any = None  # the value of the caller's `probe` expression, if one was given


def find_chromium() -> str | None:
    """Path of a Chromium on PATH (or at /usr/bin/chromium), or None."""
    for name in _NAMES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def unavailable_note() -> Path:
    """Where scripts/setup.sh --browser says why it could not install Chromium: in the
    environment that runs the tests (.venv)."""
    return Path(sys.prefix) / "chromium-unavailable"


def chromium_or_skip() -> str:
    """Path of the browser, or skip the calling test saying how to install one (and why
    scripts/setup.sh --browser could not, where it wrote that down). Under CI (the CI variable
    set) it fails instead, whatever the reason: in CI only the GPU-only tests may skip, and
    a browser test skipped there would leave the reports unchecked with the run still green."""
    found = find_chromium()
    if found is not None:
        return found
    note = unavailable_note()
    why = f"; here: {note.read_text().strip()}" if note.is_file() else ""
    if os.environ.get("CI"):
        pytest.fail(f"no Chromium under CI, where the browser tests must run{why}: {SKIP_REASON}")
    pytest.skip(f"{SKIP_REASON}{why}")


def open_page(path: Path | str, timeout_s: float = 30, browser: str | None = None) -> PageCheck:
    """Load the HTML file at `path` in a fresh headless Chromium and report what it shows.

    Waits for the page's load event, then counts images and reads the text. Skips the test
    when no Chromium is found (unless `browser` names one). Raises TimeoutError past
    `timeout_s` seconds (start to finish) and RuntimeError if the browser dies or cannot
    open the file; the browser and its temporary profile are always removed."""
    page = Path(path).resolve()
    if not page.is_file():
        raise FileNotFoundError(page)
    exe = browser or chromium_or_skip()
    deadline = time.monotonic() + timeout_s
    with (
        tempfile.TemporaryDirectory(prefix="sqdf-chromium-", ignore_cleanup_errors=True) as tmp,
        _Browser(exe, tmp) as cdp,
    ):
        return _check(cdp, page.as_uri(), deadline)


def open_urls(
    urls: list[str],
    timeout_s: float = 60,
    until: str | None = None,
    probe: str | None = None,
    browser: str | None = None,
) -> list[PageCheck]:
    """Load each URL (e.g. pages of a site served on 127.0.0.1) in its own tab of one fresh
    headless Chromium and report what each shows, as `open_page` does.

    `until` is a JavaScript expression polled after the load event until it is truthy (for
    content a page fills in itself, such as search results); `probe` one whose value comes
    back as `PageCheck.probed`. Raises TimeoutError past `timeout_s` seconds for all pages
    together."""
    exe = browser or chromium_or_skip()
    deadline = time.monotonic() + timeout_s
    with (
        tempfile.TemporaryDirectory(prefix="sqdf-chromium-", ignore_cleanup_errors=True) as tmp,
        _Browser(exe, tmp) as cdp,
    ):
        return [_check(cdp, url, deadline, until, probe) for url in urls]


def _evaluate(cdp: _Browser, expression: str, deadline: float, session: str) -> Any:
    answer = cdp.call(
        "Runtime.evaluate",
        {"expression": expression, "returnByValue": True, "awaitPromise": True},
        deadline,
        session,
    )
    if "exceptionDetails" in answer:
        raise RuntimeError(f"script {expression[:80]!r} failed: {answer['exceptionDetails']}")
    return answer["result"].get("value")


def _check(
    cdp: _Browser,
    url: str,
    deadline: float,
    until: str | None = None,
    probe: str | None = None,
) -> PageCheck:
    target = cdp.call("Target.createTarget", {"url": "about:blank"}, deadline=deadline)
    attached = cdp.call(
        "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, deadline
    )
    session = attached["sessionId"]
    for domain in ("Runtime", "Log", "Page"):
        cdp.call(f"{domain}.enable", {}, deadline, session)
    nav = cdp.call("Page.navigate", {"url": url}, deadline, session)
    if nav.get("errorText"):
        raise RuntimeError(f"Chromium could not open {url}: {nav['errorText']}")
    cdp.wait_for("Page.loadEventFired", session, deadline)
    while until is not None and not _evaluate(cdp, until, deadline, session):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}: {until!r} still false when the time ran out")
        time.sleep(0.1)
    value = _evaluate(cdp, _PROBE, deadline, session)
    return PageCheck(
        errors=_errors(cdp.events, session),
        images=value["images"],
        images_loaded=value["loaded"],
        text=value["text"],
        title=value["title"],
        probed=None if probe is None else _evaluate(cdp, probe, deadline, session),
    )


def _errors(events: list[dict[str, Any]], session: str) -> list[str]:
    """The page's error events, in order, as one line each."""
    out: list[str] = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            thrown = details.get("exception", {})  # an Error has a description, `throw "x"` a value
            desc = str(thrown.get("description", thrown.get("value", ""))).splitlines()
            what = f"{details.get('text', 'Uncaught')} {desc[0] if desc else ''}".strip()
            where = f"{details.get('url', '')}:{details.get('lineNumber', 0) + 1}"
            out.append(f"{what} ({where})")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
            out.append(f"console.{params['type']}: {' '.join(args)}")
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            # browser-side errors, among them failed loads: "network: Failed to load
            # resource: net::ERR_FILE_NOT_FOUND file:///.../missing.png"
            entry = params["entry"]
            out.append(f"{entry['source']}: {entry['text']} {entry.get('url', '')}".strip())
    return out


class _Browser:
    """A Chromium process and its DevTools pipe; closes both on exit."""

    def __init__(self, exe: str, tmp: str) -> None:
        self.exe = exe
        self.tmp = Path(tmp)
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._partial: list[bytes] = []  # the start of a message not yet complete
        self._complete: list[bytes] = []  # messages read but not yet handled

    def __enter__(self) -> _Browser:
        # Our ends stay in this process; the child's ends are moved above fd 9 so that
        # putting them on 3 and 4 in the trampoline cannot overwrite one with the other.
        to_child_r, self._write = os.pipe()
        self._read, from_child_w = os.pipe()
        child_r = _high_fd(to_child_r)
        child_w = _high_fd(from_child_w)
        self._log = open(self.tmp / "chromium.log", "wb")  # closed in __exit__
        argv = [self.exe, *FLAGS, f"--user-data-dir={self.tmp / 'profile'}"]
        argv += ["--remote-debugging-pipe", "about:blank"]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _TRAMPOLINE, str(child_r), str(child_w), *argv],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                pass_fds=(child_r, child_w),
                start_new_session=True,
            )
        except BaseException:
            self._close_fds()
            self._log.close()
            raise
        finally:
            os.close(child_r)
            os.close(child_w)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.send("Browser.close", {})
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: see Popen
                    self.proc.wait()
        finally:
            self._close_fds()
            self._log.close()

    def _close_fds(self) -> None:
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._read = self._write = -1

    def send(self, method: str, params: dict[str, Any], session: str | None = None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._write, data) :]
        return self._next_id

    def call(
        self,
        method: str,
        params: dict[str, Any],
        deadline: float,
        session: str | None = None,
    ) -> dict[str, Any]:
        """Send a command and wait for its answer, keeping the events that come before it."""
        sent = self.send(method, params, session)
        while True:
            message = self._receive(deadline, method)
            if message.get("id") == sent:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, method: str, session: str, deadline: float) -> None:
        """Read events until `method` arrives for `session`."""
        while True:
            message = self._receive(deadline, method)
            if "method" in message:
                self.events.append(message)
                if message["method"] == method and message.get("sessionId") == session:
                    return

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        """The next message; each ends with a NUL byte."""
        while not self._complete:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"Chromium: no answer to {waiting_for} in time{self._tail()}")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited while waiting for {waiting_for}{self._tail()}")
            *ends, rest = chunk.split(b"\0")
            if ends:
                self._complete += [b"".join([*self._partial, ends[0]]), *ends[1:]]
                self._partial = []
            if rest:
                self._partial.append(rest)
        return json.loads(self._complete.pop(0))

    def _tail(self) -> str:
        self._log.flush()
        text = (self.tmp / "chromium.log").read_text(errors="replace").strip()
        return f"; its output ends:\n{text[-2000:]}" if text else ""


def _high_fd(fd: int) -> int:
    """A copy of `fd` numbered 10 or more (inheritable), closing the original."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high
