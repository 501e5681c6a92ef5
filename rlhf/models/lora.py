"""The one LoRA setup (peft) of every model rlhf trains: the policy, a separate critic, a reward model."""
from __future__ import annotations

import torch

from rlhf.errors import BadModel


def is_peft(model: torch.nn.Module) -> bool:
    """True for a peft-wrapped model (a LoRA adapter on a base)."""
    return hasattr(model, "peft_config")


def apply_lora(model: torch.nn.Module, lora, task_type: str | None = "CAUSAL_LM",
               key: str = "model.lora") -> torch.nn.Module:
    """`model` wrapped with a LoRA adapter of `lora` (rlhf.config.LoraConfig: r, alpha, dropout, target_modules,
    ['all-linear'] for every linear layer); the trainable parameters (the adapters, and a SEQ_CLS score head) in
    fp32 whatever the base's dtype. A bad `target_modules` fails naming the config key (`key`.target_modules)."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                          task_type=task_type)
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as e:
        raise BadModel(f"{key}.target_modules={lora.target_modules}: {e}") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model
