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
    return explained_variance_from_moments(value_moments(values_NT, returns_NT, mask_NT))


def value_moments(values_NT: Tensor, returns_NT: Tensor, mask_NT: Tensor) -> Tensor:
    """m_6 = (n, sum V, sum R, sum R^2, sum (R-V), sum (R-V)^2) over masked tokens: summable over processes."""
    m = mask_NT.bool()
    r, v = returns_NT[m].double(), values_NT[m].double()
    d = r - v
    return torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64), v.sum(), r.sum(), (r * r).sum(), d.sum(),
                        (d * d).sum()])


def explained_variance_from_moments(m_6: Tensor) -> float:
    """`explained_variance` from (summed) `value_moments`; NaN with under 2 tokens or constant returns."""
    n, _, sr, srr, sd, sdd = (float(x) for x in m_6)
    if n < 2:
        return float("nan")
    var_r = srr / n - (sr / n) ** 2
    if var_r <= 1e-12 * max(1.0, srr / n):
        return float("nan")
    return 1.0 - (sdd / n - (sd / n) ** 2) / var_r
