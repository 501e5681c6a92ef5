"""The processes a step runs on: reductions, micro-batches and the gradient-accumulation boundary.

    rt = Runtime(accelerator, micro_batch_size=8)
    for rows in rt.micro_batches(mini_batch_rows):
        with rt.accumulate([model], last=rows is the last):
            rt.backward(loss)

Every function of a step takes the runtime explicitly; it is the only thing they share with the trainer.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor

from rlhf.compat import set_sync_gradients


class Runtime:
    """The accelerator plus what the step needs from it: global sums, gathers, micro-batching, accumulation."""

    def __init__(self, accelerator, micro_batch_size: int):
        self.acc = accelerator
        self.micro_batch_size = micro_batch_size

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def num_processes(self) -> int:
        return self.acc.num_processes

    @property
    def process_index(self) -> int:
        return self.acc.process_index

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def reduce_sum(self, x, dtype: torch.dtype = torch.float32) -> float:
        """sum of the number `x` over every process (a collective call), added in `dtype`."""
        return float(self.acc.reduce(torch.tensor(float(x), dtype=dtype, device=self.device), "sum"))

    def reduce_vec(self, v: Tensor) -> Tensor:
        """sum of the tensor `v` over every process (on this process's device)."""
        return self.acc.reduce(v.to(self.device), "sum") if self.num_processes > 1 else v

    def gather(self, t: Tensor) -> Tensor:
        """Every process's `t`, concatenated along dim 0, on the CPU."""
        return self.acc.gather(t.to(self.device)).cpu()

    def max(self, x: float) -> float:
        """max of the number `x` over every process."""
        return float(self.gather(torch.tensor([float(x)])).max())

    def micro_batches(self, rows: Sequence[int]) -> list[list[int]]:
        """`rows` in consecutive chunks of `micro_batch_size`."""
        mbs = self.micro_batch_size
        return [list(rows[i: i + mbs]) for i in range(0, len(rows), mbs)]

    @contextlib.contextmanager
    def accumulate(self, models: Sequence[torch.nn.Module], last: bool) -> Iterator[None]:
        """One micro-batch's forward and backward. Before the `last` one, DDP and FSDP2 skip their gradient
        all-reduce (no_sync); on the last, gradients are reduced, and DeepSpeed steps its optimizer inside
        `backward`. The loss normaliser is global, so the accumulated gradient is the full batch's."""
        set_sync_gradients(self.acc, last)
        try:
            with contextlib.ExitStack() as stack:
                if not last:
                    for model in models:
                        stack.enter_context(self.acc.no_sync(model))
                yield
        finally:
            set_sync_gradients(self.acc, True)

    def backward(self, loss: Tensor) -> None:
        """Backward of a loss already divided by a global normaliser: DDP, FSDP2 and DeepSpeed average
        gradients over processes, so it is scaled back by their number."""
        self.acc.backward(loss * self.num_processes)
