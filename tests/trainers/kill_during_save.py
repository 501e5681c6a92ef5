"""Subprocess helper for tests/trainers/test_checkpoint.py: save step 1, then SIGKILL this process at one
point of the step-2 save. Weights of step s are all equal to s, so a test can tell which step it loaded.

    python kill_during_save.py ROOT POINT KEEP_LAST
"""
import importlib.util
import os
import signal
import sys
from pathlib import Path

import torch

# Load rlhf/trainers/checkpoint.py by path: importing the `rlhf.trainers` package would pull in
# transformers and accelerate, which only makes this short-lived process slower to start.
_spec = importlib.util.spec_from_file_location(
    "rlhf_checkpoint", Path(__file__).resolve().parents[2] / "rlhf" / "trainers" / "checkpoint.py")
ckpt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ckpt)


def components(step: int) -> dict:
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.weight.grad = torch.ones_like(model.weight)
    opt.step()  # non-empty optimizer state
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    return {"policy": model, "optimizer": opt}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    root, point, keep_last = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    ckpt.commit(root, 1, components(1), {"step": 1}, keep_last)
    real_save, real_replace, real_write, real_rmtree = torch.save, os.replace, ckpt._write_atomic, ckpt.shutil.rmtree

    def save(obj, f, *a, **k):  # a half-written file, then death
        if point == "mid_file" and str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"\x80\x02partial")
            die()
        return real_save(obj, f, *a, **k)

    def replace(src, dst):
        if point == "before_rename" and Path(src).name.startswith(ckpt.STAGING_PREFIX):
            die()
        return real_replace(src, dst)

    def write_atomic(path, text):
        if point == "before_latest" and Path(path).name == "latest":
            die()
        return real_write(path, text)

    def rmtree(path, *a, **k):  # delete one file of the pruned checkpoint, then death
        if point == "mid_prune":
            next(p for p in Path(path).iterdir() if p.is_file()).unlink()
            die()
        return real_rmtree(path, *a, **k)

    torch.save, ckpt.os.replace, ckpt._write_atomic, ckpt.shutil.rmtree = save, replace, write_atomic, rmtree
    ckpt.commit(root, 2, components(2), {"step": 2}, keep_last)


if __name__ == "__main__":
    main()
