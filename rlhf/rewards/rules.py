"""Rule-based reward functions with TRL's signature: f(prompts, completions, completion_ids, **columns)."""
from __future__ import annotations

import math
import re
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of a conversational message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion must be a string or a list of messages, got {type(completion).__name__}")


def first_number(text: str) -> float | None:
    m = _NUMBER.search(text.replace(",", ""))
    return float(m.group()) if m else None


def first_number_matches(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 when the first number in the completion equals `answer`, else 0.0 (the demo's reward)."""
    out = []
    for completion, target in zip(completions, answer):
        got = first_number(completion_text(completion))
        out.append(1.0 if got is not None and math.isclose(got, float(target)) else 0.0)
    return out


def contains_answer(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 when any number in the completion equals `answer` (a looser scorer for evaluation)."""
    out = []
    for completion, target in zip(completions, answer):
        nums = [float(x) for x in _NUMBER.findall(completion_text(completion).replace(",", ""))]
        out.append(1.0 if any(math.isclose(x, float(target)) for x in nums) else 0.0)
    return out
