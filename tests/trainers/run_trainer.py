"""Subprocess helper: run a Trainer from `key=value` overrides in a fresh process, exit 0 when it returns.

Used by the crash and preemption tests. With RLHF_TEST_KILL_AT=FILE:STEP the process SIGKILLs itself
while that checkpoint file of that step is being written (half of it is on disk).
"""
import os
import signal
import sys
from pathlib import Path

import torch

from rlhf.config import load_config
from rlhf.trainers import Trainer


def kill_during(file_name: str, step: int) -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if f"step_{step:06d}" in str(f) and str(f).endswith(file_name):
            Path(f).write_bytes(b"\x80\x02partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    if os.environ.get("RLHF_TEST_KILL_AT"):
        name, step = os.environ["RLHF_TEST_KILL_AT"].split(":")
        kill_during(name, int(step))
    Trainer(load_config(None, sys.argv[1:])).train()
