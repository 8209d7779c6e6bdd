"""A small CNN digit classifier that we train and ship; its log-probability is a reward.

``ClassifierReward(target=None)`` rewards looking like the requested class (an alignment
reward); ``target=k`` rewards looking like digit k whatever was asked, a reward that fights
the conditioning and so shows over-optimisation plainly. The classifier is ours and is never
used to evaluate: the independent evaluator (``sqdf.evaluators``) is a different network.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from sqdf.assets.digits_data import load_digits
from sqdf.errors import SqdfError

WEIGHTS = "reward_cnn.safetensors"


class RewardCNN(nn.Module):
    """16×16 -> 10 logits. SiLU rather than ReLU: its input gradient, which drives fine-tuning,
    is smooth."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.SiLU(), nn.Linear(64, 10),
        )  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        # images: (B, 1, 16, 16) in [0, 1]
        return self.net(images * 2.0 - 1.0)


def shipped_weights() -> Path:
    return Path(str(resources.files("sqdf.assets") / "digits" / WEIGHTS))


def load_reward_cnn(path: str | Path | None = None) -> RewardCNN:
    path = Path(path) if path is not None else shipped_weights()
    if not path.is_file():
        raise SqdfError(
            f"reward classifier weights not found: {path} (sqdf train-reward rebuilds them)"
        )
    model = RewardCNN()
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as err:  # a corrupt or foreign file: say which, not where in torch
        raise SqdfError(
            f"cannot load reward classifier {path}: {str(err).splitlines()[0]}"
        ) from None
    return model.eval().requires_grad_(False)


@dataclass
class ClassifierReward:
    target: int | None = None
    weights: str | None = None
    domain = "image"

    def __post_init__(self) -> None:
        # an int 0-9: 3.0 passes `in range(10)` but cannot index the class scores
        digit = type(self.target) is int and 0 <= self.target <= 9
        if self.target is not None and not digit:
            raise ValueError(f"target must be a digit 0-9 or unset, got {self.target!r}")
        self._model = load_reward_cnn(self.weights)

    def __call__(self, images: Tensor, cond: Tensor | None = None) -> Tensor:
        model = self._model.to(images.device)
        logp = F.log_softmax(model(images), dim=1)
        if self.target is not None:
            return logp[:, self.target]
        if cond is None:
            raise SqdfError("reward 'classifier' without a target needs the requested classes")
        return logp.gather(1, cond.long().view(-1, 1)).squeeze(1)


def train_reward_cnn(
    out: str | Path, steps: int = 1500, seed: int = 0, progress: bool = True
) -> Path:
    """Train the reward classifier on 4,500 shipped digits (the last 500 held out); save it."""
    out = Path(out)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits(16)
    perm = torch.randperm(images.shape[0], generator=g)
    train_idx, test_idx = perm[:4500], perm[4500:]
    model = RewardCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), desc="train reward classifier", disable=not progress):
        idx = train_idx[torch.randint(0, train_idx.shape[0], (128,), generator=g)]
        # light pixel noise: the reward sees estimates x̂0, not only clean digits
        x = (images[idx] + 0.1 * torch.randn(images[idx].shape, generator=g)).clamp(0, 1)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    log = {
        "steps": steps,
        "seed": seed,
        "held_out_accuracy": acc,
        "wall_s": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }
    out.with_suffix(".json").write_text(json.dumps(log, indent=1))
    return out
