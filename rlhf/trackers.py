"""Experiment trackers through accelerate (tensorboard, wandb, mlflow) and the parquet completions table.

    acc = make_accelerator(cfg)          # Accelerator(log_with=[...]) built from cfg.log.trackers
    trackers = Trackers(cfg, acc)
    trackers.start(config_dict, step)    # accelerator.init_trackers(...)
    trackers.log(records)                # accelerator.log(numeric metrics, step=opt_step)
    trackers.log_completions(rows, step) # completions/step_NNNNNN.parquet, a wandb table
    trackers.finish()                    # every tracker's finish(); the process group stays

Where each tracker writes: tensorboard to `<output_dir>/tensorboard/`, wandb to
`<output_dir>/wandb/` (mode from `log.wandb_mode` or `$WANDB_MODE`), mlflow to
`log.mlflow_tracking_uri`, `$MLFLOW_TRACKING_URI`, or the local file store `<output_dir>/mlruns`.
Only the run config and metrics are sent: never environment variables.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator, PartialState
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedType

from rlhf.compat import switch_to_fsdp
from rlhf.config import Config

COMPLETIONS_DIR = "completions"


def run_name(cfg: Config) -> str:
    """The run's name in trackers: `log.run_name`, else the output directory's folder name."""
    return cfg.log.run_name or Path(cfg.output_dir).resolve().name


def mlflow_uri(cfg: Config) -> str:
    """`log.mlflow_tracking_uri`, else `$MLFLOW_TRACKING_URI`, else `file:<output_dir>/mlruns`."""
    uri = cfg.log.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or (Path(cfg.output_dir).resolve() / "mlruns").as_uri()


def build_trackers(cfg: Config) -> list[GeneralTracker]:
    """accelerate tracker objects for `cfg.log.trackers` (not started; `init_trackers` starts them)."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    out = Path(cfg.output_dir)
    trackers: list[GeneralTracker] = []
    for name in cfg.log.trackers:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", out))
        elif name == "wandb":
            kwargs: dict[str, Any] = {"name": run_name(cfg), "dir": str(out)}
            if cfg.log.wandb_mode:
                kwargs["mode"] = cfg.log.wandb_mode
            trackers.append(WandBTracker(cfg.log.project, **kwargs))
        elif name == "mlflow":
            trackers.append(MLflowTracker(cfg.log.project, run_name=run_name(cfg)))
        else:  # Config.validate rejects unknown names first; this guards direct callers
            raise ValueError(f"log.trackers: unknown tracker '{name}'")
    return trackers


def make_accelerator(cfg: Config) -> Accelerator:
    """The trainer's Accelerator, with `log_with` set from `cfg.log.trackers`.

    The layout (DDP, DeepSpeed, FSDP2) comes from `accelerate launch`. Without a GPU it runs on the CPU,
    except under DeepSpeed (with DS_ACCELERATOR=cpu) and FSDP: `cpu=True` would turn those into plain DDP.
    """
    use = lambda name: os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true"  # noqa: E731
    cpu = not torch.cuda.is_available()
    if cpu and use("DEEPSPEED"):  # without a backend named, accelerate counts 1 process under DeepSpeed on a CPU
        PartialState(backend="gloo")
    acc = Accelerator(cpu=cpu and not use("DEEPSPEED"), log_with=build_trackers(cfg) or None)
    if cpu and use("FSDP") and acc.distributed_type == DistributedType.MULTI_CPU:
        switch_to_fsdp()  # accelerate selects FSDP only on accelerators; torch's FSDP2 runs on CPU tensors over gloo
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != world:  # never train twice on the same prompts without knowing it
        raise RuntimeError(f"accelerate sees {acc.num_processes} process(es) but WORLD_SIZE={world} "
                           f"({acc.distributed_type}); check the launch config (launch/*.yaml)")
    return acc


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1, 'c': [1, 2]}} -> {'a.b': 1, 'a.c': '[1, 2]'}: the scalar hyperparameters trackers accept."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = "None" if value is None else value
        else:
            flat[name] = str(value)
    return flat


_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)[^/\s@]+@", re.I)


def without_url_credentials(flat: dict[str, Any]) -> dict[str, Any]:
    """Drop `user:password@` from URL values (e.g. log.mlflow_tracking_uri) before a tracker records them."""
    return {k: _URL_USERINFO.sub(r"\g<scheme>", v) if isinstance(v, str) else v for k, v in flat.items()}


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (None, NaN and strings are left out; trackers reject them)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = value
    return out


class Trackers:
    """The run's trackers (on the accelerator) plus the optional parquet completions table."""

    def __init__(self, cfg: Config, accelerator: Accelerator):
        self.cfg, self.acc = cfg, accelerator
        self.parquet_dir = Path(cfg.output_dir) / COMPLETIONS_DIR if cfg.log.completions_parquet else None
        self.started = False

    @property
    def names(self) -> list[str]:
        """Names of the trackers the accelerator was built with."""
        return [getattr(t, "name", str(t)) for t in (self.acc.log_with or [])]

    def start(self, config: dict[str, Any], step: int = 0) -> None:
        """Start every tracker with the (flattened) run config; drop parquet parts beyond `step` (resume)."""
        if "mlflow" in self.names and self.acc.is_main_process:
            import mlflow

            uri = mlflow_uri(self.cfg)
            if uri.startswith("file:"):  # mlflow 3 refuses its file store unless asked; it is the offline option
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
        self.acc.init_trackers(self.cfg.log.project, config=without_url_credentials(flatten(config)))
        self.started = True
        if self.parquet_dir is not None and self.acc.is_main_process and self.parquet_dir.is_dir():
            for part in self.parquet_dir.glob("step_*.parquet"):
                if int(part.stem.split("_")[1]) > step:
                    part.unlink()

    def log(self, records: list[dict[str, Any]]) -> None:
        """Send each metrics record's numbers to every tracker, at its optimizer step."""
        for record in records:
            self.acc.log(numeric(record), step=int(record["opt_step"]))

    def log_completions(self, rows: list[dict[str, Any]], step: int, opt_step: int) -> None:
        """Write one step's completion rows to parquet (if enabled) and to wandb as a table (if tracked)."""
        if not rows or not self.acc.is_main_process:
            return
        if self.parquet_dir is not None:
            write_parquet(rows, self.parquet_dir / f"step_{step:06d}.parquet")
        if "wandb" in self.names:
            columns = list(rows[0])
            self.acc.get_tracker("wandb").log_table(
                "completions", columns=columns, data=[[r.get(c) for c in columns] for r in rows], step=opt_step
            )

    def finish(self) -> None:
        """Flush and close every tracker; safe to call twice.

        Not `accelerator.end_training()`: that also destroys the process group, which the
        final checkpoint and model save still need in a multi-process run.
        """
        if self.started:
            for tracker in self.acc.trackers:
                tracker.finish()  # main process only (accelerate decorates it)
            self.acc.trackers = []
            self.started = False


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    """One parquet file of completion rows; reward and advantage columns are float64 (None -> null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(rows[0])
    arrays = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        if col == "step":
            arrays[col] = pa.array(values, type=pa.int64())
        elif col in ("prompt", "completion"):
            arrays[col] = pa.array(values, type=pa.string())
        else:
            arrays[col] = pa.array([None if v is None else float(v) for v in values], type=pa.float64())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(arrays), tmp)
    os.replace(tmp, path)
    return path


def read_completions(run_dir: str | Path, fmt: Optional[str] = None) -> list[dict[str, Any]]:
    """All completion rows of a run: from completions.jsonl, or from the parquet parts with fmt='parquet'."""
    run_dir = Path(run_dir)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        parts = sorted((run_dir / COMPLETIONS_DIR).glob("step_*.parquet"))
        return [row for part in parts for row in pq.read_table(part).to_pylist()]
    from rlhf.logging import read_jsonl

    path = run_dir / "completions.jsonl"
    return read_jsonl(path) if path.is_file() else []
