import math

import pytest
import torch

from rlhf.algos import IS_CORRECTIONS, logp_gap

# ratios pi_old/pi_sampler: row 0 = [1, 3, 0.5], row 1 = [1.5, 1.2, padding]
OLD = torch.log(torch.tensor([[1.0, 3.0, 0.5], [1.5, 1.2, 10.0]]))  # 10: padding, must be ignored
SAMPLER = torch.zeros(2, 3)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def weights(name, cap=2.0):
    w, stats = IS_CORRECTIONS.get(name)(OLD, SAMPLER, MASK, cap)
    return w * MASK, stats


def test_none_is_one():
    w, stats = weights("none")
    assert torch.equal(w, MASK) and stats == {}


def test_token_truncate_caps_the_ratio():
    w, stats = weights("token_truncate")
    assert torch.allclose(w, torch.tensor([[1.0, 2.0, 0.5], [1.5, 1.2, 0.0]]))
    assert stats["is/truncated_frac"] == pytest.approx(1 / 5)


def test_token_mask_drops_tokens_over_the_cap():
    w, stats = weights("token_mask")
    assert torch.allclose(w, torch.tensor([[1.0, 0.0, 0.5], [1.5, 1.2, 0.0]]))
    assert stats["is/masked_frac"] == pytest.approx(1 / 5)


def test_seq_mask_drops_whole_sequences_whose_product_exceeds_the_cap():
    # row 0: 1 * 3 * 0.5 = 1.5 <= 2 (kept, token ratios as weights); row 1: 1.5 * 1.2 = 1.8 <= 2 (kept)
    w, _ = weights("seq_mask")
    assert torch.allclose(w, torch.tensor([[1.0, 3.0, 0.5], [1.5, 1.2, 0.0]]))
    w, stats = weights("seq_mask", cap=1.6)  # now row 1 (1.8) goes, row 0 (1.5) stays
    assert torch.allclose(w, torch.tensor([[1.0, 3.0, 0.5], [0.0, 0.0, 0.0]]))
    assert stats["is/masked_frac"] == pytest.approx(2 / 5)


def test_weights_carry_no_gradient():
    old = OLD.clone().requires_grad_(True)
    for name in IS_CORRECTIONS.names():
        w, _ = IS_CORRECTIONS.get(name)(old, SAMPLER, MASK, 2.0)
        assert not w.requires_grad, name


def test_logp_gap_sums_and_maxes_masked_tokens():
    total, biggest = logp_gap(OLD, SAMPLER, MASK)
    expected = [0.0, math.log(3), math.log(2), math.log(1.5), math.log(1.2)]
    assert float(total) == pytest.approx(sum(expected), rel=1e-6)
    assert float(biggest) == pytest.approx(math.log(3), rel=1e-6)


def test_seq_truncate_weights_every_token_by_the_capped_sequence_ratio():
    w, stats = weights("seq_truncate")
    # row 0: 1 * 3 * 0.5 = 1.5 (under the cap of 2), row 1: 1.5 * 1.2 = 1.8
    assert torch.allclose(w, torch.tensor([[1.5, 1.5, 1.5], [1.8, 1.8, 0.0]]))
    w, stats = weights("seq_truncate", cap=1.6)
    assert torch.allclose(w, torch.tensor([[1.5, 1.5, 1.5], [1.6, 1.6, 0.0]]))
    assert stats["is/truncated_frac"] == pytest.approx(2 / 5) and stats["is/weight_mean"] == pytest.approx(7.7 / 5)
