"""Scored samples of whole groups: what a rollout hands to the trainer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class Samples:
    """Scored completions of whole groups: G contiguous rows per prompt (row n is in group n // G)."""

    prompts: list[Any]  # raw prompt of each sample, as the reward functions saw it
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]  # False: cut at generation.max_new_tokens
    scores_N: Tensor
    per_fn: dict[str, list]  # each reward function's raw values (and the overlong penalty)
    sampler_logps: Optional[list[list[float]]] = None  # the engine's log-prob of each completion token

    def __len__(self) -> int:
        return len(self.completion_ids)

    def groups(self, idx: list[int], G: int) -> "Samples":
        rows = [g * G + i for g in idx for i in range(G)]
        pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
        return Samples(pick(self.prompts), pick(self.prompt_ids), pick(self.completion_ids), pick(self.texts),
                       pick(self.finished), self.scores_N[rows], {k: pick(v) for k, v in self.per_fn.items()},
                       None if self.sampler_logps is None else pick(self.sampler_logps))

    @staticmethod
    def cat(parts: list["Samples"]) -> "Samples":
        first = parts[0]
        return Samples(
            *(sum((getattr(p, f) for p in parts), []) for f in ("prompts", "prompt_ids", "completion_ids", "texts", "finished")),
            torch.cat([p.scores_N for p in parts]), {k: sum((p.per_fn[k] for p in parts), []) for k in first.per_fn},
            None if first.sampler_logps is None else sum((p.sampler_logps for p in parts), []),
        )
