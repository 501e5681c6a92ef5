"""Asynchronous rollouts: batches generated ahead of training, in a background thread, with a staleness bound.

With `train.max_staleness = k >= 1`, batch s (the one training step s uses) is generated with the weights of
policy version g(s) = max(0, s - 1 - k), version v being the policy after v steps. The trainer, after step v,
waits until batch v + k is generated, loads version v into the engine (`sync`) and admits batch v + k + 1: so
generation of the next batches runs while the trainer updates on the current one, a sample is trained exactly
min(k, s - 1) versions after the weights that produced it, and nothing is generated that would be too stale to
use (admission control, as AReaL and SkyRL do, rather than generating and throwing away).

The schedule is fixed, so a run is reproducible: each batch samples with its own seed (`train.seed`, the batch
index), and a checkpoint holds the batches up to v + k still to be trained; batch v + k + 1 (in flight, done or
not started, which differs between processes) is regenerated on resume from the same weights, prompts and seed.
Sampling seeds torch's global generator in this thread: a policy with dropout would draw from it in the training
thread meanwhile, so such a run is not reproducible to the bit (the trainer warns).
"""
from __future__ import annotations

import threading
import zlib
from typing import Callable, Optional

import torch

from rlhf.errors import UserError
from rlhf.logging import PhaseTimer
from rlhf.rollout.groups import Batch, RolloutSource, sample_round
from rlhf.runtime import Runtime


def async_batch(src: RolloutSource, cfg, rt: Runtime, s: int) -> Batch:
    """Batch s in the producer's thread (no collective call: no DAPO rounds), generated with version s - 1 - k."""
    timer = PhaseTimer()
    batch = sample_round(src, cfg, rt, timer)
    batch.version = max(0, s - 1 - cfg.train.max_staleness)
    batch.metrics.update({f"time/async_{k}_s": v for k, v in timer.seconds.items()})
    return batch


class AsyncError(RuntimeError):
    """The background generation failed (a bug, not the user's input); the original error is its cause."""


class Producer:
    """Runs `make(s) -> (samples, reward_stats, env_stats)` for batches s = first .. last in a thread, at most
    k versions ahead. `take(s)` hands batch s to the trainer; after step v, `idle_for(v)` waits until the thread
    is idle, the trainer loads version v into the engine, and `admit(v)` lets generation go on."""

    def __init__(self, make: Callable[[int], tuple], k: int, first: int, last: int, seed: int,
                 ready: Optional[dict] = None, snapshot: Optional[Callable[[], dict]] = None):
        self.make, self.k, self.last, self.seed, self.snapshot = make, k, last, seed, snapshot
        self.done: dict[int, tuple] = dict(ready or {})  # batch index -> (samples, reward stats, env stats)
        self.states: dict[int, dict] = {}  # batch index -> the prompt source's state before it was drawn
        self.next = max([first - 1, *self.done]) + 1  # the next batch to generate
        self.admitted = first + k  # batches up to this one may be generated now
        self.error: Optional[BaseException] = None
        self.device = torch.cuda.current_device() if torch.cuda.is_available() else None  # the trainer's GPU
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="rlhf-rollouts", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.device is not None:  # a new thread starts on GPU 0
            torch.cuda.set_device(self.device)
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: self.stopping or (self.next <= min(self.admitted, self.last)))
                    if self.stopping:
                        return
                    s = self.next
                    if self.snapshot is not None:
                        self.states[s] = self.snapshot()
                devices = [self.device] if self.device is not None else []
                with torch.random.fork_rng(devices=devices):  # the batch's own sampling seed: reproducible
                    torch.manual_seed(zlib.crc32(f"{self.seed}:batch:{s}".encode()))
                    out = self.make(s)
                with self.cond:
                    self.done[s] = out
                    self.next = s + 1
                    self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the trainer thread
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _wait(self, s: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: s in self.done or self.error is not None)
            if self.error is not None and s not in self.done:
                if isinstance(self.error, UserError):  # a reward function, a tool, ...: its one-line message
                    raise self.error
                raise AsyncError(f"generating batch {s} failed: "
                                 f"{type(self.error).__name__}: {self.error}") from self.error

    def take(self, s: int) -> tuple:
        """Batch s (blocks until it is generated)."""
        self._wait(s)
        with self.cond:
            self.states.pop(s, None)
            return self.done.pop(s)

    def idle_for(self, v: int) -> None:
        """After training step v: wait for batch v + k (generated with an older version); the thread is then idle
        until `admit(v)`, so the engine can load version v."""
        if v + self.k <= self.last:
            self._wait(v + self.k)

    def admit(self, v: int) -> None:
        """The engine holds version v: batch v + k + 1 may be generated."""
        with self.cond:
            self.admitted = v + self.k + 1
            self.cond.notify_all()

    def pending(self) -> tuple[dict[int, tuple], Optional[dict]]:
        """What a checkpoint after `admit(v)` saves, the same on every process: the generated batches up to v + k not
        yet trained, and the prompt source's state before batch v + k + 1 (whether it is done, in flight or not
        started yet), which a resume regenerates."""
        with self.cond:
            cut = self.admitted
            ready = {s: b for s, b in self.done.items() if s < cut}
            if cut in self.states:  # started: the state it was drawn from
                return ready, self.states[cut]
            return ready, self.snapshot() if self.snapshot is not None else None  # not started: it waits on this lock

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=600)
