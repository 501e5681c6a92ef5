"""Save a trained policy for use outside rlhf: LoRA adapter dir, merged or full model dir (atomic)."""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf.models.lora import is_peft


def save_model(model: torch.nn.Module, tokenizer, target: Path, merge: bool = False) -> Path:
    """Write `target` with save_pretrained: adapter only for a LoRA model unless `merge`.

    Load back: `AutoModelForCausalLM.from_pretrained(target)` for full or merged models,
    `peft.AutoPeftModelForCausalLM.from_pretrained(target)` for an adapter.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        out = model
        if merge and is_peft(model):
            out = copy.deepcopy(model).merge_and_unload()
        config = getattr(out, "config", None)
        use_cache = getattr(config, "use_cache", None)
        if config is not None:
            config.use_cache = True  # training turns the KV cache off; whoever loads the export wants it on
        try:
            out.save_pretrained(tmp, safe_serialization=True)
        finally:
            if config is not None:
                config.use_cache = use_cache
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
