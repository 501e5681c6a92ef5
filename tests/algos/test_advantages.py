import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf.algos import ADVANTAGES, AdvantageInputs
from rlhf.algos.advantages import discounted_returns
from rlhf.config import AlgoConfig
from rlhf.trainers.experience import score_at_last_token


def outcome_inputs(scores, G, T=3, lengths=None):
    scores = torch.tensor(scores, dtype=torch.float32)
    N = len(scores)
    mask = torch.ones(N, T)
    if lengths:
        for i, L in enumerate(lengths):
            mask[i, L:] = 0
    return AdvantageInputs(score_at_last_token(scores, mask), mask, G)


def test_grpo_hand_computed():
    cfg = AlgoConfig(std_eps=0.0)
    adv, _ = ADVANTAGES.get("grpo")(outcome_inputs([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0], G=4), cfg)
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: mean 2.75, std 1.5
    s1 = math.sqrt(1 / 3)
    expected = torch.tensor([0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1, -0.5, -0.5, -0.5, 1.5])
    assert torch.allclose(adv[:, 0], expected, atol=1e-6)
    assert torch.allclose(adv, expected[:, None].expand(8, 3), atol=1e-6)  # every token of a sample


def test_grpo_all_equal_group_is_zero_and_padding_is_zero():
    adv, _ = ADVANTAGES.get("grpo")(outcome_inputs([1.0, 1.0, 0.0, 1.0], G=2, lengths=[3, 1, 2, 3]), AlgoConfig())
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    assert adv[2, 2] == 0 and adv[2, 0] < 0 and adv[3, 0] > 0


def test_dr_grpo_and_reinforce_baseline_subtract_mean_only():
    inp = outcome_inputs([3.0, 1.0, 0.0, 0.0], G=2)
    for name in ("dr_grpo", "reinforce_baseline"):
        adv, _ = ADVANTAGES.get(name)(inp, AlgoConfig())
        assert torch.allclose(adv[:, 0], torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_rloo_leave_one_out():
    adv, _ = ADVANTAGES.get("rloo")(outcome_inputs([1.0, 2.0, 6.0], G=3), AlgoConfig())
    assert torch.allclose(adv[:, 0], torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))


def test_nan_scores_get_zero_advantage_and_are_left_out_of_stats():
    adv, _ = ADVANTAGES.get("grpo")(outcome_inputs([1.0, float("nan"), 0.0, 1.0], G=4), AlgoConfig(std_eps=0.0))
    assert adv[1].abs().sum() == 0 and torch.isfinite(adv).all()
    # stats over [1, 0, 1]: mean 2/3, std sqrt(1/3)
    assert adv[0, 0] == pytest.approx((1 - 2 / 3) / math.sqrt(1 / 3), rel=1e-5)


def test_reinforce_reward_to_go_with_gamma():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    ret = discounted_returns(rewards, mask, gamma=0.5)
    assert torch.allclose(ret, torch.tensor([[1 + 0.25 * 2, 0.5 * 2, 2.0, 0.0]]))
    adv, _ = ADVANTAGES.get("reinforce")(AdvantageInputs(rewards, mask, 1), AlgoConfig(gamma=0.5))
    assert torch.allclose(adv, ret)


def test_gae_hand_computed_trajectory():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    m = torch.ones(1, 3)
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + g * 0.7 - 0.6
    d0 = 0.0 + g * 0.6 - 0.5
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    adv, ret = ADVANTAGES.get("gae")(AdvantageInputs(r, m, 1, v), AlgoConfig(gamma=g, lam=lam))
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]), atol=1e-6)
    assert torch.allclose(ret, adv + v, atol=1e-6)
    assert ADVANTAGES.meta("gae") == {"needs_values": True}


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.data())
def test_group_advantages_sum_to_zero(B, G, data):
    scores = data.draw(st.lists(st.floats(-10, 10), min_size=B * G, max_size=B * G))
    inp = outcome_inputs(scores, G)
    for name in ("grpo", "rloo", "reinforce_baseline", "dr_grpo"):
        adv, _ = ADVANTAGES.get(name)(inp, AlgoConfig())
        assert torch.allclose(adv[:, 0].view(B, G).sum(-1), torch.zeros(B), atol=1e-3), name


def test_reinforce_baseline_is_reward_to_go_minus_group_mean_of_returns():
    # two samples of one prompt, per-token rewards (KL in the reward), gamma = 0.5
    rewards = torch.tensor([[0.0, -0.5, 2.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    cfg = AlgoConfig(gamma=0.5)
    adv, ret = ADVANTAGES.get("reinforce_baseline")(AdvantageInputs(rewards, mask, 2), cfg)
    g_a = [0.0 + 0.5 * -0.5 + 0.25 * 2.0, -0.5 + 0.5 * 2.0, 2.0]  # [0.25, 0.5, 2.0]
    g_b = [1.0, 0.0]
    b = (g_a[0] + g_b[0]) / 2  # 0.625
    assert torch.allclose(adv, torch.tensor([[g_a[0] - b, g_a[1] - b, g_a[2] - b], [g_b[0] - b, g_b[1] - b, 0.0]]))
    assert torch.allclose(ret, torch.tensor([g_a, g_b + [0.0]]))
    dr, _ = ADVANTAGES.get("dr_grpo")(AdvantageInputs(rewards, mask, 2), cfg)
    assert not torch.allclose(adv, dr)  # token-level, not the sequence score on every token


def test_reinforce_pp_whitens_reward_to_go_over_the_batch():
    rewards = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    mask = torch.ones(2, 2)
    adv, ret = ADVANTAGES.get("reinforce_pp")(AdvantageInputs(rewards, mask, 1), AlgoConfig(gamma=1.0))
    flat = torch.tensor([1.0, 1.0, 3.0, 3.0])  # reward-to-go of every token
    expected = (flat - 2.0) / flat.std()
    assert torch.allclose(ret, flat.view(2, 2)) and torch.allclose(adv.reshape(-1), expected, atol=1e-6)


def test_td_and_nstep_td_hand_computed():
    r = torch.tensor([[0.0, 1.0, 2.0]])
    v = torch.tensor([[0.5, 0.25, 1.0]])
    m = torch.ones(1, 3)
    g = 0.5
    adv, ret = ADVANTAGES.get("td")(AdvantageInputs(r, m, 1, v), AlgoConfig(gamma=g))
    assert torch.allclose(ret, torch.tensor([[0 + g * 0.25, 1 + g * 1.0, 2 + 0.0]]))
    assert torch.allclose(adv, ret - v)
    adv2, ret2 = ADVANTAGES.get("nstep_td")(AdvantageInputs(r, m, 1, v), AlgoConfig(gamma=g, n_step=2))
    assert torch.allclose(ret2, torch.tensor([[0 + g * 1 + g**2 * 1.0, 1 + g * 2, 2.0]]))
    assert torch.allclose(adv2, ret2 - v)


def test_critic_estimators_need_values_and_declare_it():
    inp = outcome_inputs([1.0, 0.0], G=2)
    for name in ("td", "nstep_td", "gae"):
        assert ADVANTAGES.meta(name).get("needs_values") is True
        with pytest.raises(ValueError, match=f"advantage '{name}' needs critic values"):
            ADVANTAGES.get(name)(inp, AlgoConfig())
    group = {n for n in ADVANTAGES.names() if ADVANTAGES.meta(n).get("group_relative")}
    assert group == {"grpo", "dr_grpo", "rloo", "reinforce_baseline"}


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.floats(0.0, 1.0), st.data())
def test_gae_limits_are_mc_minus_v_and_td1(N, T, gamma, data):
    floats = st.floats(-5, 5, allow_nan=False)
    r = torch.tensor(data.draw(st.lists(floats, min_size=N * T, max_size=N * T))).view(N, T)
    v = torch.tensor(data.draw(st.lists(floats, min_size=N * T, max_size=N * T))).view(N, T)
    lengths = data.draw(st.lists(st.integers(1, T), min_size=N, max_size=N))
    m = torch.zeros(N, T)
    for i, L in enumerate(lengths):
        m[i, :L] = 1
    r, v = r * m, v * m
    inp = AdvantageInputs(r, m, 1, v)
    adv1, _ = ADVANTAGES.get("gae")(inp, AlgoConfig(gamma=gamma, lam=1.0))
    assert torch.allclose(adv1, (discounted_returns(r, m, gamma) - v) * m, atol=1e-4)
    adv0, _ = ADVANTAGES.get("gae")(inp, AlgoConfig(gamma=gamma, lam=0.0))
    td1, _ = ADVANTAGES.get("td")(inp, AlgoConfig(gamma=gamma))
    assert torch.allclose(adv0, td1, atol=1e-5)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_baseline"])
def test_a_group_of_equal_scores_gets_exactly_zero_advantage(name):
    """1.344090266 three times averages 1 ulp off in fp32; GRPO then divided 1e-7 deviations by a 1e-7 std."""
    inp = outcome_inputs([1.344090266001066] * 3 + [0.0, 1.0, 0.5], 3)
    adv, _ = ADVANTAGES.get(name)(inp, AlgoConfig())
    assert adv.dtype == torch.float32
    assert torch.equal(adv[:3], torch.zeros_like(adv[:3])) and adv[3:].abs().sum() > 0


@pytest.mark.parametrize("T", [1, 3])
def test_reinforce_pp_gives_exactly_zero_when_every_return_is_equal(T):
    """Every sample scores 0.7 (not exact in binary), mask all ones, gamma 1: the returns are all equal, so every
    advantage is 0 (fp32 statistics gave +0.81 / +0.84 on every token: a mean one ulp off over a std of ~1e-7)."""
    N = 8
    rewards = torch.zeros(N, T)
    rewards[:, -1] = 0.7
    adv, ret = ADVANTAGES.get("reinforce_pp")(AdvantageInputs(rewards, torch.ones(N, T), 4), AlgoConfig(gamma=1.0))
    assert torch.all(ret == ret[0, 0]) and torch.count_nonzero(adv) == 0


# ---------------------------------------------------------------------------- tokens that are not time steps

def _with_holes(x_NT, holes, fill=0.0):
    """x_NT with extra columns inserted before the positions in `holes` (filled with `fill`)."""
    cols = []
    for t in range(x_NT.shape[1]):
        if t in holes:
            cols += [torch.full_like(x_NT[:, :1], fill)] * holes[t]
        cols.append(x_NT[:, t: t + 1])
    return torch.cat(cols, dim=1)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce", "reinforce_baseline", "reinforce_pp", "td",
                                  "nstep_td", "gae"])
def test_tokens_that_are_not_actions_are_not_time_steps(name):
    """A completion with tool-result tokens between the policy's tokens (mask 0 inside the row) gets, on its
    actions, exactly the advantages and returns of the same completion without them; 0 on them."""
    torch.manual_seed(0)
    N, T, G = 4, 6, 2
    rewards = torch.randn(N, T) * (torch.rand(N, T) < 0.5)  # dense, KL-in-reward-like rewards
    mask = torch.ones(N, T)
    mask[1, 4:] = 0
    values = torch.randn(N, T)
    cfg = AlgoConfig(gamma=0.9, lam=0.8, n_step=2)
    plain = ADVANTAGES.get(name)(AdvantageInputs(rewards * mask, mask, G, values * mask), cfg)
    holes = {2: 3, 5: 1}  # 3 environment tokens before action 2, 1 before action 5
    env_values = _with_holes(values, holes, fill=123.0)  # whatever the critic says there is ignored
    holed = ADVANTAGES.get(name)(AdvantageInputs(_with_holes(rewards * mask, holes), _with_holes(mask, holes),
                                                 G, env_values * _with_holes(mask, holes)), cfg)
    keep = _with_holes(torch.ones(1, T), holes).bool()[0]
    for a, b in zip(plain, holed):
        assert torch.equal(b[:, ~keep], torch.zeros_like(b[:, ~keep]))
        assert torch.allclose(b[:, keep], a, atol=1e-6), name


def test_a_reward_on_a_tool_token_changes_nothing():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]])
    plain = torch.tensor([[0.0, 2.0, 0.0, 0.0, 1.0]])
    on_tool = plain + torch.tensor([[0.0, 0.0, 5.0, -3.0, 0.0]])
    cfg = AlgoConfig(gamma=0.5)
    a = ADVANTAGES.get("reinforce")(AdvantageInputs(on_tool, mask, 1), cfg)[0]
    b = ADVANTAGES.get("reinforce")(AdvantageInputs(plain, mask, 1), cfg)[0]
    assert torch.equal(a, b) and a[0, 1] == 2.5  # discounted once, over one action, not three tokens
