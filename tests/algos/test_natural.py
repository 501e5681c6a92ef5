import math

import pytest
import torch

from rlhf.algos.natural import (
    assign_flat_,
    backtracking_line_search,
    categorical_kl_NT,
    conjugate_gradient,
    flatten,
    hessian_vector_product,
    natural_step,
    self_kl_NT,
)


def spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.T + 0.5 * torch.eye(n, dtype=torch.float64)


def test_conjugate_gradient_solves_an_explicit_spd_system():
    F = spd(8)
    b = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x, residual = conjugate_gradient(lambda v: F @ v, b, iters=8)
    assert torch.allclose(F @ x, b, atol=1e-8) and residual < 1e-12
    x_few, res_few = conjugate_gradient(lambda v: F @ v, b, iters=2)
    assert res_few > 1e-6  # two iterations are not enough: the residual reports it


def test_hessian_vector_product_by_double_backprop():
    F = spd(5)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(0.5 * theta @ F @ theta + theta.sin().sum(), [theta], create_graph=True)
    v = torch.randn(5, dtype=torch.float64)
    hv = hessian_vector_product(g, [theta], v)
    assert torch.allclose(hv, F @ v - theta.detach().sin() * v)
    assert torch.allclose(hessian_vector_product(g, [theta], v), hv)  # the graph is kept for the next CG step


def test_self_kl_hessian_is_the_categorical_fisher():
    """For pi = softmax(theta): Hessian of KL(sg[pi] || pi) = E[score score^T] = diag(p) - p p^T."""
    theta = torch.tensor([[0.2, -1.0, 0.7, 0.0]], dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(theta, -1).unsqueeze(0)  # [N=1, T=1, V=4]
    kl = self_kl_NT(logp).sum()
    assert abs(float(kl.detach())) < 1e-12
    (g,) = torch.autograd.grad(kl, [theta], create_graph=True)
    p = torch.softmax(theta.detach(), -1).reshape(-1)
    fisher = torch.diag(p) - torch.outer(p, p)
    for seed in range(3):
        v = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(hessian_vector_product(g.reshape(-1), [theta], v), fisher @ v)


def test_categorical_kl_hand_computed():
    old = torch.log(torch.tensor([[[0.5, 0.5]]]))
    new = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert categorical_kl_NT(old, new).item() == pytest.approx(expected)


def test_natural_step_spends_exactly_the_kl_budget_of_the_quadratic_model():
    F = spd(6, seed=3)
    g = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    step = natural_step(g, lambda v: F @ v, max_kl=0.01, cg_iters=6)
    x = torch.linalg.solve(F, g)
    assert torch.allclose(step.delta_P, -math.sqrt(0.02 / float(x @ F @ x)) * x)
    assert float(step.delta_P @ F @ step.delta_P) / 2 == pytest.approx(0.01)
    assert step.expected_improvement == pytest.approx(float(-g @ step.delta_P)) and step.expected_improvement > 0
    zero = natural_step(torch.zeros(6, dtype=torch.float64), lambda v: F @ v, 0.01)
    assert zero.step_size == 0 and torch.equal(zero.delta_P, torch.zeros(6, dtype=torch.float64))


def test_line_search_rejects_steps_over_the_kl_budget_or_without_improvement():
    tried = []

    def evaluate(fraction):  # KL grows as fraction^2, improvement is positive only below 0.3
        tried.append(fraction)
        return (1.0 if fraction < 0.3 else -1.0), 0.04 * fraction**2

    res = backtracking_line_search(evaluate, max_kl=0.02, backtrack_coef=0.5, max_backtracks=5)
    # 1.0: KL 0.04 > 0.02 rejected; 0.5: KL 0.01 ok but no improvement; 0.25: accepted
    assert tried == [1.0, 0.5, 0.25] and res.accepted and res.fraction == 0.25 and res.tries == 3
    assert res.kl == pytest.approx(0.04 / 16)
    never = backtracking_line_search(lambda f: (1.0, float("nan")), max_kl=0.02, max_backtracks=2)
    assert not never.accepted and never.fraction == 0.0 and never.tries == 3


def test_flat_parameters_round_trip_without_aliasing():
    params = [torch.zeros(2, 3), torch.zeros(4)]
    flat = torch.arange(10.0)
    assign_flat_(params, flat)
    assert torch.equal(flatten(params), flat)
    flat += 1  # the parameters hold copies
    assert params[1][0] == 6.0
    with pytest.raises(ValueError, match="flat vector has 3 entries"):
        assign_flat_(params, torch.zeros(3))
