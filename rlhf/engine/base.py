"""The GenerationEngine protocol and the Rollouts it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    greedy: bool = False


@dataclass
class Rollouts:
    """N = len(prompts) x n samples, prompt-major: the n samples of prompt b are rows b*n .. b*n+n-1."""

    prompt_ids: list[list[int]]  # per sample, unpadded
    completion_ids: list[list[int]]  # per sample, unpadded, ends with EOS when finished
    finished: list[bool]  # True if the sample emitted EOS, False if cut at max_new_tokens
    sampler_logps: Optional[list[list[float]]] = None  # per completion token, from the sampling distribution
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)


@runtime_checkable
class GenerationEngine(Protocol):
    """Samples completions for token-id prompts with the current policy weights.

    An engine may set `free_logps = True` when the log-probs of its sampled tokens cost nothing extra: the trainer
    then always asks for them (the sampler/trainer gap metric); otherwise only an IS correction asks."""

    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, return_logps: bool = False
    ) -> Rollouts: ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make generation use `model`'s current weights (called after each optimizer step)."""

    def sleep(self) -> None:
        """Free generation memory while training runs (no-op where nothing is held)."""

    def wake(self) -> None: ...
