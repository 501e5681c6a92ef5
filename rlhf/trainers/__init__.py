"""Trainers: readable loops on top of accelerate."""
from rlhf.trainers.trainer import Trainer, check_algorithm

__all__ = ["Trainer", "check_algorithm", "train"]


def train(cfg) -> list[dict]:
    """Build the trainer for `cfg` and run it; returns the metrics records."""
    return Trainer(cfg).train()
