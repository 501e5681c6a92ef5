"""The reward model: a causal-LM backbone with a 1-output score head (AutoModelForSequenceClassification).

Full fine-tuning keeps fp32 weights; LoRA (peft task SEQ_CLS: the score head is trained in
full, next to the adapters) freezes the base, in bf16 when computing in bf16. The saved model
is always a plain transformers directory: LoRA is merged, so no peft is needed to load it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from rlhf.models.export import save_model
from rlhf.models.loading import resolve_model_path
from rlhf.models.lora import apply_lora, is_peft
from rlhf.models.precision import autocast


def load_reward_model(mcfg, tokenizer) -> torch.nn.Module:
    """Backbone from `mcfg.path` with a fresh score head (num_labels=1), LoRA-wrapped when `mcfg.lora.enabled`."""
    lora = mcfg.lora
    dtype = torch.bfloat16 if (lora.enabled and mcfg.compute_dtype == "bf16") else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(mcfg.path), num_labels=1, dtype=dtype, trust_remote_code=mcfg.trust_remote_code,
        pad_token_id=tokenizer.pad_token_id,
    )
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise ValueError(f"model '{mcfg.path}' is quantized; "
                         "training needs plain weights (dequantize and save it first)")
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    model.config.use_cache = False
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora.enabled:
            model.enable_input_require_grads()
    if not lora.enabled:
        return model
    return apply_lora(model, lora, task_type="SEQ_CLS")  # the score head trains in full, beside the adapters


def save_reward_model(model: torch.nn.Module, tokenizer, target: Path) -> Path:
    """Write a plain transformers directory (LoRA merged, one dtype) that loads with
    `AutoModelForSequenceClassification.from_pretrained(target)`; atomic like `save_model`."""
    out = model
    if is_peft(model):
        out = copy.deepcopy(model).merge_and_unload()
        out = out.to(out.get_input_embeddings().weight.dtype)  # the fp32 head joins the base's dtype
    return save_model(out, tokenizer, target)


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids_BL, mask_BL with every sequence left-aligned (right padding)."""
    width = max(len(s) for s in seqs)
    ids_BL = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask_BL = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BL[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BL[i, : len(s)] = 1
    return ids_BL.to(device), mask_BL.to(device)


def score_sequences(model: torch.nn.Module, seqs: list[list[int]], pad_id: int, device,
                    compute_dtype: str) -> torch.Tensor:
    """scores_B (float32): the score head's output at each sequence's last token, one padded forward."""
    ids_BL, mask_BL = pad_right(seqs, pad_id, device)
    with autocast(compute_dtype, device):
        logits_B1 = model(input_ids=ids_BL, attention_mask=mask_BL).logits
    return logits_B1[:, 0].float()
