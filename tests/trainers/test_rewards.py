"""Per-token rewards and advantage whitening (rlhf.trainers.rewards)."""
import numpy as np
import torch
from accelerate import Accelerator

from rlhf.runtime import Runtime
from rlhf.trainers.rewards import whiten


def test_whitening_is_exact_far_from_zero():
    """Advantages of mean 5 and std 1e-3: E[x^2] - E[x]^2 from fp32 sums was off by 3e5; two passes in float64
    match a float64 reference (unbiased std, the project's convention)."""
    torch.manual_seed(0)
    x = 5.0 + 1e-3 * torch.randn(16, 12)
    mask = (torch.rand(16, 12) < 0.8).float()
    got = whiten(x, mask, Runtime(Accelerator(cpu=True), micro_batch_size=1))
    xs = x.double().numpy()[mask.bool().numpy()]
    ref = (x.double().numpy() - xs.mean()) / (xs.std(ddof=1) + 1e-8) * mask.numpy()
    assert np.allclose(got.numpy(), ref, atol=1e-4)
    assert torch.all(got[mask == 0] == 0)
    assert abs(float(got[mask.bool()].mean())) < 1e-5 and abs(float(got[mask.bool()].std()) - 1) < 1e-4
