import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.algos import LOSS_AGGREGATIONS, POLICY_LOSSES, LossNormalizer
from rlhf.config import AlgoConfig


def test_pg_hand_computed():
    logp = torch.tensor([[-1.0, -2.0]])
    loss, stats = POLICY_LOSSES.get("pg")(logp, logp, torch.tensor([[2.0, -1.0]]), torch.ones(1, 2), AlgoConfig())
    assert torch.allclose(loss, torch.tensor([[2.0, -2.0]])) and stats == {}
    assert POLICY_LOSSES.meta("pg") == {"on_policy": True}


def test_ppo_clip_hand_computed():
    cfg = AlgoConfig(eps_low=0.2, eps_high=0.3)
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    adv = torch.tensor([[1.0, -1.0, -2.0, 1.0]])
    loss, stats = POLICY_LOSSES.get("ppo_clip")(logp, old, adv, torch.ones(1, 4), cfg)
    # A>0, r=1.5 -> clipped at 1.3; A<0, r=0.5 -> max(0.5, 0.8)=0.8 -> loss 0.8; A<0 r=1.1 -> 2.2; A>0 r=0.7 -> 0.7
    assert torch.allclose(loss, torch.tensor([[-1.3, 0.8, 2.2, -0.7]]), atol=1e-6)
    assert stats["clipfrac"] == 0.5


def test_dual_clip_caps_negative_advantage_loss():
    cfg = AlgoConfig(dual_clip=3.0)
    logp = torch.log(torch.tensor([[5.0, 5.0]]))
    loss, stats = POLICY_LOSSES.get("ppo_clip")(logp, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2),
                                                cfg)
    assert torch.allclose(loss, torch.tensor([[3.0, -1.2]]))
    assert stats["dual_clipfrac"] == 0.5


def test_gspo_uses_one_sequence_ratio_per_sample():
    cfg = AlgoConfig(eps_low=0.1, eps_high=0.1)
    old = torch.zeros(2, 2)
    # sample 0: token log-ratios 0.2 and 0.0 -> s = exp(0.1) ~ 1.105 (inside 1.1? no: clipped for A > 0)
    # sample 1: log-ratios 0.1 and -0.1 -> s = 1 even though the token ratios differ
    logp = torch.tensor([[0.2, 0.0], [0.1, -0.1]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    loss, stats = POLICY_LOSSES.get("gspo")(logp, old, adv, torch.ones(2, 2), cfg)
    assert torch.allclose(loss, torch.tensor([[-1.1, -1.1], [-2.0, -2.0]]), atol=1e-6)
    assert stats["clipfrac"] == 0.5
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.allclose(grad, torch.tensor([[0.0, 0.0], [-2.0, -2.0]]))  # clipped sample: no gradient


def test_cispo_clips_the_weight_but_keeps_the_gradient():
    cfg = AlgoConfig(eps_low=0.2, eps_high=0.2)
    logp = torch.log(torch.tensor([[2.0, 1.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = POLICY_LOSSES.get("cispo")(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), cfg)
    assert torch.allclose(loss, torch.tensor([[-1.2 * math.log(2.0), 0.0]]), atol=1e-6)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.allclose(grad, torch.tensor([[-1.2, 1.0]]))  # PPO would give 0 for the clipped token
    assert stats["clipfrac"] == 0.5


def test_aggregations_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    norm = LossNormalizer(num_tokens=4, num_seqs=2, max_tokens=5)
    assert LOSS_AGGREGATIONS.get("token_mean")(loss, mask, norm) == 10 / 4
    assert LOSS_AGGREGATIONS.get("seq_mean_token_mean")(loss, mask, norm) == (2 + 4) / 2
    assert LOSS_AGGREGATIONS.get("seq_mean_token_sum_norm")(loss, mask, norm) == 10 / (2 * 5)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(1, 6), st.integers(1, 4), st.integers(0, 10_000))
def test_aggregations_do_not_change_when_split_into_micro_batches(N, T, mbs, seed):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(N, T, generator=g)
    mask = (torch.rand(N, T, generator=g) > 0.3).float()
    norm = LossNormalizer(max(1.0, float(mask.sum())), N, T)
    for name in LOSS_AGGREGATIONS.names():
        agg = LOSS_AGGREGATIONS.get(name)
        whole = agg(loss, mask, norm)
        parts = sum(agg(loss[i: i + mbs], mask[i: i + mbs], norm) for i in range(0, N, mbs))
        assert torch.allclose(whole, parts, atol=1e-5), name


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 10_000))
def test_ratio_losses_have_the_pg_gradient_at_ratio_one(N, T, seed):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(N, T, generator=g) * 5).requires_grad_(True)
    adv = torch.randn(N, T, generator=g)
    mask = torch.ones(N, T)
    cfg = AlgoConfig(dual_clip=3.0)
    l_pg, _ = POLICY_LOSSES.get("pg")(logp, logp.detach(), adv, mask, cfg)
    (g_pg,) = torch.autograd.grad(l_pg.sum(), logp)
    assert torch.allclose(g_pg, -adv)
    for name in ("ppo_clip", "gspo", "cispo"):
        loss, _ = POLICY_LOSSES.get(name)(logp, logp.detach(), adv, mask, cfg)
        (grad,) = torch.autograd.grad(loss.sum(), logp)
        assert torch.allclose(grad, g_pg, atol=1e-6), name
