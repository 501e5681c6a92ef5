"""Reward functions: TRL's contract, weighted combination, errors named by function."""
from rlhf.rewards.combine import RewardError, RewardModule, RewardResult
from rlhf.rewards.registry import REWARD_FACTORIES, REWARDS, load_reward_fn

__all__ = ["REWARDS", "REWARD_FACTORIES", "RewardError", "RewardModule", "RewardResult", "load_reward_fn"]
