"""Reward functions the trainer tests run with, written to files as users write theirs."""
import pytest

YES_REWARD = '''
import os
import time


def yes_fraction(prompts, completions, completion_ids, **kwargs):
    """Dense toy reward: the fraction of completion words that are 'yes' (slowed down by SLOW_REWARD_S)."""
    time.sleep(float(os.environ.get("SLOW_REWARD_S", "0")))
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        words = text.split()
        out.append(sum(w == "yes" for w in words) / max(1, len(words)))
    return out
'''


@pytest.fixture
def reward_file(tmp_path):
    """reward_file(source, fn) -> the `reward.functions=[...]` override for function `fn` defined in `source`."""

    def make(source: str, fn: str, **spec) -> str:
        path = tmp_path / f"reward_{fn}.py"
        path.write_text(source)
        extra = "".join(f", {k}: {v}" for k, v in spec.items())
        return f"reward.functions=[{{fn: '{path}:{fn}'{extra}}}]"

    return make


@pytest.fixture
def yes_reward(reward_file):
    return reward_file(YES_REWARD, "yes_fraction")
