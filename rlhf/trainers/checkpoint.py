"""Crash-safe checkpoints: written to a temporary directory, renamed into place, `latest` written last.

Layout of `<output_dir>/checkpoints/step_000012/`: trainable.safetensors (adapter or full
weights), optimizer.pt, scheduler.pt, rng_rank{r}.pt, state.json (written last inside the
directory, so a directory with state.json is complete). Everything loads with safetensors
or `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step_"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (tied weights appear once)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.dtype))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
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


def staging_dir(root: Path, step: int) -> Path:
    return root / f".tmp-{STEP_PREFIX}{step:06d}"


def write_rank_files(root: Path, step: int, rank: int) -> None:
    """Per-process part of a checkpoint (RNG); every process calls this before `commit`."""
    tmp = staging_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")


def commit(root: Path, step: int, model: torch.nn.Module, optimizer, scheduler, state: dict, keep_last: int) -> Path:
    """Main process: write the shared files into the staging dir, rename it into place, update `latest`."""
    tmp = staging_dir(root, step)
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    _write_atomic(tmp / "state.json", json.dumps(state, indent=1))
    _fsync_dir(tmp)
    final = root / f"{STEP_PREFIX}{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", final.name + "\n")
    prune(root, keep_last)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(STEP_PREFIX) and (d / "state.json").is_file()]
    return sorted(dirs, key=lambda d: d.name)


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` (at least one is kept) and stale staging dirs."""
    done = complete_checkpoints(root)
    for d in done[: max(0, len(done) - max(1, keep_last))]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(f".tmp-{STEP_PREFIX}*"):  # left by a crash during an earlier save
        shutil.rmtree(d, ignore_errors=True)


def find_latest(root: Path) -> Optional[Path]:
    """The checkpoint `latest` points to if complete, else the newest complete one."""
    pointer = root / "latest"
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if (d / "state.json").is_file():
            return d
    done = complete_checkpoints(root)
    return done[-1] if done else None


def load(path: Path, model: torch.nn.Module, optimizer, scheduler, rank: int) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG; return the trainer state."""
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.json)")
    load_trainable_state(model, load_file(path / "trainable.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / f"rng_rank{rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / "state.json").read_text())
