"""Pure math of SQDF: step kernels and the sampler steps under them, x̂0 estimators, the
Gaussian KL and the soft-Q loss.

Nothing here holds state, reads files or imports the rest of the package, so every
function can be checked against a closed form or against diffusers' own schedulers.
"""

from sqdf.core.ddim import ddim_sigma, ddim_step_mean_std
from sqdf.core.flow import flow_sigmas, flow_step_mean_std, flow_x0
from sqdf.core.kernel import STEP_KL_SCALES, DDIMKernel, FlowKernel, StepKernel
from sqdf.core.kl import (
    KL_SCALES,
    alpha_in_sum_convention,
    flow_grpo_kl_weights,
    gaussian_kl,
    gaussian_log_prob,
)
from sqdf.core.loss import discount_weight, soft_q_loss
from sqdf.core.ode import pf_ode_x0
from sqdf.core.schedule import DDIMSchedule, make_ddim_schedule
from sqdf.core.x0 import consistency_x0, lcm_boundary_scalings, predict_x0_and_eps, tweedie_x0

__all__ = [
    "DDIMKernel",
    "DDIMSchedule",
    "FlowKernel",
    "STEP_KL_SCALES",
    "StepKernel",
    "flow_sigmas",
    "flow_step_mean_std",
    "flow_x0",
    "KL_SCALES",
    "alpha_in_sum_convention",
    "flow_grpo_kl_weights",
    "consistency_x0",
    "ddim_sigma",
    "ddim_step_mean_std",
    "discount_weight",
    "gaussian_kl",
    "gaussian_log_prob",
    "lcm_boundary_scalings",
    "make_ddim_schedule",
    "pf_ode_x0",
    "predict_x0_and_eps",
    "soft_q_loss",
    "tweedie_x0",
]
