"""The exact 2-D benchmark: a Gaussian mixture whose score, x̂0 and tilted optimum are closed-form.

On either path the reference model is exact: the mixture's noise prediction under the VP
process (DDIM kernel), or its velocity under the rectified flow x_t = (1 - t) x0 + t ε (the
flow SDE kernel, ``process = "flow"``). Both come from the posterior mean E[x0 | x_t], which
is closed-form because a noised mixture is a mixture; the flow state x_t is the VP state
x_t / r at ᾱ = ((1 - t) / r)², r = sqrt((1 - t)² + t²), so one posterior serves both. Tweedie's
x̂0 is therefore the true posterior mean and the probability-flow ODE solved with it the true
consistency function. The policy adds a zero-initialised, time-conditioned MLP to the
reference's output. For a linear or quadratic reward the KL-regularised optimum
p_ref(x) exp(r(x)/alpha) is again a mixture, so fine-tuned samples are judged against the
truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sqdf.config.params import build_settings
from sqdf.core.flow import flow_sigmas
from sqdf.core.gmm import GaussianMixture, gmm_eps, gmm_posterior_mean
from sqdf.core.kernel import DDIMKernel, FlowKernel
from sqdf.core.ode import pf_ode_x0
from sqdf.core.schedule import make_ddim_schedule
from sqdf.core.soft_value import gmm_posterior, soft_value
from sqdf.errors import ConfigError, SqdfError
from sqdf.evaluators.metrics import mode_frequencies, mode_tv, sliced_w2
from sqdf.tasks.base import Task

PROCESSES = ("vp", "flow")


@dataclass
class GMM2DConfig:
    """The mixture and the policy network. Explicit ``means`` (with ``stds``, ``weights``)
    override the default ring of ``num_modes`` modes of std ``std`` at distance ``radius``."""

    num_modes: int = 8
    radius: float = 3.0
    std: float = 0.3
    means: list | None = None
    stds: list | None = None
    weights: list | None = None
    hidden: int = 128
    ode_steps: int = 32
    process: str = "vp"  # vp: DDIM over a VP schedule (eta); flow: the rectified-flow SDE
    noise_level: float = 0.7  # flow: the SDE's noise level a (Flow-GRPO's default)
    # flow: the level at the last step, run linearly from noise_level at the first (None: one
    # level for the whole chain)
    noise_level_end: float | None = None
    shift: float = 1.0  # flow: SD3's time shift of the grid (1: none)

    def __post_init__(self) -> None:
        if self.num_modes < 1:
            raise ConfigError(f"gmm2d num_modes must be >= 1, got {self.num_modes}")
        if not self.std > 0:
            raise ConfigError(f"gmm2d std must be > 0, got {self.std}")
        if self.hidden < 1:
            raise ConfigError(f"gmm2d hidden must be >= 1, got {self.hidden}")
        if self.ode_steps < 1:
            raise ConfigError(f"gmm2d ode_steps must be >= 1, got {self.ode_steps}")
        if self.process not in PROCESSES:
            raise ConfigError(
                f"gmm2d process must be one of {', '.join(PROCESSES)}, got {self.process!r}"
            )
        if not self.noise_level > 0:
            raise ConfigError(
                f"gmm2d noise_level must be > 0 (the KL needs a stochastic step), got "
                f"{self.noise_level}"
            )
        if self.noise_level_end is not None and not self.noise_level_end > 0:
            raise ConfigError(
                f"gmm2d noise_level_end must be > 0 (the KL needs a stochastic step), got "
                f"{self.noise_level_end}"
            )
        if not self.shift > 0:
            raise ConfigError(f"gmm2d shift must be > 0, got {self.shift}")
        flow_only = {
            key: value
            for key, value, default in (
                ("noise_level", self.noise_level, 0.7),
                ("noise_level_end", self.noise_level_end, None),
                ("shift", self.shift, 1.0),
            )
            if value != default
        }
        if self.process == "vp" and flow_only:
            given = ", ".join(f"{key} = {value}" for key, value in flow_only.items())
            raise ConfigError(
                f"gmm2d {given}: noise_level, noise_level_end and shift are the flow "
                "process's; add process = \"flow\" (the vp process's noise is eta)"
            )
        k = len(self.means) if self.means is not None else self.num_modes
        if self.means is not None and any(len(m) != 2 for m in self.means):
            raise ConfigError(f"gmm2d means must be a list of [x, y] pairs, got {self.means}")
        if self.stds is not None and (len(self.stds) != k or min(self.stds) <= 0):
            raise ConfigError(f"gmm2d stds must be {k} positive numbers, got {self.stds}")
        if self.weights is not None and (len(self.weights) != k or min(self.weights) <= 0):
            raise ConfigError(f"gmm2d weights must be {k} positive numbers, got {self.weights}")

    def mixture(self) -> GaussianMixture:
        if self.means is not None:
            means = torch.tensor(self.means, dtype=torch.float64)
        else:
            angle = 2 * math.pi * torch.arange(self.num_modes, dtype=torch.float64) / self.num_modes
            means = self.radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        k = means.shape[0]
        stds = torch.tensor(
            self.stds if self.stds is not None else [self.std] * k, dtype=torch.float64
        )
        w = torch.tensor(
            self.weights if self.weights is not None else [1.0] * k, dtype=torch.float64
        )
        return GaussianMixture(w / w.sum(), means, stds[:, None].pow(2).expand(k, 2).clone())


# the flow SDE's noise level a at which it is the exact time reversal of the path
# (sigma_t² = 2t / (1 - t)): only there is x_out | x_t the forward posterior
FULL_NOISE_FLOW = math.sqrt(2.0)


def check_exact(eta: float, options: GMM2DConfig) -> None:
    """The closed-form soft value takes x_out | x_t to be the forward process's posterior,
    which the reference sampler's own chain is only at full noise: DDIM eta 1 on the VP path,
    noise_level √2 on the flow path (at other levels the value is of another chain)."""
    levels = (options.noise_level, options.noise_level_end or options.noise_level)
    if options.process == "flow" and max(abs(a - FULL_NOISE_FLOW) for a in levels) > 1e-6:
        raise ConfigError(
            "estimator 'exact' is the soft value of the sampler at full noise: on the flow path "
            "that is noise_level = 1.4142135623730951 (√2) at every step, got "
            + (f"{levels[0]} to {levels[1]}" if options.noise_level_end else f"{levels[0]}")
        )
    if options.process == "vp" and eta != 1.0:
        raise ConfigError(
            "estimator 'exact' is the soft value of the sampler at full noise: on the VP path "
            f"that is eta = 1, got {eta}"
        )


class TimeResidualMLP(nn.Module):
    """A residual added to the reference's noise prediction; zero at initialisation so the
    policy starts as the reference exactly."""

    def __init__(self, dim: int, hidden: int, num_freqs: int = 6):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32))
        self.net = nn.Sequential(
            nn.Linear(dim + 2 * num_freqs, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, dim),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, t_frac: Tensor) -> Tensor:
        # x: (B, D); t_frac: (B,) in [0, 1]
        ang = t_frac[:, None].to(x.dtype) * self.freqs[None]
        return self.net(torch.cat([x, ang.sin(), ang.cos()], dim=1))


class GMM2DTask(Task):
    sample_shape = (2,)

    def __init__(self, cfg: Any, options: GMM2DConfig, reward: Any, device: torch.device):
        if cfg.estimator == "exact":
            check_exact(cfg.eta, options)
        self.options = options
        self.alpha = cfg.alpha
        self.estimator = cfg.estimator
        self.reward_model = reward
        self.device = device
        self.flow = options.process == "flow"
        if self.flow:
            sigmas = flow_sigmas(cfg.num_steps, shift=options.shift)
            self.kernel = FlowKernel(sigmas, options.noise_level, options.noise_level_end)
        else:
            # DDPM's linear betas; steps_offset=1 and alpha-bar(0) < 1 at the end keep every
            # step stochastic, so the per-step KL is finite (see make_ddim_schedule).
            self.schedule = make_ddim_schedule(
                cfg.num_steps, eta=cfg.eta, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"
            )
            self.kernel = DDIMKernel(self.schedule)
            self._alphas = self.schedule.alphas_cumprod.to(device)
        self.data = options.mixture()
        self.data32 = self.data.to(torch.float32)
        self.policy = TimeResidualMLP(2, options.hidden).to(device)

    def reference_output(self) -> GaussianMixture:
        """The distribution the reference sampler targets: the data at the final noise level
        (the flow sampler ends at t = 0: the data itself)."""
        if self.flow:
            return self.data
        return self.data.noised(self.schedule.final_alpha_cumprod)

    def target(self) -> GaussianMixture:
        """The exact KL-regularised optimum over the sampler's output, in float64."""
        return self.reward_model.tilt(self.reference_output(), self.alpha)

    def sample_conditions(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.zeros(n, dtype=torch.long)

    def _data_for(self, x: Tensor) -> GaussianMixture:
        gmm = self.data32 if x.dtype == torch.float32 else self.data.to(x.dtype)
        return GaussianMixture(*(t.to(x.device) for t in (gmm.weights, gmm.means, gmm.variances)))

    def _ref_eps(self, x: Tensor, abar: Tensor) -> Tensor:
        return gmm_eps(self._data_for(x), x, abar)

    def _posterior_mean(self, x: Tensor, abar: Tensor) -> Tensor:
        return gmm_posterior_mean(self._data_for(x), x, abar)

    @staticmethod
    def _as_vp(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The flow state x at time t as the VP state with the same posterior: (x / r, ᾱ)."""
        r = ((1 - t) ** 2 + t**2).sqrt()
        return x / r[:, None], ((1 - t) / r) ** 2

    def _ref_velocity(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact velocity E[ε - x0 | x_t] = (x_t - E[x0 | x_t]) / t."""
        x0 = self._posterior_mean(*self._as_vp(x, t))
        return (x - x0) / t[:, None]

    def model_output(self, x: Tensor, times: Tensor, cond: Tensor, *, policy: bool) -> Tensor:
        if self.flow:  # times: t in (0, 1]
            t = times.to(x.device, x.dtype)
            out = self._ref_velocity(x, t)
            return out + self.policy(x, t) if policy else out
        abar = self._alphas[times.clamp(min=0)]
        eps = self._ref_eps(x, abar)
        if policy:
            eps = eps + self.policy(x, times.to(x.dtype) / self.schedule.num_train_timesteps)
        return eps

    def consistency_x0(self, x: Tensor, times: Tensor, cond: Tensor) -> Tensor:
        if self.flow:  # the flow's ODE is the VP probability-flow ODE of the equivalent state
            return pf_ode_x0(
                self._posterior_mean, *self._as_vp(x, times.to(x.device, x.dtype)),
                self.options.ode_steps,
            )  # fmt: skip
        abar = self.schedule.abar(times.cpu()).to(x.device, x.dtype)
        return pf_ode_x0(self._posterior_mean, x, abar, self.options.ode_steps)

    def path_of_output(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, noise variance) with which state(s) ``state`` (B,) hold the sampler's
        output x_out: x_state = scale · x_out + sqrt(noise variance) ε. VP: the forward
        process from the final noise level, ᾱ_state / ᾱ_final; flow: (1 - t, t²)."""
        if self.flow:
            t = self.kernel.sigmas[state].double()
            return 1.0 - t, t * t
        ratio = self.schedule.abar(self.schedule.timesteps[state]).double()
        ratio = ratio / self.schedule.final_alpha_cumprod
        return ratio.sqrt(), 1.0 - ratio

    def exact_soft_value(self, x: Tensor, state: Tensor) -> Tensor:
        """V(x) = α log E[exp(r(x_out)/α) | x_state = x] under the reference's output
        mixture (sqdf.core.soft_value), differentiable in x; (B,). ``state`` < T."""
        log_mgf_of = getattr(self.reward_model, "log_mgf", None)
        if log_mgf_of is None:  # e.g. sqdf bbo's proxy
            raise SqdfError(
                f"estimator 'exact' needs a reward with a closed-form soft value (linear, "
                f"quadratic); {type(self.reward_model).__name__} has none"
            )
        scale, noise_var = self.path_of_output(state.cpu())
        prior = self.reference_output()
        posterior = gmm_posterior(prior, x, scale.to(x.device), noise_var.to(x.device))
        log_mgf = log_mgf_of(posterior.means, posterior.variances, self.alpha)
        return soft_value(posterior, log_mgf, self.alpha)

    def soft_q(
        self,
        x_prev: Tensor,
        step_index: Tensor,
        cond: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if self.estimator != "exact":
            return super().soft_q(x_prev, step_index, cond, generator)
        T = self.kernel.num_steps
        state = (step_index.cpu() + 1).clamp(max=T - 1)  # after the last step: unused below
        value = self.exact_soft_value(x_prev, state)
        last = (step_index == T - 1).to(x_prev.device)
        return torch.where(last, self.reward(x_prev, cond), value)

    def evaluate(
        self, samples: Tensor, ref_samples: Tensor, cond: Tensor, generator: torch.Generator
    ) -> dict:
        target = self.target()
        exact = target.sample(samples.shape[0], generator)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return {
            "target_mode_tv": mode_tv(samples, target),
            "target_sliced_w2": sliced_w2(samples, exact, torch.Generator().manual_seed(seed)),
            "ref_target_mode_tv": mode_tv(ref_samples, target),
            "ref_target_sliced_w2": sliced_w2(
                ref_samples, exact, torch.Generator().manual_seed(seed)
            ),
            # the floor: how far the untouched reference sampler (finite steps) is from the
            # exact distribution it discretises; no fine-tuned policy is judged more finely
            "ref_sampler_sliced_w2": sliced_w2(
                ref_samples,
                self.reference_output().sample(ref_samples.shape[0], generator),
                torch.Generator().manual_seed(seed),
            ),
            "target_reward_mean": float(self.reward(exact, None).mean()),
            # KL(target || reference output), Monte Carlo over exact target samples with exact
            # densities: the least path KL any policy reaching the target can have.
            "target_kl": float(
                (target.log_prob(exact) - self.reference_output().log_prob(exact)).mean()
            ),
            "target_mode_weights": [round(float(w), 6) for w in target.weights],
            "sample_mode_freq": [round(float(w), 6) for w in mode_frequencies(samples, target)],
            "ref_mode_freq": [round(float(w), 6) for w in mode_frequencies(ref_samples, target)],
        }

    def plot_samples(
        self, samples: Tensor, ref_samples: Tensor | None, cond: Tensor, path: Path
    ) -> None:
        panels = [("fine-tuned", samples)]
        if ref_samples is not None:
            panels.append(("reference", ref_samples))
        process = "flow, " if self.flow else ""
        self.plot_panels(
            panels, path, f"samples (red) over the exact target, {process}alpha = {self.alpha:g}"
        )

    def plot_panels(
        self,
        panels: list[tuple[str, Tensor]],
        path: Path,
        title: str,
        targets: list[GaussianMixture] | None = None,
    ) -> None:
        """One scatter panel per (name, points), each over an exact target density: this
        task's, or ``targets[i]`` for panel i (a sweep's variants each have their own)."""
        from sqdf.infra.report import pyplot

        plt = pyplot()
        targets = targets or [self.target()] * len(panels)
        lim = max(float(t.means.abs().max() + 4 * t.variances.max().sqrt()) for t in targets)
        grid = torch.linspace(-lim, lim, 180, dtype=torch.float64)
        gx, gy = torch.meshgrid(grid, grid, indexing="xy")
        flat = torch.stack([gx.flatten(), gy.flatten()], 1)
        n = len(panels)
        fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.8), squeeze=False)
        for ax, (name, pts), target in zip(axes[0], panels, targets, strict=True):
            dens = target.log_prob(flat).exp().view_as(gx)
            ax.contourf(gx.numpy(), gy.numpy(), dens.numpy(), levels=20, cmap="Greys")
            pts = pts.detach().cpu()
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color="tab:red")
            ax.set_title(name, fontsize=9)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def build_gmm2d(cfg: Any, reward: Any, device: torch.device) -> GMM2DTask:
    options = build_settings(GMM2DConfig, cfg.task_params, "task 'gmm2d'")
    if options.process == "flow" and cfg.eta != 1.0:
        raise ConfigError(
            f"eta is DDIM's; the flow process's noise is task_params.noise_level (got eta "
            f"{cfg.eta})"
        )
    # the task measures against, and plots over, the exact tilted optimum (target()): a reward
    # without one (a mixture of linear and quadratic) could train but not be evaluated
    if getattr(reward, "domain", None) != "points" or getattr(reward, "tilt", None) is None:
        name = getattr(reward, "name", type(reward).__name__)
        raise ConfigError(
            f"task 'gmm2d' needs a reward with a closed-form optimum (linear, quadratic, or a "
            f"mixture of linear rewards); {name!r} has none"
        )
    for name in ("b", "center"):
        vec = getattr(reward, name, None)
        if vec is not None and len(vec) != 2:
            raise ConfigError(
                f"reward parameter {name} must have 2 entries for gmm2d, got {list(vec)}"
            )
    return GMM2DTask(cfg, options, reward, device)
