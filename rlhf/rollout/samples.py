"""Scored samples of whole groups: what a rollout hands to the trainer."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
from torch import Tensor


def _pick(v: Any, rows: list[int]) -> Any:
    if v is None:
        return None
    if isinstance(v, Tensor):
        return v[rows]
    if isinstance(v, dict):
        return {k: _pick(x, rows) for k, x in v.items()}
    return [v[r] for r in rows]


def _cat(vs: list) -> Any:
    if vs[0] is None:
        return None
    if isinstance(vs[0], Tensor):
        return torch.cat(vs)
    if isinstance(vs[0], dict):
        return {k: _cat([v[k] for v in vs]) for k in vs[0]}
    return sum(vs, [])


@dataclass
class Completions:
    """What generation produced for one batch: N = B prompts x G samples, prompt-major (row n is in group n // G).
    Single-turn: one completion per sample. Episodes: the model's turns and what the environment added between
    them, in one token sequence per sample."""

    prompts: list[Any]  # raw prompt of each sample, as the reward functions see it
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completions: list[Any]  # what reward functions receive: texts, or message lists for chat prompts
    texts: list[str]  # the completion as text (episodes: the transcript, environment parts marked)
    finished: list[bool]  # False: cut by a budget (generation.max_new_tokens, env.max_tokens / max_turns)
    sampler_logps: Optional[list[list[float]]] = None  # the engine's log-prob of each token it sampled (0 elsewhere)
    # episodes: 1 on the tokens the model sampled, 0 on the environment's
    action_masks: Optional[list[list[int]]] = None
    transcripts: Optional[list[list[dict]]] = None  # episodes: the messages after the prompt
    columns: dict[str, list] = field(default_factory=dict)  # extra keyword lists for reward functions (environments)
    stats: dict[str, float] = field(default_factory=dict)  # episode counters on this process (sums)


@dataclass
class Samples:
    """Scored completions of whole groups: G contiguous rows per prompt (row n is in group n // G)."""

    prompts: list[Any]  # raw prompt of each sample, as the reward functions saw it
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]  # False: cut by a budget
    scores_N: Tensor
    per_fn: dict[str, list]  # each reward function's raw values (and the overlong penalty)
    sampler_logps: Optional[list[list[float]]] = None  # the engine's log-prob of each completion token
    action_masks: Optional[list[list[int]]] = None  # episodes: 1 on the model's own tokens
    transcripts: Optional[list[list[dict]]] = None  # episodes: the messages after the prompt

    def __len__(self) -> int:
        return len(self.completion_ids)

    def groups(self, idx: list[int], G: int) -> "Samples":
        rows = [g * G + i for g in idx for i in range(G)]
        return Samples(**{f.name: _pick(getattr(self, f.name), rows) for f in fields(self)})

    @staticmethod
    def cat(parts: list["Samples"]) -> "Samples":
        return Samples(**{f.name: _cat([getattr(p, f.name) for p in parts]) for f in fields(Samples)})
