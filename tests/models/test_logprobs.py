import pytest
import torch

from rlhf.models import logprobs as lp
from rlhf.models.loading import load_causal_lm
from rlhf.models.logprobs import _IndexedLogProb, pack, sample_logprobs

PROMPTS = [[8, 9, 10]] * 3 + [[13, 14]] * 2
COMPLETIONS = [[11, 12], [15, 16, 17, 18], [19], [20, 21, 22], [23, 24]]


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_indexed_logprobs_match_log_softmax_values_and_gradient(monkeypatch, temperature):
    monkeypatch.setattr(lp, "CHUNK_ROWS", 2)  # exercise chunk boundaries
    torch.manual_seed(0)
    logits = torch.randn(5, 11, dtype=torch.float64, requires_grad=True) * 4
    rows = torch.tensor([0, 0, 0, 1, 3, 4, 4])  # row 0 serves three targets, row 2 none
    tgt = torch.randint(0, 11, (7,))
    logp, ent = _IndexedLogProb.apply(logits, rows, tgt, temperature, True)
    ref = torch.log_softmax(logits / temperature, -1)
    assert torch.allclose(logp.double(), ref[rows, tgt], atol=1e-6)
    assert torch.allclose(ent.double(), -(ref.exp() * ref).sum(-1)[rows], atol=1e-5)
    logp_only, no_ent = _IndexedLogProb.apply(logits, rows, tgt, temperature, False)
    assert torch.equal(logp_only, logp) and not no_ent.any()
    w = torch.randn(7)
    g1, = torch.autograd.grad((logp * w).sum(), logits)
    g2, = torch.autograd.grad((ref[rows, tgt] * w).sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_pack_layout_shares_prompts_and_restarts_positions():
    pb = pack([[5, 6], [5, 6], [7]], [[1, 2], [3], [4, 9]], pad_id=0)
    assert pb.input_ids_RL.tolist() == [[5, 6, 1, 2, 3], [0, 7, 4, 9, 0]]
    assert pb.position_ids_RL.tolist()[0] == [0, 1, 2, 3, 2]  # the 2nd completion starts at position 2 again
    v = pb.visible_RLL[0]
    assert v[4, :2].all() and not v[4, 2:4].any() and v[4, 4]  # sees the prompt and itself, not completion 1
    plain = pack([[5, 6], [5, 6], [7]], [[1, 2], [3], [4, 9]], pad_id=0, share_prompts=False)
    assert plain.input_ids_RL.tolist() == [[5, 6, 1, 2], [5, 6, 3, 0], [0, 7, 4, 9]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked_and_the_full_sequence(tiny_model_dir, attn):
    model = load_causal_lm(str(tiny_model_dir))
    model.config._attn_implementation = attn
    w = torch.arange(1.0, 6.0)[:, None]
    packed, ent_p = sample_logprobs(model, PROMPTS, COMPLETIONS, 0, pack_prompts=True)
    (packed * w).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain, ent = sample_logprobs(model, PROMPTS, COMPLETIONS, 0, pack_prompts=False)
    (plain * w).sum().backward()
    assert packed.shape == (5, 4) and packed[0, 2:].abs().sum() == 0
    assert torch.allclose(packed, plain, atol=1e-5) and torch.allclose(ent_p, ent, atol=1e-4)
    for n, p in model.named_parameters():
        assert torch.allclose(g_packed[n], p.grad, atol=1e-5), n
    with torch.no_grad():  # and both equal an unpadded forward of prompt + completion
        full = torch.log_softmax(model(torch.tensor([PROMPTS[1] + COMPLETIONS[1]])).logits, -1)[0]
    expected = full[torch.arange(2, 6), torch.tensor(COMPLETIONS[1])]
    assert torch.allclose(plain[1], expected, atol=1e-5)
