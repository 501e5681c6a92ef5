"""`rlhf export`: a run's model (its final/ directory or a checkpoint) as a standalone directory."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlhf.models.export import save_model
from rlhf.models.loading import load_causal_lm, load_policy, load_tokenizer
from rlhf.models.lora import is_peft
from rlhf.models.precision import DTYPES
from rlhf.trainers import checkpoint as ckpt
from rlhf.trainers.checkpoint import load_trainable_state


def run_config(run_dir: Path):
    """The typed Config a run was trained with (its `config.json`)."""
    from rlhf.config import load_config

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run directory "
                                "(the output_dir of a training run)")
    return load_config(path)  # JSON is YAML


def find_checkpoint(run_dir: Path, checkpoint: str) -> Path:
    """'latest', 'step_N' / 'N' (in <run>/checkpoints) or a checkpoint directory path."""
    root = Path(run_dir) / "checkpoints"
    if checkpoint == "latest":
        path = ckpt.find_latest(root)
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint in {root}")
        return path
    if checkpoint.isdigit():
        checkpoint = f"step_{int(checkpoint):06d}"
    path = root / checkpoint if (root / checkpoint).is_dir() else Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint '{checkpoint}' not found (looked in {root} and as a path)")
    return path


# The trainable weights inside a checkpoint directory.
CHECKPOINT_WEIGHTS = ("policy.safetensors",)


def load_run_model(run_dir: Path, checkpoint: str | None = None) -> tuple[torch.nn.Module, object]:
    """(policy, tokenizer) of a run: its `final/` directory, or a checkpoint's trainable weights on the base model."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if checkpoint is None:
        final = run_dir / "final"
        if (final / "adapter_config.json").is_file():
            from peft import PeftModel

            base = load_causal_lm(cfg.model.path, torch.float32, cfg.model.trust_remote_code)
            return PeftModel.from_pretrained(base, final), load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        if (final / "config.json").is_file():
            return load_causal_lm(str(final)), load_tokenizer(str(final), cfg.model.trust_remote_code)
        raise FileNotFoundError(f"{final} holds no model (the run has not finished, or checkpoint.save_final=false); "
                                "export a checkpoint instead: --checkpoint latest")
    path = find_checkpoint(run_dir, checkpoint)
    weights = next((path / name for name in CHECKPOINT_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path} has none of {', '.join(CHECKPOINT_WEIGHTS)}: not a checkpoint directory")
    mcfg = copy.deepcopy(cfg.model)
    mcfg.compute_dtype = "fp32"  # load the base in fp32: export keeps full precision unless --dtype says otherwise
    mcfg.gradient_checkpointing = False
    model = load_policy(mcfg)
    load_trainable_state(model, load_file(weights))
    return model, load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)


def export_run(run_dir: str | Path, merge: bool = False, checkpoint: str | None = None,
               output: str | Path | None = None, dtype: str | None = None) -> Path:
    """`rlhf export`: write a run's model (final/ or a checkpoint) as a standalone directory.

    With `merge`, a LoRA adapter is merged into the base weights: the result is a plain
    transformers model directory (what vLLM serves). Without it, a LoRA run exports its
    adapter (load with peft) and a full fine-tuning run its full model. `dtype` (bf16,
    fp16, fp32) casts the weights; by default they are saved as they are.
    Default output: `<run>/export/merged`, `<run>/export/adapter` or `<run>/export/model`.
    """
    run_dir = Path(run_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    model, tokenizer = load_run_model(run_dir, checkpoint)
    kind = "merged" if merge and is_peft(model) else ("adapter" if is_peft(model) else "model")
    target = Path(output) if output is not None else run_dir / "export" / kind
    if merge and is_peft(model):
        model = model.merge_and_unload()
    if dtype is not None:
        model = model.to(DTYPES[dtype])
    return save_model(model, tokenizer, target, merge=False)
