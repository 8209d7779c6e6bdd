"""``--eval-every``: a small evaluation of the live policy against the reference during
training, from fixed seeds so that the series is comparable from row to row (and across a
resume). sd: the run's held-out ``eval_prompts``, two images each (sqdf.evaluation.heldout); gmm2d
and digits: the task's own metrics on 128 samples. The reference side is drawn once and kept: it
does not change while the policy trains."""

from __future__ import annotations

from typing import Any

import torch

from sqdf.evaluation.evaluate import score_samples
from sqdf.evaluation.heldout import evaluate_prompts, image_features
from sqdf.sampling.sampler import sample_in_chunks

SAMPLES = 128  # gmm2d and digits: small and fixed (digits UNet passes on 256 take seconds)
IMAGES_PER_PROMPT = 2  # sd: the fewest that give a within-prompt diversity
SEED = 20_251_205  # its own noise: the run's random stream is not touched

# the scalars of a held-out sd evaluation that go to eval_metrics.jsonl
SD_KEYS = ("reward_mean", "ref_reward_mean", "kl_path", "eval_diversity", "ref_eval_diversity",
           "frechet_to_reference")  # fmt: skip


class PeriodicEval:
    """Call it at an update: the evaluation's scalars (name -> float)."""

    def __init__(self, task: Any, trained: str):
        self.task = task
        self.trained = trained
        self.reference: dict[str, Any] = {}
        self.pairs: list[tuple[str, str | None]] | None = None  # sd: read once

    def __call__(self) -> dict[str, float]:
        if hasattr(self.task, "add_prompts"):
            return self._prompts()
        return self._samples()

    def _prompts(self) -> dict[str, float]:
        from sqdf.tasks.sd_prompts import load_prompt_pairs

        task = self.task
        if self.pairs is None:
            self.pairs = load_prompt_pairs(task.options.eval_prompts)
        rewards = {self.trained: task.reward_model}
        metrics = evaluate_prompts(
            task, self.pairs, rewards=rewards,
            trained=self.trained, per_prompt=IMAGES_PER_PROMPT, seed=SEED,
            features=image_features(rewards, None), reference=self.reference,
        )  # fmt: skip
        return {k: float(metrics[k]) for k in SD_KEYS}

    @torch.no_grad()
    def _samples(self) -> dict[str, float]:
        task = self.task
        traj = sample_in_chunks(task, SAMPLES, SEED, with_kl=True)
        if not self.reference:
            ref = sample_in_chunks(task, SAMPLES, SEED, policy=False)
            r_ref = score_samples(task, ref.x0, ref.cond)
            self.reference = {"x0": ref.x0, "reward": float(r_ref.mean())}
        assert traj.kl is not None
        out = {
            "reward_mean": float(score_samples(task, traj.x0, traj.cond).mean()),
            "ref_reward_mean": self.reference["reward"],
            "kl_path": float(traj.kl.sum(dim=1).mean()),
        }
        gen = torch.Generator().manual_seed(SEED + 1)
        metrics = task.evaluate(traj.x0, self.reference["x0"], traj.cond, gen)
        out.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        return out
