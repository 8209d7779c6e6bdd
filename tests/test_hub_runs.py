"""sqdf train, eval and --dry-run by Hub id against a stand-in Hub on 127.0.0.1 serving tiny
random models written at test time: from an empty cache, then offline from the cache, the
run's commits pinned for eval after the repository moves on, and a gated model as one line."""

from __future__ import annotations

import json

import pytest

from sqdf import weights
from sqdf.cli import main
from tests.hub_standin import StandInHub, point_at, serve
from tests.tasks.sd_runs import write_tiny_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from sqdf.tasks.sd_random import write_random_lcm_unet

    root = write_tiny_parts(tmp_path_factory.mktemp("hub_parts"))
    write_random_lcm_unet(root / "lcm")
    return root


@pytest.fixture
def hub(parts, tmp_path, monkeypatch):
    standin = StandInHub()
    standin.add_folder("tiny/sd", parts / "sd")
    standin.add_folder("tiny/lcm", parts / "lcm")
    standin.add_folder("tiny/clip", parts / "clip")
    standin.add_files("tiny/head", {"head.pth": (parts / "head.pth").read_bytes()})
    standin.add_folder("gated/sd", parts / "sd", gated=True)
    weights.clear()
    with serve(standin) as url:
        point_at(monkeypatch, url, tmp_path / "cache" / "hub")
        yield standin
    weights.clear()


def train_argv(out, model="tiny/sd"):
    return ["train", "--task", "sd", "--model", model, "--task-param", "lcm=tiny/lcm",
            "--reward", "aesthetic", "--reward-param", "clip=tiny/clip",
            "--reward-param", "head=hf://tiny/head/head.pth", "--estimator", "consistency",
            "--num-steps", "3", "--steps", "1", "--batch-size", "2", "--buffer-size", "4",
            "--device", "cpu", "--out", str(out), "--no-progress"]  # fmt: skip


def test_train_by_hub_id_then_offline_then_eval_at_the_runs_commits(hub, tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    # --dry-run: the weights with their sizes, and nothing but configs fetched
    assert main([*train_argv(tmp_path / "dry"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    sd_bytes = sum(
        len(b)
        for n, b in hub.repos["tiny/sd"].commits[hub.repos["tiny/sd"].branches["main"]].items()
        if n.endswith(".safetensors")
    )
    assert "tiny/sd: tiny/sd@" in out and "to download" in out
    assert not any(k.endswith((".safetensors", ".pth")) for k in hub.gets)
    assert sd_bytes > 0
    # from an empty cache
    run = tmp_path / "run"
    assert main(train_argv(run)) == 0
    doc = json.loads((run / "config.json").read_text())
    recorded = doc["weights"]
    assert set(recorded) == {"tiny/sd", "tiny/lcm", "tiny/clip", "hf://tiny/head/head.pth"}
    for given, rec in recorded.items():
        repo = weights.parse_hub_ref(given).repo
        assert rec["commit"] == hub.repos[repo].branches["main"]
    head = hub.repos["tiny/head"].commits[hub.repos["tiny/head"].branches["main"]]["head.pth"]
    import hashlib

    assert recorded["hf://tiny/head/head.pth"]["sha256"] == hashlib.sha256(head).hexdigest()
    assert doc["train"]["task_params"]["model"] == "tiny/sd"  # as given
    # offline, from the cache: no request reaches the Hub
    weights.clear()
    point_at(monkeypatch, hub.url, tmp_path / "cache" / "hub", offline=True)
    before = sum(hub.requests.values())
    assert main(train_argv(tmp_path / "offline")) == 0
    assert sum(hub.requests.values()) == before
    # the CLIP repository moves on; eval of the run loads the commit it trained on
    point_at(monkeypatch, hub.url, tmp_path / "cache" / "hub")
    trained = hub.repos["tiny/clip"].branches["main"]
    clip = hub.repos["tiny/clip"].commits[trained]
    hub.add_files("tiny/clip", {**clip, "README.md": b"a later commit"})
    weights.clear()
    from sqdf.run import read_run_config

    read_run_config(run)
    assert f"/snapshots/{trained}" in weights.resolve("tiny/clip", "clip")
    assert main(["eval", str(run), "--per-prompt", "2", "--no-progress"]) == 0
    assert "tiny/clip" in weights.resolutions()
    assert weights.resolutions()["tiny/clip"]["commit"] == trained


def test_a_gated_model_is_one_line(hub, tmp_path, capsys):
    assert main(train_argv(tmp_path / "run", model="gated/sd")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "gated/sd is a gated repository" in err and "hf auth login" in err
    assert f"{hub.url}/gated/sd" in err
    assert not (tmp_path / "run" / "config.json").exists()
