"""Policy objectives: `POLICY_LOSSES[name](logp_NT, old_logp_NT, adv_NT, mask_NT, cfg) -> (loss_NT, stats)`.

Inputs are [N, T]: `logp_NT` = log pi_theta(a_t|s_t) (differentiable), `old_logp_NT` =
log pi_old(a_t|s_t) of the policy that sampled the batch (detached; equal to `logp_NT` in
value on a first pass), `adv_NT` the advantages, `mask_NT` 1.0 on tokens that count.
`loss_NT` is the per-token loss to minimise (aggregated later by `LOSS_AGGREGATIONS`);
`stats` holds scalar diagnostics (for example the clipped fraction) over masked tokens.

Registry metadata: `on_policy=True` (pg) marks a loss whose gradient is only correct on
the policy that sampled the batch, so it cannot be reused for several optimizer steps.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rlhf.registry import Registry

PolicyLossFn = Callable[..., "tuple[Tensor, dict[str, Tensor]]"]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def masked_mean(x_NT: Tensor, mask_NT: Tensor) -> Tensor:
    return (x_NT * mask_NT).sum() / mask_NT.sum().clamp(min=1)


def _ratio(logp_NT: Tensor, old_logp_NT: Tensor) -> Tensor:
    """r_NT = pi / pi_old, with the log-ratio clamped to +-20 so exp never overflows."""
    return torch.exp((logp_NT - old_logp_NT).clamp(-20.0, 20.0))


@POLICY_LOSSES.register("pg", on_policy=True)
def pg(logp_NT: Tensor, old_logp_NT: Tensor, adv_NT: Tensor, mask_NT: Tensor, cfg) -> tuple[Tensor, dict]:
    """loss_t = -A_t log pi(a_t|s_t): the vanilla score-function estimator (Williams 1992, REINFORCE).

    Its gradient -A_t grad log pi is the score-function estimator (docs/derivation.md#score-function);
    it is only unbiased on the policy that sampled the batch (one optimizer step per batch).
    """
    return -adv_NT * logp_NT, {}


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logp_NT: Tensor, old_logp_NT: Tensor, adv_NT: Tensor, mask_NT: Tensor, cfg) -> tuple[Tensor, dict]:
    """loss_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)), r_t = pi/pi_old (Schulman et al. 2017).

    Asymmetric clipping as in DAPO (Yu et al. 2025, clip-higher: `algo.eps_high` > `algo.eps_low`);
    with `algo.dual_clip = c` the loss of negative-advantage tokens is capped at -c A_t
    (Ye et al. 2020, dual-clip PPO). At r = 1 the gradient equals `pg`'s.
    """
    ratio_NT = _ratio(logp_NT, old_logp_NT)
    unclipped_NT = -adv_NT * ratio_NT
    clipped_NT = -adv_NT * ratio_NT.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss_NT = torch.maximum(unclipped_NT, clipped_NT)
    stats = {"clipfrac": masked_mean((clipped_NT > unclipped_NT).float(), mask_NT)}
    if cfg.dual_clip is not None:
        cap_NT = -adv_NT * cfg.dual_clip
        capped_NT = (adv_NT < 0) & (cap_NT < loss_NT)
        loss_NT = torch.where(capped_NT, cap_NT, loss_NT)
        stats["dual_clipfrac"] = masked_mean(capped_NT.float(), mask_NT)
    return loss_NT, stats


@POLICY_LOSSES.register("gspo")
def gspo(logp_NT: Tensor, old_logp_NT: Tensor, adv_NT: Tensor, mask_NT: Tensor, cfg) -> tuple[Tensor, dict]:
    """GSPO (Zheng et al. 2025): PPO-clip on the sequence ratio s_i = exp(mean_t log(pi/pi_old)).

    Token form s_{i,t} = sg[s_i] * pi_t / sg[pi_t] (the paper's GSPO-token), so every token of
    a sequence carries the same ratio and clipping decision. With
    `algo.loss_agg=seq_mean_token_mean` this is exactly the paper's objective. Its clip range
    is small: set `algo.eps_low` / `algo.eps_high` around 3e-4 / 4e-4.
    """
    len_N = mask_NT.sum(-1).clamp(min=1)
    seq_log_ratio_N = ((logp_NT - old_logp_NT) * mask_NT).sum(-1) / len_N
    log_ratio_NT = seq_log_ratio_N.detach().unsqueeze(-1) + logp_NT - logp_NT.detach()
    ratio_NT = torch.exp(log_ratio_NT.clamp(-20.0, 20.0))
    unclipped_NT = -adv_NT * ratio_NT
    clipped_NT = -adv_NT * ratio_NT.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss_NT = torch.maximum(unclipped_NT, clipped_NT)
    return loss_NT, {"clipfrac": masked_mean((clipped_NT > unclipped_NT).float(), mask_NT)}


@POLICY_LOSSES.register("cispo")
def cispo(logp_NT: Tensor, old_logp_NT: Tensor, adv_NT: Tensor, mask_NT: Tensor, cfg) -> tuple[Tensor, dict]:
    """CISPO (MiniMax-M1, 2025): loss_t = -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] A_t log pi(a_t|s_t).

    The importance weight is clipped and detached, so no token loses its gradient (PPO's
    clip zeroes the gradient of clipped tokens). The paper clips only from above: set a
    large `algo.eps_low` to match.
    """
    ratio_NT = _ratio(logp_NT, old_logp_NT).detach()
    weight_NT = ratio_NT.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    clipfrac = masked_mean((weight_NT != ratio_NT).float(), mask_NT)
    return -weight_NT * adv_NT * logp_NT, {"clipfrac": clipfrac}
