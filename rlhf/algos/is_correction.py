"""Sampler/trainer mismatch: `IS_CORRECTIONS[name](old_logp_NT, sampler_logp_NT, mask_NT, cap) -> (weight_NT, stats)`.

A fast generation engine (vLLM, bf16 kernels) samples from pi_sampler, slightly different from
the trainer's pi_old for the same weights, so the policy gradient is off-policy. Each
correction returns a detached per-token weight built from the ratio r_t = pi_old / pi_sampler
that multiplies the per-token policy loss:

- `none`:           w_t = 1
- `token_truncate`: w_t = min(r_t, C)                      (truncated IS, TIS; Yao et al. 2025,
                    "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training")
- `token_mask`:     w_t = r_t if r_t <= C else 0            (masked IS, MIS, token level)
- `seq_mask`:       w_t = r_t if prod_t r_t <= C else 0     (MIS, sequence level: the whole sample is dropped)
                    (both: Liu et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse
                    from the Training-Inference Mismatch")
- `seq_truncate`:   w_t = min(prod_t r_t, C) on every token  (sequence-level TIS; Liu et al. 2025)

With asynchronous rollouts (`train.max_staleness`) pi_sampler is also older than pi_old: the same weights
correct for the staleness (AReaL's decoupled objective, Fu et al. 2025). Every correction reports
`is/weight_mean` beside its ratio and the share of tokens it clipped or masked.

`logp_gap` measures the mismatch itself: |log pi_old - log pi_sampler| over completion tokens.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rlhf.algos.policy_loss import masked_mean
from rlhf.registry import Registry

ISCorrectionFn = Callable[[Tensor, Tensor, Tensor, float], "tuple[Tensor, dict[str, Tensor]]"]
IS_CORRECTIONS: Registry[ISCorrectionFn] = Registry("importance-sampling correction")


def log_ratio(old_logp_NT: Tensor, sampler_logp_NT: Tensor, mask_NT: Tensor) -> Tensor:
    """log(pi_old / pi_sampler) per token, 0 on padding, clamped so exp() stays finite."""
    return ((old_logp_NT - sampler_logp_NT) * mask_NT).clamp(-20.0, 20.0).detach()


@IS_CORRECTIONS.register("none")
def none(old_logp_NT: Tensor, sampler_logp_NT: Tensor, mask_NT: Tensor, cap: float) -> tuple[Tensor, dict]:
    return torch.ones_like(mask_NT), {}


@IS_CORRECTIONS.register("token_truncate")
def token_truncate(old_logp_NT: Tensor, sampler_logp_NT: Tensor, mask_NT: Tensor, cap: float) -> tuple[Tensor, dict]:
    ratio_NT = torch.exp(log_ratio(old_logp_NT, sampler_logp_NT, mask_NT))
    weight_NT = ratio_NT.clamp(max=cap)
    return weight_NT, {"is/ratio_mean": masked_mean(ratio_NT, mask_NT),
                       "is/weight_mean": masked_mean(weight_NT, mask_NT),
                       "is/truncated_frac": masked_mean((ratio_NT > cap).float(), mask_NT)}


@IS_CORRECTIONS.register("token_mask")
def token_mask(old_logp_NT: Tensor, sampler_logp_NT: Tensor, mask_NT: Tensor, cap: float) -> tuple[Tensor, dict]:
    ratio_NT = torch.exp(log_ratio(old_logp_NT, sampler_logp_NT, mask_NT))
    keep_NT = ratio_NT <= cap
    weight_NT = ratio_NT * keep_NT
    return weight_NT, {"is/ratio_mean": masked_mean(ratio_NT, mask_NT),
                       "is/weight_mean": masked_mean(weight_NT, mask_NT),
                       "is/masked_frac": masked_mean((~keep_NT).float(), mask_NT)}


@IS_CORRECTIONS.register("seq_mask")
def seq_mask(old_logp_NT: Tensor, sampler_logp_NT: Tensor, mask_NT: Tensor, cap: float) -> tuple[Tensor, dict]:
    lr_NT = log_ratio(old_logp_NT, sampler_logp_NT, mask_NT)
    keep_N = lr_NT.sum(-1) <= torch.log(torch.tensor(cap))
    ratio_NT = torch.exp(lr_NT)
    weight_NT = ratio_NT * keep_N.unsqueeze(-1)
    masked_NT = (~keep_N).float().unsqueeze(-1).expand_as(mask_NT)
    return weight_NT, {"is/ratio_mean": masked_mean(ratio_NT, mask_NT),
                       "is/weight_mean": masked_mean(weight_NT, mask_NT),
                       "is/masked_frac": masked_mean(masked_NT, mask_NT)}


@IS_CORRECTIONS.register("seq_truncate")
def seq_truncate(old_logp_NT: Tensor, sampler_logp_NT: Tensor, mask_NT: Tensor, cap: float) -> tuple[Tensor, dict]:
    lr_N = log_ratio(old_logp_NT, sampler_logp_NT, mask_NT).sum(-1)
    seq_N = torch.exp(lr_N.clamp(max=20.0))
    weight_NT = seq_N.clamp(max=cap).unsqueeze(-1).expand_as(mask_NT)
    truncated_NT = (seq_N > cap).float().unsqueeze(-1).expand_as(mask_NT)
    return weight_NT, {"is/ratio_mean": masked_mean(seq_N.unsqueeze(-1).expand_as(mask_NT), mask_NT),
                       "is/weight_mean": masked_mean(weight_NT, mask_NT),
                       "is/truncated_frac": masked_mean(truncated_NT, mask_NT)}


def logp_gap(old_logp_NT: Tensor, sampler_logp_NT: Tensor, mask_NT: Tensor) -> tuple[Tensor, Tensor]:
    """(sum, max) of |log pi_old - log pi_sampler| over the masked tokens (divide the sum by the token count)."""
    gap_NT = (old_logp_NT - sampler_logp_NT).abs().detach() * mask_NT
    return gap_NT.sum(), gap_NT.max() if gap_NT.numel() else torch.zeros(())
