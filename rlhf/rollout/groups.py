"""Generate and score whole groups for one RL step, with DAPO's shaping (Yu et al. 2025):

- the soft overlong punishment (`algo.overlong.*`) is added to every score;
- dynamic sampling (`algo.dynamic_sampling.*`) drops groups whose scores are all equal and
  generates further rounds of prompts until `train.prompts_per_step` informative groups are
  left (at most `max_extra_rounds` extra rounds; missing groups are filled with dropped ones).

Rounds are collective: every process draws every round's prompts, so the prompt order stays
the same on all processes, but only processes still short of groups generate.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from rlhf.algos.dapo import informative_groups, overlong_penalty
from rlhf.data import PromptSource
from rlhf.engine import GenerationEngine, SamplingParams
from rlhf.logging import PhaseTimer
from rlhf.rewards import RewardModule
from rlhf.rollout.episodes import EpisodeSpec, run_episodes
from rlhf.rollout.samples import Completions, Samples
from rlhf.runtime import Runtime


@dataclass
class RolloutSource:
    """Where samples come from: the prompts, the engine that completes them, the rewards that score them."""

    prompts: PromptSource
    engine: GenerationEngine
    rewards: RewardModule
    tokenizer: object
    return_logps: bool = False  # ask the engine for the sampled tokens' log-probs
    episodes: Optional[EpisodeSpec] = None  # multi-turn: an environment, tools or a rollout hook


def sampling_params(gen) -> SamplingParams:
    """The engine's sampling settings from `cfg.generation`."""
    return SamplingParams(gen.max_new_tokens, gen.temperature, gen.top_p, gen.top_k)


def generate_batch(src: RolloutSource, batch, G: int, sampling: SamplingParams) -> Completions:
    """G completions (or episodes) for each prompt of `batch`."""
    if src.episodes is not None:
        return run_episodes(src.episodes, src.engine, src.tokenizer, batch, G, sampling, src.return_logps)
    rollouts = src.engine.generate(batch.prompt_ids, G, sampling, return_logps=src.return_logps)
    texts = src.tokenizer.batch_decode(rollouts.completion_ids, skip_special_tokens=True)
    prompts_N = [p for p in batch.prompts for _ in range(G)]
    completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                   for p, t in zip(prompts_N, texts)]
    return Completions(prompts_N, rollouts.prompt_ids, rollouts.completion_ids, completions, texts,
                       list(rollouts.finished), rollouts.sampler_logps)


@dataclass
class Batch:
    """One step's scored samples and what is logged about them."""

    samples: Samples
    reward_stats: dict  # the reward functions' counters on this process (sums)
    env_stats: dict  # episode counters on this process (sums; reduced by `episode_metrics`)
    metrics: dict  # global already (dynamic sampling)
    version: int = 0  # the policy version that generated it (the number of optimizer syncs before it)


def batch_to_json(batch: Batch) -> dict:
    """A batch as JSON-able data (an asynchronous run's checkpoint keeps the batches generated but not trained)."""
    samples = {f.name: getattr(batch.samples, f.name) for f in fields(Samples)}
    samples["scores_N"] = batch.samples.scores_N.tolist()
    return {"samples": samples, "reward_stats": batch.reward_stats, "env_stats": batch.env_stats,
            "metrics": batch.metrics, "version": batch.version}


def batch_from_json(data: dict) -> Batch:
    samples = dict(data["samples"])
    samples["scores_N"] = torch.tensor(samples["scores_N"], dtype=torch.float32)
    return Batch(Samples(**samples), data["reward_stats"], data["env_stats"], data["metrics"], data["version"])


def sample_round(src: RolloutSource, cfg, rt: Runtime, timer: PhaseTimer) -> Batch:
    """One batch of this process's prompts, G completions each, scored (+ overlong penalty). No collective call:
    it may run in a background thread (rlhf.rollout.producer)."""
    G = cfg.train.samples_per_prompt
    with timer("generate"):
        batch = src.prompts.batch(cfg.train.prompts_per_step, rt.process_index, rt.num_processes)
        gen = generate_batch(src, batch, G, sampling_params(cfg.generation))
    with timer("reward"):
        columns = {k: [v for v in vals for _ in range(G)] for k, vals in batch.columns.items()}
        result = src.rewards(gen.prompts, gen.completions, gen.completion_ids, {**columns, **gen.columns})
    scores_N, per_fn = result.scores_N, dict(result.per_fn)
    over = cfg.algo.overlong
    if over.buffer > 0:
        lengths_N = torch.tensor([len(c) for c in gen.completion_ids])
        pen_N = overlong_penalty(lengths_N, cfg.generation.max_new_tokens, over.buffer, over.penalty)
        scores_N = scores_N + pen_N
        per_fn["overlong_penalty"] = pen_N.tolist()
    samples = Samples(gen.prompts, gen.prompt_ids, gen.completion_ids, gen.texts, gen.finished, scores_N, per_fn,
                      gen.sampler_logps, gen.action_masks, gen.transcripts)
    return Batch(samples, dict(result.stats), gen.stats, {})


def episode_metrics(stats: dict, rt: Runtime) -> dict:
    """Over every process (collective; nothing without episodes): turns and tool calls per episode, errors,
    timeouts and malformed calls (totals), the share of environment tokens and of episodes a budget ended."""
    if not stats:
        return {}
    tot = {k: rt.reduce_sum(v) for k, v in stats.items()}
    n = max(1.0, tot["episodes"])
    return {"env/turns_mean": tot["turns"] / n, "env/tool_calls_mean": tot["tool_calls"] / n,
            "env/tool_errors": tot["tool_errors"], "env/tool_timeouts": tot["tool_timeouts"],
            "env/malformed_calls": tot["malformed_calls"], "env/overflows": tot["overflows"],
            "env/truncated_frac": tot["truncated"] / n,
            "env/env_token_frac": tot["env_tokens"] / max(1.0, tot["env_tokens"] + tot["model_tokens"]),
            "env/model_tokens_mean": tot["model_tokens"] / n}


def rollout(src: RolloutSource, cfg, rt: Runtime, timer: PhaseTimer) -> Batch:
    """This process's share of groups for one step, scored, with DAPO's rounds (collective) when enabled."""
    G = cfg.train.samples_per_prompt
    first = sample_round(src, cfg, rt, timer)
    samples, reward_stats, env_stats = first.samples, first.reward_stats, first.env_stats
    ds = cfg.algo.dynamic_sampling
    if not ds.enabled:
        return first
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
            more = sample_round(src, cfg, rt, timer)
            split(more.samples)
            generated.append(more.samples.scores_N)
            for k, v in more.reward_stats.items():
                reward_stats[k] = reward_stats.get(k, 0.0) + v
            for k, v in more.env_stats.items():
                env_stats[k] = env_stats.get(k, 0.0) + v
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
    return Batch(out, reward_stats, env_stats, metrics)
