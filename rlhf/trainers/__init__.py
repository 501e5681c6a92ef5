"""Trainers: readable loops on top of accelerate."""
from rlhf.trainers.trainer import Trainer

__all__ = ["Trainer", "train"]


def train(cfg) -> list[dict]:
    """Build the trainer for `cfg` and run it; returns the metrics records."""
    return Trainer(cfg).train()
