"""Crash-safe checkpoints: written to a staging directory, renamed into place, `latest` written last.

Layout of `<output_dir>/checkpoints/step_000012/`:

    policy.safetensors      trainable weights (the LoRA adapter, or the full model)
    optimizer.pt, scheduler.pt, ...   one file per named stateful component
    rng_rank{r}.pt          torch (CPU, CUDA), python and numpy RNG of process r
    sharded/                zero2, zero3, fsdp2: weights and optimizer state as each process holds them
    state.json              trainer counters and data position; written last

A trainer passes its components as a dict, `{"policy": model, "optimizer": opt, ...}`;
another trainer registers more (a critic, a KL controller) and they are saved and
restored the same way: an `nn.Module` as its trainable parameters in safetensors,
anything else through `state_dict()` / `load_state_dict()`. Nothing is unpickled:
tensors load with safetensors, the rest with `torch.load(weights_only=True)`.

Crash safety: a directory named `step_*` only ever appears by `os.replace` of a
complete, fsynced staging directory, and `latest` is replaced atomically after it.
A kill at any point leaves the previous complete checkpoint reachable; deletion
(pruning, or re-saving a step) first renames a directory out of the `step_*`
namespace, so a half-deleted checkpoint never looks complete.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf.errors import UserError

STEP_PREFIX = "step_"
STAGING_PREFIX = f".tmp-{STEP_PREFIX}"
TRASH_PREFIX = ".trash-"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is incomplete or does not match the trainer; the message names the file."""


# ----------------------------------------------------------------------------- state of one component


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (tied weights appear once)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.dtype))


def rng_state() -> dict[str, Any]:
    """Every RNG a step can draw from: torch (CPU and CUDA), python `random`, numpy (as plain tensors)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- durable file operations


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_dir(root: Path, d: Path) -> None:
    """Rename `d` out of the checkpoint namespace (atomic), then delete it."""
    trash = root / f"{TRASH_PREFIX}{d.name}-{os.getpid()}"
    os.replace(d, trash)
    shutil.rmtree(trash, ignore_errors=True)


def staging_dir(root: Path, step: int) -> Path:
    return root / f"{STAGING_PREFIX}{step:06d}"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{STEP_PREFIX}{step:06d}"


# ----------------------------------------------------------------------------- save


def write_rank_files(root: Path, step: int, rank: int) -> None:
    """Per-process part of a checkpoint (RNG); every process calls this before `commit`."""
    tmp = staging_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")


def commit(root: Path, step: int, components: dict[str, Any], state: dict, keep_last: int) -> Path:
    """Main process: write the components and `state` into the staging dir, rename it into place,
    point `latest` at it, prune old checkpoints. Returns the checkpoint directory."""
    tmp = staging_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    for name, obj in components.items():
        if isinstance(obj, torch.nn.Module):
            save_file(trainable_state(obj), tmp / f"{name}.safetensors")
        else:
            torch.save(obj.state_dict(), tmp / f"{name}.pt")
    for f in tmp.rglob("*"):  # rank files and per-process shards too
        if f.is_file():
            _fsync(f)
    _write_atomic(tmp / "state.json", json.dumps({**state, "components": sorted(components)}, indent=1))
    _fsync(tmp)
    final = step_dir(root, step)
    if final.exists():  # re-saving a step (e.g. after resuming from an earlier one)
        _remove_dir(root, final)
    os.replace(tmp, final)
    _fsync(root)
    _write_atomic(root / "latest", final.name + "\n")
    _fsync(root)
    prune(root, keep_last)
    return final


# ----------------------------------------------------------------------------- find, prune, load


def is_complete(d: Path) -> bool:
    return d.is_dir() and d.name.startswith(STEP_PREFIX) and (d / "state.json").is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if is_complete(d)), key=lambda d: d.name)


def _pointed(root: Path) -> Optional[Path]:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    d = root / pointer.read_text().strip()
    return d if is_complete(d) else None


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (at least one) and the one `latest` points to;
    delete older ones and what crashed saves and deletions left behind."""
    done = complete_checkpoints(root)
    keep = set(done[-max(1, keep_last):])
    pointed = _pointed(root)
    if pointed is not None:
        keep.add(pointed)
    for d in done:
        if d not in keep:
            _remove_dir(root, d)
    for d in list(root.glob(f"{STAGING_PREFIX}*")) + list(root.glob(f"{TRASH_PREFIX}*")):
        shutil.rmtree(d, ignore_errors=True)


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint `latest` points to if it is complete, else the newest complete one."""
    pointed = _pointed(root)
    if pointed is not None:
        return pointed
    done = complete_checkpoints(root)
    return done[-1] if done else None


def load(path: Path, components: dict[str, Any], rank: int) -> dict:
    """Restore every component and this process's RNG from `path`; return the trainer state."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no state.json in a step_* directory)")
    state = json.loads((path / "state.json").read_text())
    saved = state.pop("components", sorted(components))
    missing = sorted(set(components) - set(saved))
    if missing:
        raise CheckpointError(f"{path}: the checkpoint has no state for {missing} (it holds {saved})")
    for name, obj in components.items():
        if isinstance(obj, torch.nn.Module):
            load_trainable_state(obj, load_file(path / f"{name}.safetensors"))
        else:
            obj.load_state_dict(torch.load(path / f"{name}.pt", weights_only=True))
    rng = path / f"rng_rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return state
