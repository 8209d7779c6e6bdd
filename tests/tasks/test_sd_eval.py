"""Held-out evaluation of sd runs (sqdf.evaluation.heldout): prompts the run did not train on,
cross-rewards, diversity within a prompt, the Fréchet distance to the reference, eval.md."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sqdf.cli import main
from sqdf.errors import ConfigError
from sqdf.evaluation.evaluate import evaluate_run
from sqdf.tasks import build_task
from sqdf.tasks.sd_prompts import ANIMALS, ANIMALS_HELDOUT
from sqdf.tasks.sd_random import write_random_sd
from sqdf.tasks.sd_text import encode_prompts
from sqdf.training.trainer import train
from tests.tasks.sd_runs import (
    held_out_drawn_again,
    held_out_numbers_are_the_images,
    sd_config,
    sd_pipeline,
    write_tiny_parts,
)

# a user's rewards: the index of the prompt in PROMPTS (tells whether each image is scored
# with its own prompt) and the mean brightness
USER_REWARDS = """
import torch
PROMPTS = []

def prompt_index(images, prompts):
    return torch.tensor([float(PROMPTS.index(p)) for p in prompts])

def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))
"""


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_tiny_parts(tmp_path_factory.mktemp("sd_eval"))


@pytest.fixture(scope="module")
def run(parts, tmp_path_factory):
    """A 2-update run on the varied prompts."""
    return train(sd_config(parts / "sd", parts), tmp_path_factory.mktemp("run") / "r",
                 progress=False)  # fmt: skip


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "sd_eval_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import sd_eval_rewards

    yield sd_eval_rewards
    sys.modules.pop("sd_eval_rewards", None)


def test_the_held_out_animals_are_not_trained_on():
    assert len(ANIMALS_HELDOUT) == 8 and not set(ANIMALS_HELDOUT) & set(ANIMALS)


def test_added_prompts_are_encoded_as_the_pipeline_does_and_never_drawn(parts):
    task = build_task(sd_config(parts / "sd", parts, task_params={"negative_prompt": "blurry"}))
    trained = len(task.prompts)
    first = task.prompts[0]
    cond = task.add_prompts([("a held-out owl", None), (first, None), ("a crab", "dark")])
    assert cond.tolist() == [trained, 0, trained + 1]
    again = task.add_prompts([("a crab", "dark"), ("a crab", None)])
    assert again.tolist() == [trained + 1, trained + 2]  # a new negative is a new row
    pipe = sd_pipeline(parts / "sd")
    pos, neg = pipe.encode_prompt(["a held-out owl", "a crab"], "cpu", 1, True, ["blurry", "dark"])
    rows = torch.tensor([trained, trained + 1])
    torch.testing.assert_close(task.text.embeds[rows], pos)
    torch.testing.assert_close(task.text.rows(rows, negative=True)[0], neg)
    drawn = task.sample_conditions(4000, torch.Generator().manual_seed(0))
    assert int(drawn.max()) == trained - 1 and task.prompts_of(cond[:1]) == ["a held-out owl"]


def test_extended_conditioning_keeps_sdxl_pooled_rows_and_negatives(tmp_path):
    from sqdf.tasks.sd_family import family_of

    write_random_sd(tmp_path / "xl", "tiny-xl")
    family = family_of(tmp_path / "xl")
    (a,) = encode_prompts(
        family, tmp_path / "xl", ["a cat", "a dog"], ["", ""], "cpu", torch.float32
    )
    (b,) = encode_prompts(family, tmp_path / "xl", ["an owl"], ["grey"], "cpu", torch.float32)
    both = a.extended(b)
    (whole,) = encode_prompts(family, tmp_path / "xl", ["a cat", "a dog", "an owl"],
                              ["", "", "grey"], "cpu", torch.float32)  # fmt: skip
    cond = torch.tensor([0, 1, 2])
    for negative in (False, True):
        for ours, theirs in zip(both.rows(cond, negative=negative),
                                whole.rows(cond, negative=negative), strict=True):  # fmt: skip
            torch.testing.assert_close(ours, theirs)


def test_a_policy_equal_to_the_reference_scores_as_the_reference(parts, tmp_path, user_rewards):
    run = train(sd_config(parts / "sd", parts, steps=1), tmp_path / "run", progress=False)
    weights = load_file(str(run / "final" / "policy.safetensors"))
    zeroed = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}
    save_file(zeroed, str(run / "final" / "policy.safetensors"))  # the policy is the reference
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("an owl\na crab\nan octopus\na koala\na panda\n")
    user_rewards.PROMPTS[:] = ["an owl", "a crab", "an octopus", "a koala", "a panda"]
    metrics = evaluate_run(
        run, prompts=str(prompts), per_prompt=2,  # 10 images: chunks of 8 and 2
        rewards={"sd_eval_rewards:prompt_index": {}, "sd_eval_rewards:brightness": {}},
    )  # fmt: skip
    assert metrics["kl_path"] == 0.0 and metrics["num_samples"] == 10
    assert metrics["reward_mean"] == metrics["ref_reward_mean"]
    assert metrics["eval_diversity"] == metrics["ref_eval_diversity"] > 0
    assert metrics["frechet_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["diversity_features"].startswith("CLIP image features (of reward aesthetic")
    rows = metrics["per_prompt"]
    assert [r["prompt"] for r in rows] == user_rewards.PROMPTS
    # every image was scored with its own prompt, two images per prompt
    assert [r["rewards"]["sd_eval_rewards:prompt_index"]["fine_tuned"] for r in rows] == [
        0.0, 1.0, 2.0, 3.0, 4.0
    ]  # fmt: skip
    for r in rows:
        for scores in r["rewards"].values():
            assert scores["fine_tuned"] == scores["reference"]
    assert set(metrics["rewards"]) == {
        "aesthetic", "sd_eval_rewards:prompt_index", "sd_eval_rewards:brightness"
    }  # fmt: skip
    assert metrics["rewards"]["aesthetic"]["trained"]
    assert metrics["rewards"]["sd_eval_rewards:prompt_index"]["mean"] == 2.0
    assert metrics["trained_prompts_among_them"] == []
    text = (run / "eval.md").read_text()
    (koala,) = [line for line in text.splitlines() if line.startswith("| a koala |")]
    assert "| 3 → 3 |" in koala and "| path KL | 0 | 0 |" in text
    assert json.loads((run / "eval.json").read_text())["per_prompt"] == rows


def test_per_prompt_numbers_are_the_means_of_their_own_images(parts, run, user_rewards):
    """The held-out numbers against a direct computation: the same noise through the task's
    own sampler, the run's reward and a user's brightness reward on the decoded images."""
    brightness = {"sd_eval_rewards:brightness": {}}
    metrics = evaluate_run(run, per_prompt=3, seed=7, rewards=brightness, clip=str(parts / "clip"))
    again = held_out_drawn_again(run, 3, 7)  # parts/clip is the reward's own CLIP
    held_out_numbers_are_the_images(metrics, again)
    bright = again["images"].mean(dim=(1, 2, 3))
    for i, row in enumerate(metrics["per_prompt"]):
        assert row["rewards"]["sd_eval_rewards:brightness"]["fine_tuned"] == pytest.approx(
            float(bright[3 * i : 3 * i + 3].mean()), rel=1e-5
        )
    assert metrics["diversity_features"].startswith("CLIP image")
    assert metrics["num_prompts"] == 8 and metrics["prompts"] == "animals-heldout"


def test_cli_eval_with_cross_rewards_writes_eval_json_and_md(parts, run, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(parts))  # ~ after NAME.KEY= is not the shell's to expand
    argv = ["eval", str(run), "--rewards", "pickscore,clipscore", "--reward-param",
            "pickscore.model=~/clip", "--reward-param", "pickscore.processor=~/clip",
            "--reward-param", f"clipscore.model={parts / 'clip'}", "--per-prompt", "2",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert '"per_prompt"' not in out and "eval.md" in out
    metrics = json.loads((run / "eval.json").read_text())
    assert set(metrics["rewards"]) == {"aesthetic", "pickscore", "clipscore"}
    assert all(set(r["rewards"]) == set(metrics["rewards"]) for r in metrics["per_prompt"])
    assert "pickscore ref → ft" in (run / "eval.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reward-param", "pickscore.model=x"], "reward 'pickscore' is not in --rewards"),
        # KEY=VALUE without a NAME is the run's own reward's (as in train)
        (
            ["--rewards", "pickscore", "--reward-param", "model=x"],
            "unknown parameter 'model' for reward 'aesthetic'",
        ),
        (["--rewards", "pickscore"], "PickScore_v1@a4e4367c6dfa7288a00c550414478f865b875800 is"),
        (["--rewards", "imagereward"], "THUDM/ImageReward/ImageReward.pt is not in the Hub cache"),
        (["--rewards", "classifier"], "reward 'classifier' scores image samples, not what the sd"),
        (["--rewards", "linear"], "reward 'linear' scores points samples, not what the sd task"),
        (["--per-prompt", "1"], "images per prompt must be >= 2"),
        (["--num-samples", "4"], "evaluated per prompt: give --per-prompt"),
        (["--prompts", "no-such-set"], "neither a built-in set"),
        (["--clip", "/no/such/clip"], "--clip '/no/such/clip' is not a model folder"),
    ],
)
def test_bad_eval_options_are_one_line(run, capsys, argv, message):
    assert main(["eval", str(run), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_digits_runs_take_cross_rewards_but_not_prompts(tmp_path, capsys):
    from sqdf.run.settings import config_for

    run = train(config_for("digits", steps=1, batch_size=4, num_steps=4), tmp_path / "d",
                progress=False)  # fmt: skip
    metrics = evaluate_run(run, num_samples=20, rewards={"ink": {}, "classifier": {}})
    assert set(metrics["rewards"]) == {"classifier"}  # ink, the trained one, is top-level
    assert metrics["rewards"]["classifier"]["trained"] is False
    assert metrics["rewards"]["classifier"]["mean"] <= 0  # a log-probability
    with pytest.raises(ConfigError, match="--prompts is for sd runs"):
        evaluate_run(run, num_samples=20, prompts="animals")
    with pytest.raises(ConfigError, match="scores rgb samples, not what the digits task makes"):
        evaluate_run(run, num_samples=20, rewards={"clipscore": {"model": "x"}})


def _metric_weights(root):
    """Random weights of the three metric packages' own networks, in their public files' layouts."""
    from sqdf.evaluators.fid import WEIGHTS_FILE
    from sqdf.evaluators.lpips import TRUNK_FILE
    from tests.evaluators.metric_weights import (
        random_alexnet,
        write_random_dreamsim,
        write_random_inception,
    )

    torch.save(random_alexnet(seed=0), root / TRUNK_FILE)
    return (
        root / TRUNK_FILE,
        write_random_dreamsim(root / "dreamsim"),
        write_random_inception(root / WEIGHTS_FILE),
    )


def test_lpips_dreamsim_and_fid_are_recomputed_from_the_images(parts, tmp_path, monkeypatch):
    """sqdf eval with the three image metrics against their definitions on the same images drawn
    again: LPIPS by the float64 reference, DreamSim by the package's own forward per pair, FID by
    torch-fidelity's network and the Fréchet distance."""
    import itertools

    from dreamsim import dreamsim
    from torchvision.transforms.functional import to_pil_image

    from sqdf.evaluation.evaluate import load_run
    from sqdf.evaluation.heldout import FID_LABEL
    from sqdf.sampling.sampler import sample_in_chunks
    from tests.evaluators.metric_weights import (
        offline,
        package_lins,
        random_alexnet,
        reference_fid,
        reference_lpips,
    )

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    alexnet, folder, inception = _metric_weights(tmp_path)
    config = sd_config(parts / "sd", parts, steps=1, task_params={"resolution": 32})
    run = train(config, tmp_path / "run", progress=False)  # 32 px: LPIPS needs 31 or more
    prompts = tmp_path / "p.txt"
    prompts.write_text("an owl\na crab\n")
    argv = ["eval", str(run), "--prompts", str(prompts), "--per-prompt", "3", "--lpips",
            str(alexnet), "--dreamsim", str(folder), "--dreamsim-type", "clip_vitb32", "--fid",
            str(inception), "--no-progress"]  # fmt: skip
    with offline():  # nothing is downloaded
        assert main(argv) == 0
    metrics = json.loads((run / "eval.json").read_text())
    text = (run / "eval.md").read_text()
    assert all(f"| {label} |" in text for label in ("LPIPS diversity", "DreamSim diversity",
                                                    FID_LABEL))  # fmt: skip
    assert str(inception) in metrics["fid"] and "reference model's images" in metrics["fid"]
    assert "clip_vitb32" in metrics["dreamsim"] and str(alexnet) in metrics["lpips"]

    task = load_run(run)
    cond = task.add_prompts([("an owl", None), ("a crab", None)]).repeat_interleave(3)
    ft = task.decode_batches(sample_in_chunks(task, 6, 1234, cond=cond, with_kl=True).x0)
    ref = task.decode_batches(sample_in_chunks(task, 6, 1234, cond=cond, policy=False).x0)
    state = {**random_alexnet(seed=0), **package_lins()}
    model, preprocess = dreamsim(pretrained=True, device="cpu", cache_dir=str(folder),
                                 dreamsim_type="clip_vitb32")  # fmt: skip
    pairs = list(itertools.combinations(range(3), 2))
    for p, row in enumerate(metrics["per_prompt"]):
        for key, images in (("lpips_diversity", ft), ("ref_lpips_diversity", ref)):
            x = images[3 * p : 3 * p + 3]
            lpips = [float(reference_lpips(state, x[i : i + 1], x[j : j + 1])) for i, j in pairs]
            assert row[key] == pytest.approx(sum(lpips) / 3, rel=1e-4), key
        x = [preprocess(to_pil_image(image)) for image in ref[3 * p : 3 * p + 3]]
        with torch.no_grad():
            sims = [float(model(x[i], x[j])) for i, j in pairs]
        assert row["ref_dreamsim_diversity"] == pytest.approx(sum(sims) / 3, rel=1e-4)
        assert row["dreamsim_diversity"] > 0
    assert metrics["lpips_diversity"] == pytest.approx(
        sum(r["lpips_diversity"] for r in metrics["per_prompt"]) / 2
    )
    # One update barely moves the images: the FID is about 1e-4, so float32 round-off of the
    # order-one features (about 1e-7 each) is compared in absolute terms; test_fid checks a
    # large FID to 1e-4 relative.
    fid = reference_fid(inception, ft, ref)
    assert fid > 1e-5
    assert metrics["fid_inception_to_reference"] == pytest.approx(fid, rel=1e-3, abs=1e-6)


def test_lpips_on_images_too_small_names_their_size(run, tmp_path, capsys):
    path = tmp_path / "alexnet.pth"
    path.write_bytes(b"")  # not read: the size is checked first
    assert main(["eval", str(run), "--lpips", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "16" in err and "31" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "flag, module, package",
    [("--lpips", "lpips", "lpips"), ("--dreamsim", "dreamsim", "dreamsim"),
     ("--fid", "torch_fidelity", "torch-fidelity"), ("--fid", "torchmetrics", "torchmetrics")],
)  # fmt: skip
def test_a_metric_without_its_package_names_the_extra(run, monkeypatch, capsys, flag, module,
                                                       package):  # fmt: skip
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert main(["eval", str(run), flag, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"needs the {package} package: pip install 'sqdf[metrics]'" in err
    assert len(err.splitlines()) == 1


def test_evaluation_guide_held_out_block_runs_on_tiny_parts(parts, tmp_path, monkeypatch):
    """The page's commands as written: the cross-rewards' default weights from a stand-in Hub
    (tiny CLIPs at the pinned commits), LPIPS's AlexNet from torchvision's own cache (a random
    one put there; no download is allowed)."""
    from sqdf.evaluators.lpips import TRUNK_FILE
    from sqdf.rewards.clip_rewards import CLIP_L14, PICKSCORE, PICKSCORE_PROCESSOR
    from tests.evaluators.metric_weights import offline, random_alexnet
    from tests.tasks.sd_runs import doc_lines, run_doc_lines

    lines = doc_lines("docs/guides/evaluation.md", "sqdf eval runs/sd --rewards pickscore")
    monkeypatch.chdir(tmp_path)
    config = sd_config(parts / "sd", parts, steps=1, task_params={"resolution": 32})
    train(config, tmp_path / "runs" / "sd", progress=False)  # 32 px: LPIPS needs 31 or more
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / TRUNK_FILE
    cached.parent.mkdir(parents=True)
    torch.save(random_alexnet(seed=0), cached)  # where torchvision keeps what it fetched
    repos = {PICKSCORE: parts / "clip", PICKSCORE_PROCESSOR: parts / "clip",
             CLIP_L14: parts / "clip"}  # fmt: skip
    with offline():
        run_doc_lines(lines, repos, tmp_path, monkeypatch)
    metrics = json.loads((tmp_path / "runs/sd/eval.json").read_text())
    assert set(metrics["rewards"]) == {"aesthetic", "pickscore", "clipscore"}
    assert metrics["lpips_diversity"] > 0 and metrics["images_per_prompt"] == 4
    assert "<h3>Per prompt</h3>" in (tmp_path / "runs/sd/report.html").read_text()


def test_compare_on_sd_scores_best_of_n_on_the_held_out_prompts_too(parts, tmp_path):
    from sqdf.experiments.compare import best_of_n, compare
    from tests.tasks.sd_runs import sd_settings

    base = sd_settings(parts / "sd", parts)
    metrics = best_of_n(base, 2, None, 0)
    assert metrics["reward_evals"] == 8 * 4 * 2  # 8 held-out prompts, 4 images, 2 candidates
    assert metrics["reward_mean"] >= metrics["ref_reward_mean"]
    assert {"eval_diversity", "frechet_to_reference"} <= set(metrics)
    with pytest.raises(ConfigError, match="--num-samples is for gmm2d and digits"):
        compare(base, ["sqdf"], 1, tmp_path / "c", num_samples=8, progress=False)
