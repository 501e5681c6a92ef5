"""Advantage and return estimators: `ADVANTAGES[name](inp, cfg) -> (adv_NT, ret_NT)`.

Every estimator is a term Psi_t of the family grad J = E[sum_t grad log pi(a_t|s_t) Psi_t]
(docs/derivation.md#score-function). Shapes: N samples (G contiguous rows per prompt: row n
belongs to group n // G), T completion tokens (right-padded).

Time steps are the policy's own tokens, `mask_NT` = 1 (its actions). A completion may hold other
tokens between them (a tool's result in a multi-turn episode, mask 0): they are not time steps.
Returns and GAE pass over them unchanged (no discount, no value), and they carry no reward: the
trainer puts a sample's score on its last action (docs/derivation.md#conventions). Every std is the
unbiased sample std (n - 1).

All take per-token rewards `rewards_NT` (the sequence score sits on the last completion
token; with `algo.kl.placement=in_reward` the per-token KL penalty is added everywhere),
so outcome-based estimators use `score_N = rewards_NT.sum(-1)` and token-level ones use
the rewards directly. A sample whose score is NaN (no reward function applied) gets
advantage 0 and is left out of its group's statistics. `ret_NT` is the regression target
of a critic (the return), or the advantage itself where there is no critic.

Registry metadata: `needs_values=True` (td, nstep_td, gae) needs a critic;
`group_relative=True` marks estimators whose advantage is 0 for a group whose rewards are
all equal (those DAPO dynamic sampling may drop without changing the gradient).
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
    mask_NT: Tensor  # 1.0 on the policy's own tokens (time steps), 0 on padding and on tokens it did not sample
    group_size: int  # G samples per prompt, contiguous rows
    values_NT: Optional[Tensor] = None  # critic values V(s_t), needed by td / nstep_td / gae


AdvantageFn = Callable[[AdvantageInputs, "object"], "tuple[Tensor, Tensor]"]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")


def sequence_scores(inp: AdvantageInputs) -> Tensor:
    """score_N: the summed per-token reward of each sample (NaN stays NaN)."""
    return (inp.rewards_NT * inp.mask_NT).sum(-1)


def compact(x_NT: Tensor, mask_NT: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(xc_NT, maskc_NT, order_NT): each row's action tokens moved to its front, in order (a row that has no
    holes is unchanged); `expand(yc_NT, order_NT)` puts per-action results back where the actions were."""
    order_NT = torch.argsort((mask_NT == 0).to(torch.int8), dim=-1, stable=True)
    return x_NT.gather(-1, order_NT), mask_NT.gather(-1, order_NT), order_NT


def expand(yc_NT: Tensor, order_NT: Tensor) -> Tensor:
    return torch.zeros_like(yc_NT).scatter_(-1, order_NT, yc_NT)


def _group_view(score_N: Tensor, group_size: int) -> Tensor:
    """score_BG in float64: a group of equal fp32 scores then has a mean equal to each of them, so every
    deviation is exactly 0 (in fp32, 3 x 1.344090266 averages 1 ulp off, and GRPO divided those 1e-7
    deviations by a 1e-7 std into advantages of 0.1)."""
    if score_N.numel() % group_size:
        raise ValueError(f"{score_N.numel()} samples do not split into groups of {group_size}")
    return score_N.view(-1, group_size).double()


def _group_mean_std(score_BG: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """mean_B1, unbiased std_B1 over the finite entries of each group, and the finite mask valid_BG
    (float64 scores from `_group_view`)."""
    valid_BG = torch.isfinite(score_BG)
    n_B1 = valid_BG.sum(-1, keepdim=True).clamp(min=1)
    x_BG = torch.where(valid_BG, score_BG, 0.0)
    mean_B1 = x_BG.sum(-1, keepdim=True) / n_B1
    var_B1 = (torch.where(valid_BG, x_BG - mean_B1, 0.0) ** 2).sum(-1, keepdim=True) / (n_B1 - 1).clamp(min=1)
    return mean_B1, var_B1.sqrt(), valid_BG


def _broadcast(adv_N: Tensor, mask_NT: Tensor) -> tuple[Tensor, Tensor]:
    """A sequence-level advantage on every completion token: (adv_NT, ret_NT = adv_NT)."""
    adv_NT = (torch.nan_to_num(adv_N, nan=0.0).unsqueeze(-1) * mask_NT).to(mask_NT.dtype)
    return adv_NT, adv_NT.clone()


@ADVANTAGES.register("grpo", group_relative=True)
def grpo(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps) on every token of sample i.

    r_i = score_N, std is the unbiased group std, eps = `algo.std_eps`.
    Shao et al. 2024, DeepSeekMath (GRPO).
    """
    score_BG = _group_view(sequence_scores(inp), inp.group_size)
    mean_B1, std_B1, valid_BG = _group_mean_std(score_BG)
    adv_BG = torch.where(valid_BG, (score_BG - mean_B1) / (std_B1 + cfg.std_eps), 0.0)
    return _broadcast(adv_BG.reshape(-1), inp.mask_NT)


@ADVANTAGES.register("dr_grpo", group_relative=True)
def dr_grpo(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_i = r_i - mean(r_group): GRPO without the std division (Liu et al. 2025, Dr. GRPO).

    Pair it with `algo.loss_agg=seq_mean_token_sum_norm` for the paper's length-unbiased loss.
    """
    score_BG = _group_view(sequence_scores(inp), inp.group_size)
    mean_B1, _, valid_BG = _group_mean_std(score_BG)
    adv_BG = torch.where(valid_BG, score_BG - mean_B1, 0.0)
    return _broadcast(adv_BG.reshape(-1), inp.mask_NT)


@ADVANTAGES.register("rloo", group_relative=True)
def rloo(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_i = r_i - mean_{j != i} r_j, the leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024).

    The baseline does not depend on sample i, so the estimator is unbiased.
    """
    score_BG = _group_view(sequence_scores(inp), inp.group_size)
    valid_BG = torch.isfinite(score_BG)
    x_BG = torch.where(valid_BG, score_BG, 0.0)
    n_B1 = valid_BG.sum(-1, keepdim=True)
    others_B1 = (n_B1 - 1).clamp(min=1)
    baseline_BG = (x_BG.sum(-1, keepdim=True) - x_BG) / others_B1
    adv_BG = torch.where(valid_BG & (n_B1 > 1), x_BG - baseline_BG, 0.0)
    return _broadcast(adv_BG.reshape(-1), inp.mask_NT)


def discounted_returns(rewards_NT: Tensor, mask_NT: Tensor, gamma: float) -> Tensor:
    """ret_NT[n, t] = sum_{tau >= t} gamma^(tau - t) r_tau over the time steps of each sequence (the causality
    trick, docs/derivation.md#causality); tau and t count actions only."""
    r_NT, m_NT, order_NT = compact(torch.nan_to_num(rewards_NT * mask_NT, nan=0.0), mask_NT)
    ret_NT = torch.zeros_like(r_NT)
    running_N = torch.zeros_like(r_NT[:, 0])
    for t in reversed(range(r_NT.shape[1])):
        running_N = r_NT[:, t] + gamma * running_N
        ret_NT[:, t] = running_N
    return expand(ret_NT * m_NT, order_NT)


@ADVANTAGES.register("reinforce")
def reinforce(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """Psi_t = G_t = sum_{tau >= t} gamma^(tau-t) R_tau: REINFORCE with reward-to-go (Williams 1992).

    No baseline: high variance. gamma = `algo.gamma`. With gamma = 1 (the default) this is the
    unbiased estimator of grad J; with gamma < 1 it is the common practice of dropping the
    gamma^t factor of Psi_t = gamma^t G_t, which favours later tokens (Thomas 2014).
    """
    ret_NT = discounted_returns(inp.rewards_NT, inp.mask_NT, cfg.gamma)
    return ret_NT, ret_NT.clone()


@ADVANTAGES.register("reinforce_baseline", group_relative=True)
def reinforce_baseline(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """Psi_t = G_t - b: reward-to-go minus the group mean of the sequence returns (Williams 1992).

    G_t as in `reinforce`; b = mean over the prompt's G valid samples of G_0, a baseline that
    depends on the prompt only (REINFORCE with baseline, b(s) = group mean; docs/derivation.md#baselines).
    With an outcome reward and gamma = 1 this equals `dr_grpo`; it differs when rewards are
    per token (KL in the reward) or gamma < 1, where each token keeps only its future rewards.
    """
    valid_N = torch.isfinite(sequence_scores(inp))
    ret_NT = discounted_returns(inp.rewards_NT, inp.mask_NT, cfg.gamma)
    g0_BG = _group_view(torch.where(valid_N, ret_NT[:, 0], float("nan")), inp.group_size)
    mean_B1, _, _ = _group_mean_std(g0_BG)
    baseline_N = mean_B1.expand_as(g0_BG).reshape(-1)
    adv_NT = (ret_NT.double() - baseline_N.unsqueeze(-1)) * inp.mask_NT * valid_N.unsqueeze(-1)
    return adv_NT.to(ret_NT.dtype), ret_NT


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): A_t = (G_t - mean(G)) / std(G), whitened over every valid token of the batch.

    G_t is the token reward-to-go (as `reinforce`); pair with `algo.kl.placement=in_reward`
    as in the paper. The statistics are over this process's batch, in float64: returns that are
    all equal give exactly 0 (in fp32 their mean was an ulp off, and dividing by a std of 1e-7
    made +-0.8 of it).
    """
    valid_N = torch.isfinite(sequence_scores(inp))
    ret_NT = discounted_returns(inp.rewards_NT, inp.mask_NT, cfg.gamma)
    m_NT = inp.mask_NT.bool() & valid_N.unsqueeze(-1)
    if m_NT.sum() < 2:
        return torch.zeros_like(ret_NT), ret_NT
    x_NT = ret_NT.double()
    adv_NT = (x_NT - x_NT[m_NT].mean()) / (x_NT[m_NT].std() + 1e-8) * m_NT
    return adv_NT.to(ret_NT.dtype), ret_NT


def _next_values(values_NT: Tensor, mask_NT: Tensor, k: int) -> Tensor:
    """V(s_{t+k}) as [N, T], 0 past the end of each sequence (the episode terminates)."""
    v_NT = values_NT * mask_NT
    out = torch.zeros_like(v_NT)
    if k < v_NT.shape[1]:
        out[:, :-k] = v_NT[:, k:]
    return out


def _require_values(inp: AdvantageInputs, name: str) -> Tensor:
    if inp.values_NT is None:
        raise ValueError(f"advantage '{name}' needs critic values (AdvantageInputs.values_NT)")
    return inp.values_NT


@ADVANTAGES.register("td", needs_values=True)
def td(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_t = R_t + gamma V(s_{t+1}) - V(s_t): the 1-step TD error (docs/derivation.md#actor-critic);
    ret_t = R_t + gamma V(s_{t+1})."""
    return _nstep(inp, cfg.gamma, 1, "td")


@ADVANTAGES.register("nstep_td", needs_values=True)
def nstep_td(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """A_t = sum_{k<n} gamma^k R_{t+k} + gamma^n V(s_{t+n}) - V(s_t), n = `algo.n_step`
    (n-step TD, docs/derivation.md#actor-critic)."""
    return _nstep(inp, cfg.gamma, cfg.n_step, "nstep_td")


def _actions(inp: AdvantageInputs, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(r_NT, values_NT, mask_NT, order_NT) compacted to the time steps (see `compact`)."""
    values_NT = _require_values(inp, name)
    r_NT, m_NT, order_NT = compact(torch.nan_to_num(inp.rewards_NT * inp.mask_NT, nan=0.0), inp.mask_NT)
    return r_NT, values_NT.gather(-1, order_NT), m_NT, order_NT


def _nstep(inp: AdvantageInputs, gamma: float, n: int, name: str) -> tuple[Tensor, Tensor]:
    r_NT, values_NT, m_NT, order_NT = _actions(inp, name)
    T = r_NT.shape[1]
    ret_NT = torch.zeros_like(r_NT)
    for k in range(min(n, T)):
        ret_NT[:, : T - k] += gamma**k * r_NT[:, k:]
    ret_NT = (ret_NT + gamma**n * _next_values(values_NT, m_NT, n)) * m_NT
    adv_NT = (ret_NT - values_NT) * m_NT
    return expand(adv_NT, order_NT), expand(ret_NT, order_NT)


@ADVANTAGES.register("gae", needs_values=True)
def gae(inp: AdvantageInputs, cfg) -> tuple[Tensor, Tensor]:
    """GAE(gamma, lambda) (Schulman et al. 2015): A_t = sum_l (gamma lambda)^l delta_{t+l}, ret_t = A_t + V(s_t).

    delta_t = R_t + gamma V(s_{t+1}) - V(s_t); lambda = `algo.lam`. lambda = 1 gives the
    Monte-Carlo return minus V, lambda = 0 the 1-step TD error.
    """
    r_NT, values_NT, m_NT, order_NT = _actions(inp, "gae")
    v_NT = values_NT * m_NT
    delta_NT = r_NT + cfg.gamma * _next_values(values_NT, m_NT, 1) - v_NT
    adv_NT = torch.zeros_like(r_NT)
    running_N = torch.zeros_like(r_NT[:, 0])
    for t in reversed(range(r_NT.shape[1])):
        running_N = delta_NT[:, t] + cfg.gamma * cfg.lam * running_N  # padding has delta 0
        adv_NT[:, t] = running_N
    adv_NT = adv_NT * m_NT
    return expand(adv_NT, order_NT), expand((adv_NT + v_NT) * m_NT, order_NT)
