"""The one update loop: epochs x mini-batches x micro-batches, the policy's and the critic's losses side by side.

    records = update(exp, policy, critic, losses, fwd, cfg.train, rt)   # one metrics record per optimizer step

Every micro-batch loss is `LOSS_AGGREGATIONS[algo.loss_agg]` of `POLICY_LOSSES[algo.policy_loss]`
(x the IS correction's weight) (+ beta * KL to the reference when it is in the loss) (+ an update
rule's extra term), divided by a normaliser fixed for the whole optimizer step over every process,
so the sum over micro-batches and processes is the full mini-batch's loss. The critic's loss is the
clipped value loss over the same tokens with the same normaliser; it has its own optimizer.
A pass splits the batch into `train.mini_batches_per_pass` contiguous mini-batches, one optimizer step
each (for the policy and for the critic).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from rlhf.algos import ExtraLoss, LossNormalizer, logp_gap
from rlhf.algos.kl import k3
from rlhf.algos.value import clipped_value_loss
from rlhf.runtime import Runtime
from rlhf.trainers.experience import Experience
from rlhf.trainers.forward import ForwardSpec
from rlhf.trainers.optim import Trainable


@dataclass(frozen=True)
class Losses:
    """The algorithm pieces picked from the registries for this run (rlhf.algos), and their settings."""

    policy_loss: Callable  # POLICY_LOSSES[algo.policy_loss]
    aggregate: Callable  # LOSS_AGGREGATIONS[algo.loss_agg]
    kl: Callable  # KL_ESTIMATORS[algo.kl.estimator]
    is_correction: Callable  # IS_CORRECTIONS[algo.is_correction]
    algo: object  # AlgoConfig: clip ranges and the like, read by the registered functions
    beta: float = 0.0  # coefficient of the KL to the reference in the loss (0: none, or KL in the reward)
    extra: Optional[ExtraLoss] = None  # an update rule's extra term (mdpo)
    value_clip: Optional[float] = None  # critic.value_clip
    max_new_tokens: int = 1  # Dr. GRPO's constant normaliser


def normalizer(mask_NT: Tensor, rt: Runtime, max_new_tokens: int) -> LossNormalizer:
    """The loss normaliser of the tokens `mask_NT` on every process (a collective call)."""
    return LossNormalizer(num_tokens=max(1.0, rt.reduce_sum(mask_NT.sum())),
                          num_seqs=max(1.0, rt.reduce_sum((mask_NT.sum(-1) > 0).sum())),
                          max_tokens=float(max_new_tokens))


def mini_batches(exp: Experience, count: int, rt: Runtime,
                 max_new_tokens: int) -> list[tuple[list[int], LossNormalizer]]:
    """(rows, normaliser) of each of `count` contiguous mini-batches of this process's batch."""
    size = len(exp) // count
    rows = [list(range(i * size, (i + 1) * size)) for i in range(count)]
    return [(r, normalizer(exp.train_mask_NT[r], rt, max_new_tokens)) for r in rows]


def policy_loss(mb: Experience, logp_NT: Tensor, norm: LossNormalizer, L: Losses, gap: bool) -> tuple[Tensor, dict]:
    """The aggregated policy loss of one micro-batch and its token-weighted metric sums (`gap`: also the
    sampler/trainer log-prob gap, measured before any optimizer step on the batch)."""
    dev = logp_NT.device
    mask_NT, adv_NT = mb.train_mask_NT.to(dev), mb.adv_NT.to(dev)
    old_NT = mb.old_logp_NT.to(dev) if mb.old_logp_NT is not None else logp_NT.detach()
    loss_NT, stats = L.policy_loss(logp_NT, old_NT, adv_NT, mask_NT, L.algo)
    n_tok = float(mask_NT.sum())
    gaps = {}
    if mb.sampler_logp_NT is not None:  # the engine's log-probs: IS correction and the sampler/trainer gap
        sampler_NT = mb.sampler_logp_NT.to(dev)
        weight_NT, is_stats = L.is_correction(old_NT, sampler_NT, mask_NT, L.algo.is_cap)
        loss_NT, stats = loss_NT * weight_NT, {**stats, **is_stats}
        if gap:
            g_sum, g_max = logp_gap(old_NT, sampler_NT, mask_NT)
            gaps = {"engine/logp_gap_mean": float(g_sum), "engine/logp_gap_max": float(g_max)}
    sums = {k: float(v) * n_tok for k, v in stats.items()}
    sums["approx_kl"] = float((k3(old_NT, logp_NT.detach()) * mask_NT).sum())  # KL(pi_old || pi), k3 estimate
    sums.update(gaps)  # token sums already (the max is taken, not summed: `add_sums`)
    if L.beta > 0:
        kl_NT = L.kl(logp_NT, mb.ref_logp_NT.to(dev))
        loss_NT = loss_NT + L.beta * kl_NT
        sums["kl"] = float((kl_NT.detach() * mask_NT).sum())
    if L.extra is not None:
        x_NT = L.extra.fn(logp_NT, old_NT)
        loss_NT = loss_NT + L.extra.coef * x_NT
        sums[L.extra.name] = float((x_NT.detach() * mask_NT).sum())
    return L.aggregate(loss_NT, mask_NT, norm), sums


def value_loss(mb: Experience, v_NT: Tensor, norm: LossNormalizer, clip: Optional[float]) -> tuple[Tensor, dict]:
    """The critic's loss of one micro-batch, 0.5 max((V-R)^2, (V_clip-R)^2) over the loss tokens / the normaliser."""
    dev = v_NT.device
    mask_NT, old_NT = mb.train_mask_NT.to(dev), mb.values_NT.to(dev)
    loss = (clipped_value_loss(v_NT, old_NT, mb.ret_NT.to(dev), clip) * mask_NT).sum() / norm.num_tokens
    clipped = float((((v_NT.detach() - old_NT).abs() > clip).float() * mask_NT).sum()) if clip is not None else 0.0
    return loss, {"critic/value_loss": float(loss.detach()), "critic/value_clipfrac": clipped}


def add_sums(sums: dict, new: dict) -> None:
    for k, v in new.items():
        sums[k] = max(sums[k], v) if k == "engine/logp_gap_max" else sums[k] + v


def reduce_sums(sums: dict, norm: LossNormalizer, rt: Runtime) -> dict:
    """Over every process: losses are sums, the gap's max a max, every other key a mean over the tokens."""
    out = {}
    for k, v in sums.items():
        if k in ("loss", "critic/value_loss"):
            out[k] = rt.reduce_sum(v)
        elif k == "engine/logp_gap_max":
            out[k] = rt.max(v)
        else:
            out[k] = rt.reduce_sum(v) / norm.num_tokens
    return out


def update(exp: Experience, policy: Optional[Trainable], critic: Optional[Trainable], L: Losses, fwd: ForwardSpec,
           tcfg, rt: Runtime, capture_old: bool = False) -> list[dict]:
    """`tcfg.updates_per_batch` passes x `tcfg.mini_batches_per_pass` optimizer steps of the policy and the critic
    (either may be None: a frozen policy during the critic's warm-up; no critic). `capture_old`: record log pi_old
    from the first pass's forwards (no optimizer step before them) into `exp` for the later passes."""
    records, gaps = [], {}
    old_logp_NT = torch.zeros_like(exp.mask_NT) if capture_old else None
    models = [t.model for t in (policy, critic) if t is not None]
    for epoch in range(tcfg.updates_per_batch):
        for rows, norm in mini_batches(exp, tcfg.mini_batches_per_pass, rt, L.max_new_tokens):
            sums: dict = defaultdict(float)
            chunks = rt.micro_batches(rows)
            for k, chunk in enumerate(chunks):
                mb = exp.select(chunk)
                with rt.accumulate(models, last=k == len(chunks) - 1):
                    if policy is not None:
                        logp_NT, ent_NT = fwd.logprobs(policy.model, mb)
                        if capture_old and epoch == 0:
                            old_logp_NT[chunk, : logp_NT.shape[1]] = logp_NT.detach().float().cpu()
                        loss, stats = policy_loss(mb, logp_NT, norm, L, gap=epoch == 0)
                        rt.backward(loss)
                        add_sums(sums, {"loss": float(loss.detach()),
                                        "entropy": float((ent_NT.cpu() * mb.train_mask_NT).sum()), **stats})
                    if critic is not None:
                        loss, stats = value_loss(mb, fwd.values(critic.model, mb), norm, L.value_clip)
                        rt.backward(loss)
                        add_sums(sums, stats)
            record = reduce_sums(sums, norm, rt)
            if policy is not None:
                record["kl"] = record.get("kl") if L.beta > 0 else None
                gaps = {k: v for k, v in record.items() if k.startswith("engine/")} if epoch == 0 else gaps
                record.update({**gaps, "grad_norm": policy.clip_and_step(rt.acc),
                               "lr": policy.scheduler.get_last_lr()[0]})
            if critic is not None:
                record.update({"critic/grad_norm": critic.clip_and_step(rt.acc),
                               "critic/lr": critic.scheduler.get_last_lr()[0]})
            records.append(record)
        if capture_old and epoch == 0:
            exp.old_logp_NT = old_logp_NT  # pi_old of every later pass
    return records
