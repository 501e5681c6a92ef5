"""Rollouts: prompts in, scored samples of whole groups out (generate + score, DAPO's rounds)."""
from rlhf.rollout.groups import RolloutSource, rollout, sampling_params
from rlhf.rollout.samples import Samples

__all__ = ["RolloutSource", "Samples", "rollout", "sampling_params"]
