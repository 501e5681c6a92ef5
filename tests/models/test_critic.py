import torch

from rlhf.algos.value import clipped_value_loss, explained_variance
from rlhf.config import LoraConfig
from rlhf.models.critic import load_value_model, sample_values

PROMPTS = [[8, 9, 10]] * 2 + [[13, 14]]
COMPLETIONS = [[11, 12], [15, 16, 17], [19, 20]]


def test_values_start_at_zero_and_match_between_layouts(tiny_model_dir):
    critic = load_value_model(str(tiny_model_dir), LoraConfig(enabled=False), "fp32")
    v = sample_values(critic, PROMPTS, COMPLETIONS, 0)
    assert v.shape == (3, 3) and torch.all(v == 0)
    torch.nn.init.normal_(critic.head.weight)
    packed = sample_values(critic, PROMPTS, COMPLETIONS, 0, pack_prompts=True)
    plain = sample_values(critic, PROMPTS, COMPLETIONS, 0, pack_prompts=False)
    assert torch.allclose(packed, plain, atol=1e-5) and packed[0, 2] == 0 and packed[1, 2] != 0


def test_value_loss_drives_values_to_returns(tiny_model_dir):
    torch.manual_seed(0)
    critic = load_value_model(str(tiny_model_dir), LoraConfig(enabled=False), "fp32")
    returns = torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.25, -1.0], [2.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        v = sample_values(critic, PROMPTS, COMPLETIONS, 0)
        loss = (clipped_value_loss(v, v.detach(), returns, None) * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    assert explained_variance(v.detach(), returns, mask) > 0.9


def test_lora_critic_trains_adapter_and_head_only(tiny_model_dir):
    critic = load_value_model(str(tiny_model_dir), LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]),
                              "fp32")
    names = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert "head.weight" in names and all("lora_" in n or n.startswith("head.") for n in names)


def test_clipped_value_loss_hand_computed():
    v, old, ret = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[3.0]])
    assert clipped_value_loss(v, old, ret, None).item() == 0.5
    assert clipped_value_loss(v, old, ret, 0.5).item() == 0.5 * 2.5 ** 2  # the clipped value is farther
    # nan: 1 token
    assert explained_variance(ret, ret, torch.ones(1, 1)) != explained_variance(ret, ret, torch.ones(1, 1))
