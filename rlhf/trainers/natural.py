"""The natural-gradient branch of the update (algo.update = npg or trpo): one batch bound to the policy as the
`rlhf.algos.NaturalProblem` the registered step functions work on (flat parameters, the gradient, Fisher-vector
products by double backprop, and the exact KL and surrogate for the line search).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from rlhf.algos.natural import (
    FVP,
    assign_flat_,
    categorical_kl_NT,
    flatten,
    hessian_vector_product,
    self_kl_NT,
    surrogate_loss_NT,
)
from rlhf.models.logprobs import scatter_tokens
from rlhf.runtime import Runtime
from rlhf.trainers.experience import Experience
from rlhf.trainers.forward import ForwardSpec
from rlhf.trainers.guards import NonFiniteGradients
from rlhf.trainers.update import Losses, add_sums, normalizer, policy_loss, reduce_sums


class PolicyBatch:
    """Implements `rlhf.algos.NaturalProblem` for one `Experience` on this process (global over processes).

    `model` is the unwrapped policy (parameters are assigned by hand; gradients are all-reduced here).
    `capture_old`: `loss_and_grad` records log pi_old into `exp` (it runs before any parameter change).
    """

    def __init__(self, model: torch.nn.Module, exp: Experience, L: Losses, fwd: ForwardSpec, rt: Runtime,
                 guard: NonFiniteGradients, fisher_samples: int, capture_old: bool):
        self.model, self.exp, self.L, self.fwd, self.rt, self.guard = model, exp, L, fwd, rt, guard
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.rows = list(range(len(exp)))
        self.norm = normalizer(exp.train_mask_NT, rt, L.max_new_tokens)
        self.fisher_samples, self.capture_old = fisher_samples, capture_old

    def flat_params(self) -> Tensor:
        return flatten([p.detach() for p in self.params]).clone()

    def set_flat_params(self, flat_P: Tensor) -> None:
        assign_flat_(self.params, flat_P)

    def loss_and_grad(self) -> tuple[Tensor, dict]:
        """(g_P, metrics) at the current parameters; a NaN/inf gradient is counted by the guard and zeroed."""
        exp = self.exp
        old_logp_NT = torch.zeros_like(exp.mask_NT) if self.capture_old else None
        g_P = torch.zeros(sum(p.numel() for p in self.params), device=self.params[0].device)
        sums: dict = defaultdict(float)
        for chunk in self.rt.micro_batches(self.rows):
            mb = exp.select(chunk)
            logp_NT, ent_NT = self.fwd.logprobs(self.model, mb)
            if self.capture_old:
                old_logp_NT[chunk, : logp_NT.shape[1]] = logp_NT.detach().float().cpu()
            loss, stats = policy_loss(mb, logp_NT, self.norm, self.L, gap=True)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            g_P += flatten([torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, self.params)])
            add_sums(sums, {"loss": float(loss.detach()), "entropy": float((ent_NT.cpu() * mb.train_mask_NT).sum()),
                            **stats})
        if self.capture_old:
            exp.old_logp_NT = old_logp_NT
        metrics = reduce_sums(sums, self.norm, self.rt)
        metrics["kl"] = metrics.get("kl") if self.L.beta > 0 else None
        g_P = self.rt.reduce_vec(g_P)
        grad_norm = float(g_P.norm())
        if not self.guard.record(grad_norm):  # a NaN/inf gradient gives no step (natural_step of 0 is 0)
            g_P = torch.zeros_like(g_P)
        return g_P, {**metrics, "grad_norm": grad_norm}

    def _fisher_rows(self) -> list[int]:
        k = self.fisher_samples
        if k == 0 or k >= len(self.rows):
            return self.rows
        stride = len(self.rows) / k  # evenly spread over the groups
        return [self.rows[int(i * stride)] for i in range(k)]

    def _full_logp(self, mb: Experience):
        """(logp_MV, packed batch, mask_M): the full log-softmax of every completion token and its loss mask."""
        logp_MV, pb = self.fwd.log_softmax(self.model, mb)
        mask_M = mb.train_mask_NT[pb.sample_M, pb.pos_M].to(logp_MV.device)
        return logp_MV, pb, mask_M

    def fisher_vector_product(self) -> FVP:
        """F v for F = Hessian of the mean KL(sg[pi] || pi) over the Fisher rows' tokens, by double backprop.

        The first-order graph of every Fisher micro-batch is built once and kept for all CG iterations.
        """
        rows = self._fisher_rows()
        n_tok = max(1.0, self.rt.reduce_sum(self.exp.train_mask_NT[rows].sum()))
        self.model.eval()
        grads = []
        for chunk in self.rt.micro_batches(rows):
            logp_MV, _, mask_M = self._full_logp(self.exp.select(chunk))
            kl = (self_kl_NT(logp_MV) * mask_M).sum() / n_tok
            gr = torch.autograd.grad(kl, self.params, create_graph=True, allow_unused=True)
            flat = flatten([torch.zeros_like(p) if x is None else x for x, p in zip(gr, self.params)])
            if flat.requires_grad:  # a micro-batch with no loss tokens has no curvature
                grads.append(flat)
        self.model.train()

        def fvp(v_P: Tensor) -> Tensor:
            out_P = torch.zeros_like(v_P)
            for grad_P in grads:
                out_P += hessian_vector_product(grad_P, self.params, v_P)
            return self.rt.reduce_vec(out_P)

        return fvp

    def _surrogate(self, mb: Experience, logp_NT: Tensor) -> float:
        """The aggregated surrogate loss -r A (+ beta * KL to the reference) of one micro-batch (TRPO's line search)."""
        dev, L = logp_NT.device, self.L
        loss_NT = surrogate_loss_NT(logp_NT, mb.old_logp_NT.to(dev), mb.adv_NT.to(dev))
        if L.beta > 0:
            loss_NT = loss_NT + L.beta * L.kl(logp_NT, mb.ref_logp_NT.to(dev))
        return float(L.aggregate(loss_NT, mb.train_mask_NT.to(dev), self.norm))

    @torch.no_grad()
    def measure(self, theta_old_P: Tensor) -> tuple[float, float, float]:
        """(surrogate loss at theta_old, surrogate loss now, mean KL(pi_theta_old || pi_now) per token, exact).

        Needs log pi_old in the batch (`loss_and_grad` records it when the experience has none).
        """
        theta_now_P = self.flat_params()
        self.model.eval()
        loss_old = loss_now = kl_sum = 0.0
        for chunk in self.rt.micro_batches(self.rows):
            mb = self.exp.select(chunk)
            self.set_flat_params(theta_old_P)
            old_MV, pb, mask_M = self._full_logp(mb)
            self.set_flat_params(theta_now_P)
            now_MV, _, _ = self._full_logp(mb)
            target_M1 = pb.target_M.to(now_MV.device).unsqueeze(-1)
            loss_old += self._surrogate(mb, scatter_tokens(pb, old_MV.gather(-1, target_M1).squeeze(-1)))
            loss_now += self._surrogate(mb, scatter_tokens(pb, now_MV.gather(-1, target_M1).squeeze(-1)))
            kl_sum += float((categorical_kl_NT(old_MV, now_MV) * mask_M).sum())
        self.model.train()
        red = self.rt.reduce_sum
        return red(loss_old), red(loss_now), red(kl_sum) / self.norm.num_tokens
