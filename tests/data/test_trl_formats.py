"""Datasets and reward functions written for TRL work unchanged: the standard and the conversational
prompt-only formats, and reward functions copied from TRL's documentation, each through a short run."""
import json

import datasets

from rlhf.logging import read_jsonl
from rlhf.trainers import Trainer

# Verbatim from TRL's GRPOTrainer documentation.
TRL_REWARDS = r'''
import re


def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]
'''


def test_standard_prompt_only_with_trl_reward_functions(tiny_cfg, tmp_path):
    (tmp_path / "trl_rewards.py").write_text(TRL_REWARDS)
    data = tmp_path / "standard.jsonl"  # TRL's standard prompt-only format, plus a column for reward_func
    data.write_text("".join(json.dumps({"prompt": p, "ground_truth": g}) + "\n"
                            for p, g in [("The sky is", "blue"), ("The sun is", "yellow"), ("What is 1 + 1 ?", "2")]))
    fns = (f"reward.functions=[{{fn: '{tmp_path}/trl_rewards.py:reward_len'}}, "
           f"{{fn: '{tmp_path}/trl_rewards.py:reward_func'}}]")
    trainer = Trainer(tiny_cfg(f"data.train={data}", fns, "train.steps=2", "log.trackers=[]",
                               "log.completions_per_step=8"))
    records = trainer.train()
    rows = read_jsonl(trainer.out / "completions.jsonl")
    assert len(rows) == 16
    for row in rows:  # the functions saw plain strings: TRL's standard format
        assert row["prompt"] in ("The sky is", "The sun is", "What is 1 + 1 ?")
        assert row["reward/reward_len"] == -abs(20 - len(row["completion"]))
        assert row["reward/reward_func"] == 0.0
        assert row["reward"] == row["reward/reward_len"]
    assert records[-1]["reward/reward_len/mean"] < 0 and records[-1]["reward/reward_func/mean"] == 0.0


def test_conversational_prompt_only_with_trl_format_reward(tiny_cfg, tmp_path):
    (tmp_path / "trl_rewards.py").write_text(TRL_REWARDS)
    saved = tmp_path / "conversational"  # TRL's conversational prompt-only format, as a saved DatasetDict
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": [
        [{"role": "user", "content": "What color is the sky?"}],
        [{"role": "system", "content": "Answer with yes or no."}, {"role": "user", "content": "Is the sky blue?"}],
    ]})}).save_to_disk(str(saved))
    spy = tmp_path / "spy.py"
    spy.write_text(f'''
import json
def spy(prompts, completions, **kwargs):
    with open({str(tmp_path / "seen.jsonl")!r}, "a") as f:
        f.write(json.dumps({{"prompts": prompts, "completions": completions}}) + "\\n")
    return [0.0] * len(completions)
''')
    fns = f"reward.functions=[{{fn: '{tmp_path}/trl_rewards.py:format_reward_func'}}, {{fn: '{spy}:spy', weight: 0}}]"
    trainer = Trainer(tiny_cfg(f"data.train={saved}", fns, "train.steps=2", "log.trackers=[]"))
    records = trainer.train()  # format_reward_func indexes completion[0]["content"]: strings would raise
    assert [r["reward/format_reward_func/mean"] for r in records] == [0.0, 0.0]
    calls = read_jsonl(tmp_path / "seen.jsonl")
    assert len(calls) == 2
    for call in calls:
        assert all(isinstance(p, list) and p[-1]["role"] == "user" for p in call["prompts"])
        assert all(len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
                   for c in call["completions"])
    rows = read_jsonl(trainer.out / "completions.jsonl")
    assert json.loads(rows[0]["prompt"])[-1]["role"] == "user"
