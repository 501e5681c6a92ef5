from pathlib import Path

import pytest
from rm_helpers import rm_overrides, write_jsonl
from transformers import AutoModelForSequenceClassification

from reward_models.config import load_rm_config
from rlhf.cli import main
from rlhf.logging import read_jsonl

RECIPE = Path(__file__).parents[2] / "recipes" / "reward_model_arithmetic.yaml"


def test_help_lists_every_key(capsys):
    main(["reward", "train", "--help"])
    out = capsys.readouterr().out
    for key in ("data.chosen_column", "data.margin_column", "train.pairs_per_step", "train.center_rewards_coef",
                "model.lora.enabled", "eval.every", "save.final"):
        assert f"  {key} " in out, key


def test_cli_trains_and_saves(tiny_model_dir, separable_jsonl, tmp_path):
    out = tmp_path / "run"
    main(["reward", "train", *rm_overrides(tiny_model_dir, separable_jsonl, out, "train.steps=2", "eval.every=0")])
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 2]  # eval, 2 steps, final eval
    assert AutoModelForSequenceClassification.from_pretrained(out / "final").config.num_labels == 1


def test_cli_reports_bad_config_and_bad_data(tiny_model_dir, separable_jsonl, tmp_path):
    with pytest.raises(SystemExit, match=r"config error: unknown config key 'train.lrr'"):
        main(["reward", "train", *rm_overrides(tiny_model_dir, separable_jsonl, tmp_path, "train.lrr=1")])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "yes", "rejected": "no"}, {"chosen": "yes", "rejected": ""}])
    with pytest.raises(SystemExit, match=r"data error: .*bad\.jsonl: row 1, column 'rejected': is empty"):
        main(["reward", "train", *rm_overrides(tiny_model_dir, bad, tmp_path)])


def test_recipe_is_valid():
    cfg = load_rm_config(RECIPE)
    cfg.validate()
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.data.train == cfg.data.eval == "arithmetic_preferences"
