"""Trackers through accelerate (tensorboard, wandb offline, mlflow file store) and the parquet completions table."""
import importlib.util
import json

import pytest

from rlhf.config import ConfigError
from rlhf.logging import read_jsonl
from rlhf.trackers import build_trackers, flatten, mlflow_uri, numeric, read_completions, without_url_credentials
from rlhf.trainers import Trainer


def test_flatten_and_numeric_keep_what_trackers_accept():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": "x"}) == {"a.b": 1, "a.c": "[1, 2]", "d": "None",
                                                                          "e": "x"}
    assert numeric({"step": 3, "kl": None, "x": float("nan"), "y": 0.5, "ok": True, "s": "a"}) == {"step": 3, "y": 0.5}


def test_url_credentials_never_reach_trackers():
    flat = {"log.mlflow_tracking_uri": "https://alice:s3cr3t@mlflow.example.org/x", "a": 1, "b": "http://host/y"}
    assert without_url_credentials(flat) == {"log.mlflow_tracking_uri": "https://mlflow.example.org/x", "a": 1,
                                             "b": "http://host/y"}


def test_unknown_or_missing_tracker_fails_naming_it(tiny_cfg, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        tiny_cfg("log.trackers=[comet]").validate()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="'wandb' but the wandb package is not installed"):
        tiny_cfg("log.trackers=[wandb]").validate()


def test_no_trackers_writes_no_tracker_files(tiny_cfg):
    trainer = Trainer(tiny_cfg("log.trackers=[]", "train.steps=1"))
    trainer.train()
    assert not (trainer.out / "tensorboard").exists()
    assert build_trackers(trainer.cfg) == []


def test_parquet_completions_match_jsonl(lora_run):
    run_dir, _ = lora_run
    parts = sorted(p.name for p in (run_dir / "completions").glob("*.parquet"))
    assert parts == [f"step_{s:06d}.parquet" for s in range(1, 7)]
    rows_pq, rows_js = read_completions(run_dir, "parquet"), read_completions(run_dir)
    assert len(rows_pq) == len(rows_js) == 6 * 4
    for a, b in zip(rows_pq, rows_js):
        assert a == pytest.approx(b)
    assert {"step", "prompt", "completion", "reward", "reward/yes_fraction", "reward/first_number_matches",
            "advantage"} <= set(rows_js[0])
    assert json.loads(rows_js[0]["prompt"])[0]["role"] == "user"  # conversational prompts stay readable


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run_records_metrics_and_table(tiny_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = Trainer(tiny_cfg("log.trackers=[wandb]", "log.wandb_mode=offline", "train.steps=2", "log.run_name=tiny"))
    trainer.train()
    runs = list((trainer.out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"reward/mean" in data and b"completion/len_mean" in data and b"train.lr" in data
    tables = list((runs[0] / "files" / "media" / "table").glob("completions_*.table.json"))
    assert tables
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["step", "prompt", "completion"] and len(table["data"]) == 4


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow not installed")
def test_mlflow_local_store_has_metrics_and_params(tiny_cfg, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trainer = Trainer(tiny_cfg("log.trackers=[mlflow]", "train.steps=2", "log.project=tiny-exp"))
    trainer.train()
    import mlflow

    uri = mlflow_uri(trainer.cfg)
    assert uri.startswith("file:") and (trainer.out / "mlruns").is_dir()
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny-exp")
    (run,) = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(run.info.run_id, "reward/mean")
    rows = read_jsonl(trainer.out / "metrics.jsonl")
    assert [(m.step, m.value) for m in history] == [(r["opt_step"], pytest.approx(r["reward/mean"])) for r in rows]
    assert run.data.params["train.samples_per_prompt"] == "4"
    assert run.info.run_name == "run"


def test_closing_trackers_keeps_the_process_group(tiny_cfg, monkeypatch):
    """accelerate's end_training() would destroy the process group before the final save of a multi-process run."""
    from accelerate.state import AcceleratorState, PartialState

    calls = []
    for cls in (AcceleratorState, PartialState):
        monkeypatch.setattr(cls, "destroy_process_group", lambda self, *a, **k: calls.append(1))
    trainer = Trainer(tiny_cfg("train.steps=1", "checkpoint.save_final=true"))
    trainer.train()
    assert calls == [] and trainer.acc.trackers == [] and (trainer.out / "final").is_dir()
    event_files = list((trainer.out / "tensorboard").glob("events.out.tfevents.*"))
    assert event_files and event_files[0].stat().st_size > 0  # flushed by finish()
