"""KL estimators per token: `KL_ESTIMATORS[name](logp_NT, ref_logp_NT) -> kl_NT`.

For samples a ~ pi and log-ratio x = log pi(a) - log pi_ref(a) (Schulman, "Approximating
KL divergence", 2020): k1 = x (unbiased, can be negative), k2 = x^2 / 2 (low variance,
biased), k3 = exp(-x) - 1 + x (unbiased, always >= 0). The seed notes' two penalty forms
are k1 and k3.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rlhf.registry import Registry

KLFn = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: Registry[KLFn] = Registry("KL estimator")


@KL_ESTIMATORS.register("k1")
def k1(logp_NT: Tensor, ref_logp_NT: Tensor) -> Tensor:
    """log pi - log pi_ref."""
    return logp_NT - ref_logp_NT


@KL_ESTIMATORS.register("k2")
def k2(logp_NT: Tensor, ref_logp_NT: Tensor) -> Tensor:
    """(log pi - log pi_ref)^2 / 2."""
    return 0.5 * (logp_NT - ref_logp_NT) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp_NT: Tensor, ref_logp_NT: Tensor) -> Tensor:
    """pi_ref/pi - log(pi_ref/pi) - 1 (clamped log-ratio for stability)."""
    x_NT = (ref_logp_NT - logp_NT).clamp(-20.0, 20.0)
    return torch.exp(x_NT) - x_NT - 1.0
