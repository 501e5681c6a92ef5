"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, tcfg) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the fused kernel where torch has one for their device
    (CPU and CUDA: one pass over each tensor instead of a dozen, 4x faster on a 2-core CPU for 135M parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=tcfg.lr, betas=tuple(tcfg.adam_betas), weight_decay=tcfg.weight_decay,
                             fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for `warmup_steps` optimizer steps, then constant, linear or cosine decay to 0."""
    warmup = tcfg.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if tcfg.lr_schedule == "linear":
            return 1.0 - progress
        if tcfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
