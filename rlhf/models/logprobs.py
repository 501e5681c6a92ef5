"""Token log-probabilities of completions without keeping fp32 full-vocabulary logits around.

The policy forward returns logits only for completion positions (`logits_to_keep`), in
the compute dtype (bf16 under autocast). `token_logprobs` turns them into log pi(a_t|s_t)
chunk by chunk in fp32 and, in backward, rebuilds softmax from the saved bf16 logits and
the per-token log-sum-exp, so no fp32 [N, T, V] tensor is ever stored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.models.precision import autocast

CHUNK_TOKENS = 1024  # rows of the [N*T, V] logits handled at once in fp32


@dataclass
class TokenBatch:
    """prompt (left-padded to P) + completion (right-padded to T) for a forward pass."""

    input_ids_NL: Tensor
    attention_mask_NL: Tensor
    position_ids_NL: Tensor
    completion_ids_NT: Tensor
    mask_NT: Tensor  # float, 1.0 on completion tokens (EOS included)

    @property
    def prompt_len(self) -> int:
        return self.input_ids_NL.shape[1] - self.completion_ids_NT.shape[1]


def collate(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device=None) -> TokenBatch:
    """Pack variable-length prompts and completions with the least padding that keeps one prompt length P."""
    P = max(len(p) for p in prompt_ids)
    T = max(1, max(len(c) for c in completion_ids))
    N = len(prompt_ids)
    ids = torch.full((N, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((N, P + T), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p): P] = 1
        if c:
            ids[i, P: P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, P: P + len(c)] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    mask = attn[:, P:].float()
    batch = TokenBatch(ids, attn, pos, ids[:, P:].clone(), mask)
    if device is not None:
        batch = TokenBatch(*(t.to(device) for t in (ids, attn, pos, batch.completion_ids_NT, mask)))
    return batch


class _TokenLogProb(torch.autograd.Function):
    """logp = x_y - logsumexp(x), x = logits / temperature; also returns the (non-differentiable) entropy."""

    @staticmethod
    def forward(ctx, logits_NTV: Tensor, ids_NT: Tensor, temperature: float):
        N, T, V = logits_NTV.shape
        flat = logits_NTV.reshape(-1, V)
        ids = ids_NT.reshape(-1, 1)
        logp = torch.empty(N * T, dtype=torch.float32, device=flat.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp)
        for i in range(0, N * T, CHUNK_TOKENS):
            x = flat[i: i + CHUNK_TOKENS].float() / temperature
            lse_c = torch.logsumexp(x, -1)
            lse[i: i + CHUNK_TOKENS] = lse_c
            logp[i: i + CHUNK_TOKENS] = x.gather(-1, ids[i: i + CHUNK_TOKENS]).squeeze(-1) - lse_c
            p = torch.exp(x - lse_c.unsqueeze(-1))
            ent[i: i + CHUNK_TOKENS] = lse_c - (p * x).sum(-1)
        ctx.save_for_backward(logits_NTV, ids_NT, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(ent)
        return logp.view(N, T), ent.view(N, T)

    @staticmethod
    def backward(ctx, grad_logp_NT: Tensor, _grad_ent):
        logits_NTV, ids_NT, lse = ctx.saved_tensors
        N, T, V = logits_NTV.shape
        flat = logits_NTV.reshape(-1, V)
        ids = ids_NT.reshape(-1, 1)
        g = grad_logp_NT.reshape(-1, 1).float()
        grad = torch.empty_like(flat)
        for i in range(0, N * T, CHUNK_TOKENS):
            x = flat[i: i + CHUNK_TOKENS].float() / ctx.temperature
            gi = g[i: i + CHUNK_TOKENS]
            d = -torch.exp(x - lse[i: i + CHUNK_TOKENS].unsqueeze(-1)) * gi  # d logp / dx = onehot - softmax
            d.scatter_add_(-1, ids[i: i + CHUNK_TOKENS], gi)
            grad[i: i + CHUNK_TOKENS] = (d / ctx.temperature).to(grad.dtype)
        return grad.view(N, T, V), None, None


def token_logprobs(logits_NTV: Tensor, ids_NT: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(logp_NT, entropy_NT) in fp32 from logits of any dtype; differentiable in logp."""
    return _TokenLogProb.apply(logits_NTV, ids_NT, temperature)


def completion_logprobs(
    model: torch.nn.Module, batch: TokenBatch, temperature: float = 1.0, compute_dtype: str = "fp32"
) -> tuple[Tensor, Tensor]:
    """(logp_NT, entropy_NT) of each completion token under `model` (call through the DDP/FSDP wrapper).

    Only the T + 1 last positions produce logits (P-1 .. P+T-1); the last is dropped.
    """
    T = batch.completion_ids_NT.shape[1]
    with autocast(compute_dtype, batch.input_ids_NL.device):
        out = model(
            input_ids=batch.input_ids_NL,
            attention_mask=batch.attention_mask_NL,
            position_ids=batch.position_ids_NL,
            use_cache=False,
            logits_to_keep=T + 1,
        )
    logits_NTV = out.logits[:, :-1]
    logp_NT, ent_NT = token_logprobs(logits_NTV, batch.completion_ids_NT, temperature)
    return logp_NT * batch.mask_NT, ent_NT.detach() * batch.mask_NT


def completion_logits(model: torch.nn.Module, batch: TokenBatch, compute_dtype: str = "fp32") -> Tensor:
    """logits_NTV (compute dtype) predicting each completion token, differentiable to any order.

    For the full-distribution KL and its Fisher-vector products (`rlhf.algos.natural`):
    attention runs on PyTorch's math kernel, the only one with a double backward.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    T = batch.completion_ids_NT.shape[1]
    with autocast(compute_dtype, batch.input_ids_NL.device), sdpa_kernel([SDPBackend.MATH]):
        out = model(
            input_ids=batch.input_ids_NL,
            attention_mask=batch.attention_mask_NL,
            position_ids=batch.position_ids_NL,
            use_cache=False,
            logits_to_keep=T + 1,
        )
    return out.logits[:, :-1]
