"""A Hugging Face Hub cache laid out as huggingface_hub writes it, read offline: what a
reward's default weights resolve from on a machine that downloaded them once."""

from __future__ import annotations

from pathlib import Path

SHA = "0123456789abcdef0123456789abcdef01234567"


def offline_hub_cache(root: Path, monkeypatch, files: dict[str, dict[str, Path]]) -> Path:
    """``files``: repository (or REPOSITORY@COMMIT) -> {file name in it: local file to place
    there}. The cache is
    ``root``; huggingface_hub is made offline and pointed at it for the test."""
    for given, entries in files.items():
        repo, _, commit = given.partition("@")  # REPO@COMMIT: a pinned default's snapshot
        commit = commit or SHA
        folder = root / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        for name, source in entries.items():
            (folder / "snapshots" / commit / name).write_bytes(source.read_bytes())
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both once, at import
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return root
