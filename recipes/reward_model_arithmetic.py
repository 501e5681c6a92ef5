"""Train a reward model on correct vs wrong addition answers:
`python recipes/reward_model_arithmetic.py [key=value ...]`
(also `rlhf reward train recipes/reward_model_arithmetic.yaml`).
The model lands in runs/reward_model_arithmetic/final; reference it as `reward_model:runs/reward_model_arithmetic`."""
import sys
from pathlib import Path

from reward_models.cli import train_main

if __name__ == "__main__":
    train_main([str(Path(__file__).with_suffix(".yaml")), *sys.argv[1:]])
