"""``sqdf demo``: fine-tune the embedded digits model with SQDF and, from the same start, seed
and number of updates, with a KL-free reward-gradient baseline; explain the result in one
self-contained page (report.html) that opens on the two beside the reference."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import torch

from sqdf.assets.digits_data import NUM_CLASSES
from sqdf.config.train_config import TrainConfig
from sqdf.errors import ConfigError
from sqdf.evaluation.evaluate import evaluate_run, load_run, sample_reference
from sqdf.evaluation.run_report import EVAL_TABLES, write_run_report
from sqdf.evaluation.x0_quality import x0_estimator_quality
from sqdf.infra.report import figure_png, file_png, pyplot, save_digit_grid
from sqdf.run.folder import read_metrics, read_run_config
from sqdf.run.settings import config_for
from sqdf.sampling.sampler import sample_trajectories, samples_from_seed
from sqdf.tasks.digits_model import to_pixels
from sqdf.training.trainer import train

DEMO_PRESET = "digits-demo"  # the digits task defaults, on the ink reward
# The KL-free reward-gradient method run beside SQDF: of DRaFT-1 and ReFL, the one whose
# over-optimisation shows more clearly at the demo's budget (measured: docs/demo.md)
BASELINE = "refl"
KL_FREE = {"draft": "DRaFT-1", "refl": "ReFL"}  # the baselines the demo takes, by label
BASELINE_FOLDER = "baseline"  # RUN/baseline/: the baseline's own run folder
PICTURE = "demo.png"  # RUN/demo.png: reference, SQDF and the baseline side by side
PICTURE_SEED = 0  # its noise
PER_CLASS = 4  # its digits of each class
NUM_SAMPLES = 300  # samples per model for the metrics


def demo_config(**overrides: Any) -> TrainConfig:
    return config_for("digits", preset=DEMO_PRESET, **overrides)


def summary_table(run: str | Path) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
    """The printed table of a demo folder: column titles (reference, sqdf, the baseline where
    the demo ran one, real digits) and rows of (metric, one value or None per column)."""
    run = Path(run)
    columns = {"reference": None, "sqdf": json.loads((run / "eval.json").read_text())}
    base = run / BASELINE_FOLDER
    if (base / "eval.json").is_file():
        columns[read_run_config(base).method] = json.loads((base / "eval.json").read_text())
    ours = columns["sqdf"]
    rows = []
    for label, key, ref, real in EVAL_TABLES["digits"][1]:
        values = [ours[ref] if ref else 0.0]
        values += [m[key] for m in list(columns.values())[1:]]
        values.append(ours[real] if real else None)
        rows.append((label, values))
    return [*columns, "real"], rows


def run_demo(
    out: str | Path = "runs/demo",
    num_samples: int = NUM_SAMPLES,
    progress: bool = True,
    quality_samples: int = 64,
    baseline: str | None = BASELINE,
    **overrides: Any,
) -> Path:
    """Train SQDF into ``out`` and (unless ``baseline`` is None) the baseline into
    ``out``/baseline with the same settings but the method; evaluate both, measure the x̂0
    estimators, write report.html and demo.png; returns the page."""
    if baseline is not None and baseline not in KL_FREE:
        raise ConfigError(
            f"demo baseline must be one of {', '.join(KL_FREE)} (a KL-free reward-gradient "
            f"method), got {baseline!r}"
        )
    t0 = time.perf_counter()
    cfg = demo_config(**overrides)
    run = train(cfg, out, progress=progress)
    base_run = None
    if baseline is not None:
        # the same start (the shipped model), seed, batch and updates; only the loss differs
        base_cfg = demo_config(**{**overrides, "method": baseline})
        base_run = train(base_cfg, run / BASELINE_FOLDER, progress=progress)
    t_train = time.perf_counter() - t0
    task = load_run(run)
    # both runs start from the shipped model: the reference is sampled once for the two
    ref = sample_reference(task, num_samples, progress=progress)
    metrics = evaluate_run(run, num_samples=num_samples, progress=progress, reference=ref)
    base_metrics = None
    if base_run is not None:
        base_metrics = evaluate_run(
            base_run, num_samples=num_samples, progress=progress, reference=ref
        )
    quality = x0_estimator_quality(task, num_samples=quality_samples)
    (run / "x0_quality.json").write_text(json.dumps(quality, indent=1))
    lead: list[tuple[str, str]] = []
    if base_run is not None and base_metrics is not None:
        lead = [_side_by_side(run, cfg, task, metrics, base_run, base_metrics)]
    return _write_report(run, cfg, metrics, quality, task, t_train, time.perf_counter() - t0, lead)


def picture_samples(task: Any, base_task: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The picture's classes (PER_CLASS of each) and its samples from one noise: the
    reference's, ``task``'s policy's and ``base_task``'s policy's."""
    classes = task.options.classes or list(range(NUM_CLASSES))
    cond = torch.tensor(classes).repeat_interleave(PER_CLASS)
    n = len(cond)
    return cond, [
        samples_from_seed(task, n, PICTURE_SEED, cond=cond, policy=False)[1],
        samples_from_seed(task, n, PICTURE_SEED, cond=cond)[1],
        samples_from_seed(base_task, n, PICTURE_SEED, cond=cond)[1],
    ]


def _side_by_side(
    run: Path, cfg: TrainConfig, task: Any, metrics: dict, base_run: Path, base_metrics: dict
) -> tuple[str, str]:
    """The page's first section: one sentence on the picture, with its numbers; RUN/demo.png
    (reference, SQDF, the baseline from the same noise and classes, with the evaluation's
    reward and agreement under each); both methods' reward curves on one plot."""
    name = KL_FREE[read_run_config(base_run).method]
    cond, (ref, ours, theirs) = picture_samples(task, load_run(base_run))
    scores = [
        (metrics["ref_reward_mean"], metrics["ref_eval_agreement"]),
        (metrics["reward_mean"], metrics["eval_agreement"]),
        (base_metrics["reward_mean"], base_metrics["eval_agreement"]),
    ]
    panels = [
        ("reference", ref, cond),
        ("SQDF", ours, cond),
        (f"{name} (no KL term)", theirs, cond),
    ]
    save_digit_grid(
        [(title, to_pixels(x), c) for title, x, c in panels],
        run / PICTURE,
        captions=[f"reward {r:.2f}, agreement {100 * a:.0f}%" for r, a in scores],
        per_class=PER_CLASS,
        dpi=100,
        panel_width=2.6,
    )
    (r0, a0), (r1, a1), (r2, a2) = scores
    updates = metrics["updates"]
    # the verdict only where the numbers carry it: more reward than SQDF, for digits the
    # evaluator reads as the class asked for at least ten points less often than the reference's
    hacked = r2 > r1 and a2 < a0 - 0.1
    verdict = (
        ", a higher reward bought with digits the evaluator no longer recognises" if hacked else ""
    )
    sentence = (
        f"Left to right, the reference, SQDF and {name} (no KL term) from the same noise and "
        f"classes, each fine-tuned for {updates} updates from the same start and seed on the "
        f"{html.escape(cfg.reward)} reward: SQDF raised the reward from {r0:.2f} to {r1:.2f} "
        f"with the independent evaluator still reading {100 * a1:.0f}% of its digits as the "
        f"class asked for (reference {100 * a0:.0f}%), while {name} reached {r2:.2f} with "
        f"{100 * a2:.0f}%{verdict}."
    )
    note = (
        f"Reward and agreement under each grid are the evaluation's means over "
        f"{metrics['num_samples']} samples per model. The baseline's own run is in "
        f"{html.escape(str(base_run))} (<code>sqdf report</code> on it gives its page)."
    )
    body = (
        f"<p><b>{sentence}</b></p><img src='{file_png(run / PICTURE)}' alt='reference, SQDF "
        f"and {name} side by side'><img src='{_reward_curves(run, base_run, name, r0)}' "
        f"alt='reward during training, both methods'><p class='note'>{note}</p>"
    )
    return f"SQDF beside {name}, a reward-gradient method without the KL term", body


def _reward_curves(run: Path, base_run: Path, name: str, ref_reward: float) -> str:
    """Both methods' mean reward of fresh samples by update, on one plot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    for folder, label, colour in ((run, "SQDF", "tab:blue"), (base_run, name, "tab:red")):
        rows = read_metrics(folder)
        ax.plot([r["step"] for r in rows], [r["reward_mean"] for r in rows], color=colour,
                marker=".", label=label)  # fmt: skip
    ax.axhline(ref_reward, color="grey", ls="--", label="reference (evaluation)")
    ax.set(xlabel="update", ylabel="mean reward of fresh samples", title="during training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def _x0_pictures(task: Any, quality: dict) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    t = quality["timestep"]
    axes[0].plot(t, quality["tweedie_rmse"], label="Tweedie (reference model)")
    axes[0].plot(t, quality["cm_rmse"], label="consistency model")
    axes[0].set(xlabel="timestep of x_t", ylabel="RMS distance to the final x0", title="x̂0 error")
    axes[1].plot(t, quality["tweedie_corr"], label="Tweedie")
    axes[1].plot(t, quality["cm_corr"], label="consistency model")
    axes[1].set(xlabel="timestep of x_t", ylabel="corr(r(x̂0), r(x0))", title="soft-Q quality")
    for ax in axes:
        ax.invert_xaxis()
        ax.legend()
    fig.tight_layout()
    curves = figure_png(fig)
    # x̂0 of three reference trajectories along the way: rows (x_t, Tweedie, consistency
    # model) × digits, columns timesteps
    cond = torch.tensor([2, 5, 8])
    traj = sample_trajectories(task, 3, torch.Generator().manual_seed(3), cond=cond, policy=False)
    last = task.kernel.num_steps - 2  # the state before the final step
    ks = sorted({round(i * last / 7) for i in range(8)})
    rows: dict[str, list] = {"x_t": [], "Tweedie x̂0": [], "consistency x̂0": []}
    with torch.no_grad():
        for k in ks:
            x = traj.states[:, k + 1].to(task.device)
            state = torch.full((3,), k + 1)
            rows["x_t"].append(x)
            rows["Tweedie x̂0"].append(task.reference_x0(x, state, cond))
            rows["consistency x̂0"].append(task.consistency_x0(x, task.model_time(state, x), cond))
    h = traj.states.shape[-1] + 1
    canvas = torch.full((9 * h + 2 * 4, len(ks) * h), 0.35)
    for i, imgs in enumerate(rows.values()):
        for j, batch in enumerate(imgs):
            for d, img in enumerate(to_pixels(batch).cpu()):
                top = (3 * i + d) * h + 4 * i
                canvas[top : top + h - 1, j * h : j * h + h - 1] = img[0]
    fig, ax = plt.subplots(figsize=(1.0 * len(ks) + 1.5, 7.5))
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks(
        [j * h + h / 2 for j in range(len(ks))],
        [f"t={task.kernel.model_time(torch.tensor([k + 1])).item()}" for k in ks],
    )
    ax.set_yticks([(3 * i + 1.5) * h + 4 * i for i in range(3)], list(rows))
    ax.tick_params(length=0)
    return curves, figure_png(fig)


def _write_report(
    run: Path,
    cfg: TrainConfig,
    metrics: dict,
    quality: dict,
    task: Any,
    t_train: float,
    t_total: float,
    lead: list[tuple[str, str]],
) -> Path:
    curves, strips = _x0_pictures(task, quality)
    agreement_drop = 1 - metrics["eval_agreement"] / max(metrics["ref_eval_agreement"], 1e-9)
    intro = (
        f"<p>SQDF fine-tuned a LoRA on the shipped class-conditional digits model "
        f"to raise the <b>{cfg.reward}</b> reward, with alpha = {cfg.alpha}, "
        f"gamma = {cfg.gamma}, {cfg.estimator} x̂0, a {cfg.buffer} replay buffer, "
        f"{cfg.steps} updates of {cfg.batch_size} cells, {cfg.num_steps} DDIM steps. "
        f"Training{' (both methods)' if lead else ''} took {t_train:.0f} s, everything "
        f"{t_total:.0f} s. Metrics use "
        f"{metrics['num_samples']} samples per model from the same noise and classes.</p>"
        f"<p>Reward went from {metrics['ref_reward_mean']:.3f} to {metrics['reward_mean']:.3f}; "
        f"the independent evaluator agrees with the requested class for "
        f"{100 * metrics['eval_agreement']:.1f}% of samples against "
        f"{100 * metrics['ref_eval_agreement']:.1f}% for the reference "
        f"({100 * agreement_drop:+.1f}% relative change), and the Fréchet distance to real "
        f"digits is {metrics['eval_frechet']:.2f} against {metrics['ref_eval_frechet']:.2f}.</p>"
    )
    x0_section = (
        "x̂0 by timestep: Tweedie against the consistency model",
        f"<img src='{curves}'><img src='{strips}'><p class='note'>Measured on "
        f"{quality['num_samples']} reference "
        "trajectories: how far each estimate is from the sample the trajectory reaches, and "
        "how well the reward of the estimate predicts the final reward. The posterior mean "
        "(Tweedie) minimises the expected squared distance, so it should win on the left; the "
        "consistency model earns its place only where it predicts the reward better, which "
        "is what the right panel tests on this small model.</p>",
    )
    title = "sqdf demo: SQDF on handwritten digits"
    if lead:
        title = "sqdf demo: SQDF beside a KL-free baseline on handwritten digits"
    return write_run_report(run, title=title, intro=intro, lead=lead, extra=[x0_section])
