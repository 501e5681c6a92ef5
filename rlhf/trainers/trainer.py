"""The RL trainer: builds the pieces, runs one RL step after another, checkpoints and resumes.

One step, top to bottom (`Trainer.step`), a pipeline of plain functions over explicit arguments:

    rollout            prompts -> engine (G completions each) -> rewards (+ DAPO rounds)   rlhf.rollout
    batch_logprobs     log pi_old (only when needed), log pi_ref (kl.coef > 0)            rlhf.trainers.forward
    batch_values       V(s_t) (actor-critic only)
    token_rewards      score on the last token (- beta KL_t when the KL is in the reward)  rlhf.trainers.rewards
    advantages         ADVANTAGES[algo.advantage] (+ whitening)
    update             epochs x mini-batches x micro-batches, policy and critic losses   rlhf.trainers.update
                       (npg / trpo: one natural-gradient step instead, rlhf.trainers.natural)
    sync               engine.update_weights(policy); metrics -> metrics.jsonl

Algorithms come from the registries in `rlhf.algos`, picked by name in the config; PPO is this
step with a critic (`rlhf.trainers.critic`). Helpers never see the trainer: they take the runtime
(`rlhf.runtime.Runtime`) and what they compute on.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rlhf import algos
from rlhf.algos.combos import critic_type, old_logp_source
from rlhf.algos.kl_control import KLController
from rlhf.checks import check_config
from rlhf.config import Config, ConfigError, to_dict
from rlhf.data import PromptSource, load_prompt_dataset
from rlhf.engine import ENGINES
from rlhf.logging import JsonlWriter, PhaseTimer, Progress, quiet_repeated_warnings, warn_about_step, warn_once
from rlhf.models.loading import (
    load_policy,
    load_reference,
    load_teacher,
    load_tokenizer,
    uses_dropout,
    with_pad_token,
)
from rlhf.models.precision import Bf16Casts
from rlhf.redact import redact
from rlhf.rewards import RewardModule
from rlhf.rollout import (
    Batch,
    RolloutSource,
    batch_from_json,
    batch_to_json,
    build_episodes,
    episode_metrics,
    episode_rewards,
    rollout,
)
from rlhf.rollout.producer import Producer, async_batch
from rlhf.runtime import Runtime
from rlhf.trackers import Trackers, make_accelerator
from rlhf.trainers import checkpoint as ckpt
from rlhf.trainers import distributed as dist
from rlhf.trainers.critic import build_critic
from rlhf.trainers.experience import Experience
from rlhf.trainers.forward import ForwardSpec, batch_logprobs, batch_values
from rlhf.trainers.guards import NonFiniteGradients, Preemption
from rlhf.trainers.host import set_malloc_mmap_threshold
from rlhf.trainers.metrics import batch_metrics, completion_rows, critic_metrics, sequence_kl, step_records
from rlhf.trainers.natural import PolicyBatch
from rlhf.trainers.optim import Trainable, build_optimizer, build_scheduler
from rlhf.trainers.rewards import advantages, distill_rewards, token_rewards
from rlhf.trainers.update import Losses, update


def build_losses(cfg: Config) -> Losses:
    """The registered pieces of the loss picked by `cfg.algo` (beta is set per step: it may adapt)."""
    a = cfg.algo
    return Losses(policy_loss=algos.POLICY_LOSSES.get(a.policy_loss), aggregate=algos.LOSS_AGGREGATIONS.get(a.loss_agg),
                  kl=algos.KL_ESTIMATORS.get(a.kl.estimator), is_correction=algos.IS_CORRECTIONS.get(a.is_correction),
                  algo=a, extra=algos.UPDATES.get(a.update)(a).extra, value_clip=cfg.critic.value_clip,
                  max_new_tokens=cfg.generation.max_new_tokens)


def build_prompts(cfg: Config, tokenizer, dataset=None) -> PromptSource:
    """The training prompts: `dataset` (a `datasets.Dataset`) or `data.train` (a task, file or directory)."""
    d = cfg.data
    ds = dataset if dataset is not None else load_prompt_dataset(d.train, "train", d.task_args, cfg.train.seed)
    name = d.train if dataset is None else "train_dataset"
    return PromptSource(ds, tokenizer, name=name, prompt_column=d.prompt_column, max_prompt_tokens=d.max_prompt_tokens,
                        on_long_prompt=d.on_long_prompt, shuffle=d.shuffle, seed=cfg.train.seed)


class Trainer:
    """`Trainer(cfg).train()`; see the module docstring for one step."""

    def __init__(self, cfg: Config, accelerator: Optional[Accelerator] = None, *, model=None, tokenizer=None,
                 reward_funcs: Optional[Sequence[Callable]] = None, train_dataset=None, environment_factory=None,
                 tools: Optional[Sequence[Callable]] = None, rollout_fn: Optional[Callable] = None):
        """From Python, as with TRL: `model` a local model directory (replaces `model.path`) or an already-loaded
        causal LM (then `tokenizer` too, unless the model was loaded from a local directory), `reward_funcs`
        callables with TRL's signature (or (callable, weight) pairs; replace `reward.functions`), `train_dataset`
        a `datasets.Dataset` with a prompt column (replaces `data.train`); `environment_factory` (a class: one
        instance per episode), `tools` (functions) and `rollout_fn` (a rollout hook) replace `env.*`."""
        if isinstance(model, (str, Path)):
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(model)))
            model = None
        elif model is not None:
            local = getattr(model.config, "_name_or_path", "")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=local or cfg.model.path))
            if cfg.generation.engine != "hf":
                raise ConfigError(f"generation.engine={cfg.generation.engine} loads the model from its directory: "
                                  "pass model as a path")
        self.cfg = cfg
        self.acc = accelerator or make_accelerator(cfg)  # an accelerator passed in brings its own trackers
        self.rt = Runtime(self.acc, cfg.train.micro_batch_size)
        self.layout = dist.layout(self.acc)  # single, ddp, zero2, zero3 or fsdp2
        check_config(cfg, self.acc.num_processes)  # values, algorithm names and combinations, the engine
        dist.check_layout(cfg, self.acc, self.layout)
        quiet_repeated_warnings()
        kind = critic_type(cfg)
        set_seed(cfg.train.seed, device_specific=True)
        set_malloc_mmap_threshold(cfg.speed.malloc_mmap_threshold_mb)  # before the models allocate
        self.out = Path(cfg.output_dir)
        self.log = self.acc.print
        self.log(f"{cfg.derived_summary(self.acc.num_processes)} | layout {self.layout}")

        # Cheap, error-prone inputs first: rewards and data fail before the model loads.
        self.tokenizer = (with_pad_token(tokenizer) if tokenizer is not None
                          else load_tokenizer(cfg.model.path, cfg.model.trust_remote_code))
        self.episodes = build_episodes(cfg, self.tokenizer, environment_factory, tools, rollout_fn)
        specs = list(cfg.reward.functions if reward_funcs is None else reward_funcs) + episode_rewards(self.episodes)
        self.rewards = RewardModule(specs, cfg.reward.on_error, cfg.reward.timeout_s)
        self.prompts = build_prompts(cfg, self.tokenizer, train_dataset)
        if self.prompts.stats["prompts/too_long"]:
            self.log(f"data: {self.prompts.stats} (data.on_long_prompt={cfg.data.on_long_prompt})")

        self.state = {"step": 0, "opt_step": 0}
        with dist.whole_loading(self.layout):
            policy = load_policy(cfg.model, model)
            self.ref = load_reference(cfg.model, policy, cfg.algo.kl.coef)  # frozen, whole on every process
            # zero3/fsdp2: the engine samples from a whole copy, refreshed after each step (rlhf.trainers.distributed)
            self.full = dist.full_copy(policy).to(self.acc.device) if self.layout in dist.SHARDED else None
        if self.ref is not None:
            self.ref.to(self.acc.device)
        d = cfg.distill
        self.teacher = None if not d.teacher else load_teacher(d.teacher, self.tokenizer, cfg.model.compute_dtype,
                                                             cfg.model.trust_remote_code).to(self.acc.device)
        if cfg.train.max_staleness and uses_dropout(policy):
            warn_once("train.max_staleness > 0 with dropout in the policy: the background sampling and the dropout "
                      "masks share torch's generator, so this run is not reproducible to the bit (resume included)")
        optimizer = build_optimizer(policy, cfg.train)
        self.total_opt_steps = cfg.train.steps * cfg.train.updates_per_batch * cfg.train.mini_batches_per_pass
        if self.layout in ("zero2", "zero3"):
            dist.configure_deepspeed(cfg, self.acc)
        self.model, optimizer = self.acc.prepare(policy, optimizer)
        # on the optimizer that steps (DeepSpeed wraps it, or swaps in its CPU Adam when offloading)
        scheduler = build_scheduler(dist.inner_optimizer(optimizer), cfg.train, self.total_opt_steps)
        self.policy = Trainable(self.model, optimizer, scheduler,
                                NonFiniteGradients(self.state, cfg.train.max_skipped_steps), cfg.train.max_grad_norm)
        # speed.engine_bf16_casts: the engine hands its bf16 casts of the policy's weights to the training forwards
        name = cfg.generation.engine
        use_casts = (cfg.speed.engine_bf16_casts and self.layout in ("single", "ddp")
                     and ENGINES.meta(name).get("bf16_casts"))
        casts = Bf16Casts(dist.inner_optimizer(optimizer)) if use_casts else None
        extra = {"casts": casts} if casts is not None else {}
        self.engine = ENGINES.get(name)(self.whole_model, self.tokenizer, cfg, **extra)
        if casts is not None and casts.offered:  # the engine casts at every sync (the HF engine's decode loop)
            casts.install(self.unwrapped)
        # sampler log-probs: needed by an IS correction; the gap metric where the engine has them for free
        want_logps = cfg.algo.is_correction != "none" or getattr(self.engine, "free_logps", False)
        self.source = RolloutSource(self.prompts, self.engine, self.rewards, self.tokenizer, want_logps, self.episodes)
        self.fwd = ForwardSpec(self.tokenizer.pad_token_id, cfg.generation.temperature, cfg.model.compute_dtype,
                               self.acc.device, cfg.train.pack_prompts)
        self.losses, self.adv_fn = build_losses(cfg), algos.ADVANTAGES.get(cfg.algo.advantage)
        self.natural = algos.UPDATES.get(cfg.algo.update)(cfg.algo).natural  # npg / trpo: the natural-gradient branch
        self.old_logp = old_logp_source(cfg)  # 'forward', 'first_pass' or 'none': decided once
        # Everything a checkpoint saves and a resume restores: the policy, and the critic and an adaptive KL controller.
        # zero2/zero3/fsdp2: the optimizer is saved per process (distributed.save_sharded); "policy" holds whole
        # weights.
        self.stateful = {"policy": self.whole_model, "optimizer": optimizer, "scheduler": scheduler}
        if dist.shards_optimizer(self.layout):
            del self.stateful["optimizer"]
        self.critic = (build_critic(cfg, kind, self.unwrapped, self.acc, self.total_opt_steps, self.state)
                       if kind != "none" else None)
        if self.critic is not None:
            self.stateful.update(critic=self.acc.unwrap_model(self.critic.model),
                                 critic_optimizer=self.critic.optimizer, critic_scheduler=self.critic.scheduler)
        k = cfg.algo.kl
        self.kl_ctl = KLController(k.coef, k.target, k.horizon)
        if k.target is not None:  # an adaptive beta is state; a fixed one is config
            self.stateful["kl_controller"] = self.kl_ctl
        self.metrics = JsonlWriter(self.out / "metrics.jsonl")
        self.completions = JsonlWriter(self.out / "completions.jsonl")
        self._saved_step: Optional[int] = None
        self.producer: Optional[Producer] = None  # train.max_staleness > 0: the background generation
        self._resumed_batches: dict[int, Batch] = {}
        self.trackers = Trackers(cfg, self.acc)

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

    # ------------------------------------------------------------------ the step

    def step(self) -> list[dict]:
        """One RL step; returns the metrics records written (one per optimizer step)."""
        timer, t0 = PhaseTimer(), time.perf_counter()
        exp, batch = self.make_experience(timer)
        with timer("train"):
            updates = self.update(exp)
        self.publish(self.state["step"] + 1, timer)
        return self.log_step(exp, batch, updates, timer, t0)

    def next_batch(self, timer: PhaseTimer) -> Batch:
        """This step's scored samples: generated now, or (train.max_staleness > 0) taken from the producer."""
        k = self.cfg.train.max_staleness
        if k and self.producer is None:  # generation runs ahead from here on, in a background thread
            make = functools.partial(async_batch, self.source, self.cfg, self.rt)
            self.producer = Producer(make, k, self.state["step"] + 1, self.cfg.train.steps,
                                     self.cfg.train.seed, self._resumed_batches, self.prompts.state)
            self._resumed_batches = {}  # the producer holds them now
        if self.producer is None:
            batch = rollout(self.source, self.cfg, self.rt, timer)  # generate + score (+ DAPO rounds)
            self.engine.sleep()  # frees the GPU for training where the engine supports it
            batch.version = self.state["step"]
            return batch
        with timer("wait"):
            return self.producer.take(self.state["step"] + 1)

    def publish(self, version: int, timer: PhaseTimer) -> None:
        """Make the engine sample from policy `version` (the policy now): at once, or once the producer is idle."""
        if self.producer is not None:
            with timer("wait"):  # for the batch k ahead (rlhf.rollout.producer)
                self.producer.idle_for(version)
        with timer("sync"):
            self.engine.wake()
            self.sync_weights()
        if self.producer is not None:
            self.producer.admit(version)

    def make_experience(self, timer: PhaseTimer) -> tuple[Experience, Batch]:
        """A scored batch, then everything the update reads: log-probs, values, rewards, advantages."""
        cfg, rt, kl = self.cfg, self.rt, self.cfg.algo.kl
        batch = self.next_batch(timer)
        batch.metrics.update(episode_metrics(batch.env_stats, rt))
        exp = Experience.from_samples(batch.samples, cfg.algo.mask_truncated)
        with timer("logprob"):
            if self.old_logp == "forward":  # else taken from the update's first pass, or pi_old = pi
                exp.old_logp_NT = batch_logprobs(self.unwrapped, exp, self.fwd, rt)
            if kl.coef > 0:  # LoRA: the reference is the policy with its adapter off
                exp.ref_logp_NT = batch_logprobs(self.ref or self.unwrapped, exp, self.fwd, rt,
                                                 adapter_off=self.ref is None)
            if self.teacher is not None:
                exp.teacher_logp_NT = batch_logprobs(self.teacher, exp, self.fwd, rt)
        if self.critic is not None:
            with timer("values"):
                exp.values_NT = batch_values(self.acc.unwrap_model(self.critic.model), exp, self.fwd, rt)
        exp.rewards_NT, kl_in_reward = token_rewards(exp, self.losses.kl, self.kl_coef, kl.placement == "in_reward", rt)
        if self.teacher is not None:  # on-policy distillation: a dense reward, the reverse KL to the teacher
            distill_NT, batch.metrics["distill/reverse_kl"] = distill_rewards(exp, cfg.distill.coef, rt)
            exp.rewards_NT = exp.rewards_NT + distill_NT
        exp.adv_NT, exp.ret_NT = advantages(exp, self.adv_fn, cfg.algo, cfg.train.samples_per_prompt, rt)
        if kl_in_reward is not None:
            batch.metrics["kl_in_reward"] = kl_in_reward
        return exp, batch

    def update(self, exp: Experience) -> list[dict]:
        """The policy's and the critic's optimizer steps on `exp`: the one update loop, or a natural-gradient step
        of the policy (npg, trpo) and the loop for the critic. One record per optimizer step."""
        cfg, rt = self.cfg, self.rt
        frozen = self.critic is not None and self.state["step"] < cfg.critic.warmup_steps  # the critic's warm-up
        L = dataclasses.replace(self.losses, beta=self.kl_coef if cfg.algo.kl.placement == "in_loss" else 0.0)
        first_order = self.policy if not (frozen or self.natural) else None
        records = []
        if first_order is not None or self.critic is not None:
            records = update(exp, first_order, self.critic, L, self.fwd, cfg.train, rt,
                             capture_old=self.old_logp == "first_pass" and first_order is not None)
        if self.natural is not None and not frozen:
            problem = PolicyBatch(self.unwrapped, exp, L, self.fwd, rt, self.policy.guard,
                                  cfg.algo.natural.fisher_samples, capture_old=self.old_logp == "first_pass")
            step = self.natural(problem, cfg.algo)
            records = [{**step, **r} for r in records] or [step]
        return [{"policy_frozen": 1.0, **r} for r in records] if frozen else records

    def log_step(self, exp: Experience, info: Batch, updates: list[dict], timer: PhaseTimer, t0: float) -> list[dict]:
        """Count the step, assemble its records, write them (metrics.jsonl, trackers, completions); return them."""
        cfg, rt = self.cfg, self.rt
        self.state["opt_step"] += len(updates)
        self.state["step"] += 1
        batch = batch_metrics(exp, info.samples, info.reward_stats, cfg.train.samples_per_prompt, rt)
        batch.update({"world_size": rt.num_processes, "skipped_steps": self.state["skipped_steps"],
                      **self.prompts.stats})
        batch.update({**info.metrics, "staleness": float(self.state["step"] - 1 - info.version)})
        if cfg.algo.kl.coef > 0:  # beta used this step; an adaptive controller then moves it by the sequence KL
            batch["kl_coef"] = self.kl_coef
            if cfg.algo.kl.target is not None:
                batch["kl_seq"] = sequence_kl(self.losses.kl, exp, rt)
                self.kl_ctl.update(batch["kl_seq"], cfg.samples_per_step)
        if self.critic is not None:
            batch.update({**critic_metrics(exp, rt), "critic/skipped_steps": self.state["critic/skipped_steps"]})
        times = {f"time/{k}_s": v for k, v in timer.seconds.items()}
        times["time/step_s"] = time.perf_counter() - t0
        records = step_records(self.state["step"], self.state["opt_step"] - len(updates) + 1, batch, updates, times)
        if self.is_main:
            for rec in records:
                self.metrics.write(rec)
            self.trackers.log(records)
            warn_about_step(records[0],
                            group_relative=bool(algos.ADVANTAGES.meta(cfg.algo.advantage).get("group_relative")))
            rows = completion_rows(self.state["step"], exp, info.samples, cfg.log.completions_per_step)
            for row in rows:
                self.completions.write(row)
            self.trackers.log_completions(rows, self.state["step"], records[-1]["opt_step"])
        return records

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
        guards = [self.policy.guard] + ([self.critic.guard] if self.critic is not None else [])
        try:
            while self.state["step"] < cfg.train.steps:
                records = self.step()
                history += records
                if self.is_main:
                    progress.update(records[0])
                stop, every = preemption.requested(self.acc), cfg.checkpoint.every
                exceeded = next((g for g in guards if g.exceeded), None)
                if stop or exceeded or (every and self.state["step"] % every == 0):
                    self.save_checkpoint()
                if exceeded:
                    raise exceeded.error(self.state["step"])
                if stop:
                    self.log(f"{preemption.name}: saved a checkpoint at step {self.state['step']}; exiting "
                             "(continue with checkpoint.resume=latest)")
                    return history
        finally:
            if self.producer is not None:
                self.producer.close()
                self.producer = None
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
        data = self.prompts.state()
        if self.producer is not None:  # the batches generated and not trained yet, per process; the prompts after them
            ready, data = self.producer.pending()
            path = ckpt.staging_dir(root, step) / f"async_rank{self.acc.process_index}.json"
            path.write_text(json.dumps({str(k): batch_to_json(b) for k, b in ready.items()}))
        if dist.shards_optimizer(self.layout):
            dist.save_sharded(self.model, self.policy.optimizer, ckpt.staging_dir(root, step) / dist.SHARDED_DIR,
                              self.layout)
        self.acc.wait_for_everyone()
        if self.is_main:
            state = {**self.state, "data": data, "layout": self.layout, "world_size": self.acc.num_processes}
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
                                           f"checkpoint resumes only with the same layout, "
                                           f"not {self.acc.num_processes} under {self.layout}")
            dist.load_sharded(self.model, self.policy.optimizer, path / dist.SHARDED_DIR, self.layout)
        self.prompts.load_state(state.pop("data"))
        self.state.update(state)
        pending = path / f"async_rank{self.acc.process_index}.json"
        if self.cfg.train.max_staleness and pending.is_file():  # generated before the checkpoint, not trained yet
            self._resumed_batches = {int(k): batch_from_json(b) for k, b in json.loads(pending.read_text()).items()}
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
