"""Pair packing: a preference pair's chosen and rejected go through the model in ONE row with ONE copy of
their shared beginning (the prompt, rendered: system message, question, chat markup).

Row layout (right-padded):

    [prefix | chosen suffix | rejected suffix | pad..]

A block attention mask lets each suffix see the prefix and itself (causally), never the other
suffix; position ids of each suffix continue from the prefix, so every token has exactly the
context and position it has in the unpacked sequence, and the scores are the same. The score
head's per-token output is read where transformers' sequence classifiers read it: at the last
token that is not the pad token. Cost per pair drops from 2 x (prefix + suffix) tokens to
prefix + 2 x suffix tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.models.packing import _attention_mask
from rlhf.models.precision import autocast


@dataclass
class PackedPairs:
    input_ids_RL: Tensor
    position_ids_RL: Tensor
    visible_RLL: Tensor  # bool: query l may attend to key l'
    chosen_col_R: Tensor  # column where each row's chosen score is read
    rejected_col_R: Tensor  # column where each row's rejected score is read


def shared_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the common beginning of a and b, leaving at least one token of each outside it."""
    n = min(len(a), len(b)) - 1
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def last_scored(seq: list[int], pad_id: int) -> int:
    """Where AutoModelForSequenceClassification reads a sequence's score: its last non-pad token (0 if none)."""
    return next((i for i in range(len(seq) - 1, -1, -1) if seq[i] != pad_id), 0)


def pack_pairs(chosen_ids: list[list[int]], rejected_ids: list[list[int]], pad_id: int) -> PackedPairs:
    """One row per pair: shared prefix, chosen suffix, rejected suffix; see the module docstring."""
    layout = []
    for c, r in zip(chosen_ids, rejected_ids):
        k = shared_prefix_len(c, r)
        layout.append((k, c, r))
    R = len(layout)
    L = max(len(c) + len(r) - k for k, c, r in layout)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    seg = torch.full((R, L), -2, dtype=torch.long)  # -1 prefix, 0 chosen, 1 rejected, -2 padding
    chosen_col, rejected_col = [], []
    for row, (k, c, r) in enumerate(layout):
        ids[row, :k] = torch.tensor(c[:k], dtype=torch.long)
        pos[row, :k] = torch.arange(k)
        seg[row, :k] = -1
        start = k
        for s, seq in enumerate((c, r)):
            n = len(seq) - k
            ids[row, start: start + n] = torch.tensor(seq[k:], dtype=torch.long)
            pos[row, start: start + n] = torch.arange(k, len(seq))
            seg[row, start: start + n] = s
            last = last_scored(seq, pad_id)  # in the prefix (shared column) or in this suffix
            (chosen_col if s == 0 else rejected_col).append(last if last < k else start + last - k)
            start += n
    q, kk = seg.unsqueeze(2), seg.unsqueeze(1)
    visible = torch.ones(L, L, dtype=torch.bool).tril() & ((kk == -1) | (kk == q))
    visible |= torch.eye(L, dtype=torch.bool)  # padding attends to itself (no empty softmax)
    return PackedPairs(ids, pos, visible, torch.tensor(chosen_col), torch.tensor(rejected_col))


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The 1-output head of a (DDP-, peft-wrapped) AutoModelForSequenceClassification model."""
    base = getattr(model, "module", model)  # DDP
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # peft
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(base).__name__} has no 'score' or 'classifier' head; set train.pack_pairs=false")


def packed_pair_scores(model: torch.nn.Module, packed: PackedPairs, device, compute_dtype: str) -> tuple[Tensor, Tensor]:
    """(r_chosen_M, r_rejected_M), float32, from one forward over the packed rows.

    The model is called as a whole (so DDP synchronises gradients); a forward hook on its score
    head keeps the per-token scores, from which the two suffix ends are read.
    """
    captured: list[Tensor] = []
    handle = score_head(model).register_forward_hook(lambda module, args, out: captured.append(out))
    base = getattr(model, "module", model)
    dtype = torch.bfloat16 if compute_dtype == "bf16" else torch.float32
    try:
        with autocast(compute_dtype, device):
            model(input_ids=packed.input_ids_RL.to(device), position_ids=packed.position_ids_RL.to(device),
                  attention_mask=_attention_mask(base, packed.visible_RLL.to(device), dtype), use_cache=False)
    finally:
        handle.remove()
    scores_RL = captured[-1][..., 0].float()
    rows = torch.arange(scores_RL.shape[0], device=scores_RL.device)
    return scores_RL[rows, packed.chosen_col_R.to(scores_RL.device)], scores_RL[rows, packed.rejected_col_R.to(scores_RL.device)]
