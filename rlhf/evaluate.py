"""`rlhf eval`: greedy accuracy and pass@k of a model on a recipe's eval split, scored by its reward functions.

    result = evaluate("runs/demo/final", cfg)            # a model dir, a LoRA adapter dir or an embedded name
    result = evaluate_engine(trainer.engine, tok, cfg)   # the live policy, through any GenerationEngine

A completion is correct when its combined reward (the weighted sum of `reward.functions`)
is >= `eval.threshold`. Greedy accuracy is the fraction of prompts whose greedy completion
is correct. pass@k samples `eval.samples` (default k) completions per prompt at
`generation.temperature` and reports the unbiased estimator of Chen et al. (2021),
"Evaluating Large Language Models Trained on Code", eq. 1.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from rlhf.config import Config, ConfigError
from rlhf.data import PromptSource, load_prompt_dataset
from rlhf.engine import SamplingParams
from rlhf.rewards import RewardModule
from rlhf.rollout import EpisodeSpec, RolloutSource, build_episodes, episode_rewards, generate_batch


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k draws without replacement from n samples, c of them correct, is correct).

    1 - C(n-c, k) / C(n, k)  (Chen et al. 2021, eq. 1); needs n >= k >= 1.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def eval_prompts(cfg: Config, tokenizer) -> PromptSource:
    """The eval split named by `data.eval` (a task's eval split, or a file), tokenized, in file order."""
    d = cfg.data
    if not d.eval:
        raise ConfigError("data.eval is not set: name the eval prompts (a task such as 'arithmetic', or a file)")
    ds = load_prompt_dataset(d.eval, "eval", d.task_args, cfg.train.seed)
    if cfg.eval.max_prompts:
        ds = ds.select(range(min(cfg.eval.max_prompts, len(ds))))
    return PromptSource(ds, tokenizer, name=d.eval, prompt_column=d.prompt_column,
                        max_prompt_tokens=d.max_prompt_tokens, on_long_prompt=d.on_long_prompt, shuffle=False,
                        seed=cfg.train.seed)


def _score(src: RolloutSource, batch, n: int,
           sampling: SamplingParams) -> tuple[list[str], torch.Tensor, dict[str, list]]:
    """n completions (or episodes) per prompt of `batch`, scored the way the trainer scores them."""
    gen = generate_batch(src, batch, n, sampling)
    columns = {k: [v for v in vals for _ in range(n)] for k, vals in batch.columns.items()}
    result = src.rewards(gen.prompts, gen.completions, gen.completion_ids, {**columns, **gen.columns})
    return gen.texts, result.scores_N, result.per_fn


def evaluate_engine(engine, tokenizer, cfg: Config, model_name: str = "policy", rewards: Optional[RewardModule] = None,
                    episodes: Optional[EpisodeSpec] = None) -> dict[str, Any]:
    """Greedy accuracy and pass@k of whatever `engine` generates with, on `data.eval`; returns a JSON-able dict.
    With `episodes`, each sample is a multi-turn episode, as in training.

    Sampling is seeded with `train.seed` inside a forked RNG: evaluating does not change
    the random stream of a training run around it.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.train.seed)
        return _evaluate(engine, tokenizer, cfg, model_name, rewards, episodes)


def _evaluate(engine, tokenizer, cfg: Config, model_name: str, rewards: Optional[RewardModule],
              episodes: Optional[EpisodeSpec]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ev, g = cfg.eval, cfg.generation
    if cfg.eval.functions:  # what counts as correct is not what trains
        rewards = RewardModule(cfg.eval.functions, cfg.reward.on_error, cfg.reward.timeout_s)
    elif rewards is None:
        rewards = RewardModule(list(cfg.reward.functions) + episode_rewards(episodes), cfg.reward.on_error,
                               cfg.reward.timeout_s)
    source = eval_prompts(cfg, tokenizer)
    src = RolloutSource(source, engine, rewards, tokenizer, False, episodes)
    n = ev.samples or ev.k
    greedy = SamplingParams(g.max_new_tokens, greedy=True)
    sampled = SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.top_k)
    correct, scores, per_fn, examples, pass_k, pass_1 = [], [], {}, [], [], []
    for start in range(0, len(source), ev.batch_size):
        batch = source.get(source.rows[start: start + ev.batch_size])
        texts, s, fns = _score(src, batch, 1, greedy)
        scores += s.tolist()
        correct += [bool(x >= ev.threshold) for x in s.tolist()]  # NaN (unscored) is never correct
        for name, values in fns.items():
            per_fn.setdefault(name, []).extend(values)
        for p, t, x in zip(batch.prompts, texts, s.tolist()):
            if len(examples) < 8:
                examples.append({"prompt": p, "completion": t, "reward": x if math.isfinite(x) else None,
                                 "correct": bool(x >= ev.threshold)})
        if n:
            _, s, _ = _score(src, batch, n, sampled)
            ok = (s >= ev.threshold).view(-1, n).sum(-1).tolist()
            pass_k += [pass_at_k(n, c, ev.k) for c in ok]
            pass_1 += [c / n for c in ok]
    finite = [x for x in scores if math.isfinite(x)]
    result: dict[str, Any] = {
        "model": model_name, "data": cfg.data.eval, "num_prompts": len(source), "threshold": ev.threshold,
        "greedy_accuracy": sum(correct) / len(correct),
        "greedy_mean_reward": sum(finite) / len(finite) if finite else None,
        "reward_fns_greedy_mean": {k: _mean(v) for k, v in per_fn.items()},
        "k": ev.k, "samples": n, "temperature": g.temperature,
    }
    if n:
        result[f"pass@{ev.k}"] = sum(pass_k) / len(pass_k)
        result["pass@1"] = sum(pass_1) / len(pass_1)
    result["examples"] = examples
    result["time_s"] = round(time.perf_counter() - t0, 2)
    return result


def _mean(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def load_for_eval(path: str | Path, cfg: Config) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a full model dir, a LoRA adapter dir (merged for speed) or an embedded name.

    An adapter's base is the `base_model_name_or_path` it was saved with when that still
    exists, else `model.path` of the config.
    """
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    dtype = torch.bfloat16 if cfg.model.compute_dtype == "bf16" else torch.float32
    p = Path(path).expanduser()
    adapter = (p / "adapter_config.json").is_file()
    if adapter:
        from peft import PeftModel

        base_path = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if not (Path(base_path) / "config.json").is_file():
            base_path = cfg.model.path
        base = load_causal_lm(base_path, dtype, cfg.model.trust_remote_code)
        model = PeftModel.from_pretrained(base, p).merge_and_unload()
        if (p / "tokenizer_config.json").is_file():  # save_model stores the tokenizer beside the adapter
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=cfg.model.trust_remote_code)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
    else:
        model = load_causal_lm(str(path), dtype, cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(str(path), cfg.model.trust_remote_code)
    model.config.use_cache = True
    return model.eval().requires_grad_(False), tokenizer


def evaluate(path: str | Path, cfg: Config) -> dict[str, Any]:
    """Load the model at `path` and evaluate it on `data.eval` with the config's reward functions."""
    from rlhf.engine import ENGINES

    if not cfg.data.eval:  # fail before loading a model
        raise ConfigError("data.eval is not set: name the eval prompts (a task such as 'arithmetic', or a file)")
    model, tokenizer = load_for_eval(path, cfg)
    if torch.cuda.is_available():
        model.cuda()
    engine = ENGINES.get("hf")(model, tokenizer, cfg)
    return evaluate_engine(engine, tokenizer, cfg, model_name=str(path), episodes=build_episodes(cfg, tokenizer))


def summary_line(result: dict[str, Any]) -> str:
    """One human line: greedy accuracy and pass@k over the number of prompts."""
    k = result.get("k") or 0
    line = f"{result['model']}: greedy accuracy {result['greedy_accuracy']:.3f}"
    if k:
        line += f", pass@{k} {result[f'pass@{k}']:.3f} (pass@1 {result['pass@1']:.3f}, {result['samples']} samples)"
    return line + f" on {result['num_prompts']} prompts of {result['data']} (reward >= {result['threshold']})"
