"""Optimizer, learning-rate schedule, and the one clip-and-step every trained model uses."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf.trainers.guards import NonFiniteGradients


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


@dataclass
class Trainable:
    """A model one step trains: as prepared by accelerate (`model`, a DDP/FSDP/DeepSpeed wrapper or the
    module itself), its optimizer, its learning-rate schedule and its guard against NaN/inf gradients."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    guard: NonFiniteGradients
    max_grad_norm: float

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def clip_and_step(self, accelerator) -> float:
        """`clip_and_step` of this model; returns the gradient norm before clipping."""
        return clip_and_step(accelerator, self.params, self.optimizer, self.scheduler, self.max_grad_norm, self.guard)


def clip_and_step(accelerator, params: list[torch.nn.Parameter], optimizer, scheduler, max_grad_norm: float,
                  guard: NonFiniteGradients) -> float:
    """Clip the gradients to `max_grad_norm` (0: no clipping), then step the optimizer and the schedule unless
    the norm is NaN/inf (counted by `guard`: the weights, the optimizer state and the schedule stay as
    they were), and zero the gradients. Returns the gradient norm before clipping.

    Under DeepSpeed the engine has already clipped (gradient_clipping = max_grad_norm) and stepped inside
    the last `backward`; this reads its norm, and `optimizer.step` is a no-op. DeepSpeed applies a
    non-finite fp32 gradient: the guard then only counts it and stops the run.
    """
    norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    grad_norm = float("nan") if norm is None else float(norm)
    if guard.record(grad_norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
