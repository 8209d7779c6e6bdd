"""sqdf train, eval and --dry-run by Hub id against a stand-in Hub on 127.0.0.1 serving tiny
random models written at test time: from an empty cache, then offline from the cache, the
run's commits pinned for eval after the repository moves on, and a gated model as one line."""

from __future__ import annotations

import json
import shlex

import pytest

from sqdf.cli import main
from sqdf.infra import weights
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
    from sqdf.run.folder import read_run_config

    read_run_config(run)
    assert f"/snapshots/{trained}" in weights.resolve("tiny/clip", "clip")
    assert main(["eval", str(run), "--per-prompt", "2", "--no-progress"]) == 0
    assert "tiny/clip" in weights.resolutions()
    assert weights.resolutions()["tiny/clip"]["commit"] == trained


def test_a_gated_model_is_one_line(hub, tmp_path, capsys):
    assert main(train_argv(tmp_path / "run", model="gated/sd")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # huggingface_hub's progress bars may come first; sqdf's error is one line
    (line,) = [ln for ln in err.splitlines() if ln.startswith("sqdf train: error:")]
    err = line
    assert "gated/sd is a gated repository" in err and "hf auth login" in err
    assert f"{hub.url}/gated/sd" in err
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.fixture(scope="module")
def family_parts(parts, tmp_path_factory):
    """Tiny random stand-ins of every preset's default weights, by preset key."""
    from sqdf.tasks.sd_random import (
        write_random_flux,
        write_random_lcm_lora,
        write_random_sd,
        write_random_sd3,
    )

    root = tmp_path_factory.mktemp("family_parts")
    write_random_lcm_lora(parts / "sd", root / "lcm15")
    write_random_sd(root / "sdxl", "tiny-xl")
    write_random_lcm_lora(root / "sdxl", root / "lcmxl")
    write_random_sd3(root / "sd35m", t5=False)
    write_random_flux(root / "flux-dev")
    write_random_flux(root / "flux-schnell", guidance_embeds=False)
    return root


def publish_defaults(hub: StandInHub, parts, family_parts) -> None:
    """Every default weight the README's preset commands name, at its pinned commit."""
    from sqdf.rewards.clip_rewards import AESTHETIC_HEAD, CLIP_L14
    from sqdf.run.settings import load_preset, preset_names

    def at(given: str, folder=None, files=None) -> None:
        ref = weights.parse_hub_ref(given)
        if ref.repo in hub.repos and ref.revision in hub.repos[ref.repo].commits:
            return
        if folder is not None:
            hub.add_folder(ref.repo, folder, commit=ref.revision)
        else:
            hub.add_files(ref.repo, files, commit=ref.revision)

    at(CLIP_L14, parts / "clip")
    at(AESTHETIC_HEAD, files={"aesthetic-model.pth": (parts / "head.pth").read_bytes()})
    folders = {"sd15": parts / "sd", "sdxl": family_parts / "sdxl",
               "sd35m": family_parts / "sd35m", "flux-dev": family_parts / "flux-dev",
               "flux-schnell": family_parts / "flux-schnell",
               "flow-grpo-sd35": family_parts / "sd35m"}  # fmt: skip
    loras = {"sd15": family_parts / "lcm15", "sdxl": family_parts / "lcmxl"}
    for name in preset_names():
        params = load_preset(name).train.get("task_params", {})
        family = name.split("-")[0] if name.startswith("sd15") else name.rsplit("-", 1)[0]
        family = {"flow-grpo-sd35": "sd35m"}.get(family, family)  # Flow-GRPO's SD 3.5 Medium
        if "model" in params:
            at(params["model"], folders[family])
        lcm = params.get("lcm")
        if lcm and lcm.endswith(".safetensors"):
            at(lcm, loras[family])
        elif lcm:  # FLUX.1-dev's consistency model: [schnell]'s transformer/
            at(lcm, folders["flux-schnell"])


def test_readme_preset_commands_run_by_hub_id(hub, parts, family_parts, tmp_path,
                                             monkeypatch, capsys):  # fmt: skip
    """The README's command per family, against the stand-in serving every default weight
    at its pinned commit: each line runs as written, made small (a few updates of a few
    steps, at 32 px through the tiny parts' VAEs); each family's run records the preset's
    repositories at their pinned commits."""
    from sqdf.run.settings import load_preset
    from tests.tasks.sd_runs import QUICK, doc_lines

    publish_defaults(hub, parts, family_parts)
    monkeypatch.chdir(tmp_path)
    lines = doc_lines("README.md", "sqdf train --preset sdxl-aesthetic")
    assert [ln.split()[3] for ln in lines if ln.startswith("sqdf train")] == [
        "sd15-aesthetic", "sd15-aesthetic", "sdxl-aesthetic", "sd35m-aesthetic",
        "flux-dev-aesthetic", "flux-schnell-aesthetic",
    ]  # fmt: skip
    hub.deadline_s = 1200.0  # six trains on a loaded CPU: the stand-in outlives them
    # every train samples little (the presets sample 32 fresh trajectories an update into a
    # 1,024-trajectory buffer); the larger families also at a small side
    sampling = ["--steps", "1", "--num-steps", "2", "--fresh-trajectories", "2",
                "--buffer-size", "4"]  # fmt: skip
    for line in lines:
        argv = shlex.split(line)[1:]
        extra = [] if "--dry-run" in argv else QUICK.get(argv[0], [])
        if argv[0] == "sample":
            extra = ["--num-samples", "2"]
        elif argv[0] == "train" and "--dry-run" not in argv:
            extra = extra + sampling
            if "sd15-aesthetic" not in argv:  # 1024 px (512 for FLUX) through a tiny 2x VAE
                extra += ["--task-param", "resolution=32"]
        assert main(argv + extra) == 0, line
        out = capsys.readouterr().out
        params = load_preset(argv[2]).train["task_params"] if argv[0] == "train" else {}
        if "--dry-run" in argv:
            model = weights.parse_hub_ref(params["model"])
            assert f"{model.repo}@{model.revision[:12]}" in out, line
        elif argv[0] == "train":
            out_dir = tmp_path / argv[argv.index("--out") + 1]
            assert (out_dir / "final/pytorch_lora_weights.safetensors").is_file(), line
            recorded = json.loads((out_dir / "config.json").read_text())["weights"]
            for key in ("model", "lcm"):  # the preset's references, at their pinned commits
                if key in params:
                    pinned = weights.parse_hub_ref(params[key]).revision
                    assert recorded[params[key]]["commit"] == pinned, line
    recorded = json.loads((tmp_path / "runs/sd/config.json").read_text())["weights"]
    assert {weights.parse_hub_ref(g).repo for g in recorded} == {
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "latent-consistency/lcm-lora-sdv1-5",
        "openai/clip-vit-large-patch14", "trl-lib/ddpo-aesthetic-predictor",
    }  # fmt: skip


def test_resume_and_sample_load_the_commits_the_run_recorded(hub, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*train_argv(run), "--checkpoint-every", "1"]) == 0
    trained = {repo: hub.repos[repo].branches["main"] for repo in ("tiny/sd", "tiny/clip")}
    # both repositories move on: a new commit on main with other bytes
    for repo in trained:
        files = hub.repos[repo].commits[trained[repo]]
        hub.add_files(repo, {**files, "README.md": b"a later commit"})
    weights.clear()
    assert main(["train", "--resume", str(run), "--steps", "2", "--no-progress"]) == 0
    recorded = json.loads((run / "config.json").read_text())["weights"]
    assert recorded["tiny/sd"]["commit"] == trained["tiny/sd"]
    assert recorded["tiny/clip"]["commit"] == trained["tiny/clip"]
    assert recorded["tiny/sd"]["pinned_by"] == "the run's config.json"
    # sqdf sample given the model unpinned: the run's commit, read from its config first
    weights.clear()  # a fresh process: no pin from the resume above
    assert main(["sample", "--task", "sd", "--model", "tiny/sd", "--lora", str(run / "final"),
                 "--num-samples", "1", "--num-steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "s.png")]) == 0  # fmt: skip
    assert weights.resolutions()["tiny/sd"]["commit"] == trained["tiny/sd"]
    capsys.readouterr()


def test_the_weights_variant_follows_the_runs_device_not_the_machine(hub, parts, monkeypatch):
    from sqdf.config.params import build_settings
    from sqdf.tasks.sd import SDConfig, run_device

    files = {p.relative_to(parts / "sd").as_posix(): p.read_bytes()
             for p in (parts / "sd").rglob("*") if p.is_file()}  # fmt: skip
    files.update({n.replace(".safetensors", ".fp16.safetensors"): b
                  for n, b in files.items() if n.endswith(".safetensors")})  # fmt: skip
    hub.add_files("tiny/sd16", files)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # a machine with a GPU
    for device, variant in (("cpu", None), ("cuda", "fp16")):
        weights.clear()
        with run_device(device):
            build_settings(SDConfig, {"model": "tiny/sd16"}, "task 'sd'")
        record = weights.resolutions()["tiny/sd16"]
        assert record["variant"] == variant, device
        assert any(".fp16." in f for f in record["files"]) == (variant == "fp16")


def test_a_second_train_in_one_process_records_only_its_own_weights(hub, tmp_path):
    assert main(train_argv(tmp_path / "one")) == 0
    argv = train_argv(tmp_path / "two")
    at = argv.index("lcm=tiny/lcm")
    del argv[at - 1 : at + 1]  # no consistency model: tweedie
    argv[argv.index("consistency")] = "tweedie"
    assert main(argv) == 0
    recorded = json.loads((tmp_path / "two" / "config.json").read_text())["weights"]
    assert "tiny/lcm" not in recorded and "tiny/sd" in recorded
    # the library call too: a run built in Python after another
    from sqdf.run.folder import read_run_config
    from sqdf.training.trainer import train

    cfg = read_run_config(tmp_path / "two")
    weights.resolve("tiny/lcm", "lcm")  # something this process resolved before
    train(cfg, tmp_path / "three", progress=False)
    recorded = json.loads((tmp_path / "three" / "config.json").read_text())["weights"]
    assert "tiny/lcm" not in recorded


def test_eval_takes_hub_ids_for_its_own_weights(hub, tmp_path):
    run = tmp_path / "run"
    assert main(train_argv(run)) == 0
    weights.clear()
    assert main(["eval", str(run), "--per-prompt", "2", "--no-progress",
                 "--rewards", "clipscore", "--reward-param", "clipscore.model=hf://tiny/clip",
                 "--clip", "tiny/clip"]) == 0  # fmt: skip
    assert weights.resolutions()["tiny/clip"]["commit"] == hub.repos["tiny/clip"].branches["main"]
    assert "hf://tiny/clip" in weights.resolutions()


def test_compare_by_hub_id_and_by_a_presets_default_weights(hub, parts, family_parts, tmp_path,
                                                            monkeypatch):  # fmt: skip
    """sqdf compare with Hub ids for --model, lcm, clip and head, then compare.md's command
    (--preset sd15-aesthetic alone, its default weights at their pinned commits), each made
    small: a trained variant and best-of-N, one seed, one update. Each trained variant's
    config.json records the commits it loaded."""
    from tests.tasks.sd_runs import doc_lines

    small = ["--methods", "sqdf,best_of_n", "--seeds", "1", "--steps", "1", "--best-of", "2",
             "--set", "num_steps=2", "--set", "batch_size=2", "--set", "grad_accum=1",
             "--set", "buffer_size=4", "--set", "fresh_trajectories=2", "--set", "device='cpu'",
             "--task-param", f"eval_prompts={tmp_path / 'eval.txt'}", "--no-progress"]  # fmt: skip
    (tmp_path / "eval.txt").write_text("a red apple\n")
    by_id = ["compare", "--preset", "sd15-aesthetic", "--model", "tiny/sd", "--task-param",
             "lcm=tiny/lcm", "--reward-param", "clip=tiny/clip", "--reward-param",
             "head=hf://tiny/head/head.pth", "--out", str(tmp_path / "by_id")]  # fmt: skip
    publish_defaults(hub, parts, family_parts)
    monkeypatch.chdir(tmp_path)
    (line,) = doc_lines("docs/guides/compare.md", "sqdf compare --preset sd15-aesthetic")
    from_doc = shlex.split(line)[1:]
    for argv, out, expected in (
        (by_id, tmp_path / "by_id", {"tiny/sd", "tiny/lcm", "tiny/clip", "tiny/head"}),
        (from_doc, tmp_path / "runs/compare-sd", {
            "stable-diffusion-v1-5/stable-diffusion-v1-5", "latent-consistency/lcm-lora-sdv1-5",
            "openai/clip-vit-large-patch14", "trl-lib/ddpo-aesthetic-predictor"}),
    ):  # fmt: skip
        weights.clear()
        assert main(argv + small) == 0, argv
        doc = json.loads((out / "results.json").read_text())
        assert doc["task"] == "sd" and [r["variant"] for r in doc["runs"]] == ["sqdf", "best_of_n"]
        assert not any("diverged" in r for r in doc["runs"])
        recorded = json.loads((out / "runs/sqdf-seed0/config.json").read_text())["weights"]
        assert {weights.parse_hub_ref(g).repo for g in recorded} == expected
        for given, rec in recorded.items():  # the commit the stand-in served for each
            ref = weights.parse_hub_ref(given)
            assert rec["commit"] == (ref.revision or hub.repos[ref.repo].branches["main"])
