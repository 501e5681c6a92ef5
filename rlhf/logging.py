"""Run outputs: metrics.jsonl (one object per optimizer step), completions.jsonl, phase timers, progress bar."""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

from rlhf.redact import redact


class PhaseTimer:
    """`with timer("generate"): ...` accumulates seconds per phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
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
        with open(self.path, "a") as f:
            f.write(json.dumps(redact({k: _jsonable(v) for k, v in record.items()})) + "\n")

    def truncate_after(self, key: str, value: int) -> None:
        """Drop records with record[key] > value (used on resume, so no step is logged twice)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get(key, 0) <= value]
        self.path.write_text("".join(line + "\n" for line in keep))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A rich progress bar with reward, KL and step time (main process only; off when disabled)."""

    def __init__(self, total: int, enabled: bool, start: int = 0):
        self._bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = RichProgress(
            TextColumn("[bold]rlhf"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        )
        self._task = self._bar.add_task("train", total=total, completed=start, info="")
        self._bar.start()

    def update(self, record: dict[str, Any]) -> None:
        """Advance the bar and print one log line for the step above it (plain print when the bar is off)."""
        if self._bar is None:
            print(console_line(record), flush=True)
            return
        self._bar.console.print(console_line(record), soft_wrap=True)
        kl = record.get("kl")
        info = f"reward {record['reward/mean']:.3f}" + (f"  kl {kl:.4f}" if kl is not None else "") + f"  {record['time/step_s']:.1f}s/step"
        self._bar.update(self._task, advance=1, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def console_line(record: dict[str, Any]) -> str:
    kl = record.get("kl")
    return (
        f"step {record['step']:>4}  reward {record['reward/mean']:.3f} ± {record['reward/std']:.3f}  "
        f"kl {kl if kl is None else f'{kl:.4f}'}  loss {record['loss']:+.4f}  len {record['completion/len_mean']:.1f}  "
        f"{record['time/step_s']:.1f}s (gen {record['time/generate_s']:.1f}s, train {record['time/train_s']:.1f}s)"
    )
