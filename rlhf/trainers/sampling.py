"""Generate and score whole groups for one RL step, with DAPO's shaping (Yu et al. 2025):

- the soft overlong punishment (`algo.overlong.*`) is added to every score;
- dynamic sampling (`algo.dynamic_sampling.*`) drops groups whose scores are all equal and
  generates further rounds of prompts until `train.prompts_per_step` informative groups are
  left (at most `max_extra_rounds` extra rounds; missing groups are filled with dropped ones).

Rounds are collective: every process draws every round's prompts, so the prompt order stays
the same on all processes, but only processes still short of groups generate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from rlhf.algos.dapo import informative_groups, overlong_penalty
from rlhf.logging import PhaseTimer


@dataclass
class Samples:
    """Scored completions of whole groups: G contiguous rows per prompt (row n is in group n // G)."""

    prompts: list[Any]  # raw prompt of each sample, as the reward functions saw it
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finished: list[bool]  # False: cut at generation.max_new_tokens
    scores_N: Tensor
    per_fn: dict[str, list]  # each reward function's raw values (and the overlong penalty)
    sampler_logps: Optional[list[list[float]]] = None  # the engine's log-prob of each completion token

    def __len__(self) -> int:
        return len(self.completion_ids)

    def groups(self, idx: list[int], G: int) -> "Samples":
        rows = [g * G + i for g in idx for i in range(G)]
        pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
        return Samples(pick(self.prompts), pick(self.prompt_ids), pick(self.completion_ids), pick(self.texts),
                       pick(self.finished), self.scores_N[rows], {k: pick(v) for k, v in self.per_fn.items()},
                       None if self.sampler_logps is None else pick(self.sampler_logps))

    @staticmethod
    def cat(parts: list["Samples"]) -> "Samples":
        first = parts[0]
        return Samples(
            *(sum((getattr(p, f) for p in parts), []) for f in ("prompts", "prompt_ids", "completion_ids", "texts", "finished")),
            torch.cat([p.scores_N for p in parts]), {k: sum((p.per_fn[k] for p in parts), []) for k in first.per_fn},
            None if first.sampler_logps is None else sum((p.sampler_logps for p in parts), []),
        )


def sample_round(tr, timer: PhaseTimer) -> tuple[Samples, dict]:
    """One batch of this process's prompts, G completions each, scored (+ overlong penalty)."""
    cfg, G = tr.cfg, tr.cfg.train.samples_per_prompt
    with timer("generate"):
        batch = tr.prompts.batch(cfg.train.prompts_per_step, tr.acc.process_index, tr.acc.num_processes)
        rollouts = tr.engine.generate(batch.prompt_ids, G, tr.sampling, return_logps=tr.want_sampler_logps)
    with timer("reward"):
        texts = tr.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        prompts_N = [p for p in batch.prompts for _ in range(G)]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts_N, texts)]
        columns = {k: [v for v in vals for _ in range(G)] for k, vals in batch.columns.items()}
        result = tr.rewards(prompts_N, completions, rollouts.completion_ids, columns)
    scores_N, per_fn = result.scores_N, dict(result.per_fn)
    over = cfg.algo.overlong
    if over.buffer > 0:
        lengths_N = torch.tensor([len(c) for c in rollouts.completion_ids])
        pen_N = overlong_penalty(lengths_N, cfg.generation.max_new_tokens, over.buffer, over.penalty)
        scores_N = scores_N + pen_N
        per_fn["overlong_penalty"] = pen_N.tolist()
    samples = Samples(prompts_N, rollouts.prompt_ids, rollouts.completion_ids, texts, list(rollouts.finished), scores_N, per_fn,
                      rollouts.sampler_logps)
    return samples, dict(result.stats)


def collect(tr, timer: PhaseTimer) -> tuple[Samples, dict, dict]:
    """(samples, reward stats, dynamic-sampling metrics) with exactly this process's share of groups."""
    cfg, G = tr.cfg, tr.cfg.train.samples_per_prompt
    samples, reward_stats = sample_round(tr, timer)
    ds = cfg.algo.dynamic_sampling
    if not ds.enabled:
        return samples, reward_stats, {}
    need = cfg.train.prompts_per_step // tr.acc.num_processes
    kept, dropped, generated = [], [], [samples.scores_N]

    def split(s: Samples) -> None:
        keep_B = informative_groups(s.scores_N, G).tolist()
        kept.append(s.groups([b for b, k in enumerate(keep_B) if k], G))
        dropped.append(s.groups([b for b, k in enumerate(keep_B) if not k], G))

    split(samples)
    rounds = 0
    while rounds < ds.max_extra_rounds:
        short = need - sum(len(s) for s in kept) // G
        if tr._reduce_sum(max(short, 0)) == 0:
            break
        rounds += 1
        if short > 0:
            more, stats = sample_round(tr, timer)
            split(more)
            generated.append(more.scores_N)
            for k, v in stats.items():
                reward_stats[k] = reward_stats.get(k, 0.0) + v
        else:  # this process is full; draw the round's prompts anyway so every process stays in step
            tr.prompts.batch(cfg.train.prompts_per_step, tr.acc.process_index, tr.acc.num_processes)
    good, bad = Samples.cat(kept), Samples.cat(dropped)
    n_good = len(good) // G
    filled = max(0, need - n_good)
    out = Samples.cat([good.groups(list(range(min(need, n_good))), G), bad.groups(list(range(filled)), G)])
    all_N = torch.cat(generated)
    finite_N = torch.isfinite(all_N)
    metrics = {
        "dynamic_sampling/dropped_groups": tr._reduce_sum(len(bad) // G),
        "dynamic_sampling/filled_groups": tr._reduce_sum(filled),
        "dynamic_sampling/extra_rounds": rounds,
        "dynamic_sampling/generated_reward_mean":
            tr._reduce_sum(all_N[finite_N].sum()) / max(1.0, tr._reduce_sum(finite_N.sum())),
    }
    return out, reward_stats, metrics
