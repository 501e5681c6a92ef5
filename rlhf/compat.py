"""Shims over the private third-party APIs rlhf depends on: each is used here and nowhere else.

Every shim names what it reaches into and the versions it was written against (the bounds in
`pyproject.toml`); tests/test_compat.py checks that each still does what rlhf needs, so an upgrade
that moves one fails there, by name, instead of deep inside a training step.

- `set_sync_gradients`: accelerate (1.x) `GradientState._set_sync_gradients`. The trainer marks the
  gradient-accumulation boundary itself (its micro-batch count changes with the mini-batch split);
  DeepSpeed reduces gradients and steps its optimizer inside `Accelerator.backward` exactly when
  this flag is set.
- `whole_model_loading`: transformers (4.56-5.x) `integrations.deepspeed._hf_deepspeed_config_weak_ref`.
  Under ZeRO-3, accelerate registers its DeepSpeed config with transformers and `from_pretrained` then
  builds every model partitioned; the reference and the generation copy must load whole.
- `switch_to_fsdp`: accelerate (1.x) `AcceleratorState.fsdp_plugin` / `.distributed_type`. accelerate
  selects FSDP only on accelerators; torch's FSDP2 runs on CPU tensors over gloo.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


def set_sync_gradients(accelerator, sync: bool) -> None:
    """Declare whether the next `accelerator.backward` ends a gradient-accumulation window."""
    accelerator.gradient_state._set_sync_gradients(sync)


@contextlib.contextmanager
def whole_model_loading(active: bool = True) -> Iterator[None]:
    """While active, `from_pretrained` builds whole (unpartitioned) models even under a ZeRO-3 config."""
    if not active:
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def switch_to_fsdp() -> None:
    """Make the shared accelerate state FSDP (with the plugin built from the `FSDP_*` variables that
    `accelerate launch` sets), on a machine where accelerate itself chose MULTI_CPU."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = AcceleratorState()
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
