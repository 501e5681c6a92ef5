"""PPO against the learned reward model of recipes/reward_model_arithmetic.yaml:
`python recipes/ppo_reward_model.py [key=value ...]`
(also `accelerate launch recipes/ppo_reward_model.py ...`, or `rlhf train recipes/ppo_reward_model.yaml`)."""
from pathlib import Path

from rlhf import run_recipe

if __name__ == "__main__":
    run_recipe(Path(__file__).with_suffix(".yaml"))
