import torch

from rlhf.algos import LOSS_AGGREGATIONS, POLICY_LOSSES, LossNormalizer
from rlhf.config import AlgoConfig


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
    loss, stats = POLICY_LOSSES.get("ppo_clip")(logp, torch.zeros(1, 2), torch.tensor([[-1.0, 1.0]]), torch.ones(1, 2), cfg)
    assert torch.allclose(loss, torch.tensor([[3.0, -1.2]]))
    assert stats["dual_clipfrac"] == 0.5


def test_aggregations_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    norm = LossNormalizer(num_tokens=4, num_seqs=2, max_tokens=5)
    assert LOSS_AGGREGATIONS.get("token_mean")(loss, mask, norm) == 10 / 4
    assert LOSS_AGGREGATIONS.get("seq_mean_token_mean")(loss, mask, norm) == (2 + 4) / 2
    assert LOSS_AGGREGATIONS.get("seq_mean_token_sum_norm")(loss, mask, norm) == 10 / (2 * 5)


def test_token_mean_is_invariant_to_micro_batching_with_fixed_normaliser():
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    norm = LossNormalizer(float(mask.sum()), 6, 5)
    for name in LOSS_AGGREGATIONS.names():
        agg = LOSS_AGGREGATIONS.get(name)
        whole = agg(loss, mask, norm)
        parts = sum(agg(loss[i: i + 2], mask[i: i + 2], norm) for i in range(0, 6, 2))
        assert torch.allclose(whole, parts, atol=1e-6), name


def test_ppo_clip_has_pg_gradient_at_ratio_one():
    torch.manual_seed(0)
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    l1, _ = POLICY_LOSSES.get("ppo_clip")(logp, logp.detach(), adv, mask, AlgoConfig())
    g1, = torch.autograd.grad(l1.sum(), logp)
    l2, _ = POLICY_LOSSES.get("pg")(logp, logp.detach(), adv, mask, AlgoConfig())
    g2, = torch.autograd.grad(l2.sum(), logp)
    assert torch.allclose(g1, g2) and torch.allclose(g1, -adv)
