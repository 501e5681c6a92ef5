import pytest
import torch

from rlhf.models.loading import load_causal_lm
from rlhf.models.logprobs import collate, completion_logprobs
from rlhf.models.packing import pack, packed_logprobs

PROMPTS = [[8, 9, 10]] * 3 + [[13, 14]] * 2
COMPLETIONS = [[11, 12], [15, 16, 17, 18], [19], [20, 21, 22], [23, 24]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_equal_unpacked_values_and_gradients(tiny_model_dir, attn):
    model = load_causal_lm(str(tiny_model_dir))
    model.config._attn_implementation = attn
    pb = pack(PROMPTS, COMPLETIONS, pad_id=0)
    assert pb.input_ids_RL.shape[0] == 2  # one row per prompt
    assert pb.input_ids_RL.shape[1] == 3 + 7  # one prompt copy + the completions of the widest group
    packed, ent_p = packed_logprobs(model, pb)
    (packed * torch.arange(1.0, 6.0)[:, None]).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain, ent = completion_logprobs(model, collate(PROMPTS, COMPLETIONS, pad_id=0))
    (plain * torch.arange(1.0, 6.0)[:, None]).sum().backward()
    assert torch.allclose(packed, plain, atol=1e-5)
    assert torch.allclose(ent_p, ent, atol=1e-4)
    for n, p in model.named_parameters():
        assert torch.allclose(g_packed[n], p.grad, atol=1e-5), n
