"""What the SD 1.5, SDXL, SD 3 and FLUX tests share: the settings of a tiny sd run, running
a docs block of sd commands on tiny parts laid out under the names the docs use, and the
checks every transformer family passes."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from sqdf.cli import main
from sqdf.config.train_config import TrainConfig
from sqdf.run.settings import make_config
from tests.doc_commands import doc_block

# the docs' commands made small enough for a test
QUICK = {
    "train": ["--num-steps", "3", "--steps", "2", "--batch-size", "2", "--grad-accum", "1",
              "--device", "cpu", "--no-progress"],
    "sample": ["--num-samples", "2", "--num-steps", "2", "--device", "cpu"],
}  # fmt: skip


def write_tiny_parts(root: Path, preset: str = "tiny") -> Path:
    """``root/sd`` (a random pipeline of ``preset``), ``root/clip`` and the aesthetic head
    as ``root/head.pth`` and ``root/head.safetensors``: what sd_settings(root / "sd", root)
    reads."""
    from sqdf.rewards.clip_rewards import convert_aesthetic_head
    from sqdf.tasks.sd_random import write_random_aesthetic_head, write_random_clip, write_random_sd

    write_random_sd(root / "sd", preset)
    write_random_clip(root / "clip")
    write_random_aesthetic_head(root / "head.pth", in_dim=16)
    convert_aesthetic_head(root / "head.pth", root / "head.safetensors")
    return root


def sd_settings(model: Path, parts: Path, **over: Any) -> dict[str, Any]:
    """A 4-step, 2-update sd run on ``model`` with the aesthetic reward of ``parts`` (its
    clip/ and head.safetensors); ``over`` replaces keys, task_params merge."""
    values = {
        "task": "sd", "device": "cpu", "num_steps": 4, "batch_size": 2, "steps": 2,
        "grad_accum": 1, "buffer": "uniform", "buffer_size": 8, "estimator": "tweedie",
        "lr": 1e-2,
        "task_params": {"model": str(model), "prompts": "varied", "guidance": 3.0},
        "reward_params": {"clip": str(parts / "clip"), "head": str(parts / "head.safetensors")},
    }  # fmt: skip
    for key, value in over.items():
        values[key] = {**values[key], **value} if key == "task_params" else value
    return values


def sd_config(model: Path, parts: Path, **over: Any) -> TrainConfig:
    return make_config(sd_settings(model, parts, **over), source="test")


def sd_pipeline(model: Path) -> Any:
    """The plain diffusers pipeline of ``model``'s family, loaded as a user would."""
    from sqdf.tasks.sd_family import family_of

    return family_of(model).pipeline_class().from_pretrained(str(model), local_files_only=True)


def doc_lines(page: str, marker: str) -> list[str]:
    """The lines of the one bash block on ``page`` that contains ``marker``."""
    return doc_block(page, marker).strip().splitlines()


def reward_defaults(parts: Path) -> dict[str, Path]:
    """The aesthetic reward's default weights (its CLIP and head), as Hub references pinned to
    their commits, served from ``parts``' clip/ and head.pth."""
    from sqdf.rewards.clip_rewards import AESTHETIC_HEAD, CLIP_L14

    return {CLIP_L14: parts / "clip", AESTHETIC_HEAD: parts / "head.pth"}


def publish(hub: Any, given: str, source: Path) -> None:
    """Serve ``source`` on the stand-in ``hub`` as the Hub reference ``given`` names it: a
    folder as the repository (or its subfolder), a file as the one file the reference names;
    at the pinned commit, else as the head of main."""
    from sqdf.infra import weights

    ref = weights.parse_hub_ref(given)
    assert ref is not None, given
    known = hub.repos.get(ref.repo)
    if known is not None and (ref.revision in known.commits or ref.revision is None):
        return
    if source.is_dir():
        prefix = "" if ref.path is None or ref.is_file else f"{ref.path}/"
        files = {prefix + p.relative_to(source).as_posix(): p.read_bytes()
                 for p in sorted(source.rglob("*")) if p.is_file()}  # fmt: skip
    else:
        assert ref.is_file, given
        files = {ref.path: source.read_bytes()}
    hub.add_files(ref.repo, files, commit=ref.revision)


def run_doc_lines(
    lines: list[str], repos: dict[str, Path], tmp_path: Path, monkeypatch: Any, *,
    extra: dict[str, list[str]] | None = None,
) -> None:  # fmt: skip
    """Run the sqdf commands ``lines`` in ``tmp_path`` as written (shrunk by QUICK, then
    ``extra`` per subcommand), their Hub references served by a stand-in Hub on 127.0.0.1 from
    ``repos`` (reference -> tiny part: see ``publish``) into an empty cache."""
    from sqdf.infra import weights
    from tests.hub_standin import StandInHub, point_at, serve

    hub = StandInHub()
    for given, source in repos.items():
        publish(hub, given, source)
    weights.clear()
    try:
        with serve(hub) as url:
            point_at(monkeypatch, url, tmp_path / "hub-cache" / "hub")
            for line in lines:
                argv = shlex.split(line)
                assert argv[0] == "sqdf", line
                more = QUICK.get(argv[1], []) + (extra or {}).get(argv[1], [])
                assert main(argv[1:] + more) == 0, line
    finally:
        weights.clear()


def every_method_runs_through_compare(base: dict[str, Any], tmp_path: Path) -> None:
    """Every method and best-of-N, one update each, on the sd run ``base`` with a held-out
    prompts file: none diverges, every reward is a number (base's batch must hold a grpo
    group)."""
    import json

    from sqdf.experiments.compare import compare
    from sqdf.methods import METHODS

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("an owl\na crab\n")
    base = {**base, "task_params": {**base["task_params"], "eval_prompts": str(held_out)}}
    out = compare(base, [*METHODS, "best_of_n"], 1, tmp_path / "cmp", best_of=2, progress=False)
    runs = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert all("diverged" not in r and r["reward_mean"] == r["reward_mean"] for r in runs.values())
    assert all(runs[m]["updates"] == 1 for m in METHODS)


def checkpointing_keeps_the_gradient(config_of: Any, steps: tuple[int, int] = (0, 2)) -> None:
    """The SQDF loss's LoRA gradient on an sd run with and without gradient checkpointing
    (``config_of(checkpointing) -> TrainConfig``), on the cells of ``steps``: the same."""
    import torch

    from sqdf.methods import METHODS, build_method_params
    from sqdf.sampling.buffer import Cells
    from sqdf.sampling.sampler import sample_trajectories
    from sqdf.tasks import build_task

    grads = []
    for checkpointing in (False, True):
        cfg = config_of(checkpointing)
        torch.manual_seed(0)  # peft draws the LoRA's A matrices
        task = build_task(cfg)
        with torch.no_grad():
            for name, p in task.denoiser.named_parameters():
                if ".default." in name and "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        traj = sample_trajectories(task, 2, torch.Generator().manual_seed(1))
        k, rows = torch.tensor(steps), torch.arange(2)
        cells = Cells(x_t=traj.states[rows, k], x_next=traj.states[rows, k + 1], step=k,
                      cond=traj.cond, reward=torch.zeros(2), index=rows)  # fmt: skip
        loss, _ = METHODS["sqdf"].loss(task, cells, cfg, build_method_params("sqdf", {}),
                                       torch.Generator().manual_seed(2))  # fmt: skip
        loss.backward()
        named = task.denoiser.named_parameters()
        grads.append({n: p.grad.clone() for n, p in named if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def distilled_x0_is_one_call(task: Any, velocity: Any, *, reference: bool = False) -> None:
    """A flow family's consistency estimator: x̂0 = x - t v, v the distilled model's own
    pipeline's transformer call (``velocity(x, sigma, pos, pooled)``), with a finite,
    non-zero gradient in x; with ``reference``, the distilled model is the base itself and
    x̂0 is the reference's Tweedie one, else it is another."""
    import torch

    x = torch.randn((2, *task.sample_shape), generator=torch.Generator().manual_seed(3))
    k, cond = torch.tensor([0, 2]), torch.tensor([1, 3])
    sigma = task.kernel.model_time(k)
    # a distilled model's own encoding of the prompts where it has one (FLUX.1 schnell's
    # 256 T5 tokens under FLUX.1-dev)
    pos, pooled = (getattr(task, "distilled_text", None) or task.text).rows(cond)
    want = x - sigma.view(-1, 1, 1, 1) * velocity(x, sigma, pos, pooled)
    x_grad = x.clone().requires_grad_()
    got = task.consistency_x0(x_grad, sigma, cond)
    torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        tweedie = task.reference_x0(x, k, cond)
    assert torch.allclose(got.detach(), tweedie, rtol=1e-4, atol=1e-5) == reference
    got.square().sum().backward()
    assert bool(torch.isfinite(x_grad.grad).all()) and float(x_grad.grad.abs().sum()) > 0


def copy_model(parts: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the tiny model folder ``parts/name`` to edit."""
    import shutil

    model = tmp_path / name
    shutil.copytree(parts / name, model)
    return model


def edit_json(path: Path, **changes: Any) -> None:
    """``path``'s JSON object with ``changes`` over it."""
    import json

    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def reloaded_lora_matches_the_run(
    pipe: Any, task: Any, final: Path, velocity: Any, image: Any, x: Any, side: int
) -> None:
    """A plain pipeline ``pipe`` before and after ``load_lora_weights(final)``: its transformer
    output (``velocity(pipe, x, sigma, pos, pooled)``) equals the run's reference, then its
    policy, and its rendered ``image()`` changes."""
    import torch

    sigma, cond = task.kernel.model_time(torch.tensor([0, 3])), torch.tensor([1, 2])
    pos, pooled = task.text.rows(cond)
    before, before_image = velocity(pipe, x, sigma, pos, pooled), image()
    pipe.load_lora_weights(str(final))
    after, after_image = velocity(pipe, x, sigma, pos, pooled), image()
    with torch.no_grad():
        ours = task.model_output(x, sigma, cond, policy=True)
        ours_ref = task.model_output(x, sigma, cond, policy=False)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(before, ours_ref, rtol=1e-4, atol=1e-5)  # adapter off
    assert after_image.shape == (1, 3, side, side) and torch.isfinite(after_image).all()
    assert not torch.allclose(before_image, after_image)


def held_out_drawn_again(run: Path, per_prompt: int, seed: int) -> dict[str, Any]:
    """The held-out evaluation of ``run`` drawn again outside sqdf.evaluation.heldout: the run's
    eval prompts, ``per_prompt`` images each, from the same noise through the task's own sampler
    for the policy and the reference, decoded, scored by the run's reward called directly,
    with the path KL and the reward's CLIP image features of each image.

    # images: (N, 3, H, W); kl, reward: (N,); features: (N, D); N = prompts * per_prompt
    """
    import torch

    from sqdf.evaluation.evaluate import load_run
    from sqdf.sampling.sampler import sample_in_chunks
    from sqdf.tasks.sd_prompts import load_prompt_pairs

    task = load_run(run)
    pairs = load_prompt_pairs(task.options.eval_prompts)
    cond = task.add_prompts(pairs).repeat_interleave(per_prompt)
    traj = sample_in_chunks(task, len(cond), seed, cond=cond, with_kl=True)
    ref = sample_in_chunks(task, len(cond), seed, cond=cond, policy=False)
    out: dict[str, Any] = {"prompts": [p for p, _ in pairs], "kl": traj.kl.sum(dim=1)}
    for side, x0 in (("", traj.x0), ("ref_", ref.x0)):
        images = task.decode_batches(x0)
        with torch.no_grad():
            out[f"{side}reward"] = task.reward_model(images, task.reward_conditions(cond))
            out[f"{side}features"] = task.reward_model.clip_model.image_features(images)
        out[f"{side}images"] = images
    return out


def held_out_numbers_are_the_images(metrics: dict[str, Any], again: dict[str, Any]) -> None:
    """``metrics`` (sqdf eval of an sd run) against its images drawn again
    (:func:`held_out_drawn_again`): per prompt, the trained reward's means on each side, the
    path KL and the diversity of the prompt's own images; over all, the reward means, the
    KL and the Fréchet distance of the features."""
    import pytest
    import torch

    from sqdf.evaluators.feature_stats import frechet_distance, mean_pairwise_distance

    def close(value: Any) -> Any:
        return pytest.approx(float(value), rel=1e-4, abs=1e-6)

    per_prompt = len(again["kl"]) // len(again["prompts"])
    name = metrics["reward"]
    assert [r["prompt"] for r in metrics["per_prompt"]] == again["prompts"]
    for i, row in enumerate(metrics["per_prompt"]):
        part = slice(per_prompt * i, per_prompt * (i + 1))
        assert row["rewards"][name]["fine_tuned"] == close(again["reward"][part].mean())
        assert row["rewards"][name]["reference"] == close(again["ref_reward"][part].mean())
        assert row["kl_path"] == close(again["kl"][part].mean())
        assert row["diversity"] == close(mean_pairwise_distance(again["features"][part]))
        assert row["ref_diversity"] == close(mean_pairwise_distance(again["ref_features"][part]))
    assert metrics["reward_mean"] == close(again["reward"].mean())
    assert metrics["ref_reward_mean"] == close(again["ref_reward"].mean())
    assert metrics["kl_path"] == close(again["kl"].mean()) and metrics["kl_path"] > 0
    assert metrics["frechet_to_reference"] == pytest.approx(
        frechet_distance(again["features"], again["ref_features"]), rel=1e-3, abs=1e-6
    )
    # the two sides differ, so a swap of policy and reference would show
    assert not torch.allclose(again["features"], again["ref_features"])
