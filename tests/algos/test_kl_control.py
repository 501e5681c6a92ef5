import pytest

from rlhf.algos.kl_control import KLController


def test_fixed_controller_never_changes():
    c = KLController(0.04)
    assert c.update(10.0, 64) == 0.04


def test_adaptive_controller_moves_towards_target_and_restores():
    c = KLController(0.1, target=6.0, horizon=100)
    assert c.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    c2 = KLController(0.1, target=6.0, horizon=100)
    assert c2.update(3.0, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert c2.update(6.0, 10) == pytest.approx(0.1 * (1 - 0.02))  # on target: unchanged
    c3 = KLController(0.5, target=6.0)
    c3.load_state_dict(c.state_dict())
    assert c3.coef == c.coef
