import torch

from rlhf.algos.dapo import informative_groups, overlong_penalty

nan = float("nan")


def test_informative_groups_drop_equal_and_underscored_groups():
    scores = torch.tensor([1.0, 1.0, 1.0,  0.0, 1.0, 0.0,  2.0, nan, 2.0,  nan, nan, 3.0,  nan, 0.0, 1.0])
    assert informative_groups(scores, 3).tolist() == [False, True, False, False, True]


def test_overlong_penalty_follows_dapo():
    lengths = torch.tensor([0, 12, 13, 14, 16, 20])
    # L_max = 16, L_cache = 4: no penalty up to 12, linear to -1 at 16, -1 beyond
    pen = overlong_penalty(lengths, max_len=16, buffer=4, penalty=0.5)
    assert torch.allclose(pen, 0.5 * torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    assert torch.equal(overlong_penalty(lengths, 16, 0), torch.zeros(6))
