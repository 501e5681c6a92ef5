"""Everything about a run's config that can be checked before anything loads, in one call.

`Config.validate` checks values one key at a time (and imports nothing of rlhf); the algorithm names and
their combinations live with the registries (`rlhf.algos.combos`), the engine's with the engines.
"""
from __future__ import annotations

from rlhf.algos.combos import check_combination, check_names, critic_type
from rlhf.config import Config
from rlhf.engine import check_engine


def check_config(cfg: Config, world_size: int = 1) -> None:
    """Raise ConfigError naming the key of the first problem: a value, an algorithm name or combination, the engine."""
    cfg.validate(world_size)
    check_names(cfg)
    check_combination(cfg, has_critic=critic_type(cfg) != "none")
    check_engine(cfg)
