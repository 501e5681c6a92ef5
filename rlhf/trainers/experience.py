"""One batch of experience on this process: rollouts, scores and the per-token tensors the update needs."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Experience:
    """N samples, prompt-major (group g = rows g*G .. g*G+G-1); per-token tensors are [N, T], right-padded."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    mask_NT: Tensor  # 1.0 on completion tokens (an episode's: the model's and the environment's)
    scores_N: Tensor  # combined reward, NaN where unscorable
    action_mask_NT: Optional[Tensor] = None  # episodes: 1.0 on the tokens the model sampled (time steps); None: mask_NT
    loss_mask_NT: Optional[Tensor] = None  # tokens that enter the loss (the actions of rows that count); None: actions
    rewards_NT: Optional[Tensor] = None  # per-token rewards: score on the last token (- beta * KL_t when in the reward)
    adv_NT: Optional[Tensor] = None
    ret_NT: Optional[Tensor] = None
    old_logp_NT: Optional[Tensor] = None  # policy before the update (only when the batch is reused)
    ref_logp_NT: Optional[Tensor] = None  # reference policy (only when the KL coefficient > 0)
    teacher_logp_NT: Optional[Tensor] = None  # on-policy distillation's teacher
    sampler_logp_NT: Optional[Tensor] = None  # from the generation engine
    values_NT: Optional[Tensor] = None  # critic

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, rows: list[int]) -> "Experience":
        """Rows `rows`, per-token tensors trimmed to the longest selected completion."""
        T = max(1, max(len(self.completion_ids[i]) for i in rows))
        idx = torch.tensor(rows, dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                out[f.name] = [v[i] for i in rows]
            elif isinstance(v, Tensor):
                out[f.name] = v[idx, :T] if v.dim() == 2 else v[idx]
            else:
                out[f.name] = v
        return replace(self, **out)

    @classmethod
    def from_samples(cls, samples, mask_truncated: bool = False) -> "Experience":
        """The experience of scored `samples` (rlhf.rollout.Samples); `mask_truncated`: completions cut at
        max_new_tokens take no part in the loss (DAPO)."""
        mask_NT = completion_mask(samples.completion_ids)
        exp = cls(samples.prompt_ids, samples.completion_ids, mask_NT, samples.scores_N)
        if samples.sampler_logps is not None:
            exp.sampler_logp_NT = pad_rows(samples.sampler_logps, mask_NT.shape[1])
        if samples.action_masks is not None:
            exp.action_mask_NT = pad_rows(samples.action_masks, mask_NT.shape[1])
        if mask_truncated:
            exp.loss_mask_NT = exp.actions_NT * torch.tensor(samples.finished, dtype=mask_NT.dtype).unsqueeze(-1)
        return exp

    @property
    def actions_NT(self) -> Tensor:
        """The time steps: the tokens the policy sampled itself (every completion token of a single turn)."""
        return self.mask_NT if self.action_mask_NT is None else self.action_mask_NT

    @property
    def train_mask_NT(self) -> Tensor:
        """The tokens that count in the loss, its normaliser, the KL and the IS correction."""
        return self.actions_NT if self.loss_mask_NT is None else self.loss_mask_NT


def completion_mask(completion_ids: list[list[int]]) -> Tensor:
    T = max(1, max(len(c) for c in completion_ids))
    mask = torch.zeros(len(completion_ids), T)
    for i, c in enumerate(completion_ids):
        mask[i, : len(c)] = 1.0
    return mask


def pad_rows(rows: list[list[float]], T: int) -> Tensor:
    out = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r[:T], dtype=torch.float32)
    return out


def score_at_last_token(scores_N: Tensor, mask_NT: Tensor) -> Tensor:
    """rewards_NT with each sample's score on its last token of `mask_NT` (its last action; 0 elsewhere)."""
    pos_NT = torch.arange(mask_NT.shape[1]).expand_as(mask_NT)
    last_N = torch.where(mask_NT > 0, pos_NT, 0).amax(-1)
    rewards_NT = torch.zeros_like(mask_NT)
    rewards_NT[torch.arange(len(scores_N)), last_N] = scores_N.to(mask_NT.dtype)
    return rewards_NT
