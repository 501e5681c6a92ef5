import torch
from hypothesis import given, settings, strategies as st

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
