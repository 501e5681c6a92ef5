"""The learned critic of actor-critic runs (PPO): values for the experience, and the critic's own update.

The `Trainer` builds one when `algo.advantage` needs values (td, nstep_td, gae; see `critic.type`):

    make_experience:  values_NT = V(s_t) before every completion token (no grad) -> ADVANTAGES[...] -> ret_NT
    step:             for each pass: for each mini-batch: value loss, backward, critic optimizer step

The value loss is `clipped_value_loss` (PPO2: clipped by `critic.value_clip` around the values
at sampling time), averaged over the mini-batch's loss tokens with a normaliser fixed per
optimizer step over all processes, as the policy's. The critic has its own AdamW and
schedule (`critic.lr`) and goes through `accelerate.prepare` (DDP all-reduces its gradients).
During the first `critic.warmup_steps` RL steps the trainer updates only the critic.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor

from rlhf.algos.value import clipped_value_loss, explained_variance_from_moments, value_moments
from rlhf.models.critic import load_value_model, sample_values, shared_value_model
from rlhf.trainers.experience import Experience
from rlhf.trainers.optim import build_optimizer, build_scheduler
from rlhf.trainers.updates import mini_batches


class Critic:
    """V(s_t): a separate network (full or LoRA) or a head on the policy's hidden states (`kind`)."""

    def __init__(self, trainer, kind: str):
        self.t, cfg = trainer, trainer.cfg
        c, m = cfg.critic, cfg.model
        if kind == "shared":
            model = shared_value_model(trainer.unwrapped)
        else:
            model = load_value_model(c.path or m.path, c.lora, m.compute_dtype, m.trust_remote_code)
        tcfg = dataclasses.replace(cfg.train, lr=c.lr)
        optimizer = build_optimizer(model, tcfg)
        self.scheduler = build_scheduler(optimizer, tcfg, trainer.total_opt_steps)
        self.model, self.optimizer = trainer.acc.prepare(model, optimizer)
        self.kind = kind
        self.params = [p for p in self.unwrapped.parameters() if p.requires_grad]

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.t.acc.unwrap_model(self.model)

    @property
    def stateful(self) -> dict:
        """What a checkpoint saves: the critic's trainable weights (the head alone when shared), optimizer, schedule."""
        return {"critic": self.unwrapped, "critic_optimizer": self.optimizer, "critic_scheduler": self.scheduler}

    def _values(self, model: torch.nn.Module, exp: Experience) -> Tensor:
        cfg = self.t.cfg
        return sample_values(model, exp.prompt_ids, exp.completion_ids, self.t.tokenizer.pad_token_id,
                             compute_dtype=cfg.model.compute_dtype, device=self.t.acc.device, pack_prompts=cfg.train.pack_prompts)

    @torch.no_grad()
    def values(self, exp: Experience) -> Tensor:
        """values_NT of every completion token of `exp` (0 on padding), micro-batched."""
        values_NT = torch.zeros_like(exp.mask_NT)
        model = self.unwrapped
        model.eval()
        for rows in self.t._chunks(list(range(len(exp)))):
            v_NT = self._values(model, exp.select(rows))
            values_NT[rows, : v_NT.shape[1]] = v_NT.float().cpu()
        model.train()
        return values_NT * exp.mask_NT

    def batch_metrics(self, exp: Experience) -> dict:
        """Before the update, over all processes: how well the sampling-time values explain the returns."""
        m_6 = value_moments(exp.values_NT, exp.ret_NT, exp.train_mask_NT).float()
        m_6 = self.t.acc.reduce(m_6.to(self.t.acc.device), "sum").cpu() if self.t.acc.num_processes > 1 else m_6
        n = max(1.0, float(m_6[0]))
        return {"critic/explained_var": explained_variance_from_moments(m_6), "critic/value_mean": float(m_6[1]) / n,
                "critic/return_mean": float(m_6[2]) / n}

    def update(self, exp: Experience) -> list[dict]:
        """`train.updates_per_batch` passes x `train.mini_batches_per_pass` critic optimizer steps; one record each."""
        acc, cfg = self.t.acc, self.t.cfg
        clip = cfg.critic.value_clip
        records = []
        for _ in range(cfg.train.updates_per_batch):
            for rows, norm in mini_batches(self.t, exp):
                loss_sum = clipped = 0.0
                chunks = self.t._chunks(rows)
                for k, chunk in enumerate(chunks):
                    mb = exp.select(chunk)
                    sync = acc.no_sync(self.model) if k < len(chunks) - 1 else contextlib.nullcontext()
                    with sync:
                        v_NT = self._values(self.model, mb)
                        dev = v_NT.device
                        mask_NT, old_NT = mb.train_mask_NT.to(dev), mb.values_NT.to(dev)
                        loss = (clipped_value_loss(v_NT, old_NT, mb.ret_NT.to(dev), clip) * mask_NT).sum() / norm.num_tokens
                        acc.backward(loss * acc.num_processes)  # DDP averages gradients; the normaliser is already global
                    loss_sum += float(loss.detach())
                    if clip is not None:
                        clipped += float((((v_NT.detach() - old_NT).abs() > clip).float() * mask_NT).sum())
                records.append({"critic/value_loss": self.t._reduce_sum(loss_sum), "critic/grad_norm": self._step(),
                                "critic/value_clipfrac": self.t._reduce_sum(clipped) / norm.num_tokens,
                                "critic/lr": self.scheduler.get_last_lr()[0]})
        return records

    def _step(self) -> float:
        max_norm = self.t.cfg.train.max_grad_norm
        grad_norm = float(self.t.acc.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf")))
        if grad_norm == grad_norm and grad_norm != float("inf"):  # a NaN/inf gradient never reaches the critic
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm
