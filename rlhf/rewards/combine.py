"""Score completions with several reward functions and combine them with weights.

Contract (TRL's): `f(prompts, completions, completion_ids, **columns) -> list[float | None]`;
`None` means "not applicable" and NaN/inf count as unscorable. The combined score of a
sample is the weighted sum over the functions that scored it, NaN when none did (the
trainer gives such samples advantage 0). Async functions are awaited; a per-call timeout
and `on_error` ('raise' or 'skip') apply to every function alike.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from rlhf.calls import CallTimeout, call
from rlhf.errors import RewardError
from rlhf.rewards.registry import load_reward_fn, reward_fn_name


@dataclass
class RewardResult:
    scores_N: torch.Tensor  # float32, NaN where no function scored the sample
    per_fn: dict[str, list[Optional[float]]]  # raw (validated) values of each function
    stats: dict[str, float] = field(default_factory=dict)


class RewardModule:
    """The run's reward functions, each with a name and a weight.

    `specs`: config entries (`reward.functions`: a registry name, `module:function` or `file.py:function`,
    with `weight` and `name`), or from Python, plain callables (weight 1, named after the function) or
    `(callable, weight)` pairs.
    """

    def __init__(self, specs, on_error: str = "raise", timeout_s: Optional[float] = None):
        self.fns: list[tuple[str, Callable, float]] = []
        for spec in specs:
            if callable(spec) or isinstance(spec, tuple):
                fn, weight = spec if isinstance(spec, tuple) else (spec, 1.0)
                if not callable(fn):
                    raise RewardError(f"reward function {fn!r} is not callable")
                name = getattr(fn, "__name__", type(fn).__name__)
            else:
                fn, name, weight = load_reward_fn(spec.fn), spec.name or reward_fn_name(spec.fn), spec.weight
            if any(name == n for n, _, _ in self.fns):
                raise RewardError(f"two reward functions are named '{name}'; give one a `name`")
            self.fns.append((name, fn, float(weight)))
        self.on_error, self.timeout_s = on_error, timeout_s

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.fns]

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 columns: dict[str, list]) -> RewardResult:
        N = len(completions)
        total = torch.zeros(N, dtype=torch.float64)
        scored = torch.zeros(N, dtype=torch.bool)
        per_fn, stats = {}, {}
        for name, fn, weight in self.fns:
            kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            values, counts = self._score(name, fn, kwargs, N)
            for i, v in enumerate(values):
                if v is not None:
                    total[i] += weight * v
                    scored[i] = True
            per_fn[name] = values
            stats[f"reward/{name}/unscored"] = float(sum(v is None for v in values))
            stats[f"reward/{name}/errors"] = float(counts["errors"])
            stats[f"reward/{name}/timeouts"] = float(counts["timeouts"])
        scores = torch.where(scored, total, torch.full_like(total, float("nan"))).float()
        stats["reward/unscored"] = float((~scored).sum())
        stats["reward/unscored_frac"] = float((~scored).float().mean())
        return RewardResult(scores_N=scores, per_fn=per_fn, stats=stats)

    # --------------------------------------------------------------------- one function

    def _score(self, name: str, fn: Callable, kwargs: dict, N: int) -> tuple[list[Optional[float]], dict[str, int]]:
        """Validated values of one function and its counts {'errors', 'timeouts'}."""
        try:
            return self._validate(name, self._invoke(fn, kwargs), N), {"errors": 0, "timeouts": 0}
        except _BadOutput:
            raise
        except RewardTimeout as e:  # a hang is not retried per sample: that would cost N timeouts
            if self.on_error == "raise":
                raise RewardError(f"reward function '{name}' {e} on a batch of {N} samples "
                                  "(reward.timeout_s)") from None
            return [None] * N, {"errors": 0, "timeouts": N}
        except (Exception, SystemExit) as e:  # noqa: BLE001 - user code can raise anything
            err = e
        # Find the sample(s) that fail, so the error (or the skip) is precise.
        values: list[Optional[float]] = []
        counts = {"errors": 0, "timeouts": 0}
        for i in range(N):
            one = {k: (v[i: i + 1] if isinstance(v, list) and len(v) == N else v) for k, v in kwargs.items()}
            try:
                values += self._validate(name, self._invoke(fn, one), 1)
            except _BadOutput:
                raise
            except (Exception, SystemExit) as e:  # noqa: BLE001
                if self.on_error == "raise":
                    raise RewardError(f"reward function '{name}' failed on sample {i}: {type(e).__name__}: {e}") from e
                values.append(None)
                counts["timeouts" if isinstance(e, RewardTimeout) else "errors"] += 1
        if counts["errors"] + counts["timeouts"] == 0 and self.on_error == "raise":  # fails on the batch only
            raise RewardError(f"reward function '{name}' failed: {type(err).__name__}: {err}") from err
        return values, counts

    def _invoke(self, fn: Callable, kwargs: dict) -> Any:
        """Call `fn` (awaited if async) within `reward.timeout_s` (rlhf.calls.call)."""
        return call(fn, kwargs, self.timeout_s)

    @staticmethod
    def _validate(name: str, out: Any, N: int) -> list[Optional[float]]:
        if hasattr(out, "tolist") and not isinstance(out, list):
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise _BadOutput(f"reward function '{name}' must return a list of {N} floats or None, "
                             f"got {type(out).__name__}")
        if len(out) != N:
            raise _BadOutput(f"reward function '{name}' returned {len(out)} values for {N} completions")
        values: list[Optional[float]] = []
        for i, v in enumerate(out):
            if v is None:
                values.append(None)
            elif isinstance(v, numbers.Real):
                values.append(float(v) if math.isfinite(v) else None)
            else:
                raise _BadOutput(f"reward function '{name}' returned {type(v).__name__} {v!r} for sample {i}; "
                                 "expected a float or None")
        return values


RewardTimeout = CallTimeout  # a reward call did not return within `reward.timeout_s`


class _BadOutput(RewardError, ValueError):
    """Wrong length or type: a bug in the function, reported as ValueError without per-sample retries."""
