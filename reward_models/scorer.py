"""A trained reward model as a reward function (TRL's signature), referenced from a recipe as

    reward:
      functions:
        - fn: "reward_model:runs/reward_model_arithmetic/final?batch_size=32&dtype=bf16"

`reward_model:` is a reward *factory* (see `rlhf.rewards.registry.REWARD_FACTORIES`): the part
after the colon is a model directory (or a reward-model run directory, whose `final/` is used)
and optional `?key=value&...` options (`ScorerOptions`). The scorer uses the reward model's own
tokenizer and chat template: a chat prompt plus its completion is rendered as a conversation,
exactly as the trainer rendered the preference pairs. Consecutive completions of one prompt (a
GRPO/PPO group) are packed into one row with one copy of the prompt. Loaded once per (path, options)
and cached.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_models.data import encode
from reward_models.model import score_sequences
from reward_models.packing import pack_groups, packed_scores
from rlhf.config import ConfigError, from_dict, opt, parse_overrides


@dataclass(frozen=True)
class ScorerOptions:
    batch_size: int = opt(16, "sequences per forward pass")
    max_length: int = opt(1024, "longer inputs keep their last max_length tokens (the completion's end)")
    dtype: Literal["bf16", "fp32"] = opt("bf16", "weights and compute dtype of the reward model")
    device: str = opt("auto", "'auto' (this process's GPU if there is one, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    pack: bool = opt(True, "completions of the same prompt share one row and one prompt copy "
                           "(same scores, fewer tokens)")
    trust_remote_code: bool = opt(False, "allow model code from the model directory")


def model_dir(path: str | Path) -> Path:
    """A saved reward model directory; a reward-model run directory resolves to its `final/`."""
    p = Path(path).expanduser()
    if (p / "final" / "config.json").is_file():
        return p / "final"
    if (p / "config.json").is_file():
        return p
    raise FileNotFoundError(f"reward model '{path}': not a saved model directory (no config.json there or in final/); "
                            "train one with `rlhf reward train RECIPE.yaml output_dir=...`")


class RewardModelScorer:
    """`scorer(prompts, completions, completion_ids, **columns) -> list[float]`: one score per completion."""

    def __init__(self, path: str | Path, options: ScorerOptions = ScorerOptions()):
        self.path, self.options = model_dir(path), options
        self.__name__ = "reward_model"
        if options.batch_size < 1 or options.max_length < 2:
            raise ConfigError(f"reward model '{path}': batch_size must be >= 1 and max_length >= 2")
        if options.device == "auto":
            self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                           else torch.device("cpu"))
        else:
            self.device = torch.device(options.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=options.trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if options.dtype == "bf16" else torch.float32
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.path, dtype=dtype, trust_remote_code=options.trust_remote_code)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model '{self.path}' has {self.model.config.num_labels} outputs; "
                             "a reward model has 1")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_id = self.model.config.pad_token_id
        self.model.to(self.device).eval().requires_grad_(False)
        self._lock = threading.Lock()  # one forward at a time (reward calls may run in a timeout thread)

    @torch.no_grad()
    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]] | None = None,
                 **columns: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"reward model '{self.path}': {len(prompts)} prompts for {len(completions)} completions")
        seqs = [ids[-self.options.max_length:] for ids in encode(self.tokenizer, prompts, completions)]
        for i, ids in enumerate(seqs):
            if not ids:
                raise ValueError(f"reward model '{self.path}': sample {i} renders to no tokens")
        scores = [0.0] * len(seqs)
        with self._lock:
            for batch in self._batches(prompts, seqs):
                idx = [i for group in batch for i in group]
                if self.options.pack:
                    packed = pack_groups([[seqs[i] for i in group] for group in batch], self.pad_id)
                    scores_B = packed_scores(self.model, packed, self.device, self.options.dtype)
                else:
                    scores_B = score_sequences(self.model, [seqs[i] for i in idx], self.pad_id, self.device,
                                               self.options.dtype)
                for i, s in zip(idx, scores_B.tolist()):
                    scores[i] = s
        return scores

    def _batches(self, prompts: list[Any], seqs: list[list[int]]) -> list[list[list[int]]]:
        """Forward batches of at most batch_size sequences, as lists of index groups.

        Packed: a group is a run of consecutive samples with the same prompt (one row, one prompt
        copy). Unpacked: one sample per group, sorted by length so that a batch has little padding.
        """
        bs = self.options.batch_size
        groups: list[list[int]] = []
        if self.options.pack:
            for i, prompt in enumerate(prompts):
                if groups and len(groups[-1]) < bs and prompts[groups[-1][-1]] == prompt:
                    groups[-1].append(i)
                else:
                    groups.append([i])
        else:
            groups = [[i] for i in sorted(range(len(seqs)), key=lambda i: len(seqs[i]))]
        batches: list[list[list[int]]] = [[]]
        for group in groups:
            if batches[-1] and sum(map(len, batches[-1])) + len(group) > bs:
                batches.append([])
            batches[-1].append(group)
        return [b for b in batches if b]


_CACHE: dict[tuple, RewardModelScorer] = {}
_CACHE_LOCK = threading.Lock()


def parse_spec(arg: str) -> tuple[str, ScorerOptions]:
    """'PATH?key=value&key=value' -> (PATH, ScorerOptions); unknown keys and bad values raise ConfigError."""
    path, _, query = arg.partition("?")
    if not path:
        raise ConfigError("reward_model: give a model directory, "
                          "e.g. 'reward_model:runs/reward_model_arithmetic/final'")
    try:
        options = from_dict(ScorerOptions, parse_overrides([q for q in query.split("&") if q]))
    except ConfigError as e:
        valid = ", ".join(f.name for f in dataclasses.fields(ScorerOptions))
        raise ConfigError(f"reward_model:{arg}: {e} (options: {valid})") from None
    return path, options


def load_scorer(arg: str) -> RewardModelScorer:
    """The cached scorer for 'PATH[?options]' (the part of a `reward_model:` spec after the colon)."""
    path, options = parse_spec(arg)
    key = (str(model_dir(path).resolve()), options)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = RewardModelScorer(path, options)
        return _CACHE[key]
