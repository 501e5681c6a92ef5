"""Natural-gradient math for NPG and TRPO: Fisher-vector products by double backprop,
conjugate gradient, the KL-budget step size and the backtracking line search.

The constrained problem of docs/derivation.md#natural-gradient (Kakade 2001; Schulman et al. 2015, TRPO):

    min_theta  L(theta)    subject to    mean_t KL(pi_old(.|s_t) || pi_theta(.|s_t)) <= delta

Around theta_old, L ~ g^T d and the mean KL ~ d^T F d / 2 with F the Fisher matrix (the
Hessian of the mean KL at theta_old). The solution is d = -sqrt(2 delta / x^T F x) x with
x = F^-1 g, found by conjugate gradient using only products F v, so F is never formed.

Everything here is a pure function of tensors and callables: parameters are handled as one
flat vector (`flatten`, `assign_flat_`), `F v` comes from `hessian_vector_product` of the
KL, and the line search takes an `evaluate(fraction)` callback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

FVP = Callable[[Tensor], Tensor]  # v_P -> (F v)_P on the flat parameter vector


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """One flat vector (P,) from a list of tensors (for example parameters or their gradients)."""
    return torch.cat([t.reshape(-1) for t in tensors])


@torch.no_grad()
def assign_flat_(params: Sequence[Tensor], flat_P: Tensor) -> None:
    """Copy the flat vector into the parameters in place (no aliasing of `flat_P`)."""
    total = sum(p.numel() for p in params)
    if total != flat_P.numel():
        raise ValueError(f"flat vector has {flat_P.numel()} entries, the parameters {total}")
    i = 0
    for p in params:
        n = p.numel()
        p.copy_(flat_P[i: i + n].view_as(p))
        i += n


def surrogate_loss_NT(logp_NT: Tensor, old_logp_NT: Tensor, adv_NT: Tensor) -> Tensor:
    """-r_t A_t, r_t = pi/pi_old: the surrogate advantage L(theta, theta_old) (docs/derivation.md#trpo),
    negated, per token [N, T].

    TRPO's line search measures the improvement of this surrogate (Schulman et al. 2015, eq. 14).
    Its gradient at theta_old is -A grad log pi, the gradient every registered policy loss has
    at ratio 1, so it is consistent with the natural-gradient direction whatever `algo.policy_loss` is.
    """
    return -torch.exp((logp_NT - old_logp_NT).clamp(-20.0, 20.0)) * adv_NT


def categorical_kl_NT(old_logp_NTV: Tensor, logp_NTV: Tensor) -> Tensor:
    """KL(p_old || p) per position, exact over the vocabulary: sum_v p_old (log p_old - log p).

    Both arguments are log-softmax outputs [..., V] (for example [N, T, V] or [M, V]); the result is [...].
    """
    return (old_logp_NTV.exp() * (old_logp_NTV - logp_NTV)).sum(-1)


def self_kl_NT(logp_NTV: Tensor) -> Tensor:
    """KL(sg[pi] || pi) per position ([..., V] -> [...]): value 0 and gradient 0 at the current parameters,
    but its Hessian there is the Fisher matrix (the input of `hessian_vector_product`)."""
    return categorical_kl_NT(logp_NTV.detach(), logp_NTV)


def hessian_vector_product(grad_P: Tensor, params: Sequence[Tensor], v_P: Tensor) -> Tensor:
    """(H v)_P by double backprop: d/dtheta (grad_P . v), with `grad_P` built with create_graph=True.

    The graph of `grad_P` is kept, so one first-order pass serves every CG iteration.
    """
    hv = torch.autograd.grad(grad_P @ v_P, list(params), retain_graph=True, allow_unused=True)
    return flatten([torch.zeros_like(p) if h is None else h for h, p in zip(hv, params)])


def conjugate_gradient(fvp: FVP, b_P: Tensor, iters: int = 10, residual_tol: float = 1e-10) -> tuple[Tensor, float]:
    """x_P with F x ~ b for a symmetric positive-definite F given by products (Hestenes & Stiefel 1952).

    Returns (x_P, final squared residual ||b - F x||^2). Exact after P iterations in exact
    arithmetic; TRPO uses about 10.
    """
    x = torch.zeros_like(b_P)
    r = b_P.clone()
    p = b_P.clone()
    rr = float(r @ r)
    for _ in range(iters):
        if rr <= residual_tol:
            break
        Ap = fvp(p)
        pAp = float(p @ Ap)
        if pAp <= 0:  # F is not positive definite along p (numerical noise): stop with what we have
            break
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x, rr


@dataclass
class NaturalStep:
    delta_P: Tensor  # the parameter change theta_new - theta_old (zero when there is nothing to do)
    step_size: float  # sqrt(2 max_kl / x^T F x)
    expected_improvement: float  # -g^T delta: the first-order decrease of the loss
    predicted_kl: float  # delta^T F delta / 2 (= max_kl unless skipped)
    cg_residual: float


def natural_step(g_P: Tensor, fvp: FVP, max_kl: float, cg_iters: int = 10, damping: float = 0.0) -> NaturalStep:
    """The natural-gradient step for the loss gradient `g_P` under the KL budget `max_kl`.

    x = (F + damping I)^-1 g by conjugate gradient; delta = -sqrt(2 max_kl / x^T (F + damping I) x) x
    (Kakade 2001; Schulman et al. 2015, Appendix C). If g = 0 or the curvature is not
    positive the step is zero.
    """
    def damped(v_P: Tensor) -> Tensor:
        return fvp(v_P) + damping * v_P

    x_P, residual = conjugate_gradient(damped, g_P, cg_iters)
    xFx = float(x_P @ damped(x_P))
    gx = float(g_P @ x_P)
    if not (xFx > 0 and gx > 0 and math.isfinite(xFx) and math.isfinite(gx)):
        return NaturalStep(torch.zeros_like(g_P), 0.0, 0.0, 0.0, residual)
    scale = math.sqrt(2.0 * max_kl / xFx)
    return NaturalStep(-scale * x_P, scale, scale * gx, 0.5 * scale * scale * xFx, residual)


@dataclass
class LineSearchResult:
    accepted: bool
    fraction: float  # of the full step that was accepted (0 when rejected)
    improvement: float  # measured loss decrease at the accepted step
    kl: float  # measured mean KL(pi_old || pi) at the accepted step (or at the last try)
    tries: int


def backtracking_line_search(
    evaluate: Callable[[float], tuple[float, float]],
    max_kl: float,
    backtrack_coef: float = 0.5,
    max_backtracks: int = 10,
) -> LineSearchResult:
    """TRPO's line search (Schulman et al. 2015, Section 6): try fractions 1, c, c^2, ... of the
    full step; accept the first with measured mean KL <= max_kl and a positive loss decrease.

    `evaluate(fraction) -> (improvement, kl)` measures the loss decrease and the mean KL at
    theta_old + fraction * delta. NaN measurements are rejected. If no fraction is accepted
    the caller keeps theta_old.
    """
    kl = float("nan")
    for k in range(max_backtracks + 1):
        fraction = backtrack_coef**k
        improvement, kl = evaluate(fraction)
        if kl <= max_kl and improvement > 0:
            return LineSearchResult(True, fraction, improvement, kl, k + 1)
    return LineSearchResult(False, 0.0, 0.0, kl, max_backtracks + 1)
