"""Run guards the training loop checks at every step boundary: preemption signals and non-finite gradients.

- `Preemption`: SIGTERM (schedulers, `docker stop`, Kubernetes) and SIGUSR1 (SLURM's
  `--signal=USR1@120`) only set a flag; the loop finishes the step in progress, saves a
  checkpoint and returns, so the process exits 0 and a resume loses nothing. The flag is
  agreed across processes (max-reduced), so every rank stops at the same step even when
  only one was signalled.
- `NonFiniteGradients`: an optimizer step whose gradient norm is NaN/inf is skipped (the weights, the
  optimizer state and the learning-rate schedule are untouched) and counted; `train.max_skipped_steps`
  in a row stop the run with `NonFiniteGradientError` (after a checkpoint is saved). One policy for
  every trained model: the policy, the critic and the reward model (`rlhf.trainers.optim.clip_and_step`).
"""
from __future__ import annotations

import contextlib
import math
import signal
from typing import Optional

import torch

from rlhf.errors import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteGradientError(UserError, RuntimeError):
    """Too many optimizer steps in a row had NaN/inf gradients."""


class Preemption:
    """`stop = Preemption().install()`; `stop.requested(acc)` at each step boundary; `stop.restore()` at the end
    (or `with Preemption() as stop:`)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> "Preemption":
        with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> "Preemption":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def requested(self, accelerator) -> bool:
        """True on every process when any process was signalled."""
        flag = torch.tensor(1.0 if self.signum is not None else 0.0, device=accelerator.device)
        return bool(accelerator.reduce(flag, "max") > 0) if accelerator.num_processes > 1 else bool(flag > 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"


class NonFiniteGradients:
    """Counts the skipped optimizer steps of one trained model in `state` (`{prefix}skipped_steps` in total,
    `{prefix}skipped_in_row`), so they are checkpointed and logged with the trainer's counters."""

    def __init__(self, state: dict, max_in_row: int, name: str = "policy", prefix: str = ""):
        self.state, self.max_in_row, self.name = state, max_in_row, name
        self.total, self.in_row = f"{prefix}skipped_steps", f"{prefix}skipped_in_row"
        state.setdefault(self.total, 0)
        state.setdefault(self.in_row, 0)

    def record(self, grad_norm: float) -> bool:
        """Count one optimizer step; return True when it must be applied (finite gradient norm)."""
        finite = math.isfinite(grad_norm)
        if finite:
            self.state[self.in_row] = 0
        else:
            self.state[self.total] += 1
            self.state[self.in_row] += 1
        return finite

    @property
    def exceeded(self) -> bool:
        return 0 < self.max_in_row <= self.state[self.in_row]

    def error(self, checkpoint_step: Optional[int]) -> NonFiniteGradientError:
        saved = "" if checkpoint_step is None else f" and a checkpoint was saved at step {checkpoint_step}"
        return NonFiniteGradientError(
            f"{self.name}: {self.state[self.in_row]} optimizer steps in a row had non-finite gradients "
            f"(train.max_skipped_steps={self.max_in_row}); the weights were left untouched{saved}. "
            "Lower the learning rate, check the reward scale, or use model.compute_dtype=fp32."
        )
