"""rlhf: online reinforcement learning for language models (GRPO, PPO and the policy-gradient family)."""
from rlhf.config import Config, ConfigError, load_config

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "Trainer", "load_config", "run_recipe"]


def __getattr__(name: str):
    if name == "Trainer":  # imported on first use: `import rlhf` stays light (no torch, transformers, accelerate)
        from rlhf.trainers import Trainer

        return Trainer
    raise AttributeError(f"module 'rlhf' has no attribute '{name}'")


def run_recipe(yaml_path, argv=None) -> list[dict]:
    """Entry point of recipe scripts: `python recipes/x.py [key=value ...]` trains with x.yaml + overrides."""
    import sys

    from rlhf.cli import train_main

    return train_main([str(yaml_path), *(sys.argv[1:] if argv is None else argv)])
