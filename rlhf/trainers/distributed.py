"""How the policy is laid out over processes, and what each layout asks of the trainer.

    single   one process
    ddp      accelerate MULTI_GPU / MULTI_CPU: every process holds the whole model
    zero2    DeepSpeed ZeRO-2: optimizer state and gradients sharded, weights whole on every process
    zero3    DeepSpeed ZeRO-3: weights sharded too (gathered per parameter for generation and sync)
    fsdp2    torch FSDP2 (accelerate fsdp_version 2): weights are DTensor shards

In every layout prompts are sharded by `PromptSource.batch` (each prompt's group on one process)
and the loss normaliser is global (`rlhf.trainers.update`), so a step's gradient does not depend on it.

Sharded layouts (zero3, fsdp2) cannot generate on the training model: its forward is collective
and processes stop generating at different lengths. The trainer keeps one unsharded copy
(`full_copy`, made before `accelerate.prepare`) that the engine samples from; `gather_into`
refreshes it after every step, one parameter at a time. The frozen reference is likewise kept
unsharded on every process (no optimizer, eval mode): the simplest correct choice; it costs one
model copy per process (use LoRA, whose reference is the base network, for models that do not fit).
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from rlhf.algos.combos import critic_type
from rlhf.compat import whole_model_loading
from rlhf.config import Config, ConfigError

LAYOUTS = ("single", "ddp", "zero2", "zero3", "fsdp2")
SHARDED = ("zero3", "fsdp2")


def layout(acc: Accelerator) -> str:
    dt = acc.distributed_type
    if dt == DistributedType.DEEPSPEED:
        stage = acc.state.deepspeed_plugin.zero_stage
        if stage not in (2, 3):
            raise ConfigError(f"DeepSpeed ZeRO stage {stage} is not supported; "
                              "use launch/zero2.yaml or launch/zero3.yaml")
        return f"zero{stage}"
    if dt == DistributedType.FSDP:
        if not acc.is_fsdp2:
            raise ConfigError("FSDP1 is not supported; set fsdp_version: 2 (launch/fsdp2.yaml)")
        return "fsdp2"
    return "ddp" if acc.num_processes > 1 else "single"


def check_layout(cfg: Config, acc: Accelerator, mode: str) -> None:
    """Combinations that cannot work, refused before any model loads."""
    if shards_optimizer(mode) and cfg.algo.update in ("npg", "trpo"):
        raise ConfigError(f"algo.update={cfg.algo.update} assigns flat parameter vectors by hand and runs under "
                          f"one process or DDP only, not {mode}; use algo.update=adamw or mdpo")
    if mode in SHARDED and cfg.model.lora.enabled:
        raise ConfigError(f"model.lora.enabled=true with {mode} is not supported: a LoRA run trains a small adapter, "
                          "shard nothing (launch/multi_gpu_ddp.yaml) or only the optimizer (launch/zero2.yaml)")
    if shards_optimizer(mode) and critic_type(cfg) != "none":
        raise ConfigError(f"a critic (algo.advantage={cfg.algo.advantage}, critic.type={cfg.critic.type}) "
                          f"runs under one process or DDP only, not {mode}: its own optimizer is not sharded yet")


def whole_loading(mode: str):
    """Load models whole under ZeRO-3 (the reference and the generation copy stay whole; `prepare` shards the
    policy itself): accelerate registers its DeepSpeed config with transformers whatever zero3_init_flag says."""
    return whole_model_loading(mode == "zero3")


def configure_deepspeed(cfg: Config, acc: Accelerator) -> None:
    """Fill the DeepSpeed config from the rlhf config before `prepare`: the micro-batch size, clipping, and
    gradient_accumulation_steps = 1 (the trainer marks the accumulation boundary itself, see `Runtime.accumulate`)."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    mbs = cfg.train.micro_batch_size
    ds["train_micro_batch_size_per_gpu"] = mbs
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = mbs * acc.num_processes
    ds["gradient_clipping"] = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else 0.0
    ds.setdefault("steps_per_print", 10**9)  # DeepSpeed's own step logging stays quiet


def full_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An unsharded, frozen copy of `model` (call before `accelerate.prepare` shards it)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def full_parameters(model: torch.nn.Module, mode: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for every parameter of the (possibly sharded) training model.

    Collective under zero3 and fsdp2: every process must iterate to the end, in the same order.
    """
    if mode == "zero3":
        import deepspeed

        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, p.data
    elif mode == "fsdp2":
        from torch.distributed.tensor import DTensor

        for name, p in model.named_parameters():
            yield name, (p.full_tensor() if isinstance(p, DTensor) else p).detach()
    else:
        for name, p in model.named_parameters():
            yield name, p.detach()


@torch.no_grad()
def gather_into(dst: torch.nn.Module, src: torch.nn.Module, mode: str) -> None:
    """Copy the sharded training model's weights into its whole copy `dst` (same parameter names)."""
    params = dict(dst.named_parameters())
    for name, t in full_parameters(src, mode):
        params[_plain_name(name)].copy_(t.reshape(params[_plain_name(name)].shape))


@torch.no_grad()
def scatter_from(src: torch.nn.Module, dst: torch.nn.Module, mode: str) -> None:
    """Load whole weights `src` into the sharded training model `dst` (resume); every process holds `src`."""
    params = dict(src.named_parameters())
    if mode == "zero3":
        import deepspeed

        for name, p in dst.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(params[_plain_name(name)].reshape(p.data.shape))
    elif mode == "fsdp2":
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, p in dst.named_parameters():
            whole = params[_plain_name(name)].to(p.device, p.dtype)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(whole)
    else:
        for name, p in dst.named_parameters():
            p.copy_(params[_plain_name(name)])


def _plain_name(name: str) -> str:
    """FSDP/DeepSpeed keep parameter names; only torch.compile / checkpoint wrappers add prefixes."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


# ----------------------------------------------------------------------------- checkpoints of sharded layouts

SHARDED_DIR = "sharded"  # inside a checkpoint: the optimizer (and weights) as each process holds them


def shards_optimizer(mode: str) -> bool:
    """zero2, zero3 and fsdp2 keep optimizer state in per-process shards: every process writes its part."""
    return mode in ("zero2", "zero3", "fsdp2")


def save_sharded(model, optimizer, path, mode: str) -> None:
    """Collective: each process writes its shard of the weights and optimizer state under `path`
    (a directory on a filesystem all processes share). DeepSpeed: `engine.save_checkpoint`;
    FSDP2: `torch.distributed.checkpoint` of the model and optimizer state dicts."""
    if mode in ("zero2", "zero3"):
        model.save_checkpoint(str(path), tag="ds", save_latest=False)
    elif mode == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, inner_optimizer(optimizer))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_sharded(model, optimizer, path, mode: str) -> None:
    """Collective inverse of `save_sharded` (same layout and number of processes)."""
    if mode in ("zero2", "zero3"):
        loaded, _ = model.load_checkpoint(str(path), tag="ds", load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint")
    elif mode == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, inner_optimizer(optimizer))
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, inner_optimizer(optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


def inner_optimizer(optimizer):
    while hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer wraps the torch one
        optimizer = optimizer.optimizer
    return optimizer
