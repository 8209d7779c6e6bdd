"""The headless-Chromium page check (tests/browser.py) on small pages made here: it sees
decoded and broken images, JavaScript exceptions, console errors, failed loads and the
visible text. Skipped where no Chromium is installed."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import pytest

import tests.browser as browser
from tests.browser import SKIP_REASON, chromium_or_skip, open_page


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A real PNG file: one colour, 8-bit RGB, no filtering."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _page(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "report.html"
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Report</title>"
        "<style>body { font-family: sans-serif } .hidden { display: none }</style>"
        f"</head><body>{body}</body></html>"
    )
    return path


def test_report_with_two_images(tmp_path: Path) -> None:
    red, blue = _data_uri(_png(4, 3, (255, 0, 0))), _data_uri(_png(2, 2, (0, 0, 255)))
    path = _page(
        tmp_path,
        "<h1>Training report</h1><h2>Samples</h2>"
        f"<img src='{red}' alt='red'><img src='{blue}' alt='blue'>"
        "<p class='hidden'>not shown</p><script>console.log('fine')</script>",
    )
    check = open_page(path)
    assert check.errors == []
    assert (check.images, check.images_loaded) == (2, 2)
    assert "Training report" in check.text and "Samples" in check.text
    assert "not shown" not in check.text  # innerText leaves out CSS-hidden text


def test_broken_image_does_not_decode(tmp_path: Path) -> None:
    good = _data_uri(_png(2, 2, (0, 128, 0)))
    garbage = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
    check = open_page(_page(tmp_path, f"<h1>R</h1><img src='{good}'><img src='{garbage}'>"))
    assert (check.images, check.images_loaded) == (2, 1)


def test_uncaught_exception_is_an_error(tmp_path: Path) -> None:
    check = open_page(_page(tmp_path, '<h1>R</h1><script>throw new Error("boom")</script>'))
    assert len(check.errors) == 1 and "boom" in check.errors[0]
    assert check.text == "R"


def test_console_error_is_an_error(tmp_path: Path) -> None:
    body = '<h1>R</h1><script>console.log("fine"); console.error("bad")</script>'
    check = open_page(_page(tmp_path, body))
    assert check.errors == ["console.error: bad"]


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    check = open_page(_page(tmp_path, "<h1>R</h1><img src='missing.png'>"))
    assert (check.images, check.images_loaded) == (1, 0)
    assert any("missing.png" in e and "ERR_FILE_NOT_FOUND" in e for e in check.errors)


def test_no_such_page(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_page(tmp_path / "absent.html")


def test_skips_without_chromium(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    monkeypatch.setattr(browser, "unavailable_note", lambda: tmp_path / "chromium-unavailable")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        chromium_or_skip()
    assert "scripts/setup.sh --browser" in SKIP_REASON


def test_under_ci_a_missing_chromium_fails_even_where_setup_said_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    note = tmp_path / "chromium-unavailable"
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    monkeypatch.setattr(browser, "unavailable_note", lambda: note)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no Chromium under CI, where the browser"):
        chromium_or_skip()
    note.write_text("apt-get install chromium failed\n")
    with pytest.raises(pytest.fail.Exception, match="here: apt-get install chromium failed: "):
        chromium_or_skip()
    monkeypatch.delenv("CI")  # outside CI the same machine skips, saying why
    with pytest.raises(pytest.skip.Exception, match="here: apt-get install chromium failed$"):
        chromium_or_skip()
