"""KL estimators per token: `KL_ESTIMATORS[name](logp_NT, ref_logp_NT) -> kl_NT`.

For tokens a ~ pi and log-ratio x = log pi(a) - log pi_ref(a) (Schulman, "Approximating KL
divergence", 2020), each estimates KL(pi || pi_ref) per token, all [N, T]:
k1 = x (unbiased, can be negative), k2 = x^2 / 2 (low variance, biased),
k3 = exp(-x) - 1 + x (unbiased, always >= 0). The penalty forms of docs/derivation.md#language-models
are k1 and k3. The trainer places beta * KL in the loss (`algo.kl.placement=in_loss`, GRPO) or
subtracts it from the per-token reward (`in_reward`, PPO / REINFORCE++).

In the loss the gradient is what counts: E_pi[grad k2] = grad KL(pi || pi_ref), bounded by |x|, while
grad k3 = (1 - pi_ref / pi) grad log pi is the gradient of KL(pi_ref || pi), unbounded where pi << pi_ref
(one such token made the GRPO demo collapse: docs/algorithms.md, KL section). Prefer k2 in the loss.

`kl_to_old` is the estimator MDPO needs, for tokens sampled from the *second* policy.
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
    """k1 = log pi - log pi_ref."""
    return logp_NT - ref_logp_NT


@KL_ESTIMATORS.register("k2")
def k2(logp_NT: Tensor, ref_logp_NT: Tensor) -> Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2."""
    return 0.5 * (logp_NT - ref_logp_NT) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logp_NT: Tensor, ref_logp_NT: Tensor) -> Tensor:
    """k3 = pi_ref/pi - log(pi_ref/pi) - 1 (log-ratio clamped to +-20 for stability)."""
    x_NT = (ref_logp_NT - logp_NT).clamp(-20.0, 20.0)
    # expm1: exact near 0, so never negative by rounding (exp(x) - 1 - x was -6e-8 at x = 6e-8)
    return torch.expm1(x_NT) - x_NT


def kl_to_old(logp_NT: Tensor, old_logp_NT: Tensor) -> Tensor:
    """KL(pi || pi_old) per token, from tokens sampled by pi_old: r log r - (r - 1), r = pi / pi_old.

    Unbiased (E_old[r log r] = KL(pi || pi_old) and E_old[r] = 1), >= 0 for every token
    (x log x >= x - 1), 0 with zero gradient at pi = pi_old. Used by MDPO (Tomar et al. 2020).
    """
    log_r_NT = (logp_NT - old_logp_NT).clamp(-20.0, 20.0)
    r_NT = torch.exp(log_r_NT)
    return r_NT * log_r_NT - (r_NT - 1.0)
