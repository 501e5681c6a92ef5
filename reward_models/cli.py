"""`rlhf reward train RECIPE.yaml [key=value ...]`: train a reward model on preference pairs."""
from __future__ import annotations

import sys

from rlhf.config import ConfigError

USAGE = "rlhf reward train RECIPE.yaml [key=value ...]   (keys below; nested keys are dotted, e.g. train.lr=1e-4)"


def help_text() -> str:
    from reward_models.config import RewardModelConfig
    from rlhf.cli import keys_help

    return keys_help(RewardModelConfig, USAGE)


def train_main(argv: list[str]) -> list[dict]:
    """Train from a YAML recipe (optional) plus overrides; exits with a one-line message on bad config or data."""
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text())
        return []
    from reward_models.config import load_rm_config
    from reward_models.trainer import RewardModelTrainer
    from rlhf.data.prompts import DataError

    path, overrides = argv[0], argv[1:]
    if "=" in path:  # no YAML, only overrides
        path, overrides = None, argv
    try:
        trainer = RewardModelTrainer(load_rm_config(path, overrides))
    except (ConfigError, DataError) as e:
        sys.exit(f"{'config' if isinstance(e, ConfigError) else 'data'} error: {e}")
    return trainer.train()


def main(argv: list[str]) -> list[dict] | None:
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    print(f"usage: {USAGE}\n  rlhf reward train --help   lists every config key")
    sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
