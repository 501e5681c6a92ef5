import math

import pytest
import torch
from rm_helpers import CHAT_PROMPT, separable_rows

from reward_models.scorer import RewardModelScorer, ScorerOptions, load_scorer, parse_spec
from rlhf.config import ConfigError, RewardSpec
from rlhf.errors import RewardError
from rlhf.rewards import RewardModule, load_reward_fn


def test_learned_rm_through_reward_module_orders_its_training_pairs(trained_rm):
    run_dir, _ = trained_rm
    module = RewardModule([RewardSpec(fn=f"reward_model:{run_dir}/final?dtype=fp32"),
                           RewardSpec(fn="first_number_matches", weight=0.0)])
    rows = separable_rows()
    n = len(rows)
    prompts = [r["prompt"] for r in rows] * 2
    # message lists, as the trainer passes them
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    result = module(prompts, completions, [[1]] * (2 * n), {"answer": [0] * (2 * n)})
    scores = result.per_fn["reward_model"]
    assert module.names == ["reward_model", "first_number_matches"]
    assert all(scores[i] > scores[n + i] for i in range(n)), scores
    assert result.scores_N.tolist() == pytest.approx(scores)  # the only weighted function

    # Plain-string completions of chat prompts score exactly like their assistant-message form.
    as_text = module(prompts, [c[0]["content"] for c in completions], [[1]] * (2 * n), {"answer": [0] * (2 * n)})
    assert as_text.per_fn["reward_model"] == pytest.approx(scores, abs=1e-5)


def test_batching_packing_and_padding_do_not_change_scores(trained_rm):
    run_dir, _ = trained_rm
    one = RewardModelScorer(run_dir, ScorerOptions(batch_size=1, dtype="fp32"))
    packed = load_scorer(f"{run_dir}?batch_size=3&dtype=fp32")
    padded = load_scorer(f"{run_dir}?batch_size=16&dtype=fp32&pack=false")
    other = [{"role": "user", "content": "What is a + b ?"}]
    prompts = [CHAT_PROMPT] * 4 + [other] * 3  # two groups of one prompt each
    completions = ["yes", "no no no yes no no", "the answer is yes .", "no", "a", "b b", "yes"]  # padding in a batch
    assert packed._batches(prompts, [[1]] * 7) == [[[0, 1, 2]], [[3]], [[4, 5, 6]]]  # rows of <= batch_size
    reference = one(prompts, completions, None)
    assert packed(prompts, completions, None) == pytest.approx(reference, abs=1e-5)
    assert padded(prompts, completions, None) == pytest.approx(reference, abs=1e-5)
    assert max(reference) - min(reference) > 1e-2


def test_scorer_is_cached_per_path_and_options(trained_rm):
    run_dir, _ = trained_rm
    a = load_reward_fn(f"reward_model:{run_dir}?dtype=fp32")
    assert load_reward_fn(f"reward_model:{run_dir}/final?dtype=fp32") is a  # a run dir resolves to its final/
    assert load_reward_fn(f"reward_model:{run_dir}?dtype=fp32&batch_size=3") is not a
    assert next(a.model.parameters()).dtype == torch.float32
    assert a.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # device=auto


def test_standard_prompts_render_as_plain_text(trained_rm):
    run_dir, _ = trained_rm
    scorer = load_scorer(f"{run_dir}?dtype=fp32")
    std = separable_rows(conversational=False)[0]
    full = scorer([""], [std["prompt"] + std["chosen"]], None)
    split = scorer([std["prompt"]], [std["chosen"]], None)
    assert split == pytest.approx(full)


def test_spec_errors_are_clear(trained_rm, tmp_path):
    run_dir, _ = trained_rm
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize'; did you mean 'batch_size'"
                                          r".*\(options: batch_size, max_length"):
        parse_spec(f"{run_dir}?batchsize=4")
    with pytest.raises(ConfigError, match=r"dtype: invalid value 'fp16'"):
        parse_spec(f"{run_dir}?dtype=fp16")
    with pytest.raises(RewardError, match=r"reward model '.*nowhere': not a saved model directory"):
        load_reward_fn(f"reward_model:{tmp_path}/nowhere")
    with pytest.raises(ConfigError, match="give a model directory"):
        load_reward_fn("reward_model:")
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        load_scorer(str(run_dir))([CHAT_PROMPT] * 2, ["yes"], None)


def test_rl_trainer_uses_the_learned_rm_as_a_reward_function(trained_rm, tiny_cfg):
    from rlhf.trainers import train

    run_dir, _ = trained_rm
    history = train(tiny_cfg("train.steps=2", f"reward.functions=[{{fn: 'reward_model:{run_dir}?dtype=fp32'}}]"))
    steps = [r for r in history if "reward/reward_model/mean" in r]
    assert len(steps) == 2 and all(math.isfinite(r["reward/reward_model/mean"]) for r in steps), history
    assert steps[0]["reward/mean"] == pytest.approx(steps[0]["reward/reward_model/mean"])  # the only function, weight 1
