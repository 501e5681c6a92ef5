"""Loss aggregation: `LOSS_AGGREGATIONS[name](loss_NT, mask_NT, norm) -> scalar`.

`norm` is fixed for a whole optimizer step (all micro-batches on all processes), so
summing the micro-batch results gives exactly the full-batch loss: results do not depend
on gradient accumulation or on the number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from rlhf.registry import Registry


@dataclass(frozen=True)
class LossNormalizer:
    num_tokens: float  # completion tokens in the optimizer step (all processes)
    num_seqs: float  # sequences in the optimizer step (all processes)
    max_tokens: float  # generation.max_new_tokens, Dr. GRPO's constant


AggFn = Callable[[Tensor, Tensor, LossNormalizer], Tensor]
LOSS_AGGREGATIONS: Registry[AggFn] = Registry("loss aggregation")


@LOSS_AGGREGATIONS.register("token_mean")
def token_mean(loss_NT: Tensor, mask_NT: Tensor, norm: LossNormalizer) -> Tensor:
    """sum over all tokens / number of tokens (DAPO, Yu et al. 2025)."""
    return (loss_NT * mask_NT).sum() / norm.num_tokens


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss_NT: Tensor, mask_NT: Tensor, norm: LossNormalizer) -> Tensor:
    """mean over sequences of the per-sequence token mean (original GRPO, Shao et al. 2024)."""
    per_seq_N = (loss_NT * mask_NT).sum(-1) / mask_NT.sum(-1).clamp(min=1)
    return per_seq_N.sum() / norm.num_seqs


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss_NT: Tensor, mask_NT: Tensor, norm: LossNormalizer) -> Tensor:
    """sum over tokens / (sequences x max_new_tokens): a constant normaliser (Dr. GRPO, Liu et al. 2025)."""
    return (loss_NT * mask_NT).sum() / (norm.num_seqs * norm.max_tokens)
