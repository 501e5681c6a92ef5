"""The RL trainer: one loop for the policy-gradient family (GRPO, RLOO, REINFORCE, ...) and PPO, on accelerate.

One step, top to bottom (see `Trainer.step`):

    prompts_B -> engine.generate (G each) -> rewards -> no-grad old/ref log-probs (+ critic values)
    -> per-token rewards (score at the last token - beta * KL when in the reward) -> advantages
    -> for each pass: for each mini-batch: micro-batch loss, backward, optimizer step (policy, then critic)
    -> KL controller -> engine.update_weights -> metrics.jsonl

PPO is this loop with a critic (`rlhf.trainers.critic`, built when `algo.advantage` needs values).

Algorithms come from the registries in `rlhf.algos`, picked by name in the config.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rlhf import algos
from rlhf.algos import AdvantageInputs
from rlhf.algos.combos import check_combination, critic_type
from rlhf.algos.kl_control import KLController
from rlhf.config import Config, to_dict
from rlhf.data import PromptSource, load_prompt_dataset
from rlhf.engine import ENGINES, SamplingParams
from rlhf.logging import JsonlWriter, PhaseTimer, Progress, quiet_repeated_warnings, warn_about_step
from rlhf.models.loading import load_policy, load_reference, load_tokenizer
from rlhf.models.logprobs import sample_logprobs
from rlhf.models.precision import Bf16Weights
from rlhf.redact import redact
from rlhf.rewards import RewardModule
from rlhf.trainers import checkpoint as ckpt
from rlhf.trainers.critic import Critic
from rlhf.trainers.host import set_malloc_mmap_threshold
from rlhf.trainers import distributed as dist
from rlhf.trainers.experience import Experience, completion_mask, pad_rows, score_at_last_token
from rlhf.trainers.guards import NonFiniteGradients, Preemption
from rlhf.trainers.optim import build_optimizer, build_scheduler
from rlhf.trackers import Trackers, make_accelerator
from rlhf.trainers.sampling import collect
from rlhf.trainers.updates import BatchUpdater


def check_algorithm(cfg: Config, has_critic: bool = False) -> None:
    """Reject invalid combinations before any model is loaded (rules in `rlhf.algos.combos`)."""
    check_combination(cfg, has_critic)


class Trainer:
    def __init__(self, cfg: Config, accelerator: Optional[Accelerator] = None):
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(cfg)  # an accelerator passed in brings its own trackers
        self.layout = dist.layout(self.acc)  # single, ddp, zero2, zero3 or fsdp2
        cfg.validate(self.acc.num_processes)
        dist.check_layout(cfg, self.acc, self.layout)
        quiet_repeated_warnings()
        check_algorithm(cfg, has_critic=critic_type(cfg) != "none")
        set_seed(cfg.train.seed, device_specific=True)
        set_malloc_mmap_threshold(cfg.train.malloc_mmap_threshold_mb)  # before the models allocate
        self.out = Path(cfg.output_dir)
        self.log = self.acc.print
        self.log(f"{cfg.derived_summary(self.acc.num_processes)} | layout {self.layout}")

        # Cheap, error-prone inputs first: rewards and data fail before the model loads.
        self.rewards = RewardModule(cfg.reward.functions, cfg.reward.on_error, cfg.reward.timeout_s)
        self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        d = cfg.data
        self.prompts = PromptSource(
            load_prompt_dataset(d.train, "train", d.task_args, cfg.train.seed), self.tokenizer, name=d.train,
            prompt_column=d.prompt_column, max_prompt_tokens=d.max_prompt_tokens, on_long_prompt=d.on_long_prompt,
            shuffle=d.shuffle, seed=cfg.train.seed,
        )
        if self.prompts.stats["prompts/too_long"]:
            self.log(f"data: {self.prompts.stats} (data.on_long_prompt={d.on_long_prompt})")

        with dist.whole_loading(self.layout):
            policy = load_policy(cfg.model)
            self.ref = load_reference(cfg.model, policy, cfg.algo.kl.coef)  # frozen, whole on every process
            # zero3/fsdp2: the engine samples from a whole copy, refreshed after each step (rlhf.trainers.distributed)
            self.full = dist.full_copy(policy).to(self.acc.device) if self.layout in dist.SHARDED else None
        if self.ref is not None:
            self.ref.to(self.acc.device)
        optimizer = build_optimizer(policy, cfg.train)
        self.total_opt_steps = cfg.train.steps * cfg.train.updates_per_batch * cfg.train.mini_batches_per_pass
        if self.layout in ("zero2", "zero3"):
            dist.configure_deepspeed(cfg, self.acc)
        self.model, self.optimizer = self.acc.prepare(policy, optimizer)
        # on the optimizer that steps (DeepSpeed wraps it, or swaps in its CPU Adam when offloading)
        self.scheduler = build_scheduler(dist.inner_optimizer(self.optimizer), cfg.train, self.total_opt_steps)
        self.engine = ENGINES.get(cfg.generation.engine)(self.whole_model, self.tokenizer, cfg)
        if getattr(self.engine, "decoder", None) is not None and self.layout in ("single", "ddp"):
            # the HF engine's decode loop casts the policy's linear weights to bf16 at every sync: the next forwards reuse them
            Bf16Weights(self.unwrapped, dist.inner_optimizer(self.optimizer))
        g = cfg.generation
        self.sampling = SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.top_k)

        self.adv_fn = algos.ADVANTAGES.get(cfg.algo.advantage)
        self.loss_fn = algos.POLICY_LOSSES.get(cfg.algo.policy_loss)
        self.agg_fn = algos.LOSS_AGGREGATIONS.get(cfg.algo.loss_agg)
        self.kl_fn = algos.KL_ESTIMATORS.get(cfg.algo.kl.estimator)
        self.is_fn = algos.IS_CORRECTIONS.get(cfg.algo.is_correction)
        # sampler log-probs: needed by an IS correction, and free from engines that declare them (gap metric)
        self.want_sampler_logps = cfg.algo.is_correction != "none" or ENGINES.meta(g.engine).get("sampler_logps", False)
        self.update_fn = algos.UPDATES.get(cfg.algo.update)
        self.state = {"step": 0, "opt_step": 0}
        self.nonfinite = NonFiniteGradients(self.state, cfg.train.max_skipped_steps)
        # Everything a checkpoint saves and a resume restores: the policy, and the critic and an adaptive KL controller.
        # zero2/zero3/fsdp2: the optimizer is saved per process (distributed.save_sharded); "policy" holds whole weights.
        self.stateful = {"policy": self.whole_model, "optimizer": self.optimizer, "scheduler": self.scheduler}
        if dist.shards_optimizer(self.layout):
            del self.stateful["optimizer"]
        kind = critic_type(cfg)
        self.critic = Critic(self, kind) if kind != "none" else None
        if self.critic is not None:
            self.stateful.update(self.critic.stateful)
        k = cfg.algo.kl
        self.kl_ctl = KLController(k.coef, k.target, k.horizon)
        if k.target is not None:  # an adaptive beta is state; a fixed one is config
            self.stateful["kl_controller"] = self.kl_ctl
        self.metrics = JsonlWriter(self.out / "metrics.jsonl")
        self.completions = JsonlWriter(self.out / "completions.jsonl")
        self._saved_step: Optional[int] = None
        self.trackers = Trackers(cfg, self.acc)

    # ------------------------------------------------------------------ helpers

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    @property
    def kl_coef(self) -> float:
        """beta now: `algo.kl.coef`, or where the adaptive controller has moved it."""
        return self.kl_ctl.coef

    @property
    def whole_model(self) -> torch.nn.Module:
        """The policy with whole (unsharded) weights: what generation, weight sync and `save_final` read."""
        return self.full if self.full is not None else self.unwrapped

    def sync_weights(self) -> None:
        """Refresh the whole copy (zero3/fsdp2: a collective gather) and the engine's weights."""
        if self.full is not None:
            dist.gather_into(self.full, self.unwrapped, self.layout)
        self.engine.update_weights(self.whole_model)

    def _reduce_sum(self, x: float) -> float:
        return float(self.acc.reduce(torch.tensor(float(x), device=self.acc.device), "sum"))

    def _chunks(self, rows: list[int]):
        mbs = self.cfg.train.micro_batch_size
        return [rows[i: i + mbs] for i in range(0, len(rows), mbs)]

    def _forward(self, model: torch.nn.Module, exp: Experience, entropy: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(logp_NT, entropy_NT) of `exp`'s completions under `model` (entropy_NT None unless `entropy`)."""
        return sample_logprobs(
            model, exp.prompt_ids, exp.completion_ids, self.tokenizer.pad_token_id, temperature=self.cfg.generation.temperature,
            compute_dtype=self.cfg.model.compute_dtype, device=self.acc.device, pack_prompts=self.cfg.train.pack_prompts,
            entropy=entropy,
        )

    @torch.no_grad()
    def _logprobs(self, exp: Experience, reference: bool) -> torch.Tensor:
        """Log-probs of every completion token under the policy (or the reference), micro-batched."""
        logp_NT = torch.zeros_like(exp.mask_NT)
        use_adapter_off = reference and self.ref is None  # LoRA: the reference is the base network
        model = self.ref if (reference and self.ref is not None) else self.unwrapped
        ctx = self.unwrapped.disable_adapter() if use_adapter_off else contextlib.nullcontext()
        model.eval()
        with ctx:
            for rows in self._chunks(list(range(len(exp)))):
                lp, _ = self._forward(model, exp.select(rows), entropy=False)
                logp_NT[rows, : lp.shape[1]] = lp.float().cpu()
        self.unwrapped.train()
        return logp_NT

    # ------------------------------------------------------------------ the step

    def make_experience(self, timer: PhaseTimer) -> tuple[Experience, dict]:
        cfg, G = self.cfg, self.cfg.train.samples_per_prompt
        samples, reward_stats, sampling_metrics = collect(self, timer)  # generate + reward (+ DAPO shaping)
        self.engine.sleep()  # frees the GPU for training where the engine supports it
        mask_NT = completion_mask(samples.completion_ids)
        exp = Experience(samples.prompt_ids, samples.completion_ids, mask_NT, samples.scores_N)
        if samples.sampler_logps is not None:
            exp.sampler_logp_NT = pad_rows(samples.sampler_logps, mask_NT.shape[1])
        if cfg.algo.mask_truncated:  # completions cut at max_new_tokens take no part in the loss
            exp.loss_mask_NT = mask_NT * torch.tensor(samples.finished, dtype=mask_NT.dtype).unsqueeze(-1)
        with timer("logprob"):
            # Old log-probs are otherwise taken from the first update pass, before any optimizer step
            # (impossible with several mini-batches: the second is seen after the first step).
            if cfg.algo.kl.placement == "in_reward" or cfg.train.mini_batches_per_pass > 1 or cfg.algo.kl.target is not None:
                exp.old_logp_NT = self._logprobs(exp, reference=False)
            if cfg.algo.kl.coef > 0:
                exp.ref_logp_NT = self._logprobs(exp, reference=True)
        if self.critic is not None:
            with timer("values"):
                exp.values_NT = self.critic.values(exp)
        rewards_NT = score_at_last_token(exp.scores_N, mask_NT)
        kl_reward = None
        if cfg.algo.kl.coef > 0 and cfg.algo.kl.placement == "in_reward":  # PPO: r_t = score [t = last] - beta KL_t
            kl_NT = self.kl_fn(exp.old_logp_NT, exp.ref_logp_NT) * mask_NT
            rewards_NT = rewards_NT - self.kl_coef * kl_NT
            kl_reward = self._reduce_sum(kl_NT.sum()) / max(1.0, self._reduce_sum(mask_NT.sum()))  # over all processes
        exp.rewards_NT = rewards_NT
        exp.adv_NT, exp.ret_NT = self.adv_fn(AdvantageInputs(rewards_NT, mask_NT, G, exp.values_NT), cfg.algo)
        if cfg.algo.whiten_advantages:
            exp.adv_NT = self._whiten(exp.adv_NT, exp.train_mask_NT)
        info = {"texts": samples.texts, "prompts": samples.prompts, "per_fn": samples.per_fn, "reward_stats": reward_stats,
                "finished": samples.finished, "kl_reward": kl_reward, "sampling": sampling_metrics}
        return exp, info

    def _whiten(self, adv_NT: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
        """(A - mean) / std over the loss tokens of every process."""
        n, s1, s2 = (self._reduce_sum(x) for x in (mask_NT.sum(), (adv_NT * mask_NT).sum(), (adv_NT ** 2 * mask_NT).sum()))
        mean = s1 / max(n, 1.0)
        std = max(s2 / max(n, 1.0) - mean ** 2, 0.0) ** 0.5
        return (adv_NT - mean) / (std + 1e-8) * mask_NT

    def _update(self, exp: Experience) -> list[dict]:
        """The policy's update (algo.update), then the critic's; one merged record per optimizer step."""
        frozen = self.critic is not None and self.state["step"] < self.cfg.critic.warmup_steps  # critic warm-up
        updates = [] if frozen else self.update_fn(BatchUpdater(self, exp), self.cfg.algo)
        if self.critic is None:
            return updates
        critic = self.critic.update(exp)
        if frozen:
            return [{"policy_frozen": 1.0, **c} for c in critic]
        return [{**u, **c} for u, c in zip(updates, critic)] + updates[len(critic):]

    def step(self) -> list[dict]:
        """One RL step; returns the metrics records written (one per optimizer step)."""
        cfg, G = self.cfg, self.cfg.train.samples_per_prompt
        timer, t0 = PhaseTimer(), time.perf_counter()
        exp, info = self.make_experience(timer)
        with timer("train"):  # the update rule (algo.update) moves the policy on this batch, then the critic learns
            updates = self._update(exp)
        self.state["opt_step"] += len(updates)
        with timer("sync"):
            self.engine.wake()
            self.sync_weights()
        self.state["step"] += 1

        scores = self.acc.gather(exp.scores_N.to(self.acc.device)).float().cpu()
        lens = self.acc.gather(exp.mask_NT.sum(-1).to(self.acc.device)).float().cpu()
        finished = self.acc.gather(torch.tensor(info["finished"], device=self.acc.device)).cpu()
        valid = torch.isfinite(scores)
        group_std = torch.nan_to_num(scores.view(-1, G), nan=0.0).std(-1)
        batch_metrics = {
            "reward/mean": float(scores[valid].mean()) if valid.any() else float("nan"),
            "reward/std": float(scores[valid].std()) if valid.sum() > 1 else 0.0,
            "frac_zero_std": float((group_std == 0).float().mean()),
            "completion/len_mean": float(lens.mean()),
            "tokens/total": self._reduce_sum(sum(len(p) + len(c) for p, c in zip(exp.prompt_ids, exp.completion_ids))),
            "completion/truncated_frac": float((~finished).float().mean()),
            "world_size": self.acc.num_processes, "skipped_steps": self.state["skipped_steps"], **self.prompts.stats,
        }
        for name, values in info["per_fn"].items():
            v = self.acc.gather(torch.tensor([float("nan") if x is None else x for x in values], device=self.acc.device))
            batch_metrics[f"reward/{name}/mean"] = float(v[torch.isfinite(v)].mean()) if torch.isfinite(v).any() else None
        batch_metrics.update({k: self._reduce_sum(v) for k, v in info["reward_stats"].items() if k.endswith(("unscored", "errors", "timeouts"))})
        if info["kl_reward"] is not None:
            batch_metrics["kl_in_reward"] = info["kl_reward"]
        if cfg.algo.kl.coef > 0:  # beta used this step; an adaptive controller then moves it by the sequence KL
            batch_metrics["kl_coef"] = self.kl_coef
            if cfg.algo.kl.target is not None:
                batch_metrics["kl_seq"] = self._sequence_kl(exp)
                self.kl_ctl.update(batch_metrics["kl_seq"], cfg.samples_per_step)
        if self.critic is not None:
            batch_metrics.update(self.critic.batch_metrics(exp))
        batch_metrics.update(info["sampling"])
        # The first record of a step carries the step's timings; later ones (updates_per_batch > 1) carry 0.
        times = {f"time/{k}_s": v for k, v in timer.seconds.items()}
        times["time/step_s"] = time.perf_counter() - t0
        records = []
        for i, upd in enumerate(updates):
            rec = {"step": self.state["step"], "opt_step": self.state["opt_step"] - len(updates) + i + 1, **batch_metrics, **upd}
            rec.update({k: (v if i == 0 else 0.0) for k, v in times.items()})
            records.append(rec)
        if self.is_main:
            for rec in records:
                self.metrics.write(rec)
            self.trackers.log(records)
            warn_about_step(records[0], group_relative=bool(algos.ADVANTAGES.meta(cfg.algo.advantage).get("group_relative")))
            self.trackers.log_completions(self._write_completions(exp, info), self.state["step"], records[-1]["opt_step"])
        return records

    def _sequence_kl(self, exp: Experience) -> float:
        """Mean over samples (all processes) of sum_t KL_t(pi_old || pi_ref): the adaptive controller's measure."""
        kl_NT = self.kl_fn(exp.old_logp_NT, exp.ref_logp_NT) * exp.mask_NT
        return self._reduce_sum(kl_NT.sum()) / max(1.0, self._reduce_sum(len(exp)))

    def _write_completions(self, exp: Experience, info: dict) -> list[dict]:
        rows = []
        for i in range(min(self.cfg.log.completions_per_step, len(exp))):
            prompt = info["prompts"][i]
            rows.append({
                "step": self.state["step"], "prompt": prompt if isinstance(prompt, str) else json.dumps(prompt),
                "completion": info["texts"][i], "reward": float(exp.scores_N[i]),
                **{f"reward/{k}": v[i] for k, v in info["per_fn"].items()}, "advantage": float(exp.adv_NT[i, 0]),
            })
            self.completions.write(rows[-1])
        return rows

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._maybe_resume()
        if self.is_main:  # tokens, keys and passwords never reach the saved config
            (self.out / "config.json").write_text(json.dumps(redact(to_dict(cfg)), indent=1))
        self.trackers.start(redact(to_dict(cfg)), self.state["step"])
        progress = Progress(cfg.train.steps, cfg.log.progress and self.is_main, start=self.state["step"])
        history = []
        preemption = Preemption().install()
        try:
            while self.state["step"] < cfg.train.steps:
                records = self.step()
                history += records
                if self.is_main:
                    progress.update(records[0])
                stop, every = preemption.requested(self.acc), cfg.checkpoint.every
                if stop or self.nonfinite.exceeded or (every and self.state["step"] % every == 0):
                    self.save_checkpoint()
                if self.nonfinite.exceeded:
                    raise self.nonfinite.error(self.state["step"])
                if stop:
                    self.log(f"{preemption.name}: saved a checkpoint at step {self.state['step']}; exiting "
                             "(continue with checkpoint.resume=latest)")
                    return history
        finally:
            progress.close()
            preemption.restore()
            self.trackers.finish()
        if self._saved_step != self.state["step"]:
            self.save_checkpoint()
        if cfg.checkpoint.save_final:
            self.save_final()
        return history

    def save_checkpoint(self) -> None:
        root = self.out / "checkpoints"
        step = self.state["step"]
        ckpt.write_rank_files(root, step, self.acc.process_index)
        if dist.shards_optimizer(self.layout):
            dist.save_sharded(self.model, self.optimizer, ckpt.staging_dir(root, step) / dist.SHARDED_DIR, self.layout)
        self.acc.wait_for_everyone()
        if self.is_main:
            state = {**self.state, "data": self.prompts.state(), "layout": self.layout, "world_size": self.acc.num_processes}
            ckpt.commit(root, step, self.stateful, state, self.cfg.checkpoint.keep_last)
        self.acc.wait_for_everyone()
        self._saved_step = step

    def _maybe_resume(self) -> None:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return
        path = ckpt.find_latest(self.out / "checkpoints") if resume == "latest" else Path(resume)
        if path is None:
            self.log("checkpoint.resume=latest: no checkpoint found, starting fresh")
            return
        state = ckpt.load(path, self.stateful, self.acc.process_index)
        layout, world = state.pop("layout", "single"), state.pop("world_size", 1)
        if dist.shards_optimizer(layout) or dist.shards_optimizer(self.layout):
            if (layout, world) != (self.layout, self.acc.num_processes):
                raise ckpt.CheckpointError(f"{path} was written by {world} process(es) under {layout}; a sharded "
                                           f"checkpoint resumes only with the same layout, not {self.acc.num_processes} under {self.layout}")
            dist.load_sharded(self.model, self.optimizer, path / dist.SHARDED_DIR, self.layout)
        self.prompts.load_state(state.pop("data"))
        self.state.update(state)
        self._saved_step = self.state["step"]
        self.sync_weights()
        if self.is_main:  # forget steps logged after the checkpoint, so none is logged twice
            self.metrics.truncate_after("step", self.state["step"])
            self.completions.truncate_after("step", self.state["step"])
        self.log(f"resumed from {path} at step {self.state['step']}")

    def save_final(self) -> None:
        """`<output_dir>/final`: the adapter (LoRA) or the full model, plus the tokenizer; optionally merged."""
        if not self.is_main:
            return
        from rlhf.models.export import save_model

        save_model(self.whole_model, self.tokenizer, self.out / "final", merge=False)
        if self.cfg.model.lora.enabled and self.cfg.checkpoint.merge_lora:
            save_model(self.whole_model, self.tokenizer, self.out / "final_merged", merge=True)
