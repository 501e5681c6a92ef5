"""GRPO on single-digit addition: `python recipes/grpo_arithmetic.py [key=value ...]`
(also `accelerate launch recipes/grpo_arithmetic.py ...`, or `rlhf train recipes/grpo_arithmetic.yaml`)."""
from pathlib import Path

from rlhf import run_recipe

if __name__ == "__main__":
    run_recipe(Path(__file__).with_suffix(".yaml"))
