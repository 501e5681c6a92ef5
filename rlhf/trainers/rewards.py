"""From scores to advantages: per-token rewards (the score on the last token, minus beta KL_t when the KL is in
the reward, as in PPO), the registered advantage estimator, and optional whitening over every process."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from rlhf.algos import AdvantageInputs
from rlhf.runtime import Runtime
from rlhf.trainers.experience import Experience, score_at_last_token


def token_rewards(exp: Experience, kl_fn: Callable, beta: float, in_reward: bool,
                  rt: Runtime) -> tuple[Tensor, Optional[float]]:
    """(rewards_NT, mean KL per token over every process or None): r_t = score [t = last] - beta KL_t(old || ref)
    when `in_reward` (Ziegler et al. 2019), else the score on the last token alone; over the policy's own tokens."""
    rewards_NT = score_at_last_token(exp.scores_N, exp.actions_NT)
    if not in_reward or beta == 0:
        return rewards_NT, None
    kl_NT = kl_fn(exp.old_logp_NT, exp.ref_logp_NT) * exp.actions_NT
    kl_mean = rt.reduce_sum(kl_NT.sum()) / max(1.0, rt.reduce_sum(exp.actions_NT.sum()))
    return rewards_NT - beta * kl_NT, kl_mean


def advantages(exp: Experience, adv_fn: Callable, algo, group_size: int, rt: Runtime) -> tuple[Tensor, Tensor]:
    """(adv_NT, ret_NT) of `ADVANTAGES[algo.advantage]`, whitened over every process's loss tokens when
    `algo.whiten_advantages`."""
    adv_NT, ret_NT = adv_fn(AdvantageInputs(exp.rewards_NT, exp.actions_NT, group_size, exp.values_NT), algo)
    if algo.whiten_advantages:
        adv_NT = whiten(adv_NT, exp.train_mask_NT, rt)
    return adv_NT, ret_NT


def whiten(x_NT: Tensor, mask_NT: Tensor, rt: Runtime, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) over the masked tokens of every process, 0 elsewhere; std is the unbiased
    sample std (n - 1), as everywhere in rlhf. Two passes in float64 (mean, then squared deviations): no
    cancellation, so an x of mean 5 and std 1e-3 whitens as exactly as one of mean 0."""
    m_NT, x = mask_NT.double(), x_NT.double()
    f64 = torch.float64
    n = rt.reduce_sum(m_NT.sum(), f64)
    mean = rt.reduce_sum((x * m_NT).sum(), f64) / max(n, 1.0)
    var = rt.reduce_sum((((x - mean) * m_NT) ** 2).sum(), f64) / max(n - 1.0, 1.0)
    return ((x - mean) / (var ** 0.5 + eps) * m_NT).to(x_NT.dtype)


def distill_rewards(exp: Experience, coef: float, rt: Runtime) -> tuple[Tensor, float]:
    """(coef * (log pi_teacher - log pi_old) on the policy's tokens, the mean reverse KL per token over every
    process): on-policy distillation, the per-token reverse KL to the teacher as a dense reward (Agarwal et al.
    2024, GKD; Lu et al. 2025, "On-Policy Distillation")."""
    gap_NT = (exp.old_logp_NT - exp.teacher_logp_NT) * exp.actions_NT
    mean = rt.reduce_sum(gap_NT.sum()) / max(1.0, rt.reduce_sum(exp.actions_NT.sum()))
    return -coef * gap_NT, mean
