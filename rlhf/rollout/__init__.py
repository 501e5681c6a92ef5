"""Rollouts: prompts in, scored samples of whole groups out (generate + score, DAPO's rounds; single-turn
completions or multi-turn episodes)."""
from rlhf.rollout.episodes import EpisodeSpec, build_episodes, episode_rewards, run_episodes
from rlhf.rollout.groups import (
           Batch,
           RolloutSource,
           batch_from_json,
           batch_to_json,
           episode_metrics,
           generate_batch,
           rollout,
           sample_round,
           sampling_params,
)
from rlhf.rollout.samples import Completions, Samples

__all__ = ["Batch", "Completions", "batch_from_json", "batch_to_json", "EpisodeSpec", "RolloutSource", "Samples",
           "build_episodes", "episode_rewards", "generate_batch",
           "episode_metrics", "rollout", "run_episodes", "sample_round",
           "sampling_params"]
