"""Bradley-Terry reward-model training on preference pairs, on accelerate.

One optimizer step, top to bottom (see `RewardModelTrainer.step`):

    pairs_per_step pairs (seeded epochs; each process takes its slice)
    -> per micro-batch: one forward over chosen and rejected (packed: one row per pair) -> r_chosen_M, r_rejected_M
    -> loss = mean_M -logsigmoid(r_chosen - r_rejected - margin)  [+ coef * mean (r_chosen + r_rejected)^2]
    -> backward, clip, optimizer step (rlhf's one clip-and-step: a NaN/inf gradient is skipped and counted,
       `train.max_skipped_steps` in a row stop the run) -> metrics.jsonl (loss, accuracy, margin, lr, grad norm)

Held-out pairwise accuracy (the fraction of pairs with r_chosen > r_rejected) is logged as
`eval/accuracy` every `eval.every` steps and at the end.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from reward_models.config import RewardModelConfig
from reward_models.data import PreferencePairs, load_pairs
from reward_models.model import load_reward_model, save_reward_model, score_sequences
from reward_models.packing import packed_pair_scores
from rlhf.config import to_dict
from rlhf.logging import JsonlWriter
from rlhf.models.loading import load_tokenizer
from rlhf.runtime import Runtime
from rlhf.trainers.guards import NonFiniteGradients
from rlhf.trainers.optim import Trainable, build_optimizer, build_scheduler


def bradley_terry_loss(r_chosen_M: torch.Tensor, r_rejected_M: torch.Tensor,
                       margin_M: Optional[torch.Tensor] = None) -> torch.Tensor:
    """loss_M = -log sigmoid(r_chosen - r_rejected - margin): the negative log-likelihood of the
    preference under the Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1;
    the margin term is Llama 2's, Touvron et al. 2023)."""
    diff_M = r_chosen_M - r_rejected_M
    if margin_M is not None:
        diff_M = diff_M - margin_M
    return -F.logsigmoid(diff_M)


class RewardModelTrainer:
    def __init__(self, cfg: RewardModelConfig, accelerator: Optional[Accelerator] = None):
        self.cfg = cfg
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        cfg.validate(self.acc.num_processes)
        set_seed(cfg.train.seed, device_specific=False)  # same score-head init on every process
        self.out = Path(cfg.output_dir)
        self.log = self.acc.print

        # Cheap, error-prone inputs first: the data fails before the model loads.
        self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        self.train_pairs, self.eval_pairs = load_pairs(cfg.data, self.tokenizer, cfg.train.seed)
        n_eval = 0 if self.eval_pairs is None else len(self.eval_pairs)
        self.log(f"reward model: {len(self.train_pairs)} train pairs, {n_eval} eval pairs "
                 f"| {cfg.train.pairs_per_step} pairs/step "
                 f"| {self.acc.num_processes} process(es) x {cfg.train.pairs_per_step // self.acc.num_processes} pairs "
                 f"| micro_batch_size {cfg.train.micro_batch_size} | {cfg.train.steps} steps")

        model = load_reward_model(cfg.model, self.tokenizer)
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train, cfg.train.steps)
        self.model, optimizer = self.acc.prepare(model, optimizer)
        self.rt = Runtime(self.acc, cfg.train.micro_batch_size)
        self.state = {"step": 0, "epoch": 0, "pos": 0}
        guard = NonFiniteGradients(self.state, cfg.train.max_skipped_steps, name="reward model")
        self.trainable = Trainable(self.model, optimizer, scheduler, guard, cfg.train.max_grad_norm)
        self._order = self._permutation()
        self.metrics = JsonlWriter(self.out / "metrics.jsonl")

    # ------------------------------------------------------------------ helpers

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    def _permutation(self) -> list[int]:
        """This epoch's pair order; with group_by_prompt, a shuffled order of prompts,
        each with its pairs (shuffled) together."""
        g = torch.Generator().manual_seed(self.cfg.train.seed + self.state["epoch"])
        order = torch.randperm(len(self.train_pairs), generator=g).tolist()
        if not self.cfg.train.group_by_prompt:
            return order
        groups: dict = {}
        for i in order:  # dicts keep first-seen order: prompts in random order, pairs in random order
            key = self.train_pairs.prompt_keys[i]
            groups.setdefault(("row", i) if key is None else key, []).append(i)
        return [i for members in groups.values() for i in members]

    def next_pairs(self) -> list[int]:
        """This process's slice of the next `pairs_per_step` global pair indices (crossing epochs)."""
        count, out = self.cfg.train.pairs_per_step, []
        while len(out) < count:
            if self.state["pos"] >= len(self._order):
                self.state["epoch"], self.state["pos"] = self.state["epoch"] + 1, 0
                self._order = self._permutation()
            take = min(count - len(out), len(self._order) - self.state["pos"])
            out += self._order[self.state["pos"]: self.state["pos"] + take]
            self.state["pos"] += take
        per = count // self.acc.num_processes
        return out[self.acc.process_index * per: (self.acc.process_index + 1) * per]

    def pair_scores(self, model: torch.nn.Module, pairs: PreferencePairs,
                    idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_chosen_M, r_rejected_M) for pairs `idx`, from one forward over chosen and rejected together
        (packed: one row per pair, or per run of pairs with the same prompt, sharing the common prefix;
        else 2M padded rows)."""
        chosen, rejected = [pairs.chosen_ids[i] for i in idx], [pairs.rejected_ids[i] for i in idx]
        pad, device, dtype = self.tokenizer.pad_token_id, self.acc.device, self.cfg.model.compute_dtype
        if self.cfg.train.pack_pairs:
            return packed_pair_scores(model, chosen, rejected, pad, device, dtype, [pairs.prompt_keys[i] for i in idx])
        scores_B = score_sequences(model, chosen + rejected, pad, device, dtype)
        return scores_B[: len(idx)], scores_B[len(idx):]

    # ------------------------------------------------------------------ the step

    def step(self) -> dict:
        cfg, rt, t0 = self.cfg, self.rt, time.perf_counter()
        idx = self.next_pairs()
        chunks = rt.micro_batches(idx)
        sums = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0}
        self.model.train()
        for k, chunk in enumerate(chunks):
            with rt.accumulate([self.model], last=k == len(chunks) - 1):
                r_c, r_r = self.pair_scores(self.model, self.train_pairs, chunk)
                margin_M = torch.tensor([self.train_pairs.margins[i] for i in chunk], device=r_c.device)
                loss_M = bradley_terry_loss(r_c, r_r, margin_M)
                if cfg.train.center_rewards_coef > 0:
                    loss_M = loss_M + cfg.train.center_rewards_coef * (r_c + r_r) ** 2
                rt.backward(loss_M.sum() / cfg.train.pairs_per_step)  # the mean over every process's pairs
            diff = (r_c - r_r).detach()
            sums["loss"] += float(loss_M.detach().sum())
            sums["correct"] += float((diff > 0).sum())
            sums["margin"] += float(diff.sum())
            sums["chosen"] += float(r_c.detach().sum())
            sums["rejected"] += float(r_r.detach().sum())
        lr = self.trainable.scheduler.get_last_lr()[0]  # the rate this step uses
        grad_norm = self.trainable.clip_and_step(self.acc)
        if self.trainable.guard.exceeded:
            raise self.trainable.guard.error(None)
        self.state["step"] += 1
        n = cfg.train.pairs_per_step
        record = {
            "step": self.state["step"], "epoch": self.state["epoch"], "loss": rt.reduce_sum(sums["loss"]) / n,
            "accuracy": rt.reduce_sum(sums["correct"]) / n, "margin": rt.reduce_sum(sums["margin"]) / n,
            "reward/chosen": rt.reduce_sum(sums["chosen"]) / n, "reward/rejected": rt.reduce_sum(sums["rejected"]) / n,
            "lr": lr, "grad_norm": grad_norm, "skipped_steps": self.state["skipped_steps"],
            "time/step_s": time.perf_counter() - t0,
        }
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss and pairwise accuracy over every eval pair (each process scores a contiguous share)."""
        t0, pairs = time.perf_counter(), self.eval_pairs
        per = -(-len(pairs) // self.acc.num_processes)
        mine = list(range(self.acc.process_index * per, min(len(pairs), (self.acc.process_index + 1) * per)))
        model = self.unwrapped
        model.eval()
        subsets = sorted({s for s in pairs.subsets if s is not None})  # the same on every process
        sums = {"loss": 0.0, "correct": 0.0, "margin": 0.0, **{f"correct/{s}": 0.0 for s in subsets}}
        bs = self.cfg.eval.batch_size
        for start in range(0, len(mine), bs):
            chunk = mine[start: start + bs]
            r_c, r_r = self.pair_scores(model, pairs, chunk)
            margin_M = torch.tensor([pairs.margins[i] for i in chunk], device=r_c.device)
            sums["loss"] += float(bradley_terry_loss(r_c, r_r, margin_M).sum())
            correct = (r_c > r_r).tolist()
            sums["correct"] += sum(correct)
            sums["margin"] += float((r_c - r_r).sum())
            for i, ok in zip(chunk, correct):
                if pairs.subsets[i] is not None:
                    sums[f"correct/{pairs.subsets[i]}"] += ok
        model.train()
        n = len(pairs)
        record = {"step": self.state["step"], "eval/loss": self.rt.reduce_sum(sums["loss"]) / n,
                  "eval/accuracy": self.rt.reduce_sum(sums["correct"]) / n,
                  "eval/margin": self.rt.reduce_sum(sums["margin"]) / n,
                  "eval/pairs": n}
        for s in subsets:
            record[f"eval/accuracy/{s}"] = self.rt.reduce_sum(sums[f"correct/{s}"]) / pairs.subsets.count(s)
        record["time/eval_s"] = time.perf_counter() - t0
        return record

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict]:
        """Run `train.steps` optimizer steps; returns every record written to metrics.jsonl."""
        cfg, history = self.cfg, []
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics.path.unlink(missing_ok=True)  # a fresh run: no records from an earlier one
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

        def emit(record: dict) -> None:
            history.append(record)
            if self.acc.is_main_process:
                self.metrics.write(record)
                if cfg.progress:
                    self.log(console_line(record), flush=True)

        t_start = time.perf_counter()
        if self.eval_pairs is not None and cfg.eval.at_start:
            emit(self.evaluate())
        while self.state["step"] < cfg.train.steps:
            emit(self.step())
            step, last = self.state["step"], self.state["step"] == cfg.train.steps
            if self.eval_pairs is not None and (last or (cfg.eval.every and step % cfg.eval.every == 0)):
                emit(self.evaluate())
            if cfg.save.every and step % cfg.save.every == 0 and not last:
                self.save(self.out / "checkpoints" / f"step_{step:06d}")
                self._prune_checkpoints()
        self.log(f"trained {cfg.train.steps} steps in {time.perf_counter() - t_start:.1f} s")
        if cfg.save.final:
            self.save(self.out / "final")
        return history

    def save(self, target: Path) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            save_reward_model(self.unwrapped, self.tokenizer, target)
        self.acc.wait_for_everyone()

    def _prune_checkpoints(self) -> None:
        if not self.acc.is_main_process:
            return
        done = sorted((self.out / "checkpoints").glob("step_*"))
        for d in done[: max(0, len(done) - self.cfg.save.keep_last)]:
            shutil.rmtree(d, ignore_errors=True)


def console_line(record: dict) -> str:
    if "eval/accuracy" in record:
        subsets = "".join(f"  {k[len('eval/accuracy/'):]} {v:.3f}" for k, v in record.items()
                          if k.startswith("eval/accuracy/"))
        return (f"eval @ step {record['step']:>4}  accuracy {record['eval/accuracy']:.3f}{subsets}  "
                f"loss {record['eval/loss']:.4f}  "
                f"margin {record['eval/margin']:+.3f}  ({record['eval/pairs']} pairs, {record['time/eval_s']:.1f}s)")
    return (f"step {record['step']:>4}  loss {record['loss']:.4f}  accuracy {record['accuracy']:.3f}  "
            f"margin {record['margin']:+.3f}  "
            f"lr {record['lr']:.2e}  {record['time/step_s']:.1f}s")
