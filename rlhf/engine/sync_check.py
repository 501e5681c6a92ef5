"""Does a generation engine sample from the trainer's policy? A check to run after a weight sync.

On fixed prompts, the engine's greedy completions must equal the trainer model's own greedy
completions (`model.generate` under the trainer's compute dtype), and the engine's log-probs of
those tokens must match the trainer's (teacher-forced forward): exp(mean |delta logp|) below
`max_ratio`. Stale or wrong weights in the engine fail both.

In bf16 two correct implementations round differently, so greedy paths can part at a near-tie.
For every mismatch the report keeps the trainer's margin at the first differing token,
log p(trainer's token) - log p(engine's token) under the trainer; `ok(tie_tol=...)` excuses a
mismatch only when that margin is within `tie_tol` (0: exact equality required).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf.engine.base import GenerationEngine, SamplingParams
from rlhf.engine.decode import left_pad
from rlhf.engine.hf import eos_ids, split_completions
from rlhf.models.logprobs import sample_logprobs
from rlhf.models.precision import autocast


@dataclass
class SyncReport:
    engine_ids: list[list[int]]  # the engine's greedy completions, one per prompt
    trainer_ids: list[list[int]]  # the trainer model's greedy completions
    logp_gap_mean: float  # mean |log p_engine - log p_trainer| over the engine's completion tokens
    logp_gap_max: float
    tie_margins: dict[int, float]  # prompt index -> trainer's margin at the first differing token

    @property
    def mismatches(self) -> list[int]:
        return sorted(self.tie_margins)

    def ok(self, max_ratio: float = 1.05, tie_tol: float = 0.0) -> bool:
        near_ties = all(m <= tie_tol for m in self.tie_margins.values())
        return near_ties and math.exp(self.logp_gap_mean) < max_ratio

    def __str__(self) -> str:
        margins = ", ".join(f"{i}: {m:.3f}" for i, m in self.tie_margins.items())
        return (f"greedy mismatches at prompts [{margins}] (index: trainer margin) of {len(self.engine_ids)}, "
                f"exp(logp_gap_mean) = {math.exp(self.logp_gap_mean):.4f}, logp_gap_max = {self.logp_gap_max:.4f}")


@torch.no_grad()
def trainer_greedy(model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                   compute_dtype: str) -> list[list[int]]:
    """Greedy completions of the trainer's model (one left-padded batch), cut after EOS."""
    device = next(model.parameters()).device
    eos = eos_ids(model, tokenizer)
    ids_BP, mask_BP = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    with autocast(compute_dtype, device):
        seq = model.generate(input_ids=ids_BP, attention_mask=mask_BP, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(eos), pad_token_id=tokenizer.pad_token_id)
    return split_completions(seq[:, ids_BP.shape[1]:].cpu(), eos)[0]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def check_sync(engine: GenerationEngine, model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]],
               max_new_tokens: int = 16, compute_dtype: str = "fp32") -> SyncReport:
    """Compare `engine`'s greedy completions and log-probs on `prompt_ids` with `model`'s."""
    rollouts = engine.generate(prompt_ids, 1, SamplingParams(max_new_tokens=max_new_tokens, greedy=True),
                               return_logps=True)
    was_training = model.training
    model.eval()
    try:
        reference = trainer_greedy(model, tokenizer, prompt_ids, max_new_tokens, compute_dtype)
        both = rollouts.completion_ids + reference
        logp_NT, _ = sample_logprobs(model, prompt_ids + prompt_ids, both, tokenizer.pad_token_id,
                                     compute_dtype=compute_dtype, entropy=False,
                                     device=next(model.parameters()).device, pack_prompts=False)
    finally:
        model.train(was_training)
    B = len(prompt_ids)
    gaps = [abs(a - b) for i, c in enumerate(rollouts.completion_ids)
            for a, b in zip(rollouts.sampler_logps[i], logp_NT[i, : len(c)].tolist())]
    margins = {}
    for i, (ours, theirs) in enumerate(zip(rollouts.completion_ids, reference)):
        if ours != theirs:
            j = first_difference(ours, theirs)
            both_there = j < len(ours) and j < len(theirs)
            margins[i] = float(logp_NT[B + i, j] - logp_NT[i, j]) if both_there else float("inf")
    return SyncReport(rollouts.completion_ids, reference, sum(gaps) / max(1, len(gaps)), max(gaps, default=0.0),
                      margins)
