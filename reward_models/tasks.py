"""Built-in preference tasks: `PREFERENCE_TASKS[name](split, seed, **args) -> datasets.Dataset`.

Rows follow TRL's conversational preference format with an explicit prompt:
`prompt` (chat messages), `chosen` and `rejected` (one assistant message each).
"""
from __future__ import annotations

import random
import re

import datasets

from rlhf.data.tasks import TASKS
from rlhf.registry import Registry
from rlhf.rewards.rules import first_number

PREFERENCE_TASKS: Registry = Registry("preference task")
_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")

# Answers whose first number is the sum `s` (what `first_number_matches` rewards).
ANSWER_FORMS = [
    "{n}", "{n}.", "The answer is {n}.", "{n}. Adding {a} and {b} gives {n}.", "It is {n}.", "The sum is {n}.",
    "Sure! The answer is {n}.", "{n}, because {a} plus {b} makes {n}.", "That would be {n}.", "Answer: {n}",
]
# The base model's typical wrong answers: the question echoed with a wrong sum, or the right
# sum placed after a wrong number (the first number is then an operand, not the sum).
ECHO_FORMS = [
    "{a} + {b} = {w}", "{a} + {b} = {w}.", "The answer is {a} + {b} = {w}.", "{a} + {b} = {s}",
    "The answer is {a} + {b} = {s}.", "{w}. Wait, {a} + {b} = {s}.", "{a} plus {b} equals {s}.", "{w}",
]


def wrong_numbers(a: int, b: int) -> list[int]:
    """Plausible wrong sums: off by one or two, the product, the difference, an operand, the digits glued."""
    s = a + b
    cands = {s - 2, s - 1, s + 1, s + 2, a * b, abs(a - b), a, b, int(f"{a}{b}")}
    return sorted(c for c in cands if c >= 0 and c != s)


def preference_pair(a: int, b: int, rng: random.Random, hard_fraction: float,
                    answer_forms: list[str] = ANSWER_FORMS) -> tuple[str, str, str]:
    """(chosen, rejected, kind) for "What is a + b?"; the chosen's first number is a + b, the rejected's is not.

    The chosen answer is one of `answer_forms` with the sum. With probability `hard_fraction` the
    rejected answer has the chosen's phrasing with a wrong number (kind 'same_phrasing': only
    arithmetic tells them apart); otherwise it is one of the base model's typical mistakes
    (kind 'typical_mistake').
    """
    s = a + b
    for _ in range(100):
        form = rng.choice(answer_forms)
        chosen = form.format(n=s, a=a, b=b)
        w = rng.choice(wrong_numbers(a, b))
        if rng.random() < hard_fraction:
            rejected, kind = form.format(n=w, a=a, b=b), "same_phrasing"
        else:
            rejected, kind = rng.choice(ECHO_FORMS).format(a=a, b=b, s=s, w=w), "typical_mistake"
        if first_number(chosen) == s and first_number(rejected) != s:  # e.g. "a + 0 = ..." starts with the sum
            return chosen, rejected, kind
    raise RuntimeError(f"could not build a preference pair for {a} + {b}")


@PREFERENCE_TASKS.register("arithmetic_preferences")
def arithmetic_preferences(split: str = "train", seed: int = 0, max_operand: int = 9, eval_fraction: float = 0.2,
                           pairs_per_prompt: int = 8, hard_fraction: float = 0.5, train_max_operand: int | None = None,
                           answer_forms: list[str] | None = None, system_prompt: str | None = None) -> datasets.Dataset:
    """Correct vs wrong answers to the `arithmetic` task's prompts ("What is a + b?", chat messages).

    The (a, b) split is the `arithmetic` task's own (same seed, same `eval_fraction`), so eval
    pairs come from additions never seen in training, the same ones the RL recipes evaluate on.
    `train_max_operand` > max_operand adds to the train split every addition with an operand in
    (max_operand, train_max_operand]: far more sums than can be memorised, so the model has to
    check the arithmetic (none of them is an eval addition). `answer_forms` (format strings with
    {n}, optionally {a} and {b}; default: ANSWER_FORMS, ten phrasings) restricts the chosen answers,
    e.g. to the one canonical ["The answer is {n}."]. Columns: prompt, chosen, rejected
    (conversational), answer and kind ('same_phrasing' or 'typical_mistake', see `preference_pair`).
    Seeded; each split has its own stream.
    """
    if pairs_per_prompt < 1:
        raise ValueError(f"arithmetic_preferences: pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    if not 0 <= hard_fraction <= 1:
        raise ValueError(f"arithmetic_preferences: hard_fraction must be in [0, 1], got {hard_fraction}")
    forms = ANSWER_FORMS if answer_forms is None else list(answer_forms)
    if not forms or not all(isinstance(f, str) and "{n}" in f for f in forms):
        raise ValueError(f"arithmetic_preferences: answer_forms must be a non-empty list of strings "
                         f"containing '{{n}}', got {answer_forms!r}")
    prompts = TASKS.get("arithmetic")(split=split, seed=seed, max_operand=max_operand, eval_fraction=eval_fraction,
                                      system_prompt=system_prompt)["prompt"]
    operands = []
    for prompt in prompts:
        m = _QUESTION.fullmatch(prompt[-1]["content"])
        if m is None:
            raise ValueError(f"arithmetic_preferences: unexpected arithmetic prompt {prompt[-1]['content']!r}")
        operands.append((int(m.group(1)), int(m.group(2))))
    if split == "train" and train_max_operand is not None and train_max_operand > max_operand:
        extra = [(a, b) for a in range(train_max_operand + 1) for b in range(train_max_operand + 1)
                 if max(a, b) > max_operand]
        random.Random(seed).shuffle(extra)
        head = prompts[0][:-1]  # the task's system message, if any
        prompts = list(prompts) + [head + [{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in extra]
        operands += extra
    rng = random.Random(f"arithmetic_preferences-{seed}-{split}")
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "answer": [], "kind": []}
    for prompt, (a, b) in zip(prompts, operands):
        for _ in range(pairs_per_prompt):
            chosen, rejected, kind = preference_pair(a, b, rng, hard_fraction, forms)
            rows["prompt"].append(prompt)
            rows["chosen"].append([{"role": "assistant", "content": chosen}])
            rows["rejected"].append([{"role": "assistant", "content": rejected}])
            rows["answer"].append(a + b)
            rows["kind"].append(kind)
    return datasets.Dataset.from_dict(rows)
