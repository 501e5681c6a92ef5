"""Shared-prefix packing for scoring: sequences that begin alike (a pair's chosen and rejected, or the
G completions of one prompt) go through the model in ONE row with ONE copy of their common beginning
(the rendered prompt: system message, question, chat markup).

Row layout (right-padded):

    [prefix | suffix_1 | suffix_2 | ... | suffix_k | pad..]

A block attention mask lets each suffix see the prefix and itself (causally), never another
suffix; position ids of each suffix continue from the prefix, so every token has exactly the
context and position it has in the unpacked sequence, and the scores are the same. The score
head's per-token output is read where transformers' sequence classifiers read it: at the last
token that is not the pad token. Cost drops from k x (prefix + suffix) tokens to prefix + k x suffix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.models.logprobs import attention_mask_4d
from rlhf.models.precision import autocast


@dataclass
class PackedGroups:
    input_ids_RL: Tensor
    position_ids_RL: Tensor
    visible_RLL: Tensor  # bool: query l may attend to key l'
    row_N: Tensor  # for each sequence (groups flattened in order): its row
    col_N: Tensor  # and the column where its score is read


def shared_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the common beginning of `seqs`, leaving at least one token of each outside it."""
    n = min(len(s) for s in seqs) - 1
    k = 0
    while k < n and all(s[k] == seqs[0][k] for s in seqs[1:]):
        k += 1
    return k


def last_scored(seq: list[int], pad_id: int) -> int:
    """Where AutoModelForSequenceClassification reads a sequence's score: its last non-pad token (0 if none)."""
    return next((i for i in range(len(seq) - 1, -1, -1) if seq[i] != pad_id), 0)


def pack_groups(groups: list[list[list[int]]], pad_id: int) -> PackedGroups:
    """One row per group of non-empty sequences: their shared prefix, then each one's suffix."""
    prefix = [shared_prefix_len(g) for g in groups]
    R = len(groups)
    L = max(k + sum(len(s) - k for s in g) for k, g in zip(prefix, groups))
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    seg = torch.full((R, L), -2, dtype=torch.long)  # -1 prefix, j >= 0 suffix j, -2 padding
    row_N, col_N = [], []
    for row, (k, group) in enumerate(zip(prefix, groups)):
        ids[row, :k] = torch.tensor(group[0][:k], dtype=torch.long)
        pos[row, :k] = torch.arange(k)
        seg[row, :k] = -1
        start = k
        for j, seq in enumerate(group):
            n = len(seq) - k
            ids[row, start: start + n] = torch.tensor(seq[k:], dtype=torch.long)
            pos[row, start: start + n] = torch.arange(k, len(seq))
            seg[row, start: start + n] = j
            last = last_scored(seq, pad_id)  # in the prefix (a shared column) or in this suffix
            row_N.append(row)
            col_N.append(last if last < k else start + last - k)
            start += n
    q, kk = seg.unsqueeze(2), seg.unsqueeze(1)
    visible = torch.ones(L, L, dtype=torch.bool).tril() & ((kk == -1) | (kk == q))
    visible |= torch.eye(L, dtype=torch.bool)  # padding attends to itself (no empty softmax)
    return PackedGroups(ids, pos, visible, torch.tensor(row_N), torch.tensor(col_N))


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The 1-output head of a (DDP-, peft-wrapped) AutoModelForSequenceClassification model."""
    base = getattr(model, "module", model)  # DDP
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # peft
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(base).__name__} has no 'score' or 'classifier' head; turn packing off")


def packed_scores(model: torch.nn.Module, packed: PackedGroups, device, compute_dtype: str) -> Tensor:
    """scores_N (float32, groups flattened in order) from one forward over the packed rows.

    The model is called as a whole (so DDP synchronises gradients); a forward hook on its score
    head keeps the per-token scores, from which each sequence's score is read.
    """
    captured: list[Tensor] = []
    handle = score_head(model).register_forward_hook(lambda module, args, out: captured.append(out))
    base = getattr(model, "module", model)
    dtype = torch.bfloat16 if compute_dtype == "bf16" else torch.float32
    try:
        with autocast(compute_dtype, device):
            model(input_ids=packed.input_ids_RL.to(device), position_ids=packed.position_ids_RL.to(device),
                  attention_mask=attention_mask_4d(base, packed.visible_RLL.to(device), dtype), use_cache=False)
    finally:
        handle.remove()
    scores_RL = captured[-1][..., 0].float()
    return scores_RL[packed.row_N.to(scores_RL.device), packed.col_N.to(scores_RL.device)]


def packed_pair_scores(model: torch.nn.Module, chosen_ids: list[list[int]], rejected_ids: list[list[int]], pad_id: int,
                       device, compute_dtype: str, prompt_keys: list | None = None) -> tuple[Tensor, Tensor]:
    """(r_chosen_M, r_rejected_M): each pair packed in one row; consecutive pairs with the same (non-None)
    prompt key share a row, [prefix | c_1 | r_1 | c_2 | r_2 | ...], with one copy of the prompt."""
    keys = prompt_keys or [None] * len(chosen_ids)
    groups: list[list[list[int]]] = []
    for i, (c, r) in enumerate(zip(chosen_ids, rejected_ids)):
        if groups and keys[i] is not None and keys[i] == keys[i - 1]:
            groups[-1] += [c, r]
        else:
            groups.append([c, r])
    scores_N = packed_scores(model, pack_groups(groups, pad_id), device, compute_dtype)
    return scores_N[0::2], scores_N[1::2]
