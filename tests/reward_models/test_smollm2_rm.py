"""Integration: the reward-model recipe on the embedded SmolLM2-135M-Instruct (slow; `make test` runs it)."""
from pathlib import Path

import pytest

from reward_models.config import load_rm_config
from reward_models.trainer import RewardModelTrainer
from rlhf.config import RewardSpec
from rlhf.data.tasks import TASKS
from rlhf.rewards import RewardModule
from tests.conftest import requires_smollm2

RECIPE = Path(__file__).parents[2] / "recipes" / "reward_model_arithmetic.yaml"


@pytest.mark.slow
@requires_smollm2
def test_short_recipe_run_learns_the_typical_mistakes_and_scores_through_reward_module(tmp_path):
    cfg = load_rm_config(RECIPE, [f"output_dir={tmp_path}", "train.steps=20", "eval.every=0", "eval.at_start=true",
                                       "progress=false"])
    history = RewardModelTrainer(cfg).train()
    evals = [r for r in history if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 20]
    assert evals[-1]["eval/accuracy/typical_mistake"] >= 0.9, evals[-1]
    assert evals[-1]["eval/accuracy"] >= evals[0]["eval/accuracy"] + 0.2, evals

    # The saved model as a recipe's reward function, on held-out questions.
    module = RewardModule([RewardSpec(fn=f"reward_model:{tmp_path}")])
    held = TASKS.get("arithmetic")("eval")
    prompts, answers = held["prompt"][:8], held["answer"][:8]
    echo = [f"{p[-1]['content'][8:-1]} = {s}" for p, s in zip(prompts, answers)]  # "a + b = s": first number wrong
    right = [f"The answer is {s}." for s in answers]  # the recipe's canonical chosen form
    scores = module(prompts * 2, right + echo, [[0]] * 16, {"answer": answers * 2}).per_fn["reward_model"]
    assert sum(scores[i] > scores[8 + i] for i in range(8)) >= 7, scores
