"""Rollouts: prompts in, scored samples of whole groups out (generate + score, DAPO's rounds; single-turn
completions or multi-turn episodes)."""
from rlhf.rollout.episodes import EpisodeSpec, run_episodes
from rlhf.rollout.groups import RolloutSource, generate_batch, rollout, sampling_params
from rlhf.rollout.samples import Completions, Samples

__all__ = ["Completions", "EpisodeSpec", "RolloutSource", "Samples", "generate_batch", "rollout", "run_episodes",
           "sampling_params"]
