"""Prompt datasets: load (task, jsonl, csv, parquet, saved dir), validate every row up front,
format (chat template for message lists) and serve seeded, resumable, rank-sharded batches."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from rlhf.data.tasks import TASKS
from rlhf.errors import UserError

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(UserError, ValueError):
    """Bad prompt data; the message names the file, row and column."""


def load_prompt_dataset(spec: str, split: str = "train", task_args: dict | None = None,
                        seed: int = 0) -> datasets.Dataset:
    """A task name (its `split`), a jsonl/json/csv/parquet file, or a `save_to_disk` directory.

    From a saved DatasetDict, split 'train' reads its 'train' split; any other split (eval)
    reads that split, else 'eval', 'test' or 'validation', whichever it has first.
    """
    if spec in TASKS:
        return TASKS.get(spec)(split=split, seed=seed, **(task_args or {}))
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data: '{spec}' is neither a built-in task ({', '.join(TASKS.names())}) "
                        "nor an existing file or directory")
    return read_local_dataset(path, split, "prompts", ("eval", "test", "validation"))


def read_local_dataset(path: Path, split: str, what: str, fallbacks: tuple[str, ...]) -> datasets.Dataset:
    """A jsonl/json/csv/parquet file, or a `save_to_disk` directory: from a DatasetDict the 'train' split for
    split 'train', else `split` or the first of `fallbacks` it has. Errors name the file and, where it can be
    found, the bad line; `what` names the content ('prompts', 'preference pairs')."""
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                names = ("train",) if split == "train" else (split, *fallbacks)
                found = next((n for n in names if n in ds), None)
                if found is None:
                    raise DataError(f"{path}: saved DatasetDict has no "
                                    f"{' / '.join(repr(n) for n in dict.fromkeys(names))} "
                                    f"split (splits: {', '.join(ds)})")
                ds = ds[found]
            return ds
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; "
                            f"use one of {', '.join(FORMATS)} or a saved dataset directory")
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as e:  # datasets wraps parse errors in many types
        raise DataError(f"{path}: cannot read {what}: {_read_problem(path, e)}") from None


def _read_problem(path: Path, err: BaseException) -> str:
    """The most precise reason a file failed to load: the bad line of a JSON-lines file, else the root cause."""
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        try:
            with open(path, encoding="utf-8") as f:
                lines = list(f)
        except (OSError, UnicodeDecodeError) as e:
            return f"{type(e).__name__}: {e}"
        if path.suffix.lower() == ".jsonl" or (lines and lines[0].lstrip().startswith("{") and len(lines) > 1):
            for n, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {n + 1} (row {n}): invalid JSON: {e.msg} at column {e.colno}"
                if not isinstance(row, dict):
                    return f"line {n + 1} (row {n}): expected a JSON object, got {type(row).__name__}"
    chain, cause = [], err
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    root = next((c for c in chain if type(c).__name__ != "DatasetGenerationError" and c is not err), err)
    return f"{type(root).__name__}: {root}"


def is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list)


def _check_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: prompt is empty")
        return
    if isinstance(prompt, list) and prompt:
        for j, msg in enumerate(prompt):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
                raise DataError(f"{where}: message {j} must be a dict with string 'role' and 'content', got {msg!r}")
        return
    raise DataError(f"{where}: prompt must be a non-empty string or a list of chat messages, got {prompt!r}")


class PromptSource:
    """Validated, tokenized prompts served in seeded epochs; `state()`/`load_state()` make it resumable.

    Each step draws `prompts_per_step` global prompts in the same order on every process;
    process r keeps its contiguous slice, so every prompt's group stays on one process.
    """

    def __init__(self, ds: datasets.Dataset, tokenizer, *, name: str, prompt_column: str = "prompt",
                 max_prompt_tokens: int = 512, on_long_prompt: str = "error", shuffle: bool = True, seed: int = 0):
        if prompt_column not in ds.column_names:
            raise DataError(f"{name}: no prompt column '{prompt_column}' (columns: {', '.join(ds.column_names)})")
        if len(ds) == 0:
            raise DataError(f"{name}: the dataset is empty")
        self.ds, self.tokenizer, self.name, self.column = ds, tokenizer, name, prompt_column
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.pos = 0, 0
        self.rows: list[int] = []
        self.ids: dict[int, list[int]] = {}
        self.stats = {"prompts/too_long": 0, "prompts/truncated": 0, "prompts/filtered": 0}
        for i, prompt in enumerate(ds[prompt_column]):
            where = f"{name}: row {i}, column '{prompt_column}'"
            _check_prompt(prompt, where)
            ids = self.encode(prompt)
            if len(ids) > max_prompt_tokens:
                self.stats["prompts/too_long"] += 1
                if on_long_prompt == "error":
                    raise DataError(f"{where}: prompt has {len(ids)} tokens "
                                    f"> data.max_prompt_tokens={max_prompt_tokens} "
                                    "(set data.on_long_prompt=filter or truncate)")
                if on_long_prompt == "filter":
                    self.stats["prompts/filtered"] += 1
                    continue
                ids = ids[-max_prompt_tokens:]  # keep the end, where the question and generation prompt are
                self.stats["prompts/truncated"] += 1
            self.rows.append(i)
            self.ids[i] = ids
        if not self.rows:
            raise DataError(f"{name}: every prompt was filtered out as longer than {max_prompt_tokens} tokens")
        self._order = self._permutation()

    def encode(self, prompt: Any) -> list[int]:
        tok = self.tokenizer
        if is_conversational(prompt):
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt, add_special_tokens=True)["input_ids"]

    def __len__(self) -> int:
        return len(self.rows)

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(self.rows)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return [self.rows[i] for i in torch.randperm(len(self.rows), generator=g).tolist()]

    def next_rows(self, count: int) -> list[int]:
        """The next `count` global row indices, crossing epoch boundaries."""
        out = []
        while len(out) < count:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(count - len(out), len(self._order) - self.pos)
            out += self._order[self.pos: self.pos + take]
            self.pos += take
        return out

    def batch(self, prompts_per_step: int, rank: int = 0, world_size: int = 1) -> "PromptBatch":
        rows = self.next_rows(prompts_per_step)
        per = prompts_per_step // world_size
        return self.get(rows[rank * per: (rank + 1) * per])

    def get(self, rows: list[int]) -> "PromptBatch":
        sub = self.ds.select(rows)
        cols = {c: sub[c] for c in sub.column_names if c != self.column}
        return PromptBatch(rows=rows, prompts=sub[self.column], prompt_ids=[self.ids[r] for r in rows], columns=cols)

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()


@dataclass
class PromptBatch:
    rows: list[int]
    prompts: list[Any]  # raw prompts (strings or message lists), as reward functions receive them
    prompt_ids: list[list[int]]
    columns: dict[str, list[Any]]  # every other dataset column
