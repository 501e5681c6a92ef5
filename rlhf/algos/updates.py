"""Update rules: `UPDATES[name](cfg) -> UpdateRule`: how one batch of experience moves the policy.

A rule is either first-order, run by the trainer's one update loop (`rlhf.trainers.update`) with an
optional extra per-token loss term, or one natural-gradient step, a function of a `NaturalProblem`
(implemented by `rlhf.trainers.natural`), so the rules below stay model-free orchestration of the
math in `rlhf.algos.natural`:

- `adamw`: `train.updates_per_batch` passes, one clipped AdamW step per mini-batch each (the default).
- `mdpo`:  the same passes on the loss plus (1/eta) KL(pi || pi_old) (Tomar et al. 2020).
- `npg`:   one natural-gradient step of mean KL `max_kl` (Kakade 2001).
- `trpo`:  the npg step plus a backtracking line search on measured KL and loss (Schulman et al. 2015).

Registry metadata (read by `rlhf.algos.combos`): `single_pass=True` (one step per batch),
`min_passes=k` (needs `train.updates_per_batch >= k`), `needs_old_logp=True` (the rule reads
log pi_old even with one pass: the natural step's line search and measured KL).
The derivations: docs/derivation.md#natural-gradient, #trpo and #mdpo.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from torch import Tensor

from rlhf.algos.kl import kl_to_old
from rlhf.algos.natural import FVP, backtracking_line_search, natural_step
from rlhf.registry import Registry


@dataclass(frozen=True)
class ExtraLoss:
    """A per-token term added to the policy loss: coef * fn(logp_NT, old_logp_NT), logged as `name`."""

    name: str
    coef: float
    fn: Callable[[Tensor, Tensor], Tensor]


class NaturalProblem(Protocol):
    """One batch of experience bound to the policy; every quantity is global over processes."""

    def loss_and_grad(self) -> tuple[Tensor, dict]:
        """(g_P, metrics): the flat gradient of the aggregated loss at the current parameters."""

    def fisher_vector_product(self) -> FVP:
        """v_P -> F v_P, F the Hessian of the mean KL(pi_current || pi) at the current parameters."""

    def flat_params(self) -> Tensor: ...

    def set_flat_params(self, flat_P: Tensor) -> None: ...

    def measure(self, theta_old_P: Tensor) -> tuple[float, float, float]:
        """(surrogate loss at theta_old, surrogate loss now, mean KL(pi_theta_old || pi_now) per token, exact over
        the vocabulary); the surrogate is `natural.surrogate_loss_NT` (+ beta * KL to the reference in the loss)."""


NaturalStepFn = Callable[[NaturalProblem, "object"], dict]


@dataclass(frozen=True)
class UpdateRule:
    """First-order passes with an optional `extra` loss term, or (`natural` set) one natural-gradient step
    `natural(problem, algo_cfg) -> record`."""

    extra: Optional[ExtraLoss] = None
    natural: Optional[NaturalStepFn] = None


UPDATES: Registry[Callable[["object"], UpdateRule]] = Registry("update rule")


@UPDATES.register("adamw")
def adamw(cfg) -> UpdateRule:
    """`train.updates_per_batch` passes over the batch, one AdamW step each (Loshchilov & Hutter 2019)."""
    return UpdateRule()


@UPDATES.register("mdpo", min_passes=2)
def mdpo(cfg) -> UpdateRule:
    """Mirror-descent policy optimisation (Tomar et al. 2020): `train.updates_per_batch` inner Adam
    steps on  loss(theta) + (1/eta) KL(pi_theta || pi_old), eta = `algo.mdpo.eta`.

    The loss is the configured policy objective (the surrogate r A, or its clipped form); the KL is
    `kl_to_old` on the batch's tokens, sampled by pi_old.
    """
    return UpdateRule(extra=ExtraLoss("mdpo/kl_old", 1.0 / cfg.mdpo.eta, kl_to_old))


def _natural(problem: NaturalProblem, cfg) -> tuple[Tensor, Tensor, object, dict]:
    nat = cfg.natural
    theta_old_P = problem.flat_params()
    g_P, record = problem.loss_and_grad()
    step = natural_step(g_P, problem.fisher_vector_product(), nat.max_kl, nat.cg_iters, nat.damping)
    record.update({"natural/step_size": step.step_size, "natural/expected_improvement": step.expected_improvement,
                   "natural/cg_residual": step.cg_residual, "natural/step_norm": float(step.delta_P.norm())})
    return theta_old_P, g_P, step, record


@UPDATES.register("npg", single_pass=True, needs_old_logp=True)
def npg(cfg) -> UpdateRule:
    """Natural policy gradient (Kakade 2001); see `npg_step`."""
    return UpdateRule(natural=npg_step)


@UPDATES.register("trpo", single_pass=True, needs_old_logp=True)
def trpo(cfg) -> UpdateRule:
    """TRPO (Schulman et al. 2015); see `trpo_step`."""
    return UpdateRule(natural=trpo_step)


def npg_step(problem: NaturalProblem, cfg) -> dict:
    """Natural policy gradient (Kakade 2001): theta += -sqrt(2 delta / x^T F x) x, x = F^-1 g by CG.

    g is the gradient of the configured loss at theta_old (where every registered policy loss
    has the same gradient, -A grad log pi, so `algo.policy_loss` changes only its logged
    statistics), delta = `algo.natural.max_kl`, F from double backprop of the mean KL. No line
    search: the measured KL is logged as `natural/kl` (above delta where the quadratic model is off).
    """
    theta_old_P, _, step, record = _natural(problem, cfg)
    problem.set_flat_params(theta_old_P + step.delta_P)
    loss_old, loss_new, kl = problem.measure(theta_old_P)
    record.update({"natural/kl": kl, "natural/improvement": loss_old - loss_new, "natural/accepted": 1.0})
    return record


def trpo_step(problem: NaturalProblem, cfg) -> dict:
    """TRPO (Schulman et al. 2015): the npg step, shrunk by `algo.natural.backtrack_coef` until the
    measured mean KL(pi_old || pi) <= `algo.natural.max_kl` and the surrogate loss -r A
    (+ beta KL to the reference) decreases; if no try passes within `algo.natural.max_backtracks`,
    the parameters stay at theta_old. The surrogate, not the configured loss, is measured:
    CISPO's detached weight, for one, makes its loss value no objective to line-search on.
    """
    nat = cfg.natural
    theta_old_P, _, step, record = _natural(problem, cfg)

    def evaluate(fraction: float) -> tuple[float, float]:
        problem.set_flat_params(theta_old_P + fraction * step.delta_P)
        loss_old, loss_new, kl = problem.measure(theta_old_P)
        return loss_old - loss_new, kl

    if step.step_size > 0:
        result = backtracking_line_search(evaluate, nat.max_kl, nat.backtrack_coef, nat.max_backtracks)
    else:
        result = None
    fraction = result.fraction if result is not None else 0.0
    problem.set_flat_params(theta_old_P + fraction * step.delta_P)
    record.update({
        "natural/accepted": float(result is not None and result.accepted), "natural/fraction": fraction,
        "natural/kl": result.kl if result is not None and result.accepted else 0.0,
        "natural/improvement": result.improvement if result is not None else 0.0,
        "natural/tries": result.tries if result is not None else 0,
    })
    return record
