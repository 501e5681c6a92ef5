"""The trainer side of an update rule: one batch of experience bound to the policy, its
optimizer and the processes. `BatchUpdater` implements `rlhf.algos.UpdateProblem`; the
rule picked by `algo.update` (`rlhf.algos.UPDATES`) decides what to do with it.

Every micro-batch loss is `LOSS_AGGREGATIONS[algo.loss_agg]` of
`POLICY_LOSSES[algo.policy_loss]` (+ beta * KL to the reference when it is in the loss)
(+ an update rule's extra term), divided by a normaliser fixed for the whole optimizer
step, so the sum over micro-batches and processes is the full-batch loss.

First-order passes split the batch into `train.mini_batches_per_pass` contiguous mini-batches
(`mini_batches`), one optimizer step each, with the normaliser of that mini-batch.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Optional

import torch
from torch import Tensor

from rlhf.algos import ExtraLoss, LossNormalizer, logp_gap
from rlhf.algos.kl import k3
from rlhf.algos.natural import (FVP, assign_flat_, categorical_kl_NT, flatten, hessian_vector_product, self_kl_NT,
                                surrogate_loss_NT)
from rlhf.models.logprobs import sample_log_softmax, scatter_tokens
from rlhf.trainers.experience import Experience


def normalizer(trainer, mask_NT: Tensor) -> LossNormalizer:
    """The loss normaliser of the tokens `mask_NT` on every process (a collective call)."""
    return LossNormalizer(
        num_tokens=max(1.0, trainer._reduce_sum(mask_NT.sum())),
        num_seqs=max(1.0, trainer._reduce_sum((mask_NT.sum(-1) > 0).sum())),
        max_tokens=float(trainer.cfg.generation.max_new_tokens),
    )


def mini_batches(trainer, exp: Experience) -> list[tuple[list[int], LossNormalizer]]:
    """(rows, normaliser) of each of the `train.mini_batches_per_pass` contiguous mini-batches of this process's batch."""
    m = trainer.cfg.train.mini_batches_per_pass
    size = len(exp) // m
    out = []
    for i in range(m):
        rows = list(range(i * size, (i + 1) * size))
        out.append((rows, normalizer(trainer, exp.train_mask_NT[rows])))
    return out


class BatchUpdater:
    """Implements `rlhf.algos.UpdateProblem` for one `Experience` on this process (global over processes)."""

    def __init__(self, trainer, exp: Experience):
        self.t, self.cfg, self.exp = trainer, trainer.cfg, exp
        self.passes = self.cfg.train.updates_per_batch
        self.params = [p for p in trainer.unwrapped.parameters() if p.requires_grad]
        self.rows = list(range(len(exp)))
        self.norm = normalizer(trainer, exp.train_mask_NT)
        self.minis = mini_batches(trainer, exp) if self.cfg.train.mini_batches_per_pass > 1 else [(self.rows, self.norm)]
        kl = self.cfg.algo.kl
        self.beta = trainer.kl_coef if kl.placement == "in_loss" else 0.0
        self.first_pass = True  # no optimizer step yet on this batch: pi_old = pi, and the sampler gap is measured
        self.gap_max, self.gap = 0.0, {}

    # ------------------------------------------------------------------ losses and metrics

    def _loss(self, mb: Experience, logp_NT: Tensor, extra: Optional[ExtraLoss] = None,
              norm: Optional[LossNormalizer] = None) -> tuple[Tensor, dict]:
        """The aggregated loss of one micro-batch (normaliser `norm`, default the batch's) and token-weighted metric sums."""
        dev = logp_NT.device
        mask_NT, adv_NT = mb.train_mask_NT.to(dev), mb.adv_NT.to(dev)
        old_NT = mb.old_logp_NT.to(dev) if mb.old_logp_NT is not None else logp_NT.detach()
        loss_NT, stats = self.t.loss_fn(logp_NT, old_NT, adv_NT, mask_NT, self.cfg.algo)
        n_tok = float(mask_NT.sum())
        gap = {}
        if mb.sampler_logp_NT is not None:  # the engine's log-probs: IS correction and the sampler/trainer gap
            sampler_NT = mb.sampler_logp_NT.to(dev)
            weight_NT, is_stats = self.t.is_fn(old_NT, sampler_NT, mask_NT, self.cfg.algo.is_cap)
            loss_NT, stats = loss_NT * weight_NT, {**stats, **is_stats}
            if self.first_pass:
                g_sum, g_max = logp_gap(old_NT, sampler_NT, mask_NT)
                gap = {"engine/logp_gap_mean": float(g_sum)}
                self.gap_max = max(self.gap_max, float(g_max))
        sums = {k: float(v) * n_tok for k, v in stats.items()}
        sums["approx_kl"] = float((k3(old_NT, logp_NT.detach()) * mask_NT).sum())  # KL(pi_old || pi), k3 estimate
        sums.update(gap)  # a token sum already
        if self.beta > 0:
            kl_NT = self.t.kl_fn(logp_NT, mb.ref_logp_NT.to(dev))
            loss_NT = loss_NT + self.beta * kl_NT
            sums["kl"] = float((kl_NT.detach() * mask_NT).sum())
        if extra is not None:
            x_NT = extra.fn(logp_NT, old_NT)
            loss_NT = loss_NT + extra.coef * x_NT
            sums[extra.name] = float((x_NT.detach() * mask_NT).sum())
        return self.t.agg_fn(loss_NT, mask_NT, norm or self.norm), sums

    def _surrogate(self, mb: Experience, logp_NT: Tensor) -> float:
        """The aggregated surrogate loss -r A (+ beta * KL to the reference) of one micro-batch (TRPO's line search)."""
        dev = logp_NT.device
        mask_NT = mb.train_mask_NT.to(dev)
        loss_NT = surrogate_loss_NT(logp_NT, mb.old_logp_NT.to(dev), mb.adv_NT.to(dev))
        if self.beta > 0:
            loss_NT = loss_NT + self.beta * self.t.kl_fn(logp_NT, mb.ref_logp_NT.to(dev))
        return float(self.t.agg_fn(loss_NT, mask_NT, self.norm))

    def _add(self, sums: dict, loss: Tensor, ent_NT: Tensor, mb: Experience, stats: dict) -> None:
        sums["loss"] += float(loss.detach())
        sums["entropy"] += float((ent_NT.cpu() * mb.train_mask_NT).sum())
        for k, v in stats.items():
            sums[k] += v

    def _metrics(self, sums: dict, norm: Optional[LossNormalizer] = None) -> dict:
        """Reduce the sums over processes: the loss is a sum, every other key a token mean."""
        n_tok = (norm or self.norm).num_tokens
        rec = {"loss": self.t._reduce_sum(sums.pop("loss"))}
        rec["kl"] = self.t._reduce_sum(sums.pop("kl", 0.0)) / n_tok if self.beta > 0 else None
        rec.update({k: self.t._reduce_sum(v) / n_tok for k, v in sums.items()})
        if "engine/logp_gap_mean" in rec:  # measured in the first pass; every record of the batch carries it
            acc = self.t.acc
            rec["engine/logp_gap_max"] = float(acc.gather(torch.tensor([self.gap_max], device=acc.device)).max())
            self.gap = {k: rec[k] for k in ("engine/logp_gap_mean", "engine/logp_gap_max")}
        return {**rec, **self.gap}

    def _reduce_vec(self, v_P: Tensor) -> Tensor:
        acc = self.t.acc
        return acc.reduce(v_P.to(acc.device), "sum") if acc.num_processes > 1 else v_P

    # ------------------------------------------------------------------ first-order steps (adamw, mdpo)

    def optimizer_pass(self, extra: Optional[ExtraLoss] = None) -> list[dict]:
        """One pass over the batch: for each mini-batch, backward over its micro-batches (gradients all-reduced
        once, at the last), then one optimizer step. Returns one record per optimizer step."""
        acc, exp = self.t.acc, self.exp
        # Later passes need log pi_old: record it from this pass (no optimizer step yet), saving a forward.
        # (With several mini-batches the trainer computes it up front: the second one is already off-policy.)
        capture = exp.old_logp_NT is None and self.passes > 1
        old_logp_NT = torch.zeros_like(exp.mask_NT) if capture else None
        records = []
        for rows, norm in self.minis:
            sums: dict = defaultdict(float)
            chunks = self.t._chunks(rows)
            try:
                for k, chunk in enumerate(chunks):
                    mb = exp.select(chunk)
                    last = k == len(chunks) - 1
                    # The accumulation boundary: DeepSpeed reduces gradients and steps its optimizer there (inside
                    # `acc.backward`); DDP and FSDP2 skip their gradient all-reduce before it (no_sync).
                    acc.gradient_state._set_sync_gradients(last)
                    with contextlib.nullcontext() if last else acc.no_sync(self.t.model):
                        logp_NT, ent_NT = self.t._forward(self.t.model, mb)
                        if capture:
                            old_logp_NT[chunk, : logp_NT.shape[1]] = logp_NT.detach().float().cpu()
                        loss, stats = self._loss(mb, logp_NT, extra, norm)
                        # DDP, FSDP2 and DeepSpeed average gradients over processes; the normaliser is already global
                        acc.backward(loss * acc.num_processes)
                    self._add(sums, loss, ent_NT, mb, stats)
            finally:
                acc.gradient_state._set_sync_gradients(True)
            metrics = self._metrics(sums, norm)
            grad_norm = self._clip_and_step()
            records.append({**metrics, "grad_norm": grad_norm, "lr": self.t.scheduler.get_last_lr()[0]})
        if capture:
            exp.old_logp_NT = old_logp_NT
        self.first_pass = False
        return records

    def _clip_and_step(self) -> float:
        """Clip, step (skipping a NaN/inf gradient) and zero the gradients; returns the gradient norm.

        Under DeepSpeed the engine has already clipped (gradient_clipping = train.max_grad_norm) and
        stepped inside the last `acc.backward`; this reads its norm, and `optimizer.step` is a no-op.
        DeepSpeed applies a non-finite fp32 gradient: the guard then only counts it and stops the run.
        """
        max_norm = self.cfg.train.max_grad_norm
        norm = self.t.acc.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        grad_norm = float("nan") if norm is None else float(norm)
        if self.t.nonfinite.record(grad_norm):  # a NaN/inf gradient never reaches the weights
            self.t.optimizer.step()
            self.t.scheduler.step()
        self.t.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # ------------------------------------------------------------------ natural-gradient steps (npg, trpo)

    def flat_params(self) -> Tensor:
        return flatten([p.detach() for p in self.params]).clone()

    def set_flat_params(self, flat_P: Tensor) -> None:
        assign_flat_(self.params, flat_P)

    def loss_and_grad(self) -> tuple[Tensor, dict]:
        """(g_P, metrics) at the current parameters; also records log pi_old when the batch lacks it."""
        exp = self.exp
        capture = exp.old_logp_NT is None
        old_logp_NT = torch.zeros_like(exp.mask_NT) if capture else None
        g_P = torch.zeros(sum(p.numel() for p in self.params), device=self.params[0].device)
        sums: dict = defaultdict(float)
        for chunk in self.t._chunks(self.rows):
            mb = exp.select(chunk)
            logp_NT, ent_NT = self.t._forward(self.t.unwrapped, mb)
            if capture:
                old_logp_NT[chunk, : logp_NT.shape[1]] = logp_NT.detach().float().cpu()
            loss, stats = self._loss(mb, logp_NT)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            g_P += flatten([torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, self.params)])
            self._add(sums, loss, ent_NT, mb, stats)
        if capture:
            exp.old_logp_NT = old_logp_NT
        metrics = self._metrics(sums)
        self.first_pass = False
        g_P = self._reduce_vec(g_P)
        grad_norm = float(g_P.norm())
        if not self.t.nonfinite.record(grad_norm):  # a NaN/inf gradient gives no step (natural_step of 0 is 0)
            g_P = torch.zeros_like(g_P)
        return g_P, {**metrics, "grad_norm": grad_norm}

    def _fisher_rows(self) -> list[int]:
        k = self.cfg.algo.natural.fisher_samples
        if k == 0 or k >= len(self.rows):
            return self.rows
        stride = len(self.rows) / k  # evenly spread over the groups
        return [self.rows[int(i * stride)] for i in range(k)]

    def _full_logp(self, mb: Experience):
        """(logp_MV, packed batch, mask_M): the full log-softmax of every completion token and its loss mask."""
        cfg = self.cfg
        logp_MV, pb = sample_log_softmax(
            self.t.unwrapped, mb.prompt_ids, mb.completion_ids, self.t.tokenizer.pad_token_id,
            temperature=cfg.generation.temperature, compute_dtype=cfg.model.compute_dtype, device=self.t.acc.device,
            pack_prompts=cfg.train.pack_prompts,
        )
        mask_M = mb.train_mask_NT[pb.sample_M, pb.pos_M].to(logp_MV.device)
        return logp_MV, pb, mask_M

    def fisher_vector_product(self) -> FVP:
        """F v for F = Hessian of the mean KL(sg[pi] || pi) over the Fisher rows' tokens, by double backprop.

        The first-order graph of every Fisher micro-batch is built once and kept for all CG iterations.
        """
        rows = self._fisher_rows()
        mask_NT = self.exp.train_mask_NT
        n_tok = max(1.0, self.t._reduce_sum(mask_NT[rows].sum()))
        model = self.t.unwrapped
        model.eval()
        grads = []
        for chunk in self.t._chunks(rows):
            mb = self.exp.select(chunk)
            logp_MV, _, mask_M = self._full_logp(mb)
            kl = (self_kl_NT(logp_MV) * mask_M).sum() / n_tok
            gr = torch.autograd.grad(kl, self.params, create_graph=True, allow_unused=True)
            flat = flatten([torch.zeros_like(p) if x is None else x for x, p in zip(gr, self.params)])
            if flat.requires_grad:  # a micro-batch with no loss tokens has no curvature
                grads.append(flat)
        model.train()

        def fvp(v_P: Tensor) -> Tensor:
            out_P = torch.zeros_like(v_P)
            for grad_P in grads:
                out_P += hessian_vector_product(grad_P, self.params, v_P)
            return self._reduce_vec(out_P)

        return fvp

    @torch.no_grad()
    def measure(self, theta_old_P: Tensor) -> tuple[float, float, float]:
        """(surrogate loss at theta_old, surrogate loss now, mean KL(pi_theta_old || pi_now) per token, exact).

        Needs log pi_old in the batch (`loss_and_grad` records it when the experience has none).
        """
        theta_now_P = self.flat_params()
        model = self.t.unwrapped
        model.eval()
        loss_old = loss_now = kl_sum = 0.0
        for chunk in self.t._chunks(self.rows):
            mb = self.exp.select(chunk)
            self.set_flat_params(theta_old_P)
            old_MV, pb, mask_M = self._full_logp(mb)
            self.set_flat_params(theta_now_P)
            now_MV, _, _ = self._full_logp(mb)
            target_M1 = pb.target_M.to(now_MV.device).unsqueeze(-1)
            loss_old += self._surrogate(mb, scatter_tokens(pb, old_MV.gather(-1, target_M1).squeeze(-1)))
            loss_now += self._surrogate(mb, scatter_tokens(pb, now_MV.gather(-1, target_M1).squeeze(-1)))
            kl_sum += float((categorical_kl_NT(old_MV, now_MV) * mask_M).sum())
        model.train()
        red = self.t._reduce_sum
        return red(loss_old), red(loss_now), red(kl_sum) / self.norm.num_tokens
