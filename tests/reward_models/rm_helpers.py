"""Tiny preference sets and a trained tiny reward model, shared by the reward-model tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

CHAT_PROMPT = [{"role": "user", "content": "What is the answer ?"}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def separable_rows(conversational: bool = True) -> list[dict]:
    """Trivially separable pairs: 'yes' answers are preferred to 'no' answers."""
    good = ["yes", "yes yes", "the answer is yes", "yes ."]
    bad = ["no", "no no", "the answer is no", "no ."]
    if conversational:
        return [{"prompt": CHAT_PROMPT, "chosen": [{"role": "assistant", "content": g}],
                 "rejected": [{"role": "assistant", "content": b}]} for g, b in zip(good, bad)]
    return [{"prompt": "What is the answer ? ", "chosen": g, "rejected": b} for g, b in zip(good, bad)]


def rm_overrides(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A fast reward-model run on the tiny model: fp32, full fine-tuning, 4 pairs per step."""
    return [
        f"model.path={model_dir}", "model.compute_dtype=fp32", "model.lora.enabled=false", f"data.train={data}",
        f"data.eval={data}", f"output_dir={out}", "train.steps=12", "train.pairs_per_step=4",
        "train.micro_batch_size=2", "train.lr=1e-2", "train.lr_schedule=constant", "eval.every=6", "eval.at_start=true",
        "progress=false", *extra,
    ]


@pytest.fixture(scope="session")
def separable_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "separable.jsonl", separable_rows())


@pytest.fixture(scope="session")
def trained_rm(tiny_model_dir, separable_jsonl, tmp_path_factory):
    """(run_dir, history) of a full fine-tuning run on the separable set; trained once per session."""
    from reward_models.config import load_rm_config
    from reward_models.trainer import RewardModelTrainer

    out = tmp_path_factory.mktemp("rm") / "run"
    history = RewardModelTrainer(load_rm_config(None, rm_overrides(tiny_model_dir, separable_jsonl, out))).train()
    return out, history
