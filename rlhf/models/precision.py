"""Mixed precision: fp32 master weights, bf16 compute through autocast."""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def autocast(compute_dtype: str, device: torch.device | str):
    """Autocast context for `compute_dtype` ('bf16' or 'fp32': no-op)."""
    if compute_dtype == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=DTYPES[compute_dtype])


class Bf16Weights:
    """bf16 copies of a model's fp32 nn.Linear weights that its forwards under bf16 autocast use instead of
    autocast's cast of every weight at every forward (SmolLM2, CPU: 90 ms per training forward).

    Copies come from `put`: the HF engine's weight sync casts the same weights for its decode loop right
    after each optimizer step, and shares them here for the next step's forwards. A copy is used only
    while its weight is unchanged: same storage, same version counter (any in-place copy_ bumps it) and
    no optimizer step since (fused AdamW updates in place without bumping the version, so steps are
    counted by a step hook). Without a valid copy the forward is the plain one (further micro-batches).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.copies: dict[torch.nn.Parameter, tuple[tuple, torch.Tensor]] = {}
        self.steps = 0
        optimizer.register_step_post_hook(self._stepped)
        for mod in model.modules():
            if type(mod) is torch.nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.requires_grad:
                mod.forward = functools.partial(_linear_forward, mod, self)
        _SHARED[model] = self

    def _stepped(self, *_) -> None:
        self.steps += 1
        self.copies.clear()

    def _stamp(self, weight: torch.Tensor) -> tuple:
        return weight.data_ptr(), weight._version, self.steps

    def put(self, weight: torch.nn.Parameter, copy_bf16: torch.Tensor) -> None:
        """Offer `copy_bf16` = weight.to(bfloat16), taken now."""
        self.copies[weight] = (self._stamp(weight), copy_bf16)

    def get(self, weight: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """The valid copy of `weight`, if any. A forward that records gradients takes it out: autograd keeps
        it until that layer's backward, which frees it, as it frees autocast's casts (no higher peak)."""
        entry = self.copies.pop(weight, None) if torch.is_grad_enabled() else self.copies.get(weight)
        return entry[1] if entry is not None and entry[0] == self._stamp(weight) else None


_SHARED: "weakref.WeakKeyDictionary[torch.nn.Module, Bf16Weights]" = weakref.WeakKeyDictionary()


def shared_bf16_weights(model: torch.nn.Module) -> Optional[Bf16Weights]:
    """The `Bf16Weights` installed on `model`, if any (the engine's sync offers its casts to it)."""
    return _SHARED.get(model)


class _AsBf16(torch.autograd.Function):
    """Forward: the bf16 copy of `weight`; backward: the gradient in fp32 to `weight`, as autocast's cast does."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, copy_bf16: torch.Tensor) -> torch.Tensor:
        return copy_bf16.view_as(copy_bf16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(torch.float32), None


def _linear_forward(mod: torch.nn.Linear, shared: Bf16Weights, x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    copy_bf16 = shared.get(mod.weight) if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16 else None
    if copy_bf16 is None:
        return F.linear(x, mod.weight, mod.bias)
    return F.linear(x, _AsBf16.apply(mod.weight, copy_bf16), mod.bias)
