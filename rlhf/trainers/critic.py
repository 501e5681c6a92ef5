"""The learned critic of actor-critic runs (PPO), built when `algo.advantage` needs values (td, nstep_td, gae).

The step computes values_NT = V(s_t) before every completion token (no gradient) for the advantages;
the update loop (`rlhf.trainers.update`) trains the critic beside the policy on the clipped value loss
(PPO2: clipped by `critic.value_clip` around the values at sampling time), over the same tokens with
the same normaliser. The critic has its own AdamW and schedule (`critic.lr`), its own guard against
NaN/inf gradients, and goes through `accelerate.prepare` (DDP all-reduces its gradients). During the
first `critic.warmup_steps` RL steps only the critic trains.
"""
from __future__ import annotations

import dataclasses

import torch

from rlhf.config import Config
from rlhf.models.critic import load_value_model, shared_value_model
from rlhf.trainers.guards import NonFiniteGradients
from rlhf.trainers.optim import Trainable, build_optimizer, build_scheduler


def build_critic(cfg: Config, kind: str, policy: torch.nn.Module, accelerator, total_opt_steps: int,
                 state: dict) -> Trainable:
    """V(s_t) of `kind`: 'separate' (its own network, full or LoRA, from critic.path) or 'shared' (a head on the
    unwrapped `policy`'s hidden states), prepared with its optimizer; its skipped steps are counted in `state`."""
    c, m = cfg.critic, cfg.model
    if kind == "shared":
        model = shared_value_model(policy)
    else:
        model = load_value_model(c.path or m.path, c.lora, m.compute_dtype, m.trust_remote_code)
    tcfg = dataclasses.replace(cfg.train, lr=c.lr)
    optimizer = build_optimizer(model, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, total_opt_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    guard = NonFiniteGradients(state, cfg.train.max_skipped_steps, name="critic", prefix="critic/")
    return Trainable(model, optimizer, scheduler, guard, cfg.train.max_grad_norm)
