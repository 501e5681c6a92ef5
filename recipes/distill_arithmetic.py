"""On-policy distillation of the GRPO demo's policy into the untrained model: `python recipes/distill_arithmetic.py`
(run recipes/grpo_arithmetic.py first: its final/ model is the teacher;
also `rlhf train recipes/distill_arithmetic.yaml`)."""
from pathlib import Path

from rlhf import run_recipe

if __name__ == "__main__":
    run_recipe(Path(__file__).with_suffix(".yaml"))
