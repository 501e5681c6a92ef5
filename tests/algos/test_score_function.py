"""The score-function identities of docs/derivation.md, checked numerically on small categorical policies.

Lemma 1: E_{a~pi}[grad log pi(a)] = 0. REINFORCE: E[sum_t grad log pi(a_t|s_t) G_t] = grad J,
computed here through the registered pieces (advantage -> pg loss -> aggregation) and
compared with grad J by enumeration of every trajectory.
"""
import itertools

import torch

from rlhf.algos import ADVANTAGES, LOSS_AGGREGATIONS, POLICY_LOSSES, AdvantageInputs, LossNormalizer
from rlhf.config import AlgoConfig

K = 3  # actions (tokens)


def test_mc_mean_of_the_score_is_zero():
    torch.manual_seed(0)
    theta = torch.tensor([0.3, -1.0, 0.8])
    p = torch.softmax(theta, 0)
    a = torch.multinomial(p, 20_000, replacement=True)
    score_NK = torch.nn.functional.one_hot(a, K).double() - p.double()  # grad_theta log softmax(theta)[a]
    mean, se = score_NK.mean(0), score_NK.std(0) / score_NK.shape[0] ** 0.5
    assert torch.all(mean.abs() < 4 * se), (mean, se)
    # and the score is not trivially zero: single samples are far from 0
    assert score_NK.abs().mean() > 0.3


class TwoStepPolicy(torch.nn.Module):
    """pi(a0) = softmax(theta0), pi(a1 | a0) = softmax(theta1[a0]): a two-token tabular policy."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.theta0 = torch.nn.Parameter(torch.randn(K, generator=g, dtype=torch.float64))
        self.theta1 = torch.nn.Parameter(torch.randn(K, K, generator=g, dtype=torch.float64))

    def logp_NT(self, a_N2: torch.Tensor) -> torch.Tensor:
        lp0 = torch.log_softmax(self.theta0, 0)[a_N2[:, 0]]
        lp1 = torch.log_softmax(self.theta1, 1)[a_N2[:, 0], a_N2[:, 1]]
        return torch.stack([lp0, lp1], 1)


R0 = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64)  # reward of the first token
R1 = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 3.0, 1.0]], dtype=torch.float64)  # of the second
GAMMA = 0.9


def rewards_NT(a_N2):
    return torch.stack([R0[a_N2[:, 0]], R1[a_N2[:, 0], a_N2[:, 1]]], 1)


def exact_grad(policy):
    """grad J, J = sum over all K^2 trajectories of p(traj) (R0 + gamma R1)."""
    a = torch.tensor(list(itertools.product(range(K), repeat=2)))
    J = (policy.logp_NT(a).sum(-1).exp()
         * (rewards_NT(a) * torch.tensor([1.0, GAMMA], dtype=torch.float64)).sum(-1)).sum()
    return torch.autograd.grad(J, list(policy.parameters()))


def sample(policy, N, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        a0 = torch.multinomial(torch.softmax(policy.theta0, 0), N, replacement=True, generator=g)
        a1 = torch.multinomial(torch.softmax(policy.theta1, 1)[a0], 1, generator=g).squeeze(-1)
    return torch.stack([a0, a1], 1)


def pipeline_grads(policy, a_N2, advantage, G, gamma_t=False):
    """The gradient ascent direction the trainer follows: -grad of AGG(PG loss(ADV)), summed over tokens,
    mean over samples.

    `gamma_t`: weight token t by gamma^t, Psi_t = gamma^t G_t for the discounted J (docs/derivation.md#causality).
    """
    N = a_N2.shape[0]
    mask = torch.ones(N, 2, dtype=torch.float64)
    adv, _ = ADVANTAGES.get(advantage)(AdvantageInputs(rewards_NT(a_N2), mask, G), AlgoConfig(gamma=GAMMA))
    if gamma_t:
        adv = adv * torch.tensor([1.0, GAMMA], dtype=torch.float64)
    logp = policy.logp_NT(a_N2)
    loss_NT, _ = POLICY_LOSSES.get("pg")(logp, logp.detach(), adv, mask, AlgoConfig())
    norm = LossNormalizer(num_tokens=2.0 * N, num_seqs=float(N), max_tokens=1.0)
    loss = LOSS_AGGREGATIONS.get("seq_mean_token_sum_norm")(loss_NT, mask, norm)
    return [-g for g in torch.autograd.grad(loss, list(policy.parameters()))]


def test_reinforce_reward_to_go_matches_the_exact_gradient():
    """Mean and standard error of the per-batch estimate over 200 batches, against the exact gradient.

    The registered `reinforce` returns G_t = sum_{tau>=t} gamma^(tau-t) R_tau; the
    unbiased Psi_t for the discounted J is gamma^t G_t (with gamma = 1 they coincide).
    """
    policy = TwoStepPolicy()
    exact = torch.cat([g.reshape(-1) for g in exact_grad(policy)])
    ests = torch.stack([torch.cat([g.reshape(-1)
                                   for g in pipeline_grads(policy, sample(policy, 64, s), "reinforce", 1, True)])
                        for s in range(200)])
    mean, se = ests.mean(0), ests.std(0) / ests.shape[0] ** 0.5
    assert torch.all((mean - exact).abs() < 4 * se + 1e-9), (mean, exact, se)
    assert exact.abs().max() > 0.05  # a non-trivial gradient
    # without the gamma^t weight (the common practice with gamma < 1) the second token's gradient is off by 1/gamma
    plain = torch.stack([torch.cat([g.reshape(-1)
                                    for g in pipeline_grads(policy, sample(policy, 64, s), "reinforce", 1)])
                         for s in range(200)]).mean(0)
    assert torch.any((plain - exact).abs() > 4 * se + 1e-9)


def test_rloo_matches_the_exact_gradient():
    # the leave-one-out baseline is independent of the sample, so RLOO stays unbiased (outcome = discounted sum)
    policy = TwoStepPolicy()
    exact = torch.cat([g.reshape(-1) for g in exact_grad(policy)])

    def outcome_grads(a_N2, G=4):
        # RLOO scores whole sequences: put the discounted return on the last token
        N = a_N2.shape[0]
        r = rewards_NT(a_N2)
        score = r[:, 0] + GAMMA * r[:, 1]
        mask = torch.ones(N, 2, dtype=torch.float64)
        adv, _ = ADVANTAGES.get("rloo")(AdvantageInputs(torch.stack([torch.zeros(N, dtype=torch.float64), score], 1),
                                                        mask, G), AlgoConfig())
        logp = policy.logp_NT(a_N2)
        loss = (POLICY_LOSSES.get("pg")(logp, logp.detach(), adv, mask, AlgoConfig())[0]).sum() / N
        return -torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(policy.parameters()))])

    ests = torch.stack([outcome_grads(sample(policy, 64, s)) for s in range(200)])
    mean, se = ests.mean(0), ests.std(0) / ests.shape[0] ** 0.5
    assert torch.all((mean - exact).abs() < 4 * se + 1e-9), (mean, exact, se)


def test_a_broken_estimator_would_be_caught():
    """Sanity of the check itself: dropping the causality structure the wrong way (future rewards
    only, no present reward) is biased, and the same test detects it."""
    policy = TwoStepPolicy()
    exact = torch.cat([g.reshape(-1) for g in exact_grad(policy)])
    ests = []
    for s in range(200):
        a = sample(policy, 64, s)
        logp = policy.logp_NT(a)
        r = rewards_NT(a)
        adv = torch.stack([GAMMA * r[:, 1], torch.zeros_like(r[:, 1])], 1)  # wrong: shifted reward-to-go
        loss = (-adv * logp).sum() / a.shape[0]
        ests.append(-torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(policy.parameters()))]))
    ests = torch.stack(ests)
    mean, se = ests.mean(0), ests.std(0) / ests.shape[0] ** 0.5
    assert torch.any((mean - exact).abs() > 4 * se + 1e-9)
