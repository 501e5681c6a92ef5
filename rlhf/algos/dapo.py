"""DAPO's batch shaping (Yu et al. 2025, "DAPO: an open-source LLM RL system at scale"):
dynamic sampling keeps only informative groups, the soft overlong punishment penalises
completions that run into the length limit, and truncated completions can be masked out.

Pure functions on scores and lengths; the trainer (`rlhf.trainers.sampling`) applies them.
"""
from __future__ import annotations

import torch
from torch import Tensor


def informative_groups(scores_N: Tensor, group_size: int) -> Tensor:
    """keep_B: True for groups whose finite scores are not all equal (at least two distinct values).

    A group whose rewards are all equal has advantage 0 under group-relative estimators
    (grpo, dr_grpo, rloo, reinforce_baseline), so it carries no gradient: DAPO drops it.
    NaN scores (unscored samples) are ignored; a group with fewer than 2 scores is dropped.
    """
    score_BG = scores_N.view(-1, group_size)
    valid_BG = torch.isfinite(score_BG)
    hi_B = torch.where(valid_BG, score_BG, -torch.inf).amax(-1)
    lo_B = torch.where(valid_BG, score_BG, torch.inf).amin(-1)
    return (valid_BG.sum(-1) >= 2) & (hi_B > lo_B)


def overlong_penalty(lengths_N: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, scaled by `penalty`, for completion lengths `lengths_N`:

        R_len(y) = 0                                  if |y| <= L_max - L_cache
                 = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                 = -1                                 if |y| > L_max

    with L_max = `max_len` (generation.max_new_tokens) and L_cache = `buffer`; `buffer` = 0
    gives no penalty. It is added to the sequence score.
    """
    lengths_N = lengths_N.float()
    if buffer <= 0:
        return torch.zeros_like(lengths_N)
    start = max_len - buffer
    ramp_N = (start - lengths_N) / buffer
    pen_N = torch.where(lengths_N <= start, torch.zeros_like(lengths_N), ramp_N)
    pen_N = torch.where(lengths_N > max_len, torch.full_like(lengths_N, -1.0), pen_N)
    return penalty * pen_N
