"""PPO (learned critic, KL penalty in the reward) on single-digit addition:
`python recipes/ppo_arithmetic.py [key=value ...]`
(also `accelerate launch recipes/ppo_arithmetic.py ...`, or `rlhf train recipes/ppo_arithmetic.yaml`)."""
from pathlib import Path

from rlhf import run_recipe

if __name__ == "__main__":
    run_recipe(Path(__file__).with_suffix(".yaml"))
