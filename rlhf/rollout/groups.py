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

import torch

from rlhf.algos.dapo import informative_groups, overlong_penalty
from rlhf.data import PromptSource
from rlhf.engine import GenerationEngine, SamplingParams
from rlhf.logging import PhaseTimer
from rlhf.rewards import RewardModule
from rlhf.rollout.samples import Samples
from rlhf.runtime import Runtime


@dataclass
class RolloutSource:
    """Where samples come from: the prompts, the engine that completes them, the rewards that score them."""

    prompts: PromptSource
    engine: GenerationEngine
    rewards: RewardModule
    tokenizer: object
    return_logps: bool = False  # ask the engine for the sampled tokens' log-probs


def sampling_params(gen) -> SamplingParams:
    """The engine's sampling settings from `cfg.generation`."""
    return SamplingParams(gen.max_new_tokens, gen.temperature, gen.top_p, gen.top_k)


def sample_round(src: RolloutSource, cfg, rt: Runtime, timer: PhaseTimer) -> tuple[Samples, dict]:
    """One batch of this process's prompts, G completions each, scored (+ overlong penalty)."""
    G = cfg.train.samples_per_prompt
    with timer("generate"):
        batch = src.prompts.batch(cfg.train.prompts_per_step, rt.process_index, rt.num_processes)
        rollouts = src.engine.generate(batch.prompt_ids, G, sampling_params(cfg.generation), return_logps=src.return_logps)
    with timer("reward"):
        texts = src.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
        prompts_N = [p for p in batch.prompts for _ in range(G)]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts_N, texts)]
        columns = {k: [v for v in vals for _ in range(G)] for k, vals in batch.columns.items()}
        result = src.rewards(prompts_N, completions, rollouts.completion_ids, columns)
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


def rollout(src: RolloutSource, cfg, rt: Runtime, timer: PhaseTimer) -> tuple[Samples, dict, dict]:
    """(samples, reward stats, dynamic-sampling metrics) with exactly this process's share of groups."""
    G = cfg.train.samples_per_prompt
    samples, reward_stats = sample_round(src, cfg, rt, timer)
    ds = cfg.algo.dynamic_sampling
    if not ds.enabled:
        return samples, reward_stats, {}
    need = cfg.train.prompts_per_step // rt.num_processes
    kept, dropped, generated = [], [], [samples.scores_N]

    def split(s: Samples) -> None:
        keep_B = informative_groups(s.scores_N, G).tolist()
        kept.append(s.groups([b for b, k in enumerate(keep_B) if k], G))
        dropped.append(s.groups([b for b, k in enumerate(keep_B) if not k], G))

    split(samples)
    rounds = 0
    while rounds < ds.max_extra_rounds:
        short = need - sum(len(s) for s in kept) // G
        if rt.reduce_sum(max(short, 0)) == 0:
            break
        rounds += 1
        if short > 0:
            more, stats = sample_round(src, cfg, rt, timer)
            split(more)
            generated.append(more.scores_N)
            for k, v in stats.items():
                reward_stats[k] = reward_stats.get(k, 0.0) + v
        else:  # this process is full; draw the round's prompts anyway so every process stays in step
            src.prompts.batch(cfg.train.prompts_per_step, rt.process_index, rt.num_processes)
    good, bad = Samples.cat(kept), Samples.cat(dropped)
    n_good = len(good) // G
    filled = max(0, need - n_good)
    out = Samples.cat([good.groups(list(range(min(need, n_good))), G), bad.groups(list(range(filled)), G)])
    all_N = torch.cat(generated)
    finite_N = torch.isfinite(all_N)
    metrics = {
        "dynamic_sampling/dropped_groups": rt.reduce_sum(len(bad) // G),
        "dynamic_sampling/filled_groups": rt.reduce_sum(filled),
        "dynamic_sampling/extra_rounds": rounds,
        "dynamic_sampling/generated_reward_mean":
            rt.reduce_sum(all_N[finite_N].sum()) / max(1.0, rt.reduce_sum(finite_N.sum())),
    }
    return out, reward_stats, metrics
