"""Load the policy, its reference and tokenizer from a local directory (or the embedded model)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rlhf.errors import BadModel, NotFound
from rlhf.models import embedded
from rlhf.models.lora import apply_lora, is_peft


def resolve_model_path(path: str) -> Path:
    """A local model directory; embedded names are prepared on first use."""
    if path in embedded.EMBEDDED:
        return embedded.prepare(path)
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise NotFound(
            f"model.path '{path}' is not a local transformers model directory (no config.json there); "
            f"use a saved model directory or one of: {', '.join(embedded.EMBEDDED)}"
        )
    return p


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return with_pad_token(AutoTokenizer.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code))


def with_pad_token(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """`tok`, padding with its EOS token where it has no pad token."""
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(path), dtype=dtype, trust_remote_code=trust_remote_code
    )
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise BadModel(f"model '{path}' is quantized; training needs plain weights (dequantize and save it first)")
    return model


def load_policy(mcfg, model: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """The trainable policy: full weights in fp32, or a LoRA adapter (fp32) on a frozen base, loaded from
    `mcfg.path` or made of an already-loaded causal LM `model` (its weights are cast in place).

    With LoRA and bf16 compute the frozen base is kept in bf16 (it never receives updates).
    """
    lora = mcfg.lora
    base_dtype = torch.bfloat16 if (lora.enabled and mcfg.compute_dtype == "bf16") else torch.float32
    if model is None:
        model = load_causal_lm(mcfg.path, base_dtype, mcfg.trust_remote_code)
    else:
        if is_peft(model) or getattr(model, "hf_quantizer", None) is not None:
            raise BadModel("pass the base causal LM (not a peft or quantized model): rlhf adds the LoRA adapter itself "
                           "(model.lora)")
        model = model.to(base_dtype)
    model.config.use_cache = False
    if mcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora.enabled:
            model.enable_input_require_grads()
    if lora.enabled:
        model = apply_lora(model, lora)
    return model


@torch.no_grad()
def inference_copy(model: torch.nn.Module, dtype: Optional[torch.dtype] = None, load: bool = True) -> torch.nn.Module:
    """A frozen, eval-mode copy of a transformers model in `dtype` (for sampling).

    Built from the config and the state dict: `copy.deepcopy(model).to(dtype)` would also cast the
    rotary-frequency buffers, which stay fp32 here as in a freshly loaded model. The copy is built
    on the model's device (a GPU policy samples on the GPU).
    """
    first = next(model.parameters())
    with torch.device(first.device):
        clone = type(model)._from_config(model.config, dtype=dtype or first.dtype)
    if load:  # (else the caller fills the weights, e.g. with a LoRA adapter merged in)
        clone.load_state_dict(model.state_dict())
    clone.generation_config = copy.deepcopy(model.generation_config)
    return clone.eval().requires_grad_(False)


def load_reference(mcfg, policy: torch.nn.Module, kl_coef: float) -> Optional[torch.nn.Module]:
    """The frozen reference: None when the KL coefficient is 0 or with LoRA (the adapter is disabled instead)."""
    if kl_coef == 0 or mcfg.lora.enabled:
        return None
    ref = copy.deepcopy(policy)  # same dtype and autocast as the policy: KL is exactly 0 at the start
    ref.eval()
    ref.requires_grad_(False)
    if mcfg.compute_dtype == "bf16":
        cast_linear_weights_(ref, torch.bfloat16)
    return ref


@torch.no_grad()
def cast_linear_weights_(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store every nn.Linear's weight and bias in `dtype`, except weights shared with another module.

    For a frozen model run under autocast to `dtype` this changes no output bit (autocast casts
    a linear's fp32 weight to `dtype` at every call with the same rounding) and halves the memory
    of most weights (SmolLM2: 214 MB less); norms, embeddings and a tied lm_head stay fp32.
    """
    counts: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            for name in ("weight", "bias"):
                p = getattr(mod, name)
                if p is not None and counts[id(p)] == 1:
                    p.data = p.data.to(dtype)


def load_teacher(path: str, tokenizer, compute_dtype: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """A frozen teacher for on-policy distillation: any local causal LM whose tokenizer has the policy's vocabulary
    (a BadModel names the teacher otherwise); linear weights stored in bf16 when computing in bf16."""
    teacher_tok = load_tokenizer(path, trust_remote_code)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise BadModel(f"distill.teacher '{path}' has another tokenizer than the policy ({len(teacher_tok)} vs "
                       f"{len(tokenizer)} tokens): the teacher must score the policy's own tokens")
    teacher = load_causal_lm(path, torch.float32, trust_remote_code).eval().requires_grad_(False)
    if compute_dtype == "bf16":
        cast_linear_weights_(teacher, torch.bfloat16)
    return teacher


def uses_dropout(model: torch.nn.Module) -> bool:
    """Whether a training forward of `model` draws random numbers: a dropout module (LoRA's included) or an
    attention dropout in its config."""
    config = getattr(model, "config", None)
    return (any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
            or float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0)
