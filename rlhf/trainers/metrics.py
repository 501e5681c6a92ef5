"""What a step logs: the batch's metrics (over every process) and one record per optimizer step.

Records go to `<output_dir>/metrics.jsonl`; the first record of a step carries the step's phase
timings, later ones (updates_per_batch x mini_batches_per_pass > 1) carry 0 for them.
"""
from __future__ import annotations

import json

import torch

from rlhf.algos.value import explained_variance_from_moments, value_moments
from rlhf.rollout import Samples
from rlhf.runtime import Runtime
from rlhf.trainers.experience import Experience


def batch_metrics(exp: Experience, samples: Samples, reward_stats: dict, group_size: int, rt: Runtime) -> dict:
    """Rewards, lengths and reward-function counters of the step's batch, over every process."""
    scores = rt.gather(exp.scores_N).float()
    lens = rt.gather(exp.mask_NT.sum(-1)).float()
    finished = rt.gather(torch.tensor(samples.finished))
    valid = torch.isfinite(scores)
    group_std = torch.nan_to_num(scores.view(-1, group_size), nan=0.0).std(-1)
    out = {
        "reward/mean": float(scores[valid].mean()) if valid.any() else float("nan"),
        "reward/std": float(scores[valid].std()) if valid.sum() > 1 else 0.0,
        "frac_zero_std": float((group_std == 0).float().mean()),
        "completion/len_mean": float(lens.mean()),
        "tokens/total": rt.reduce_sum(sum(len(p) + len(c) for p, c in zip(exp.prompt_ids, exp.completion_ids))),
        "completion/truncated_frac": float((~finished).float().mean()),
    }
    for name, values in samples.per_fn.items():
        v = rt.gather(torch.tensor([float("nan") if x is None else x for x in values]))
        out[f"reward/{name}/mean"] = float(v[torch.isfinite(v)].mean()) if torch.isfinite(v).any() else None
    out.update({k: rt.reduce_sum(v) for k, v in reward_stats.items() if k.endswith(("unscored", "errors", "timeouts"))})
    return out


def step_records(step: int, first_opt_step: int, batch: dict, updates: list[dict], times: dict) -> list[dict]:
    """One record per optimizer step of the RL step `step`: the batch metrics, that update's metrics, and the
    step's timings on the first record (0 on the others)."""
    records = []
    for i, upd in enumerate(updates):
        rec = {"step": step, "opt_step": first_opt_step + i, **batch, **upd}
        rec.update({k: (v if i == 0 else 0.0) for k, v in times.items()})
        records.append(rec)
    return records


def completion_rows(step: int, exp: Experience, samples: Samples, count: int) -> list[dict]:
    """The first `count` samples of the step as rows of completions.jsonl (prompt, completion, rewards, advantage)."""
    rows = []
    for i in range(min(count, len(exp))):
        prompt = samples.prompts[i]
        rows.append({
            "step": step, "prompt": prompt if isinstance(prompt, str) else json.dumps(prompt),
            "completion": samples.texts[i], "reward": float(exp.scores_N[i]),
            **({"transcript": samples.transcripts[i]} if samples.transcripts is not None else {}),
            **{f"reward/{k}": v[i] for k, v in samples.per_fn.items()}, "advantage": float(exp.adv_NT[i, 0]),
        })
    return rows


def sequence_kl(kl_fn, exp: Experience, rt: Runtime) -> float:
    """Mean over samples (all processes) of sum_t KL_t(pi_old || pi_ref): the adaptive KL controller's measure."""
    kl_NT = kl_fn(exp.old_logp_NT, exp.ref_logp_NT) * exp.actions_NT
    return rt.reduce_sum(kl_NT.sum()) / max(1.0, rt.reduce_sum(len(exp)))


def critic_metrics(exp: Experience, rt: Runtime) -> dict:
    """Before the update, over every process: how well the sampling-time values explain the returns."""
    m_6 = rt.reduce_vec(value_moments(exp.values_NT, exp.ret_NT, exp.train_mask_NT).float()).cpu()
    n = max(1.0, float(m_6[0]))
    return {"critic/explained_var": explained_variance_from_moments(m_6), "critic/value_mean": float(m_6[1]) / n,
            "critic/return_mean": float(m_6[2]) / n}
