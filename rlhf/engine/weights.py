"""The policy's weights under plain Hugging Face names, for an engine that keeps its own copy (vLLM).

`hf_weights(model)` yields `(name, tensor)` pairs lazily, in the model's parameter order, with
the names `save_pretrained` writes for the base model:

- full models: every parameter once; a tied `lm_head` is left out (the engine ties it to
  `model.embed_tokens.weight` itself, as it does when loading the checkpoint);
- LoRA (peft) models: every LoRA-wrapped weight merged, `W + scale * B A` (peft's own
  `get_delta_weight`), computed one layer at a time in fp32 without touching the model; peft's
  `base_model.model.` prefix and `.base_layer.` infix are removed and the adapter weights skipped.

Nothing is copied up front: a consumer that processes layers as they arrive (vLLM's layerwise
reload) holds at most one layer's converted copies at a time instead of a second state dict.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

from rlhf.models.lora import is_peft

PEFT_PREFIX = "base_model.model."


def _tied(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "tie_word_embeddings", False))


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Parameters of a plain transformers model; a tied lm_head appears once, as the embedding."""
    tied = _tied(model)
    for name, p in model.named_parameters():  # remove_duplicate=True: shared tensors once
        if tied and name == "lm_head.weight":
            continue
        yield name, p.detach()


def lora_merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Base-model parameters of a peft LoRA model with the active adapter merged in (fp32 where merged)."""
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    if not isinstance(adapter, str):
        raise ValueError(f"weight sync merges one active LoRA adapter, got {adapter!r}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    base = model.get_base_model()
    tied = _tied(base)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue  # lora_A / lora_B / lora_embedding_*: folded into their base weight below
        if ".modules_to_save." in name or ".original_module." in name:
            raise ValueError(f"weight sync does not handle peft modules_to_save (parameter '{name}')")
        hf_name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        if tied and hf_name == "lm_head.weight":
            continue
        owner, _, leaf = name.rpartition(".")
        layer = layers.get(owner.removesuffix(".base_layer")) if owner.endswith(".base_layer") else None
        if layer is None or leaf != "weight" or adapter not in layer.scaling or layer.merged:
            yield hf_name, p.detach()  # untouched by LoRA (or peft already merged it into W)
            continue
        if layer.use_dora.get(adapter, False):
            raise ValueError(f"weight sync merges plain LoRA; '{owner}' uses DoRA")
        with torch.no_grad():
            delta = layer.get_delta_weight(adapter).float()
            yield hf_name, p.detach().float() + delta.to(p.device)


def hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """HF-named weights of `model` (full or LoRA-merged), lazily, in parameter order."""
    return lora_merged_weights(model) if is_peft(model) else full_weights(model)


def cast(weights: Iterable[tuple[str, Tensor]], dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """Convert each tensor to `dtype` as it is consumed (no-op for tensors already in `dtype`)."""
    for name, t in weights:
        yield name, t.to(dtype)
