"""Online black-box optimisation: fine-tune against a proxy of an expensive oracle, round by
round, at a fixed query budget (``sqdf bbo``)."""

from sqdf.bbo.config import BboConfig
from sqdf.bbo.experiment import resume_bbo, run_bbo
from sqdf.bbo.loop import BBO_METHODS, run_method
from sqdf.bbo.oracle import Oracle, OracleError
from sqdf.bbo.proxy import ProxyEnsemble, ProxyReward

__all__ = [
    "BBO_METHODS",
    "BboConfig",
    "Oracle",
    "OracleError",
    "ProxyEnsemble",
    "ProxyReward",
    "resume_bbo",
    "run_bbo",
    "run_method",
]
