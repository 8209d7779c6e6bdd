"""``sqdf report RUN``: one self-contained page (RUN/report.html) for a run of any task: what
ran, the fine-tuned policy beside the reference from the same noise, training curves, the
pictures taken during training, and the evaluation table (eval.json, with cross-rewards and
diversity). The demo's page is this one with its own sections added."""

from __future__ import annotations

import html
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqdf.evaluation.evaluate import evaluate_run, final_weights, load_run, trained_updates
from sqdf.evaluation.heldout import describe, prompt_rows, summary_rows
from sqdf.infra.report import figure_png, file_png, html_table, pyplot, write_html
from sqdf.run.folder import EVAL_METRICS, read_metrics, read_run_config
from sqdf.sampling.sampler import samples_from_seed
from sqdf.tasks import resolved_reward_name

PICTURE_SEED = 0  # the before/after picture's noise and conditions
MAX_TRAINING_PICTURES = 4  # of RUN/samples/, evenly spaced, the last always among them

# (label, fine-tuned key, reference key, third column's key) of eval.json, by task, with the
# third column's title
EVAL_TABLES: dict[str, tuple[str, list[tuple[str, str, str | None, str | None]]]] = {
    "gmm2d": ("exact target", [
        ("reward", "reward_mean", "ref_reward_mean", "target_reward_mean"),
        ("path KL to the reference", "kl_path", None, "target_kl"),
        ("mode-weight TV to the target", "target_mode_tv", "ref_target_mode_tv", None),
        ("sliced W2 to the target", "target_sliced_w2", "ref_target_sliced_w2", None),
    ]),
    "digits": ("real digits", [
        ("reward", "reward_mean", "ref_reward_mean", None),
        ("path KL to the reference", "kl_path", None, None),
        ("evaluator agreement with the class", "eval_agreement", "ref_eval_agreement",
         "real_eval_agreement"),
        ("evaluator confidence", "eval_confidence", "ref_eval_confidence",
         "real_eval_confidence"),
        ("Fréchet distance to real digits", "eval_frechet", "ref_eval_frechet", None),
        ("within-class diversity", "eval_diversity", "ref_eval_diversity", "real_eval_diversity"),
    ]),
}  # fmt: skip
EVAL_NOTES = {
    "gmm2d": "The exact target is the KL-regularised optimum p_ref(x0) exp(r(x0)/alpha), known "
    "in closed form for this mixture: the distances say how close each model lands to it.",
    "digits": "Agreement, confidence, Fréchet distance and diversity come from an MNIST "
    "classifier that the reward never saw (digit-recognizer-py). A reward that rises while "
    "agreement falls or the Fréchet distance grows is over-optimisation.",
    "sd": "Scored on prompts the run did not train on, policy and reference from the same "
    "noise. A trained reward that rises while the rewards it was not trained on fall, or "
    "while the diversity collapses, is over-optimisation.",
}


def what_ran(run: Path, config: dict[str, Any]) -> str:
    """The run's main settings as given, and how far it got."""
    train, resolved = config["train"], config.get("resolved", {})
    keys = ["task", "method", "alpha", "gamma", "estimator", "buffer", "buffer_size", "steps",
            "batch_size", "grad_accum", "num_steps", "lr", "lr_schedule", "seed",
            "ema_decay"]  # fmt: skip
    rows = [(k, train[k]) for k in keys if k in train]
    rows.insert(2, ("reward", resolved.get("reward") or train.get("reward")))
    for key, value in resolved.get("task_params", {}).items():
        if value not in (None, "", [], {}) and key in ("model", "prompts", "eval_prompts", "lcm"):
            rows.append((f"task_params.{key}", value))
    metrics = read_metrics(run)
    if metrics:
        last = metrics[-1]
        rows.append(("updates done", last["step"]))
        rows.append(("training wall time (s)", round(float(last.get("wall_s", 0.0)), 1)))
    rows.append(("sqdf version", config.get("sqdf_version", "?")))
    return html_table([(k, str(v)) for k, v in rows], ["setting", "value"])


def before_after(task: Any, weights: str) -> str:
    """The task's picture of fine-tuned and reference samples from the same noise."""
    cond, x0 = samples_from_seed(task, task.picture_samples, PICTURE_SEED)
    _, ref = samples_from_seed(task, len(cond), PICTURE_SEED, cond=cond, policy=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "before_after.png"
        task.plot_samples(x0, ref, cond, path)
        image = file_png(path)
    note = f"Same noise and conditions for both; weights: {html.escape(weights)}."
    return f"<p class='note'>{note}</p><img src='{image}' alt='fine-tuned and reference'>"


# eval_metrics.jsonl keys drawn as a constant line on another key's panel (gmm2d's exact
# target), not as panels of their own
TARGET_LINES = {"target_reward_mean": "reward_mean", "target_kl": "kl_path"}
CURVE_COLUMNS = 4


def curves(run: Path) -> str:
    """Reward and KL of training (metrics.jsonl) and, where the run has them, the
    --eval-every series (eval_metrics.jsonl) against the reference's (and gmm2d's exact
    target), four panels a row."""
    rows, evals = read_metrics(run), read_metrics(run, EVAL_METRICS)
    if not rows and not evals:
        return "<p class='note'>No metrics yet (metrics.jsonl is empty).</p>"
    train_keys = [
        ("reward_mean", "mean reward of fresh samples"),
        ("kl_mean", "KL on replayed cells"),
    ]
    train_keys = [(k, label) for k, label in train_keys if rows and k in rows[0]]
    first = evals[0] if evals else {}
    eval_keys = [
        k for k, v in first.items()
        if k != "step" and not k.startswith(("ref_", "real_")) and k not in TARGET_LINES
        and isinstance(v, int | float)
    ]  # fmt: skip
    n = len(train_keys) + len(eval_keys)
    cols = min(n, CURVE_COLUMNS)
    nrows = -(-n // cols)
    plt = pyplot()
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    axes = list(axes.flat)
    for ax, (key, label) in zip(axes, train_keys, strict=False):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], color="tab:red")
        ax.set(xlabel="update", title=label)
    steps = [r["step"] for r in evals]
    for ax, key in zip(axes[len(train_keys) :], eval_keys, strict=False):
        ax.plot(steps, [r[key] for r in evals], color="tab:blue", marker="o", label="fine-tuned")
        if f"ref_{key}" in first:
            ax.plot(steps, [r[f"ref_{key}"] for r in evals], color="grey", ls="--",
                    label="reference")  # fmt: skip
        for target, drawn_on in TARGET_LINES.items():
            if drawn_on == key and target in first:
                ax.axhline(first[target], color="black", ls=":", label="exact target")
        if f"real_{key}" in first:  # digits: the evaluator on real digits
            ax.axhline(first[f"real_{key}"], color="black", ls=":", label="real digits")
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
        ax.set(xlabel="update", title=f"eval: {key}")
    for ax in axes[n:]:
        ax.axis("off")
    fig.tight_layout()
    return f"<img src='{figure_png(fig)}' alt='training curves'>"


def training_pictures(run: Path) -> str | None:
    """Up to MAX_TRAINING_PICTURES of the --sample-every pictures, evenly spaced."""
    pictures = sorted((run / "samples").glob("step_*.png"))
    if not pictures:
        return None
    k = min(MAX_TRAINING_PICTURES, len(pictures))
    picks = sorted({round(i * (len(pictures) - 1) / max(k - 1, 1)) for i in range(k)})
    parts = []
    for i in picks:
        step = int(pictures[i].stem.removeprefix("step_"))
        parts.append(f"<p>update {step}</p><img src='{file_png(pictures[i])}' alt='update {step}'>")
    return "".join(parts)


def eval_section(task_name: str, metrics: dict[str, Any]) -> str:
    """eval.json as tables: reference against fine-tuned (and the task's third column), the
    cross-rewards, and on sd the per-prompt table."""
    if "per_prompt" in metrics:  # a held-out sd evaluation
        header, rows = prompt_rows(metrics)
        return (
            f"<p>{html.escape(describe(metrics))}</p>"
            + html_table(summary_rows(metrics), ["metric", "reference", "fine-tuned"])
            + "<h3>Per prompt</h3>"
            + html_table(rows, header)
        )
    third, spec = EVAL_TABLES.get(task_name, ("", []))
    table = []
    for label, key, ref_key, third_key in spec:
        if key not in metrics:
            continue
        row: list[Any] = [label, metrics[ref_key] if ref_key else 0.0, metrics[key]]
        if third:
            row.append(metrics.get(third_key, "") if third_key else "")
        table.append(row)
    for name, r in metrics.get("rewards", {}).items():  # cross-rewards
        table.append([f"{name} (not trained on)", r["ref_mean"], r["mean"]] + [""] * bool(third))
    header = ["metric", "reference (before)", "fine-tuned (after)"] + ([third] if third else [])
    note = f"{metrics.get('num_samples', '?')} samples per model, seed {metrics.get('seed', '?')}"
    return f"<p class='note'>{html.escape(note)}.</p>" + html_table(table, header)


def _eval_is_current(run: Path) -> bool:
    """Whether RUN/eval.json scores the final weights there now: written by this sqdf (it
    records the updates) after the last resume, for the same weights (final or ema)."""
    path = run / "eval.json"
    if not path.is_file():
        return False
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    current = (metrics.get("updates") == trained_updates(run)
               and metrics.get("weights") == final_weights(run).parent.name)  # fmt: skip
    if not current:
        print(f"sqdf report: {path} is not of the run's final weights now: evaluating again",
              file=sys.stderr)  # fmt: skip
    return current


def write_run_report(
    run: str | Path,
    *,
    title: str | None = None,
    intro: str = "",
    lead: Sequence[tuple[str, str]] = (),
    extra: Sequence[tuple[str, str]] = (),
    device: str | None = None,
    progress: bool = False,
) -> Path:
    """RUN/report.html (see the module docstring); evaluates the run first where it has no
    eval.json. ``lead`` sections (heading, HTML) open the page, before what ran; ``intro``
    (HTML) opens the section on what ran; ``extra`` sections close the page."""
    run = Path(run)
    cfg = read_run_config(run)  # a folder that is not a run fails here, in one line
    config = json.loads((run / "config.json").read_text())
    task_name = cfg.task
    if not _eval_is_current(run):
        # before the task loads: evaluate_run builds its own, and two sd models need not fit
        evaluate_run(run, device=device, progress=progress)
    metrics = json.loads((run / "eval.json").read_text())
    task = load_run(run, device)
    reward = resolved_reward_name(cfg)
    sections = [
        *lead,
        ("What ran", intro + what_ran(run, config)),
        ("Before and after", before_after(task, final_weights(run).parent.name)),
        ("Training curves", curves(run)),
    ]
    pictures = training_pictures(run)
    if pictures:
        sections.append(("Pictures during training (fixed seeds)", pictures))
    note = EVAL_NOTES.get(task_name, "")
    sections.append(
        (
            f"Evaluation (trained reward: {reward})",
            eval_section(task_name, metrics) + (f"<p class='note'>{note}</p>" if note else ""),
        )
    )
    sections += list(extra)
    method = config["train"]["method"]
    page_title = title or f"sqdf report: {method} on {task_name} ({run.name})"
    return write_html(run / "report.html", page_title, sections)
