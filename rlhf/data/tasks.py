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


ITEMS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum", "melon", "kiwi",
         "lime", "fig", "date", "olive", "onion", "carrot", "potato", "tomato", "pepper", "garlic", "ginger", "radish",
         "bean", "pea", "corn", "rice", "wheat", "oat", "honey", "sugar", "salt", "milk", "butter", "cheese", "bread",
         "egg", "tea", "coffee"]


@TASKS.register("secret_codes")
def secret_codes(split: str = "train", seed: int = 0, rows: int = 400, eval_rows: int = 40) -> datasets.Dataset:
    """"What is the secret code of the <item>?": a 4-digit code drawn per row, known only to a lookup tool
    (recipes/tool_lookup.py), so the model cannot answer without calling it. Columns: prompt, item, code.
    The eval split uses other codes (a different seed stream)."""
    if split not in ("train", "eval"):
        raise ValueError(f"secret_codes: split must be 'train' or 'eval', got '{split}'")
    rng = random.Random(f"{seed}:{split}")
    n = rows if split == "train" else eval_rows
    items = [rng.choice(ITEMS) for _ in range(n)]
    return datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": f"What is the secret code of the {item}?"}] for item in items],
        "item": items, "code": [str(rng.randrange(1000, 10000)) for _ in range(n)],
    })
