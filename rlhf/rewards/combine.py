"""Score completions with several reward functions and combine them with weights.

Contract (TRL's): `f(prompts, completions, completion_ids, **columns) -> list[float | None]`;
`None` means "not applicable" and NaN/inf count as unscorable. The combined score of a
sample is the weighted sum over the functions that scored it, NaN when none did (the
trainer gives such samples advantage 0). Async functions are awaited; a per-call timeout
and `on_error` ('raise' or 'skip') apply to every function alike.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from rlhf.rewards.registry import load_reward_fn, reward_fn_name


class RewardError(RuntimeError):
    """A reward function failed; the message names the function (and sample, where known)."""


@dataclass
class RewardResult:
    scores_N: torch.Tensor  # float32, NaN where no function scored the sample
    per_fn: dict[str, list[Optional[float]]]  # raw (validated) values of each function
    stats: dict[str, float] = field(default_factory=dict)


class RewardModule:
    def __init__(self, specs, on_error: str = "raise", timeout_s: Optional[float] = None):
        self.fns: list[tuple[str, Callable, float]] = []
        for spec in specs:
            fn = load_reward_fn(spec.fn)
            name = spec.name or reward_fn_name(spec.fn)
            if any(name == n for n, _, _ in self.fns):
                raise ValueError(f"two reward functions are named '{name}'; give one a `name`")
            self.fns.append((name, fn, float(spec.weight)))
        self.on_error, self.timeout_s = on_error, timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward")

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.fns]

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list]) -> RewardResult:
        N = len(completions)
        total = torch.zeros(N, dtype=torch.float64)
        scored = torch.zeros(N, dtype=torch.bool)
        per_fn, stats = {}, {}
        for name, fn, weight in self.fns:
            kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            values, failed = self._score(name, fn, kwargs, N)
            for i, v in enumerate(values):
                if v is not None:
                    total[i] += weight * v
                    scored[i] = True
            per_fn[name] = values
            stats[f"reward/{name}/unscored"] = float(sum(v is None for v in values))
            stats[f"reward/{name}/errors"] = float(failed)
        scores = torch.where(scored, total, torch.full_like(total, float("nan"))).float()
        stats["reward/unscored_frac"] = float((~scored).float().mean())
        return RewardResult(scores_N=scores, per_fn=per_fn, stats=stats)

    # --------------------------------------------------------------------- one function

    def _score(self, name: str, fn: Callable, kwargs: dict, N: int) -> tuple[list[Optional[float]], int]:
        try:
            return self._validate(name, self._invoke(name, fn, kwargs), N), 0
        except _BadOutput:
            raise
        except Exception as e:  # noqa: BLE001 - user code can raise anything
            err = e
        # Find the sample(s) that fail, so the error (or the skip) is precise.
        values: list[Optional[float]] = []
        failed = 0
        for i in range(N):
            one = {k: (v[i: i + 1] if isinstance(v, list) and len(v) == N else v) for k, v in kwargs.items()}
            try:
                values += self._validate(name, self._invoke(name, fn, one), 1)
            except _BadOutput:
                raise
            except Exception as e:  # noqa: BLE001
                if self.on_error == "raise":
                    raise RewardError(f"reward function '{name}' failed on sample {i}: {type(e).__name__}: {e}") from e
                values.append(None)
                failed += 1
        if failed == 0 and self.on_error == "raise":  # fails on the batch only
            raise RewardError(f"reward function '{name}' failed: {type(err).__name__}: {err}") from err
        return values, failed

    def _invoke(self, name: str, fn: Callable, kwargs: dict) -> Any:
        if inspect.iscoroutinefunction(fn):
            async def run():
                return await asyncio.wait_for(fn(**kwargs), timeout=self.timeout_s)
            try:
                return asyncio.run(run())
            except asyncio.TimeoutError:
                raise TimeoutError(f"timed out after {self.timeout_s} s") from None
        if self.timeout_s is None:
            return fn(**kwargs)
        future = self._pool.submit(fn, **kwargs)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"timed out after {self.timeout_s} s (the call keeps running in its thread)") from None

    @staticmethod
    def _validate(name: str, out: Any, N: int) -> list[Optional[float]]:
        if hasattr(out, "tolist") and not isinstance(out, list):
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise _BadOutput(f"reward function '{name}' must return a list of {N} floats or None, got {type(out).__name__}")
        if len(out) != N:
            raise _BadOutput(f"reward function '{name}' returned {len(out)} values for {N} completions")
        values: list[Optional[float]] = []
        for i, v in enumerate(out):
            if v is None:
                values.append(None)
            elif isinstance(v, numbers.Real):
                values.append(float(v) if math.isfinite(v) else None)
            else:
                raise _BadOutput(f"reward function '{name}' returned {type(v).__name__} {v!r} for sample {i}; expected a float or None")
        return values


class _BadOutput(ValueError):
    """Wrong length or type: a bug in the function, reported as ValueError without per-sample retries."""
