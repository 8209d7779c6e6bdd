"""sqdf.infra.weights against a stand-in Hub on 127.0.0.1: the reference syntax, which files of a
pipeline are fetched, the cache offline, a pinned revision, a download cut off and resumed,
and one line for each way it fails."""

from __future__ import annotations

import json

import pytest

from sqdf.infra import weights
from sqdf.infra.weights import HubRef, parse_hub_ref
from tests.hub_standin import StandInHub, point_at, serve

INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
}
# a pipeline repository as the Hub's SD 1.5 holds it: every weight as safetensors and .bin, an
# fp16 variant, a single-file checkpoint at the top, and a safety checker
PIPELINE = {
    "model_index.json": json.dumps(INDEX).encode(),
    "v1-5-pruned.ckpt": b"c" * 50,
    "v1-5-pruned.safetensors": b"s" * 50,
    "unet/config.json": b"{}",
    "unet/diffusion_pytorch_model.safetensors": b"u" * 4000,
    "unet/diffusion_pytorch_model.fp16.safetensors": b"h" * 2000,
    "unet/diffusion_pytorch_model.bin": b"b" * 4000,
    "vae/config.json": b"{}",
    "vae/diffusion_pytorch_model.safetensors": b"v" * 300,
    "vae/diffusion_pytorch_model.fp16.safetensors": b"w" * 150,
    "text_encoder/config.json": b"{}",
    "text_encoder/model.safetensors": b"t" * 500,
    "text_encoder/pytorch_model.bin": b"p" * 500,
    "tokenizer/vocab.json": b"{}",
    "tokenizer/merges.txt": b"#",
    "tokenizer/tokenizer_config.json": b"{}",
    "scheduler/scheduler_config.json": b"{}",
    "safety_checker/config.json": b"{}",
    "safety_checker/model.safetensors": b"x" * 900,
    "feature_extractor/preprocessor_config.json": b"{}",
}
FULL = [
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]  # fmt: skip


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A stand-in Hub with an SD-like pipeline, a file repository and a gated one; the
    process's huggingface_hub points at it with an empty cache."""
    standin = StandInHub()
    standin.add_files("org/pipe", PIPELINE)
    standin.add_files("org/files", {"head.pth": b"0" * 64, "lora.safetensors": b"1" * 64})
    standin.add_files("gate/model", {"model_index.json": b"{}"}, gated=True)
    weights.clear()
    with serve(standin) as url:
        point_at(monkeypatch, url, tmp_path / "hub")
        yield standin
    weights.clear()


def downloaded(cache, repo: str) -> list[str]:
    """Every file of ``repo`` in the Hub cache (files of equal bytes share one blob, so the
    stand-in's GETs undercount them)."""
    root = cache / ("models--" + repo.replace("/", "--")) / "snapshots"
    return sorted({p.relative_to(s).as_posix() for s in root.iterdir() for p in s.rglob("*")
                   if p.is_file()})  # fmt: skip


@pytest.mark.parametrize(
    "text, ref",
    [
        ("org/name", HubRef("org/name")),
        ("hf://org/name", HubRef("org/name")),
        ("org/name@0123abc", HubRef("org/name", "0123abc")),
        ("org/na.me-1/sub/file.safetensors", HubRef("org/na.me-1", None, "sub/file.safetensors")),
        ("hf://org/name@v1.0/transformer", HubRef("org/name", "v1.0", "transformer")),
        ("mymodule:reward", None),  # a module:function reward
        ("pkg.mod:fn", None),
        ("/abs/path", None),
        ("./rel/path", None),
        ("~/sd15", None),
        ("single", None),
        ("org/name/../x", None),
    ],
)
def test_reference_syntax(text, ref):
    assert parse_hub_ref(text) == ref
    if ref is not None:
        assert parse_hub_ref(str(ref)) == ref  # the spelling round-trips


def test_a_local_path_wins(tmp_path):
    local = tmp_path / "org" / "pipe"
    local.mkdir(parents=True)
    assert weights.resolve(str(local), "model") == str(local)


def test_pipeline_fetches_only_what_a_run_loads(hub, tmp_path, monkeypatch):
    folder = weights.resolve("org/pipe", "task 'sd' model")
    assert downloaded(tmp_path / "hub", "org/pipe") == FULL  # no .bin, .ckpt, fp16, safety checker
    assert json.loads(open(f"{folder}/model_index.json").read()) == INDEX
    record = weights.resolutions()["org/pipe"]
    assert record["commit"] == hub.repos["org/pipe"].branches["main"]
    assert record["files"] == FULL
    # the same offline, from the cache: no request at all
    point_at(monkeypatch, hub.url, tmp_path / "hub", offline=True)
    weights.clear()
    before = sum(hub.requests.values())
    assert weights.resolve("org/pipe", "task 'sd' model") == folder
    assert sum(hub.requests.values()) == before


def test_half_precision_takes_the_fp16_variant(hub, tmp_path):
    weights.resolve("org/pipe", "model", half=True)
    got = downloaded(tmp_path / "hub", "org/pipe")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in got
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in got
    assert "unet/diffusion_pytorch_model.safetensors" not in got
    assert "text_encoder/model.safetensors" in got  # no fp16 variant there: the plain one


def test_pinned_revision_and_run_pins(hub):
    first = hub.repos["org/files"].branches["main"]
    second = hub.add_files("org/files", {"lora.safetensors": b"2" * 64, "head.pth": b"0" * 64})
    old = weights.resolve(f"org/files@{first}/lora.safetensors", "lcm")
    assert open(old, "rb").read() == b"1" * 64
    new = weights.resolve("org/files/lora.safetensors", "lcm")
    assert open(new, "rb").read() == b"2" * 64
    assert weights.resolutions()["org/files/lora.safetensors"]["commit"] == second
    # a run recorded at the first commit loads that one, whatever main says now
    weights.clear()
    weights.pin({"org/files/lora.safetensors": {"commit": first}})
    assert open(weights.resolve("org/files/lora.safetensors", "lcm"), "rb").read() == b"1" * 64


def test_a_cut_download_resumes_and_nothing_half_written_is_loaded(hub):
    hub.cut.add("org/pipe/unet/diffusion_pytorch_model.safetensors")
    folder = weights.resolve("org/pipe", "model")
    assert hub.gets["org/pipe/unet/diffusion_pytorch_model.safetensors"] == 2
    data = open(f"{folder}/unet/diffusion_pytorch_model.safetensors", "rb").read()
    assert data == PIPELINE["unet/diffusion_pytorch_model.safetensors"]


def test_dry_run_lists_sizes_before_downloading(hub):
    with weights.planning() as plan:
        weights.resolve("org/pipe", "model")
        weights.resolve("org/files/head.pth", "head")
    weight_gets = [k for k in hub.gets if k.endswith((".safetensors", ".pth"))]
    assert weight_gets == []  # only configs were fetched
    sizes = {f["name"]: f["size"] for entry in plan for f in entry["files"]}
    assert sizes["unet/diffusion_pytorch_model.safetensors"] == 4000
    assert sizes["head.pth"] == 64
    assert sum(sizes.values()) == sum(len(PIPELINE[f]) for f in FULL) + 64
    text = "\n".join(weights.plan_text(plan))
    assert "org/pipe" in text and "to download" in text


def test_pth_converted_once_with_its_sha256_checked(hub):
    calls = []

    def convert(src, out):
        calls.append(src)
        out.write_bytes(open(src, "rb").read())

    path = weights.resolve("org/files/head.pth", "head")
    first = weights.as_safetensors(path, convert, "head")
    assert first.endswith(f"{weights.sha256_of(path)}.safetensors")
    assert weights.as_safetensors(path, convert, "head") == first
    assert len(calls) == 1
    assert weights.resolutions()["org/files/head.pth"]["sha256"] == weights.sha256_of(path)


@pytest.mark.parametrize(
    "given, error, words",
    [
        ("gate/model", weights.GatedWeightError,
         ["gate/model", "gated", "/gate/model", "hf auth login", "HF_TOKEN"]),
        ("org/nothing", weights.MissingWeightError, ["no Hub repository org/nothing"]),
        ("org/pipe@deadbeef", weights.MissingWeightError, ["org/pipe", "no revision 'deadbeef'"]),
        ("org/files/nope.safetensors", weights.MissingWeightError,
         ["org/files", "no file 'nope.safetensors'"]),
        ("org/pipe/nosuchfolder", weights.ConfigError, ["no folder 'nosuchfolder'"]),
    ],
)  # fmt: skip
def test_bad_references_are_one_line(hub, given, error, words):
    with pytest.raises(error) as info:
        weights.resolve(given, "task 'sd' model")
    message = str(info.value)
    assert "\n" not in message and message.startswith("task 'sd' model: ")
    for word in words:
        assert word in message


@pytest.mark.parametrize("given", ["org/pipe", "org/files/head.pth"])
def test_offline_with_nothing_cached_is_one_line(hub, tmp_path, monkeypatch, given):
    point_at(monkeypatch, hub.url, tmp_path / "empty", offline=True)
    with pytest.raises(weights.OfflineWeightError) as info:
        weights.resolve(given, "model")
    message = str(info.value)
    assert "\n" not in message
    assert parse_hub_ref(given).repo in message and "HF_HUB_OFFLINE" in message
    assert sum(hub.requests.values()) == 0


def _default_weights() -> dict[str, str]:
    """Every default weight: the presets' model and lcm, the rewards' dataclass defaults."""
    import dataclasses

    from sqdf.rewards import REWARDS
    from sqdf.rewards.clip_rewards import HPS_COMMIT, HPS_FILES, HPS_REPO
    from sqdf.run.settings import load_preset, preset_names

    found = {}
    for name in preset_names():
        for key, value in load_preset(name).train.get("task_params", {}).items():
            if key in ("model", "lcm"):
                found[f"preset {name} {key}"] = value
    for name, cls in REWARDS.items():
        for f in dataclasses.fields(cls):
            if isinstance(f.default, str) and parse_hub_ref(f.default) and "/" in f.default:
                found[f"reward {name} {f.name}"] = f.default
    for version, file in HPS_FILES.items():
        found[f"reward hpsv2 {version}"] = f"{HPS_REPO}@{HPS_COMMIT}/{file}"
    return found


def test_every_default_weight_is_pinned_and_in_the_docs_table():
    from pathlib import Path

    table = (Path(__file__).resolve().parents[1] / "docs" / "weights.md").read_text()
    defaults = _default_weights()
    assert len(defaults) >= 12
    for where, given in defaults.items():
        ref = parse_hub_ref(given)
        assert ref is not None and weights.COMMIT.fullmatch(ref.revision or ""), where
        assert ref.repo in table and ref.revision in table, where
        if ref.path:
            assert ref.path.split("/")[-1] in table, where


def test_dry_run_offline_lists_what_the_cache_holds(hub, tmp_path, monkeypatch):
    weights.resolve("org/pipe", "model")
    weights.resolve("org/files/head.pth", "head")
    point_at(monkeypatch, hub.url, tmp_path / "hub", offline=True)
    weights.clear()
    before = sum(hub.requests.values())
    with weights.planning() as plan:
        weights.resolve("org/pipe", "model")
        weights.resolve("org/files/head.pth", "head")
    assert sum(hub.requests.values()) == before
    files = {f["name"]: f for entry in plan for f in entry["files"]}
    assert sorted(n for n in files if n != "head.pth") == FULL
    assert all(f["cached"] for f in files.values())
    assert files["unet/diffusion_pytorch_model.safetensors"]["size"] == 4000
    assert files["head.pth"]["size"] == 64


# a processor repository as laion/CLIP-ViT-H-14 holds it: transformers configs and weights, and
# open_clip's own 3.9 GB checkpoint beside them
CLIP_REPO = {
    "config.json": b"{}", "preprocessor_config.json": b"{}", "tokenizer_config.json": b"{}",
    "vocab.json": b"{}", "merges.txt": b"#", "open_clip_config.json": b"{}",
    "model.safetensors": b"m" * 500, "open_clip_model.safetensors": b"o" * 900,
    "open_clip_pytorch_model.bin": b"b" * 900, "pytorch_model.bin": b"p" * 500,
}  # fmt: skip


def test_configs_only_downloads_and_lists_no_weights(hub, tmp_path):
    hub.add_files("org/clip", CLIP_REPO)
    with weights.planning() as plan:
        weights.resolve("org/clip", "reward 'pickscore' processor", configs_only=True)
    assert [f["name"] for f in plan[0]["files"] if not f["name"].endswith(".json")] == [
        "merges.txt"
    ]
    folder = weights.resolve("org/clip", "reward 'pickscore' processor", configs_only=True)
    got = downloaded(tmp_path / "hub", "org/clip")
    assert got == ["config.json", "merges.txt", "preprocessor_config.json",
                   "tokenizer_config.json", "vocab.json"]  # fmt: skip
    # the same repository as a model afterwards: its weights, not the configs-only folder again
    assert weights.resolve("org/clip", "model") == folder
    got = downloaded(tmp_path / "hub", "org/clip")
    assert "model.safetensors" in got and not any(f.startswith("open_clip") for f in got)


def test_offline_from_a_partly_filled_cache_is_one_line(hub, tmp_path, monkeypatch):
    with weights.planning():
        weights.resolve("org/pipe", "model")  # a dry run online caches the configs alone
    point_at(monkeypatch, hub.url, tmp_path / "hub", offline=True)
    weights.clear()
    with pytest.raises(weights.OfflineWeightError) as info:
        weights.resolve("org/pipe", "model")
    assert "\n" not in str(info.value) and "partly" in str(info.value)
    # a download killed after some files: the weights that did arrive are not enough
    point_at(monkeypatch, hub.url, tmp_path / "hub")
    weights.clear()
    folder = weights.resolve("org/pipe", "model")
    (weights.Path(folder) / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    point_at(monkeypatch, hub.url, tmp_path / "hub", offline=True)
    weights.clear()
    with pytest.raises(weights.OfflineWeightError, match="no vae/"):
        weights.resolve("org/pipe", "model")


def test_a_hub_error_falls_back_to_a_full_cache(hub, tmp_path):
    folder = weights.resolve("org/pipe", "model")
    commit = weights.resolutions()["org/pipe"]["commit"]
    hub.max_requests = 0  # from now on every request is answered 429
    weights.clear()
    assert weights.resolve("org/pipe", "model") == folder
    assert weights.resolutions()["org/pipe"]["commit"] == commit
    # nothing cached: one line
    with pytest.raises(weights.ConfigError) as info:
        weights.resolve("org/files/lora.safetensors", "lcm")
    assert "\n" not in str(info.value)


def test_a_commit_whose_files_are_cached_asks_the_hub_nothing(hub):
    commit = hub.repos["org/pipe"].branches["main"]
    weights.resolve(f"org/pipe@{commit}", "model")
    weights.clear()
    before = sum(hub.requests.values())
    weights.resolve(f"org/pipe@{commit}", "model")
    assert sum(hub.requests.values()) == before


@pytest.mark.parametrize(
    "text, ref",
    [
        ("org/name@refs/pr/1", HubRef("org/name", "refs/pr/1")),
        ("org/name@refs%2Fpr%2F12/unet", HubRef("org/name", "refs/pr/12", "unet")),
        ("hf://org/name@refs/convert/3/a.safetensors",
         HubRef("org/name", "refs/convert/3", "a.safetensors")),
    ],
)  # fmt: skip
def test_pull_request_revisions(text, ref):
    assert parse_hub_ref(text) == ref
    assert parse_hub_ref(str(ref)) == ref


@pytest.mark.parametrize("given", ["org/name@refs/pr/1", "org/name@refs%2Fpr%2F1"])
def test_a_pull_request_revision_downloads(hub, given):
    sha = hub.add_files("org/name", {"a.safetensors": b"a" * 64})
    hub.add_files("org/name", {"a.safetensors": b"b" * 64})  # main moves on
    hub.repos["org/name"].branches["refs/pr/1"] = sha
    assert open(weights.resolve(f"{given}/a.safetensors", "lcm"), "rb").read() == b"a" * 64
    folder = weights.resolve(given, "model")
    assert weights.resolutions()[given]["commit"] == sha
    assert open(f"{folder}/a.safetensors", "rb").read() == b"a" * 64


@pytest.mark.parametrize("given", ["org/a--b", "org/name..x", "org/x.git/f.safetensors"])
def test_ids_the_hub_refuses_are_one_line(given):
    assert parse_hub_ref(given) is None
    with pytest.raises(weights.ConfigError) as info:
        weights.resolve(given, "model")
    assert "\n" not in str(info.value) and "not a valid repository id" in str(info.value)


def test_a_download_cut_on_every_try_is_one_line(hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda s: None)
    hub.cut_always.add("org/files/lora.safetensors")
    with pytest.raises(weights.SqdfError) as info:
        weights.resolve("org/files/lora.safetensors", "lcm")
    message = str(info.value)
    assert "\n" not in message and "interrupted" in message and "run again" in message
    hub.cut_always.add("org/pipe/unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(weights.SqdfError, match="interrupted"):
        weights.resolve("org/pipe", "model")


def test_a_connection_cut_mid_file_resumes_with_a_range_request(hub, monkeypatch):
    # huggingface_hub writes what it receives in chunks (10 MB on the real Hub) and asks again
    # from the end of the last whole chunk: chunks of 1 kB make that visible on a 4 kB file
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 1000)
    monkeypatch.setattr("huggingface_hub.file_download.time.sleep", lambda s: None)
    key = "org/pipe/unet/diffusion_pytorch_model.safetensors"
    hub.cut.add(key)
    folder = weights.resolve("org/pipe", "model")
    assert [r for k, r in hub.ranges if k == key] == [None, "bytes=2000-"]
    data = open(f"{folder}/unet/diffusion_pytorch_model.safetensors", "rb").read()
    assert data == PIPELINE["unet/diffusion_pytorch_model.safetensors"]


def test_a_file_is_hashed_once_and_a_tampered_one_refused(hub, monkeypatch):
    import os

    path = weights.resolve("org/files/head.pth", "head")
    assert weights.resolutions()["org/files/head.pth"]["sha256"] == weights.sha256_of(path)
    calls = []
    real = weights.sha256_of
    monkeypatch.setattr(weights, "sha256_of", lambda p: calls.append(p) or real(p))
    weights.clear()
    weights.resolve("org/files/head.pth", "head")
    weights.as_safetensors(path, lambda src, out: out.write_bytes(b"x"), "head")
    assert calls == []  # remembered from the first resolve
    blob = os.path.realpath(path)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as fh:  # the same size, other bytes: an altered cached file
        fh.write(b"1")
    weights.clear()
    with pytest.raises(weights.ConfigError) as info:
        weights.resolve("org/files/head.pth", "reward 'aesthetic' head")
    message = str(info.value)
    assert "\n" not in message and "sha256" in message and "damaged or altered" in message


def test_a_run_pins_by_repository_and_path(hub):
    first = hub.repos["org/files"].branches["main"]
    second = hub.add_files("org/files", {"lora.safetensors": b"2" * 64, "head.pth": b"0" * 64})
    hub.repos["org/files"].branches["v2"] = second
    # the run gave a default pinned to the first commit
    weights.pin({f"org/files@{first}/lora.safetensors": {"commit": first, "revision": first}})
    one = b"1" * 64
    assert open(weights.resolve("org/files/lora.safetensors", "lcm"), "rb").read() == one
    # a later sqdf whose default names the second commit: the run's
    bumped = weights.resolve(f"org/files@{second}/lora.safetensors", "lcm")
    assert open(bumped, "rb").read() == one
    assert weights.resolutions()[f"org/files@{second}/lora.safetensors"]["commit"] == first
    # a branch the caller names is the caller's
    assert open(weights.resolve("org/files@v2/lora.safetensors", "lcm"), "rb").read() == b"2" * 64


def test_a_missing_local_path_is_not_sent_to_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sd" / "final").mkdir(parents=True)
    with pytest.raises(weights.ConfigError) as info:
        weights.resolve("runs/sd/finl", "sqdf sample --lora")  # a typo
    message = str(info.value)
    assert "\n" not in message and "local path not found: runs/sd/finl" in message
    assert sum(hub.requests.values()) == 0
    assert weights.resolve("runs/sd/final", "lora") == "runs/sd/final"


@pytest.mark.parametrize("given", ["datasets/org/name", "hf://spaces/org/app/model.safetensors"])
def test_datasets_and_spaces_are_one_line(hub, given):
    with pytest.raises(weights.ConfigError) as info:
        weights.resolve(given, "model")
    assert "\n" not in str(info.value) and "model repositories" in str(info.value)
    assert sum(hub.requests.values()) == 0


def test_every_gated_default_is_said_gated_in_the_readme_and_its_presets():
    from pathlib import Path

    from sqdf.run.settings import load_preset, preset_names

    root = Path(__file__).resolve().parents[1]
    rows = [ln for ln in (root / "docs" / "weights.md").read_text().splitlines()
            if ln.startswith("| ") and ln.rstrip().rstrip("|").split("|")[-1].strip()
            .startswith("**yes**")]  # fmt: skip
    gated = {ln.split("|")[3].split("`")[1] for ln in rows}  # the repository column
    assert "black-forest-labs/FLUX.1-schnell" in gated
    readme = " ".join((root / "README.md").read_text().split())
    names = {"stabilityai/stable-diffusion-3.5-medium": "SD 3.5 Medium",
             "black-forest-labs/FLUX.1-dev": "FLUX.1 [dev]",
             "black-forest-labs/FLUX.1-schnell": "FLUX.1 [schnell]"}  # fmt: skip
    sentence = readme[readme.index("SD 3.5 Medium") :].split("are gated")[0]
    for repo in gated:
        assert names[repo] in sentence, repo
    for name in preset_names():
        preset = load_preset(name)
        params = preset.train.get("task_params", {})
        for key in ("model", "lcm"):
            ref = parse_hub_ref(str(params.get(key, "")))
            if ref is not None and ref.repo in gated:
                notes = " ".join(str(getattr(preset, "notes", "")).split())
                assert ref.repo in notes and "gated" in notes, (name, key)
