"""Token log-probabilities of completions, with shared-prompt packing and no fp32 full-vocabulary logits kept.

Packing: the G completions of a prompt go through the model in ONE row with ONE copy of the prompt.
Row layout (prompts left-padded so every prompt ends at column P):

    [pad.. prompt | c_1 | c_2 | ... | c_k | pad..]

A block attention mask lets each completion see the prompt and itself (causally), never
another completion; position ids restart at the prompt length for every completion, so each
completion gets exactly the positions and context it had when it was sampled. Forward and
backward cost drops from G x (prompt + completion) tokens to prompt + G x completion tokens.
The logit at the prompt's last position predicts the first token of every completion, so
log-probs are gathered with an index (`_IndexedLogProb`), one logit row per target token.
Without sharing (`share_prompts=False`) every sample gets its own row: the usual padded layout.

Only logits from the last prompt column on are produced (`logits_to_keep`), in the compute
dtype; they are turned into log-probs chunk by chunk in fp32, and backward rebuilds softmax
from the saved logits and the per-row log-sum-exp, so no fp32 [tokens, vocab] tensor is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from rlhf.models.precision import autocast

CHUNK_ROWS: Optional[int] = None  # logit rows per chunk; None: by device, `_chunk_rows`
# a chunk's fp32 rows stay in cache through their five passes (SmolLM2, 514 rows: 3x faster than 1024-row chunks)
CPU_CHUNK_BYTES = 2 << 20
GPU_CHUNK_ROWS = 1024


def _chunk_rows(logits_KV: Tensor) -> int:
    if CHUNK_ROWS:
        return CHUNK_ROWS
    if logits_KV.device.type == "cpu":
        return max(1, CPU_CHUNK_BYTES // (4 * logits_KV.shape[-1]))
    return GPU_CHUNK_ROWS


@dataclass
class PackedBatch:
    input_ids_RL: Tensor
    position_ids_RL: Tensor
    visible_RLL: Tensor  # bool: query l may attend to key l'
    keep: int  # logits are kept for the last `keep` columns (from the last prompt column on)
    row_M: Tensor  # for each completion token m: its row in the flattened kept logits [R * keep]
    target_M: Tensor  # the token id it predicts
    sample_M: Tensor  # which sample (0..N-1) the token belongs to
    pos_M: Tensor  # its index inside the sample's completion
    num_samples: int
    max_len: int  # T, the longest completion


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
         share_prompts: bool = True) -> PackedBatch:
    """One row per run of consecutive samples with identical prompts (or per sample without sharing)."""
    rows: list[tuple[list[int], list[int]]] = []  # (prompt, sample indices)
    for i, p in enumerate(prompt_ids):
        if share_prompts and rows and rows[-1][0] == p:
            rows[-1][1].append(i)
        else:
            rows.append((p, [i]))
    P = max(len(p) for p, _ in rows)
    widths = [sum(len(completion_ids[i]) for i in idx) for _, idx in rows]
    L = P + max(widths)
    R = len(rows)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    seg = torch.full((R, L), -2, dtype=torch.long)  # -1 prompt, i >= 0 completion i, -2 padding
    row_M, target_M, sample_M, pos_M = [], [], [], []
    keep = L - (P - 1)
    for r, (p, idx) in enumerate(rows):
        ids[r, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        pos[r, P - len(p): P] = torch.arange(len(p))
        seg[r, P - len(p): P] = -1
        start = P
        for s, i in enumerate(idx):
            c = completion_ids[i]
            if not c:
                continue
            ids[r, start: start + len(c)] = torch.tensor(c, dtype=torch.long)
            pos[r, start: start + len(c)] = len(p) + torch.arange(len(c))
            seg[r, start: start + len(c)] = s
            # token j is predicted by the logit at column start + j - 1 (the prompt's last column for j = 0)
            cols = [P - 1] + list(range(start, start + len(c) - 1))
            row_M += [r * keep + col - (P - 1) for col in cols]
            target_M += c
            sample_M += [i] * len(c)
            pos_M += list(range(len(c)))
            start += len(c)
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    visible = causal & ((k == -1) | (k == q))
    visible |= torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves (no empty softmax)
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedBatch(ids, pos, visible, keep, as_t(row_M), as_t(target_M), as_t(sample_M), as_t(pos_M),
                       len(prompt_ids), max((len(c) for c in completion_ids), default=1) or 1)


class _IndexedLogProb(torch.autograd.Function):
    """logp_m = x[row_m, tgt_m] - logsumexp(x[row_m]), x = logits / temperature, computed in fp32 chunks.

    A logit row may serve several targets (the prompt's last column serves every completion).
    Backward rebuilds softmax from the saved (bf16) logits and log-sum-exp: no fp32 [rows, V] is kept.
    """

    @staticmethod
    def forward(ctx, logits_KV: Tensor, row_M: Tensor, target_M: Tensor, temperature: float, entropy: bool):
        # every row in contiguous chunks (a row no target reads costs less than gathering the used ones)
        lse_K = torch.empty(logits_KV.shape[0], dtype=torch.float32, device=logits_KV.device)
        ent_K = torch.zeros_like(lse_K)
        C = _chunk_rows(logits_KV)
        for i in range(0, logits_KV.shape[0], C):
            x = _scaled(logits_KV[i: i + C], temperature)
            max_k1 = x.amax(-1, keepdim=True)
            e = (x - max_k1).exp_()  # in place from here on: every pass over [rows, V] fp32 counts on a CPU
            sum_k = e.sum(-1)
            lse = max_k1.squeeze(-1) + sum_k.log()
            lse_K[i: i + C] = lse
            if entropy:  # H = lse - sum(softmax(x) * x)
                ent_K[i: i + C] = lse - e.mul_(x).sum(-1) / sum_k
        logp_M = logits_KV[row_M, target_M].float() / temperature - lse_K[row_M]
        ctx.save_for_backward(logits_KV, row_M, target_M, lse_K)
        ctx.temperature = temperature
        ent_M = ent_K[row_M]
        ctx.mark_non_differentiable(ent_M)
        return logp_M, ent_M

    @staticmethod
    def backward(ctx, grad_M: Tensor, _grad_ent):
        logits_KV, row_M, target_M, lse_K = ctx.saved_tensors
        t = ctx.temperature
        g = grad_M.float()
        coef_K = torch.zeros_like(lse_K).index_add_(0, row_M, g)  # d/dx of -lse, summed over targets
        grad = torch.empty_like(logits_KV)  # every row is written below
        C = _chunk_rows(logits_KV)
        for i in range(0, logits_KV.shape[0], C):
            rows = slice(i, i + C)
            p = _scaled(logits_KV[rows], t).sub_(lse_K[rows].unsqueeze(-1)).exp_()
            grad[rows] = p.mul_(coef_K[rows].unsqueeze(-1) / -t).to(grad.dtype)
        grad.index_put_((row_M, target_M), (g / t).to(grad.dtype), accumulate=True)
        return grad, None, None, None, None


def _scaled(logits_KV: Tensor, temperature: float) -> Tensor:
    """logits_KV / temperature as a new fp32 tensor."""
    x = logits_KV.float() if logits_KV.dtype != torch.float32 else logits_KV.clone()
    return x if temperature == 1.0 else x.div_(temperature)


def attention_mask_4d(model: torch.nn.Module, visible_RLL: Tensor, dtype: torch.dtype) -> Tensor:
    """4D mask in the form the model's attention implementation takes: bool for sdpa, additive otherwise."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    mask = visible_RLL.unsqueeze(1)
    if impl == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def model_inputs(model: torch.nn.Module, pb: PackedBatch, compute_dtype: str, device) -> dict:
    """Forward kwargs for a packed batch; outputs are kept from the last prompt column on."""
    base = getattr(model, "module", model)  # DDP wrapper -> the model, for its config only
    dtype = torch.bfloat16 if compute_dtype == "bf16" else torch.float32
    return dict(
        input_ids=pb.input_ids_RL.to(device),
        position_ids=pb.position_ids_RL.to(device),
        attention_mask=attention_mask_4d(base, pb.visible_RLL.to(device), dtype),
        use_cache=False,
        logits_to_keep=pb.keep,
    )


def scatter_tokens(pb: PackedBatch, values_M: Tensor) -> Tensor:
    """Per-token values in packed order -> [N, T], zero past each completion's end."""
    out_NT = torch.zeros(pb.num_samples, pb.max_len, dtype=values_M.dtype, device=values_M.device)
    return out_NT.index_put((pb.sample_M.to(values_M.device), pb.pos_M.to(values_M.device)), values_M)


def packed_logprobs(model: torch.nn.Module, pb: PackedBatch, temperature: float = 1.0, compute_dtype: str = "fp32",
                    device=None, entropy: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(logp_NT, entropy_NT) for the packed samples, zero past each completion's end
    (entropy_NT None unless `entropy`)."""
    device = device or pb.input_ids_RL.device
    with autocast(compute_dtype, device):
        logits = model(**model_inputs(model, pb, compute_dtype, device)).logits
    logits_KV = logits.reshape(-1, logits.shape[-1])
    logp_M, ent_M = _IndexedLogProb.apply(logits_KV, pb.row_M.to(device), pb.target_M.to(device), temperature, entropy)
    return scatter_tokens(pb, logp_M), scatter_tokens(pb, ent_M.detach()) if entropy else None


def sample_logprobs(model: torch.nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                    pad_id: int, *, temperature: float = 1.0, compute_dtype: str = "fp32", device=None,
                    pack_prompts: bool = True, entropy: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(logp_NT, entropy_NT) of the completions under `model` (call it through its DDP/FSDP wrapper when training).

    T is the longest completion; entries past a completion's end are 0. entropy_NT is None unless `entropy`.
    """
    pb = pack(prompt_ids, completion_ids, pad_id, share_prompts=pack_prompts)
    return packed_logprobs(model, pb, temperature, compute_dtype, device, entropy)


def sample_log_softmax(model: torch.nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                       pad_id: int, *, temperature: float = 1.0, compute_dtype: str = "fp32", device=None,
                       pack_prompts: bool = True) -> tuple[Tensor, PackedBatch]:
    """(logp_MV, packed batch): the full log-softmax over the vocabulary for every completion token m
    (token m is sample `pb.sample_M[m]`, position `pb.pos_M[m]`, id `pb.target_M[m]`), in fp32.

    Differentiable to any order, for the exact KL and its Fisher-vector products
    (`rlhf.algos.natural`): attention runs on PyTorch's math kernel, the only one with a
    double backward. Memory: one fp32 [M, V] tensor, so keep micro-batches small.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pb = pack(prompt_ids, completion_ids, pad_id, share_prompts=pack_prompts)
    device = device or pb.input_ids_RL.device
    with autocast(compute_dtype, device), sdpa_kernel([SDPBackend.MATH]):
        logits = model(**model_inputs(model, pb, compute_dtype, device)).logits
    logits_MV = logits.reshape(-1, logits.shape[-1])[pb.row_M.to(device)]
    return torch.log_softmax(logits_MV.float() / temperature, -1), pb
