"""Policy objectives: `POLICY_LOSSES[name](logp_NT, old_logp_NT, adv_NT, mask_NT, cfg) -> (loss_NT, stats)`.

`loss_NT` is the per-token loss to minimise (aggregated later by `LOSS_AGGREGATIONS`);
`stats` holds scalar diagnostics (for example the clipped fraction) over masked tokens.
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


@POLICY_LOSSES.register("pg")
def pg(logp_NT: Tensor, old_logp_NT: Tensor, adv_NT: Tensor, mask_NT: Tensor, cfg) -> tuple[Tensor, dict]:
    """Vanilla score-function loss -A_t log pi(a_t|s_t) (Williams 1992); on-policy only."""
    return -adv_NT * logp_NT, {}


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logp_NT: Tensor, old_logp_NT: Tensor, adv_NT: Tensor, mask_NT: Tensor, cfg) -> tuple[Tensor, dict]:
    """max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), r = pi/pi_old (Schulman et al. 2017).

    Asymmetric clipping as in DAPO (Yu et al. 2025); with `cfg.dual_clip = c` the loss of
    negative-advantage tokens is capped at -c A (Ye et al. 2020, dual-clip PPO).
    """
    ratio_NT = torch.exp((logp_NT - old_logp_NT).clamp(-20.0, 20.0))
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
    """GSPO (Zheng et al. 2025): PPO-clip on the sequence ratio s = exp(mean_t log(pi/pi_old)).

    Token form s_t = sg[s] * pi_t / sg[pi_t], so every token of a sequence carries the same
    ratio and gradient weight; the paper's clip range is small (eps ~ 3e-4 to 4e-4).
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
    """CISPO (MiniMax-M1, 2025): -sg[clip(r, 1-eps_low, 1+eps_high)] A log pi.

    The importance weight is clipped and detached, so no token loses its gradient.
    """
    ratio_NT = torch.exp((logp_NT - old_logp_NT).clamp(-20.0, 20.0)).detach()
    weight_NT = ratio_NT.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    clipfrac = masked_mean((weight_NT != ratio_NT).float(), mask_NT)
    return -weight_NT * adv_NT * logp_NT, {"clipfrac": clipfrac}
