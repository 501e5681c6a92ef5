"""Reward functions the trainer tests run with, written to files as users write theirs."""
import pytest

from tests.conftest import LENGTH_REWARD, YES_REWARD


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


@pytest.fixture
def length_reward(reward_file):
    """A reward that differs within a group whenever the lengths do: almost every step has a gradient."""
    return reward_file(LENGTH_REWARD, "length")
