import torch

from rlhf.models.precision import Bf16CastLinear, Bf16Casts, autocast


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _offer(shared, model):
    for lin in _linears(model):
        shared.put(lin.weight, lin.weight.detach().to(torch.bfloat16))


def test_shared_copies_give_autocast_outputs_gradients_and_steps_to_the_bit():
    plain, shared_model = _mlp(), _mlp()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=0.01, fused=True)
    opt_shared = torch.optim.AdamW(shared_model.parameters(), lr=0.01, fused=True)
    shared = Bf16Casts(opt_shared)
    assert shared.install(shared_model) == 2 and all(type(m) is Bf16CastLinear for m in _linears(shared_model))
    assert shared_model.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(5, 8)
    for _ in range(3):
        _offer(shared, shared_model)
        results = []
        for model, opt in ((plain, opt_plain), (shared_model, opt_shared)):
            with autocast("bf16", "cpu"):
                y = model(x)
            y.float().pow(2).sum().backward()
            results.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
            opt.step()
            opt.zero_grad()
        (y1, g1), (y2, g2) = results
        assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
        assert not shared.copies  # the forward took them, the step would have dropped them
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), shared_model.parameters()))


def test_a_copy_is_used_only_while_its_weight_is_unchanged():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    shared = Bf16Casts(opt)
    shared.install(model)
    x = torch.randn(5, 8)

    def out(grad: bool, dtype: str = "bf16") -> torch.Tensor:
        with torch.set_grad_enabled(grad), autocast(dtype, "cpu"):
            return model(x).detach()

    def plain(dtype: str = "bf16") -> torch.Tensor:  # the same network without the shared copies
        with torch.no_grad(), autocast(dtype, "cpu"):
            h = torch.nn.functional.gelu(torch.nn.functional.linear(x, model[0].weight, model[0].bias))
            return torch.nn.functional.linear(h, model[2].weight, model[2].bias)

    def offer_wrong():
        for lin in _linears(model):
            shared.put(lin.weight, torch.zeros_like(lin.weight, dtype=torch.bfloat16))

    assert torch.equal(out(False), plain())
    offer_wrong()
    assert not torch.equal(out(False), plain())  # the copies are what the forward uses
    assert not torch.equal(out(False), plain())  # a forward without gradients leaves them there
    assert not torch.equal(out(True), plain())  # one with gradients takes them (autograd frees them in backward)
    assert torch.equal(out(True), plain())
    offer_wrong()
    with torch.no_grad():
        for lin in _linears(model):
            lin.weight.add_(0.0)  # an in-place change bumps the version counter: the copies are stale
    assert torch.equal(out(False), plain())
    offer_wrong()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # fused AdamW changes weights without bumping versions: the step hook drops every copy
    assert not shared.copies and torch.equal(out(False), plain())
    offer_wrong()
    assert torch.equal(out(False, "fp32"), plain("fp32"))  # an fp32 forward never uses them
