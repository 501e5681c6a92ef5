"""Critic objectives and diagnostics."""
from __future__ import annotations

import torch
from torch import Tensor


def clipped_value_loss(values_NT: Tensor, old_values_NT: Tensor, returns_NT: Tensor, clip: float | None) -> Tensor:
    """Per-token 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, -c, c) (PPO2 baselines)."""
    loss_NT = (values_NT - returns_NT) ** 2
    if clip is not None:
        clipped_NT = old_values_NT + (values_NT - old_values_NT).clamp(-clip, clip)
        loss_NT = torch.maximum(loss_NT, (clipped_NT - returns_NT) ** 2)
    return 0.5 * loss_NT


def explained_variance(values_NT: Tensor, returns_NT: Tensor, mask_NT: Tensor) -> float:
    """1 - Var[R - V] / Var[R] over masked tokens: 1 is a perfect critic, 0 no better than a constant."""
    m = mask_NT.bool()
    r, v = returns_NT[m].float(), values_NT[m].float()
    var_r = r.var(unbiased=False)
    if r.numel() < 2 or var_r == 0:
        return float("nan")
    return float(1 - (r - v).var(unbiased=False) / var_r)
