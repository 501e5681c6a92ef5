"""Advantage and return estimators: `ADVANTAGES[name](inp, cfg) -> (adv_NT, ret_NT)`.

All take per-token rewards `rewards_NT` (the sequence score sits on the last completion
token; with `algo.kl.placement=in_reward` the per-token KL penalty is added everywhere),
so outcome-based estimators use `score_N = rewards_NT.sum(-1)` and token-level ones use
the rewards directly. Samples of one prompt are contiguous: row n belongs to group n // G.
A sample whose score is NaN (no reward function applied) gets advantage 0 and is left out
of its group's statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from rlhf.registry import Registry


@dataclass
class AdvantageInputs:
    rewards_NT: Tensor  # per-token rewards, 0 on padding
    mask_NT: Tensor  # 1.0 on completion tokens
    group_size: int  # G samples per prompt, contiguous rows
    values_NT: Optional[Tensor] = None  # critic values V(s_t), needed by td / nstep_td / gae


AdvantageFn = Callable[[AdvantageInputs, "object"], "tuple[Tensor, Tensor]"]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")


def sequence_scores(inp: AdvantageInputs) -> Tensor:
    """score_N: the summed per-token reward of each sample (NaN stays NaN)."""
    return (inp.rewards_NT * inp.mask_NT).sum(-1)


def _group_view(score_N: Tensor, group_size: int) -> Tensor:
    if score_N.numel() % group_size:
        raise ValueError(f"{score_N.numel()} samples do not split into groups of {group_size}")
    return score_N.view(-1, group_size)


def _group_mean_std(score_BG: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and unbiased std over the finite entries of each group, plus the finite mask."""
    valid_BG = torch.isfinite(score_BG)
    n_B1 = valid_BG.sum(-1, keepdim=True).clamp(min=1)
    x_BG = torch.where(valid_BG, score_BG, 0.0)
    mean_B1 = x_BG.sum(-1, keepdim=True) / n_B1
    var_B1 = (torch.where(valid_BG, x_BG - mean_B1, 0.0) ** 2).sum(-1, keepdim=True) / (n_B1 - 1).clamp(min=1)
    return mean_B1, var_B1.sqrt(), valid_BG


def _broadcast(adv_N: Tensor, mask_NT: Tensor) -> tuple[Tensor, Tensor]:
    adv_NT = torch.nan_to_num(adv_N, nan=0.0).unsqueeze(-1) * mask_NT
    return adv_NT, adv_NT.clone()


@ADVANTAGES.register("grpo")
def grpo(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), on every token (Shao et al. 2024, DeepSeekMath)."""
    score_BG = _group_view(sequence_scores(inp), inp.group_size)
    mean_B1, std_B1, valid_BG = _group_mean_std(score_BG)
    adv_BG = torch.where(valid_BG, (score_BG - mean_B1) / (std_B1 + cfg.std_eps), 0.0)
    return _broadcast(adv_BG.reshape(-1), inp.mask_NT)


@ADVANTAGES.register("dr_grpo")
def dr_grpo(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_i = r_i - mean(r_group): GRPO without the std division (Liu et al. 2025, Dr. GRPO)."""
    score_BG = _group_view(sequence_scores(inp), inp.group_size)
    mean_B1, _, valid_BG = _group_mean_std(score_BG)
    adv_BG = torch.where(valid_BG, score_BG - mean_B1, 0.0)
    return _broadcast(adv_BG.reshape(-1), inp.mask_NT)


@ADVANTAGES.register("reinforce_baseline")
def reinforce_baseline(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_i = r_i - mean(r_group): REINFORCE with the group mean as baseline b(s) (Williams 1992)."""
    return dr_grpo(inp, cfg)


@ADVANTAGES.register("rloo")
def rloo(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024)."""
    score_BG = _group_view(sequence_scores(inp), inp.group_size)
    valid_BG = torch.isfinite(score_BG)
    x_BG = torch.where(valid_BG, score_BG, 0.0)
    n_B1 = valid_BG.sum(-1, keepdim=True)
    others_B1 = (n_B1 - 1).clamp(min=1)
    baseline_BG = (x_BG.sum(-1, keepdim=True) - x_BG) / others_B1
    adv_BG = torch.where(valid_BG & (n_B1 > 1), x_BG - baseline_BG, 0.0)
    return _broadcast(adv_BG.reshape(-1), inp.mask_NT)


def discounted_returns(rewards_NT: Tensor, mask_NT: Tensor, gamma: float) -> Tensor:
    """ret_t = sum_{tau >= t} gamma^(tau - t) r_tau within each sequence (the causality trick)."""
    r_NT = torch.nan_to_num(rewards_NT * mask_NT, nan=0.0)
    ret_NT = torch.zeros_like(r_NT)
    running_N = torch.zeros_like(r_NT[:, 0])
    for t in reversed(range(r_NT.shape[1])):
        running_N = r_NT[:, t] + gamma * running_N
        ret_NT[:, t] = running_N
    return ret_NT * mask_NT


@ADVANTAGES.register("reinforce")
def reinforce(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_t = sum_{tau >= t} gamma^(tau-t) R_tau: REINFORCE with reward-to-go (Williams 1992)."""
    ret_NT = discounted_returns(inp.rewards_NT, inp.mask_NT, cfg.gamma)
    return ret_NT, ret_NT.clone()


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): token reward-to-go, whitened over all tokens of the batch."""
    ret_NT = discounted_returns(inp.rewards_NT, inp.mask_NT, cfg.gamma)
    m = inp.mask_NT.bool()
    if m.sum() < 2:
        return torch.zeros_like(ret_NT), ret_NT
    adv_NT = (ret_NT - ret_NT[m].mean()) / (ret_NT[m].std() + 1e-8) * inp.mask_NT
    return adv_NT, ret_NT


def _next_values(values_NT: Tensor, mask_NT: Tensor, k: int) -> Tensor:
    """V(s_{t+k}), 0 past the end of each sequence (the episode terminates)."""
    v_NT = values_NT * mask_NT
    out = torch.zeros_like(v_NT)
    if k < v_NT.shape[1]:
        out[:, :-k] = v_NT[:, k:]
    return out


@ADVANTAGES.register("td", needs_values=True)
def td(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_t = R_t + gamma V(s_{t+1}) - V(s_t): the 1-step TD error; return = R_t + gamma V(s_{t+1})."""
    return _nstep(inp, cfg.gamma, 1)


@ADVANTAGES.register("nstep_td", needs_values=True)
def nstep_td(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_t = sum_{k<n} gamma^k R_{t+k} + gamma^n V(s_{t+n}) - V(s_t), n = cfg.n_step."""
    return _nstep(inp, cfg.gamma, cfg.n_step)


def _nstep(inp: AdvantageInputs, gamma: float, n: int) -> tuple[Tensor, Tensor]:
    assert inp.values_NT is not None, "needs values"
    r_NT = torch.nan_to_num(inp.rewards_NT * inp.mask_NT, nan=0.0)
    T = r_NT.shape[1]
    ret_NT = torch.zeros_like(r_NT)
    for k in range(min(n, T)):
        ret_NT[:, : T - k] += gamma**k * r_NT[:, k:]
    ret_NT = (ret_NT + gamma**n * _next_values(inp.values_NT, inp.mask_NT, n)) * inp.mask_NT
    adv_NT = (ret_NT - inp.values_NT) * inp.mask_NT
    return adv_NT, ret_NT


@ADVANTAGES.register("gae", needs_values=True)
def gae(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) (Schulman et al. 2015): A_t = sum_l (gamma lambda)^l delta_{t+l}; return = A + V."""
    assert inp.values_NT is not None, "needs values"
    r_NT = torch.nan_to_num(inp.rewards_NT * inp.mask_NT, nan=0.0)
    v_NT = inp.values_NT * inp.mask_NT
    delta_NT = r_NT + cfg.gamma * _next_values(inp.values_NT, inp.mask_NT, 1) - v_NT
    adv_NT = torch.zeros_like(r_NT)
    running_N = torch.zeros_like(r_NT[:, 0])
    for t in reversed(range(r_NT.shape[1])):
        running_N = delta_NT[:, t] + cfg.gamma * cfg.lam * running_N  # padding has delta 0
        adv_NT[:, t] = running_N
    adv_NT = adv_NT * inp.mask_NT
    return adv_NT, (adv_NT + v_NT) * inp.mask_NT
