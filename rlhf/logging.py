"""Run outputs: metrics.jsonl (one object per optimizer step), completions.jsonl, phase timers, progress bar,
and a console that shows each warning once."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from rlhf.redact import redact

# Libraries whose warnings repeat at every step or every generate call; `quiet_repeated_warnings` dedupes them.
NOISY_LOGGERS = ("transformers", "torch", "accelerate", "peft", "datasets")
_warned: set[str] = set()


class RlhfWarning(UserWarning):
    """A warning from rlhf itself (shown once per key by `warn_once`)."""


def warn_once(message: str, key: Optional[str] = None) -> bool:
    """Warn with `message` the first time `key` (default: the message) is seen in this process.

    Returns True when the warning was shown. Use a `key` when the message carries a
    changing number (a step, a count), so the same condition still warns only once.
    """
    key = message if key is None else key
    if key in _warned:
        return False
    _warned.add(key)
    warnings.warn(message, RlhfWarning, stacklevel=2)
    return True


def warn_about_step(record: dict[str, Any], group_relative: bool = True) -> None:
    """Warn (once per run, not every step) about a step that cannot teach the policy much.

    - every group's rewards were equal (`frac_zero_std` 1) and the advantage estimator is
      group-relative (`group_relative`): every advantage is 0;
    - every completion hit `generation.max_new_tokens` (`completion/truncated_frac` 1);
    - no reward function scored any sample (`reward/mean` NaN).
    """
    step = record.get("step")
    if group_relative and record.get("frac_zero_std") == 1.0:
        warn_once(f"step {step}: every group's rewards were identical, so every advantage is 0 and the policy "
                  "gets no signal (a reward that is too sparse? try more train.samples_per_prompt)", key="zero_std")
    if record.get("completion/truncated_frac") == 1.0:
        warn_once(f"step {step}: every completion was cut at generation.max_new_tokens; raise it if answers need "
                  "more room", key="all_truncated")
    mean = record.get("reward/mean")
    if isinstance(mean, float) and math.isnan(mean):
        warn_once(f"step {step}: no reward function scored any sample (all returned None)", key="all_unscored")


class _OnceFilter(logging.Filter):
    """Lets each (logger, message template) through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """True the first time a (logger, template) is seen, for every handler of that record; errors always."""
        if record.levelno >= logging.ERROR:
            return True
        decision = getattr(record, "_rlhf_once", None)  # decided once per record, so every handler agrees
        if decision is None:
            key = (record.name, str(record.msg))
            decision = key not in self.seen
            self.seen.add(key)
            record._rlhf_once = decision
        return decision


_once_filter = _OnceFilter()


def quiet_repeated_warnings() -> None:
    """Show every library warning once per message, not once per step (idempotent).

    Python warnings from transformers, torch, accelerate, peft and datasets get the
    'once' action (one print per message text, wherever it is raised), and their
    loggers' handlers drop a WARNING/INFO record whose message template was already
    shown. Errors always pass.
    """
    with contextlib.suppress(ImportError):  # makes transformers attach its handler now, so it gets the filter
        import transformers

        transformers.logging.get_verbosity()
    for module in NOISY_LOGGERS:
        warnings.filterwarnings("once", module=rf"{module}(\.|$)")
    warnings.filterwarnings("once", category=RlhfWarning)
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _once_filter not in logger.filters:
            logger.addFilter(_once_filter)
        for handler in logger.handlers:
            if _once_filter not in handler.filters:
                handler.addFilter(_once_filter)


def quiet_library_progress() -> None:
    """Hide the per-file progress bars of transformers and datasets ("Loading weights", "Writing model
    shards", "Map"): the command line shows its own progress bar and log lines instead."""
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()


def _sync_gpu() -> None:
    """Wait for queued GPU work, so that a phase's time is its own (kernels run asynchronously)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """`with timer("generate"): ...` accumulates seconds per phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        _sync_gpu()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync_gpu()
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a crash loses nothing already logged.

    Records pass through `rlhf.redact.redact`: no token, key or password reaches the file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` as one JSON line (NaN/inf become null, tensors become numbers)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(redact({k: _jsonable(v) for k, v in record.items()})) + "\n")

    def truncate_after(self, key: str, value: int) -> None:
        """Drop records with record[key] > value (used on resume, so no step is logged twice)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get(key, 0) <= value]
        self.path.write_text("".join(line + "\n" for line in keep))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON object of a jsonl file, in order (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A rich progress bar with reward, KL and step time (main process only; off when disabled)."""

    def __init__(self, total: int, enabled: bool, start: int = 0, console: Any = None):
        """`total` RL steps, `start` already done (resume); `console`: a rich Console (default: the terminal)."""
        self._bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]rlhf"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
        )
        self._task = self._bar.add_task("train", total=total, completed=start, info="")
        self._bar.start()

    def update(self, record: dict[str, Any]) -> None:
        """Advance the bar and print one log line for the step above it (plain print when the bar is off)."""
        if self._bar is None:
            print(console_line(record), flush=True)
            return
        self._bar.console.print(console_line(record), soft_wrap=True)  # one line, even on a narrow console
        kl = record.get("kl") if record.get("kl") is not None else record.get("kl_in_reward")
        info = (f"reward {record['reward/mean']:.3f}" + (f"  kl {kl:.4f}" if kl is not None else "")
                + f"  {record['time/step_s']:.1f}s/step")
        self._bar.update(self._task, advance=1, info=info)

    def close(self) -> None:
        """Stop the bar (idempotent; a no-op when it is off)."""
        if self._bar is not None:
            self._bar.stop()


def console_line(record: dict[str, Any]) -> str:
    """The one log line of a step: reward, KL, loss, completion length and where the time went."""
    kl = record.get("kl") if record.get("kl") is not None else record.get("kl_in_reward")
    loss = record.get("loss")  # absent while only the critic trains (critic.warmup_steps)
    return (
        f"step {record['step']:>4}  reward {record['reward/mean']:.3f} ± {record['reward/std']:.3f}  "
        f"kl {kl if kl is None else f'{kl:.4f}'}  loss {'-' if loss is None else f'{loss:+.4f}'}  "
        f"len {record['completion/len_mean']:.1f}  "
        f"{record['time/step_s']:.1f}s ({_where_time_went(record)})"
    )


def _where_time_went(record: dict[str, Any]) -> str:
    """'gen 1.3s, train 3.7s' (asynchronous: the generation that overlapped, and the trainer's wait for it)."""
    if "time/async_generate_s" in record:
        return (f"gen {record['time/async_generate_s']:.1f}s beside, wait {record.get('time/wait_s', 0.0):.1f}s, "
                f"train {record['time/train_s']:.1f}s")
    return f"gen {record['time/generate_s']:.1f}s, train {record['time/train_s']:.1f}s"
