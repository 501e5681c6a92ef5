import torch

from rlhf.config import TrainConfig
from rlhf.trainers.optim import build_optimizer, clip_in_step

SCALES = [3.0, 0.01, 5.0, 0.02]  # gradient sizes per step, above and below max_norm=1


def _run(mode: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    params = list(model.parameters())
    opt = build_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.01))
    assert opt.defaults["fused"]
    gen = torch.Generator().manual_seed(1)
    for scale in SCALES:
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * scale
        if mode == "torch":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        elif mode == "in_step":
            norm = clip_in_step(opt, params, 1.0)
            assert norm.item() > 1.0 if scale > 1 else norm.item() < 1.0
        opt.step()
        opt.__dict__.pop("grad_scale", None)
    return [p.detach().clone() for p in params]


def test_clip_in_step_equals_clip_grad_norm_then_step():
    ref, got, unclipped = _run("torch"), _run("in_step"), _run("none")
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the clip matters here (Adam is not invariant to a per-step change of scale): without it the weights differ
    assert max((a - b).abs().max().item() for a, b in zip(ref, unclipped)) > 1e-2
