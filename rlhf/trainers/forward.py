"""Forward passes over a batch of experience: token log-probs, entropies and values, with the run's settings.

    fwd = ForwardSpec(pad_id, temperature, "bf16", device, pack_prompts=True)
    logp_NT, ent_NT = fwd.logprobs(model, mb)              # with gradients (the update loop)
    old_logp_NT = batch_logprobs(model, exp, fwd, rt)      # no gradients, micro-batched (pi_old, the reference)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from rlhf.models.critic import sample_values
from rlhf.models.logprobs import PackedBatch, sample_log_softmax, sample_logprobs
from rlhf.runtime import Runtime
from rlhf.trainers.experience import Experience


@dataclass(frozen=True)
class ForwardSpec:
    """How the trainer runs its models on completions: the sampling temperature (log-probs are of the
    distribution that was sampled), compute dtype, device, and shared-prompt packing."""

    pad_id: int
    temperature: float
    compute_dtype: str
    device: torch.device
    pack_prompts: bool = True

    def logprobs(self, model: torch.nn.Module, mb: Experience, entropy: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """(logp_NT, entropy_NT) of `mb`'s completions under `model` (entropy_NT None unless `entropy`)."""
        return sample_logprobs(model, mb.prompt_ids, mb.completion_ids, self.pad_id, temperature=self.temperature,
                               compute_dtype=self.compute_dtype, device=self.device, pack_prompts=self.pack_prompts,
                               entropy=entropy)

    def log_softmax(self, model: torch.nn.Module, mb: Experience) -> tuple[Tensor, PackedBatch]:
        """(logp_MV, packed batch): the full log-softmax of every completion token (natural-gradient steps)."""
        return sample_log_softmax(model, mb.prompt_ids, mb.completion_ids, self.pad_id, temperature=self.temperature,
                                  compute_dtype=self.compute_dtype, device=self.device, pack_prompts=self.pack_prompts)

    def values(self, critic: torch.nn.Module, mb: Experience) -> Tensor:
        """values_NT: V(s_t) before every completion token of `mb`."""
        return sample_values(critic, mb.prompt_ids, mb.completion_ids, self.pad_id, compute_dtype=self.compute_dtype,
                             device=self.device, pack_prompts=self.pack_prompts)


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, exp: Experience, fwd: ForwardSpec, rt: Runtime,
                   adapter_off: bool = False) -> Tensor:
    """logp_NT of every completion token of `exp` under `model` in eval mode, micro-batched, on the CPU.
    `adapter_off`: with a peft model's adapter disabled (LoRA's reference is the base network)."""
    logp_NT = torch.zeros_like(exp.mask_NT)
    was_training = model.training
    model.eval()
    with model.disable_adapter() if adapter_off else contextlib.nullcontext():
        for rows in rt.micro_batches(range(len(exp))):
            lp, _ = fwd.logprobs(model, exp.select(rows), entropy=False)
            logp_NT[rows, : lp.shape[1]] = lp.float().cpu()
    model.train(was_training)
    return logp_NT


@torch.no_grad()
def batch_values(critic: torch.nn.Module, exp: Experience, fwd: ForwardSpec, rt: Runtime) -> Tensor:
    """values_NT of every completion token of `exp` (0 on padding), micro-batched, on the CPU."""
    values_NT = torch.zeros_like(exp.mask_NT)
    critic.eval()
    for rows in rt.micro_batches(range(len(exp))):
        v_NT = fwd.values(critic, exp.select(rows))
        values_NT[rows, : v_NT.shape[1]] = v_NT.float().cpu()
    critic.train()
    return values_NT * exp.mask_NT
