"""Built-in synthetic tasks used by recipes: `TASKS[name](split, seed, **args) -> datasets.Dataset`."""
from __future__ import annotations

import random

import datasets

from rlhf.registry import Registry

TASKS: Registry = Registry("task")


@TASKS.register("arithmetic")
def arithmetic(split: str = "train", seed: int = 0, max_operand: int = 9, eval_fraction: float = 0.2,
               system_prompt: str | None = None) -> datasets.Dataset:
    """Addition prompts "What is a + b?" with 0 <= a, b <= max_operand, as chat messages.

    All (a, b) pairs are shuffled with `seed` and split: the eval split holds
    `eval_fraction` of the pairs, never seen in training. Columns: prompt, answer.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"arithmetic: split must be 'train' or 'eval', got '{split}'")
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(pairs)
    n_eval = max(1, int(len(pairs) * eval_fraction))
    chosen = pairs[:n_eval] if split == "eval" else pairs[n_eval:]
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return datasets.Dataset.from_dict({
        "prompt": [head + [{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in chosen],
        "answer": [a + b for a, b in chosen],
    })
