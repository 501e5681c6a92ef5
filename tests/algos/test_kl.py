import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.algos import KL_ESTIMATORS


def test_kl_hand_computed():
    logp, ref = torch.tensor([0.0]), torch.tensor([-1.0])
    assert torch.allclose(KL_ESTIMATORS.get("k1")(logp, ref), torch.tensor([1.0]))
    assert torch.allclose(KL_ESTIMATORS.get("k2")(logp, ref), torch.tensor([0.5]))
    assert torch.allclose(KL_ESTIMATORS.get("k3")(logp, ref), torch.tensor([torch.e ** -1 - 1 + 1.0]))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-15, 0), min_size=1, max_size=8), st.lists(st.floats(-15, 0), min_size=1, max_size=8))
def test_kl_zero_at_equal_and_k3_nonnegative(a, b):
    n = min(len(a), len(b))
    logp, ref = torch.tensor(a[:n]), torch.tensor(b[:n])
    for name in KL_ESTIMATORS.names():
        assert torch.all(KL_ESTIMATORS.get(name)(logp, logp) == 0), name
    assert torch.all(KL_ESTIMATORS.get("k3")(logp, ref) >= 0)


def test_estimators_are_unbiased_by_enumeration():
    """E_{a~pi}[k1] = E[k3] = KL(pi || ref) exactly; E_{a~old}[kl_to_old(pi, old)] = KL(pi || old)."""
    from rlhf.algos.kl import kl_to_old

    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    exact = float((pi * (pi / ref).log()).sum())
    for name in ("k1", "k3"):
        est = float((pi * KL_ESTIMATORS.get(name)(pi.log(), ref.log())).sum())
        assert abs(est - exact) < 1e-12, name
    # tokens sampled from `ref` playing pi_old: kl_to_old estimates KL(pi || ref)
    assert abs(float((ref * kl_to_old(pi.log(), ref.log())).sum()) - exact) < 1e-12
    assert torch.all(kl_to_old(pi.log(), ref.log()) >= 0)
    assert torch.all(kl_to_old(pi.log(), pi.log()) == 0)
