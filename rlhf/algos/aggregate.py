"""Loss aggregation: `LOSS_AGGREGATIONS[name](loss_NT, mask_NT, norm) -> scalar`.

`loss_NT` [N, T] is the per-token loss of one micro-batch, `mask_NT` [N, T] 1.0 on tokens
that count. `norm` is fixed for a whole optimizer step (all micro-batches on all
processes), so summing the micro-batch results gives exactly the full-batch loss: results
do not depend on gradient accumulation or on the number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from rlhf.registry import Registry


@dataclass(frozen=True)
class LossNormalizer:
    num_tokens: float  # tokens that count in the optimizer step (all processes), >= 1
    num_seqs: float  # sequences with at least one such token (all processes), >= 1
    max_tokens: float  # generation.max_new_tokens, Dr. GRPO's constant


AggFn = Callable[[Tensor, Tensor, LossNormalizer], Tensor]
LOSS_AGGREGATIONS: Registry[AggFn] = Registry("loss aggregation")


@LOSS_AGGREGATIONS.register("token_mean")
def token_mean(loss_NT: Tensor, mask_NT: Tensor, norm: LossNormalizer) -> Tensor:
    """sum_{n,t} loss / (tokens in the step): every token weighs the same (DAPO, Yu et al. 2025)."""
    return (loss_NT * mask_NT).sum() / norm.num_tokens


@LOSS_AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss_NT: Tensor, mask_NT: Tensor, norm: LossNormalizer) -> Tensor:
    """(1/N) sum_n (1/|y_n|) sum_t loss: the mean over sequences of the per-sequence token mean
    (GRPO, Shao et al. 2024)."""
    per_seq_N = (loss_NT * mask_NT).sum(-1) / mask_NT.sum(-1).clamp(min=1)
    return per_seq_N.sum() / norm.num_seqs


@LOSS_AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss_NT: Tensor, mask_NT: Tensor, norm: LossNormalizer) -> Tensor:
    """sum_{n,t} loss / (N * max_new_tokens): a constant normaliser, no length bias (Dr. GRPO, Liu et al. 2025)."""
    return (loss_NT * mask_NT).sum() / (norm.num_seqs * norm.max_tokens)
