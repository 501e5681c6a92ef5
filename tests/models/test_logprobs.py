import torch

from rlhf.models import logprobs as lp
from rlhf.models.loading import load_causal_lm
from rlhf.models.logprobs import collate, completion_logprobs, token_logprobs


def test_token_logprobs_match_log_softmax_and_gradient(monkeypatch):
    monkeypatch.setattr(lp, "CHUNK_TOKENS", 5)  # exercise chunk boundaries
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (3, 4))
    logp, ent = token_logprobs(logits, ids, temperature=0.7)
    ref = torch.log_softmax(logits / 0.7, -1)
    assert torch.allclose(logp.double(), ref.gather(-1, ids[..., None]).squeeze(-1), atol=1e-6)
    assert torch.allclose(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-5)
    w = torch.randn(3, 4)
    g1, = torch.autograd.grad((logp * w).sum(), logits)
    g2, = torch.autograd.grad((ref.gather(-1, ids[..., None]).squeeze(-1) * w).sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_collate_left_pads_prompts_and_right_pads_completions():
    b = collate([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    assert b.input_ids_NL.tolist() == [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0]]
    assert b.attention_mask_NL.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert b.position_ids_NL.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]
    assert b.prompt_len == 2 and b.mask_NT.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_completion_logprobs_ignore_padding(tiny_model_dir):
    """A sample's log-probs do not depend on how much padding its batch needs."""
    model = load_causal_lm(str(tiny_model_dir)).eval()
    alone = collate([[8, 9, 10]], [[11, 12]], pad_id=0)
    batched = collate([[8, 9, 10], [13]], [[11, 12], [14, 15, 16, 17]], pad_id=0)
    with torch.no_grad():
        a, _ = completion_logprobs(model, alone)
        b, _ = completion_logprobs(model, batched)
        full = torch.log_softmax(model(torch.tensor([[8, 9, 10, 11, 12]])).logits, -1)
    assert torch.allclose(a[0], b[0, :2], atol=1e-5)
    expected = full[0, [2, 3], [11, 12]]
    assert torch.allclose(a[0], expected, atol=1e-5)
    assert b[1].tolist()[4:] == [] and b.shape == (2, 4) and b[0, 2:].abs().sum() == 0
