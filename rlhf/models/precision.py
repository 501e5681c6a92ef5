"""Mixed precision: fp32 master weights, bf16 compute through autocast."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # every dtype name rlhf accepts


def autocast(compute_dtype: str, device: torch.device | str):
    """Autocast context for `compute_dtype` ('bf16' or 'fp32': no-op)."""
    if compute_dtype == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=DTYPES[compute_dtype])


class Bf16Casts:
    """bf16 casts of a model's fp32 linear weights, handed from the generation engine to the training forwards.

    The HF engine's decode loop casts the policy's linear weights to bf16 at every weight sync (right after
    the optimizer step); the trainer gives it this object, the engine `put`s each cast here, and `install`
    swaps the policy's trainable fp32 `nn.Linear`s for `Bf16CastLinear`s that use a cast instead of autocast's
    own cast of every weight at every forward (SmolLM2, CPU: 90 ms per training forward). Outputs, gradients
    and weights are equal to the bit (tests/models/test_precision.py).

    A cast is used only while its weight is unchanged: same storage, same version counter (any in-place copy_
    bumps it) and no optimizer step since (fused AdamW updates in place without bumping the version, so steps
    are counted by a step hook). Without a valid cast a forward is the plain one (later micro-batches).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.copies: dict[torch.nn.Parameter, tuple[tuple, torch.Tensor]] = {}
        self.steps, self.offered = 0, False
        optimizer.register_step_post_hook(self._stepped)

    def __deepcopy__(self, memo) -> "Bf16Casts":
        return self  # a deep copy of the model shares the cache: its own weights never match an entry

    def _stepped(self, *_) -> None:
        self.steps += 1
        self.copies.clear()

    def _stamp(self, weight: torch.Tensor) -> tuple:
        return weight.data_ptr(), weight._version, self.steps

    def put(self, weight: torch.nn.Parameter, copy_bf16: torch.Tensor) -> None:
        """Offer `copy_bf16` = weight.to(bfloat16), taken now."""
        self.copies[weight] = (self._stamp(weight), copy_bf16)
        self.offered = True

    def get(self, weight: torch.nn.Parameter) -> Optional[torch.Tensor]:
        """The valid cast of `weight`, if any. A forward that records gradients takes it out: autograd keeps
        it until that layer's backward, which frees it, as it frees autocast's casts (no higher peak)."""
        entry = self.copies.pop(weight, None) if torch.is_grad_enabled() else self.copies.get(weight)
        return entry[1] if entry is not None and entry[0] == self._stamp(weight) else None

    def install(self, model: torch.nn.Module) -> int:
        """Swap every trainable fp32 `nn.Linear` of `model` for a `Bf16CastLinear` on the same parameters
        (names, state dict and optimizer are unchanged); returns how many were swapped."""
        swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                 if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32
                 and child.weight.requires_grad]
        for parent, name, child in swaps:
            setattr(parent, name, Bf16CastLinear(child, self))
        return len(swaps)


class Bf16CastLinear(torch.nn.Linear):
    """An `nn.Linear` (the same weight and bias parameters) whose forward under bf16 autocast reads its
    weight's cast from `Bf16Casts` when a valid one is there."""

    def __init__(self, linear: torch.nn.Linear, casts: Bf16Casts):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.casts = casts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        copy_bf16 = self.casts.get(self.weight) if bf16 else None
        if copy_bf16 is None:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, _AsBf16.apply(self.weight, copy_bf16), self.bias)


class _AsBf16(torch.autograd.Function):
    """Forward: the bf16 copy of `weight`; backward: the gradient in fp32 to `weight`, as autocast's cast does."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, copy_bf16: torch.Tensor) -> torch.Tensor:
        return copy_bf16.view_as(copy_bf16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(torch.float32), None
