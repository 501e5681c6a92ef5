"""Every user error ends `rlhf train` (and recipe scripts, which run the same code) with one line naming the
culprit and a non-zero exit status, not a traceback."""
import json
import subprocess
import sys

import pytest


def run_train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf.cli", "train", *overrides], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def bad_rows(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1 + 2 ?", "answer": 3}) + "\n"
                    + json.dumps({"question": "1 + 1", "answer": 2}) + "\n")
    return path


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(("error:", "config error:")), proc.stderr[-2000:]
    for needle in needles:
        assert needle in last, last


def test_a_row_without_a_prompt(tiny_overrides, bad_rows):
    one_line_error(run_train(*tiny_overrides(f"data.train={bad_rows}")), str(bad_rows), "row 1", "prompt")


def test_a_reward_file_that_does_not_exist(tiny_overrides, tmp_path):
    one_line_error(run_train(*tiny_overrides(f"reward.functions=[{{fn: '{tmp_path}/nope.py:score'}}]")), "nope.py")


def test_a_reward_function_that_raises(tiny_overrides, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def score(completions, **kw):\n    raise KeyError('answer_key')\n")
    one_line_error(run_train(*tiny_overrides(f"reward.functions=[{{fn: '{path}:score'}}]")), "'score'", "answer_key")


def test_a_model_path_that_is_not_a_model(tiny_overrides, tmp_path):
    one_line_error(run_train(*tiny_overrides(f"model.path={tmp_path}")), str(tmp_path), "config.json")


def test_a_bad_config_value(tiny_overrides):
    one_line_error(run_train(*tiny_overrides("train.lr=-1")), "train.lr")


def test_an_unknown_algorithm(tiny_overrides):
    one_line_error(run_train(*tiny_overrides("algo.advantage=grpoo")), "algo.advantage", "grpo")
