"""The critic V(s_t): a decoder backbone with a scalar head, evaluated where the policy's logits are.

A separate critic has its own weights (full, or a LoRA adapter on a frozen backbone); it is
loaded from `critic.path` (default: the policy's model). A shared critic (`shared_value_model`)
is a head on the policy's own decoder: the backbone is held by reference, not as a submodule,
so the critic's parameters (and its checkpoint, optimizer and DDP wrapper) are the head alone,
and the value loss never moves the policy. The head starts at zero, so early values are 0 and
GAE starts as Monte-Carlo returns (Ziegler et al. 2019; Stiennon et al. 2020).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rlhf.models.loading import load_causal_lm
from rlhf.models.logprobs import model_inputs, pack, scatter_tokens
from rlhf.models.lora import apply_lora
from rlhf.models.precision import autocast


class ValueModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int, shared: bool = False):
        super().__init__()
        if shared:
            self._shared = (backbone,)  # a tuple hides it from nn.Module: its parameters stay the policy's
        else:
            self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def shared(self) -> bool:
        return hasattr(self, "_shared")

    @property
    def config(self):
        return (self._shared[0] if self.shared else self.backbone).config

    def forward(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, logits_to_keep: int = 0,
                **kw) -> Tensor:
        """values_RK for the last `logits_to_keep` columns (all columns when 0)."""
        kwargs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
        if self.shared:
            with torch.no_grad():  # the policy's features; only the head learns from the value loss
                h = self._shared[0](**kwargs).last_hidden_state.detach()
        else:
            h = self.backbone(**kwargs).last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.head(h).squeeze(-1).float()


def load_value_model(path: str, lora, compute_dtype: str, trust_remote_code: bool = False) -> ValueModel:
    """A critic from a causal-LM directory: its decoder (no LM head) plus a zero-initialised value head."""
    frozen_base = lora.enabled and compute_dtype == "bf16"
    lm = load_causal_lm(path, torch.bfloat16 if frozen_base else torch.float32, trust_remote_code)
    backbone = lm.get_decoder()
    if lora.enabled:
        backbone = apply_lora(backbone, lora, task_type=None, key="critic.lora")
    return ValueModel(backbone, lm.config.hidden_size)


def shared_value_model(policy: nn.Module) -> ValueModel:
    """A zero-initialised value head on `policy`'s decoder (LoRA adapters included), sharing its weights."""
    return ValueModel(policy.get_decoder(), policy.config.hidden_size, shared=True)


def sample_values(critic: nn.Module, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, *,
                  compute_dtype: str = "fp32", device=None, pack_prompts: bool = True) -> Tensor:
    """values_NT: V(s_t) for the state before each completion token t (zero past each completion's end)."""
    pb = pack(prompt_ids, completion_ids, pad_id, share_prompts=pack_prompts)
    device = device or pb.input_ids_RL.device
    with autocast(compute_dtype, device):
        values_RK = critic(**model_inputs(critic, pb, compute_dtype, device))
    return scatter_tokens(pb, values_RK.reshape(-1)[pb.row_M.to(device)].float())
