"""Preference pairs: load (task, jsonl, csv, parquet, saved dir), validate every row up front, render, tokenize.

Accepted rows (TRL's preference formats):

    standard, explicit prompt:   {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}
    standard, implicit prompt:   {"chosen": "2 + 2 = 4", "rejected": "2 + 2 = 5"}
    conversational, explicit:    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}],
                                  "rejected": [...]}
    conversational, implicit:    {"chosen": [whole conversation], "rejected": [whole conversation]}

Standard text is `prompt + response`; conversations go through the tokenizer's chat template.
The same rendering (`render`) serves training and the scorer, so the model scores what it was trained on.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import torch

from reward_models.tasks import PREFERENCE_TASKS
from rlhf.data.prompts import DataError, read_local_dataset


def load_preference_dataset(spec: str, split: str = "train", task_args: dict | None = None,
                            seed: int = 0) -> datasets.Dataset:
    """A preference task name (its `split`), a jsonl/json/csv/parquet file, or a `save_to_disk` directory
    (a DatasetDict's `split`; for 'eval' also its 'test' or 'validation' split)."""
    if spec in PREFERENCE_TASKS:
        return PREFERENCE_TASKS.get(spec)(split=split, seed=seed, **(task_args or {}))
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data: '{spec}' is neither a built-in preference task ({', '.join(PREFERENCE_TASKS.names())}) "
                        "nor an existing file or directory")
    return read_local_dataset(path, split, "preference pairs", ("test", "validation"))


def load_pairs(dcfg, tokenizer, seed: int = 0) -> tuple["PreferencePairs", Optional["PreferencePairs"]]:
    """(train, eval) pairs from a PreferenceDataConfig: `eval` given, a seeded `eval_fraction` of train, or none.

    Rows are validated before any split, so errors name rows as they are in the file.
    """
    train = build_pairs(load_preference_dataset(dcfg.train, "train", dcfg.task_args, seed), tokenizer, dcfg,
                        name=dcfg.train)
    if dcfg.eval is not None:
        held = load_preference_dataset(dcfg.eval, "eval", dcfg.task_args, seed)
        return train, build_pairs(held, tokenizer, dcfg, name=dcfg.eval)
    if dcfg.eval_fraction <= 0:
        return train, None
    n_eval = int(round(len(train) * dcfg.eval_fraction))
    if not 0 < n_eval < len(train):
        raise DataError(f"{dcfg.train}: data.eval_fraction={dcfg.eval_fraction} of {len(train)} pairs "
                        "leaves no train or no eval pair")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return train.subset(sorted(order[n_eval:])), train.subset(sorted(order[:n_eval]))


# ----------------------------------------------------------------------------- validation


def _check_text_or_messages(value: Any, where: str, non_empty_content: bool) -> str:
    """'text' or 'messages'; raises DataError naming `where` otherwise."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: is empty")
        return "text"
    if isinstance(value, list) and value:
        for j, msg in enumerate(value):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
                raise DataError(f"{where}: message {j} must be a dict with string 'role' and 'content', got {msg!r}")
            if non_empty_content and not msg["content"].strip():
                raise DataError(f"{where}: message {j} ({msg['role']}) has empty content")
        return "messages"
    if value is None or value == []:
        raise DataError(f"{where}: is empty")
    raise DataError(f"{where}: must be a non-empty string or a list of chat messages, "
                    f"got {type(value).__name__} {value!r}")


def check_row(row: dict, i: int, name: str, dcfg) -> None:
    """Validate one pair; errors name the dataset, row and column."""
    kinds = {}
    for col in (dcfg.chosen_column, dcfg.rejected_column):
        kinds[col] = _check_text_or_messages(row[col], f"{name}: row {i}, column '{col}'", non_empty_content=True)
    if dcfg.prompt_column in row:
        kinds[dcfg.prompt_column] = _check_text_or_messages(row[dcfg.prompt_column],
                                                            f"{name}: row {i}, column '{dcfg.prompt_column}'",
                                                            non_empty_content=False)
    if len(set(kinds.values())) > 1:
        desc = ", ".join(f"'{c}' is {'chat messages' if k == 'messages' else 'a string'}" for c, k in kinds.items())
        raise DataError(f"{name}: row {i}: {desc}; use one format per row (all strings, or all message lists)")
    if dcfg.margin_column is not None:
        m = row[dcfg.margin_column]
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not math.isfinite(m):
            raise DataError(f"{name}: row {i}, column '{dcfg.margin_column}': margin must be a finite number, "
                            f"got {m!r}")


# ----------------------------------------------------------------------------- rendering


def render(tokenizer, prompt: Any, response: Any) -> tuple[str, bool]:
    """The text the reward model reads for (prompt, response), and whether the tokenizer adds its special tokens.

    `prompt` may be None (implicit prompt), a string or chat messages; a string response to a
    chat prompt becomes one assistant message (the scorer's case: TRL passes such completions).
    """
    if isinstance(response, str) and not isinstance(prompt, list):
        return (prompt or "") + response, True
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    if prompt is not None and not isinstance(prompt, list):
        raise ValueError("a string prompt cannot be combined with a chat-message response; use one format")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer '{tokenizer.name_or_path}' has no chat template; chat-message pairs need one")
    text = tokenizer.apply_chat_template((prompt or []) + list(response), tokenize=False)
    return text, False


def encode(tokenizer, prompts: list[Any], responses: list[Any]) -> list[list[int]]:
    """Token ids of every rendered (prompt, response), tokenized in batches."""
    rendered = [render(tokenizer, p, r) for p, r in zip(prompts, responses)]
    out: list[list[int]] = [[] for _ in rendered]
    for special in (True, False):
        idx = [i for i, (_, s) in enumerate(rendered) if s == special]
        if idx:
            ids = tokenizer([rendered[i][0] for i in idx], add_special_tokens=special)["input_ids"]
            for i, row in zip(idx, ids):
                out[i] = row
    return out


@dataclass
class PreferencePairs:
    """Tokenized pairs: chosen_ids[i] and rejected_ids[i] come from dataset row rows[i];
    prompt_keys[i] identifies its prompt (None: no prompt column), so pairs of one prompt can share a row;
    subsets[i] is its `data.subset_column` value (None without one)."""

    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    margins: list[float]
    rows: list[int]
    prompt_keys: list[Optional[str]]
    subsets: list[Optional[str]]
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: list[int]) -> "PreferencePairs":
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return PreferencePairs(pick(self.chosen_ids), pick(self.rejected_ids), pick(self.margins), pick(self.rows),
                               pick(self.prompt_keys), pick(self.subsets), dict(self.stats))


def build_pairs(ds: datasets.Dataset, tokenizer, dcfg, name: str) -> PreferencePairs:
    """Validate every row, render and tokenize; pairs over `max_length` fail or are filtered (`on_long_pair`)."""
    missing = [c for c in (dcfg.chosen_column, dcfg.rejected_column) if c not in ds.column_names]
    missing += [c for c in (dcfg.margin_column, dcfg.subset_column) if c is not None and c not in ds.column_names]
    if missing:
        raise DataError(f"{name}: no column {', '.join(repr(c) for c in missing)} "
                        f"(columns: {', '.join(ds.column_names)}); "
                        f"preference pairs need '{dcfg.chosen_column}' and '{dcfg.rejected_column}' "
                        "(set data.chosen_column / data.rejected_column for other names)")
    if len(ds) == 0:
        raise DataError(f"{name}: the dataset is empty")
    has_prompt = dcfg.prompt_column in ds.column_names
    rows = ds.to_list()
    for i, row in enumerate(rows):
        check_row(row, i, name, dcfg)
    prompts = [row[dcfg.prompt_column] for row in rows] if has_prompt else [None] * len(rows)
    try:
        chosen = encode(tokenizer, prompts, [r[dcfg.chosen_column] for r in rows])
        rejected = encode(tokenizer, prompts, [r[dcfg.rejected_column] for r in rows])
    except ValueError as e:
        raise DataError(f"{name}: {e}") from None
    margins = [float(r[dcfg.margin_column]) for r in rows] if dcfg.margin_column else [0.0] * len(rows)
    keep, stats = [], {"pairs/too_long": 0, "pairs/filtered": 0}
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        longest = max(len(c), len(r))
        if longest > dcfg.max_length:
            stats["pairs/too_long"] += 1
            if dcfg.on_long_pair == "error":
                col = dcfg.chosen_column if len(c) >= len(r) else dcfg.rejected_column
                raise DataError(f"{name}: row {i}, column '{col}': {longest} tokens with the prompt > data.max_length="
                                f"{dcfg.max_length} (raise it, or set data.on_long_pair=filter)")
            stats["pairs/filtered"] += 1
            continue
        keep.append(i)
    if not keep:
        raise DataError(f"{name}: every pair was filtered out as longer than data.max_length={dcfg.max_length} tokens")
    keys = [None if p is None else json.dumps(p, sort_keys=True) for p in prompts]
    subsets = [str(r[dcfg.subset_column]) for r in rows] if dcfg.subset_column else [None] * len(rows)
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    return PreferencePairs(pick(chosen), pick(rejected), pick(margins), keep, pick(keys), pick(subsets), stats)
