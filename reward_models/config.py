"""Typed config of a reward-model run: YAML file + dotted `key=value` overrides, validated up front.

    cfg = load_rm_config("recipes/reward_model_arithmetic.yaml", ["train.steps=50"])

The machinery (typed fields with help texts, unknown-key and wrong-type errors, overrides)
is `rlhf.config`'s; the model section is the policy's `ModelConfig` (path, LoRA, dtype).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from rlhf.config import ConfigError, ModelConfig, load_config, opt


@dataclass
class PreferenceDataConfig:
    train: str = opt("arithmetic_preferences", "built-in preference task (reward_models.PREFERENCE_TASKS) or a "
                                               "jsonl/csv/parquet file or saved dataset dir")
    eval: Optional[str] = opt(None, "held-out pairs, same forms as `train` (a task name gives its eval split); "
                                    "None: see eval_fraction")
    eval_fraction: float = opt(0.0, "when `eval` is None: hold out this seeded fraction of the train rows (0: no eval)")
    task_args: dict[str, Any] = opt({}, "keyword arguments for a built-in preference task generator")
    prompt_column: str = opt("prompt", "optional column with the shared prompt (string or chat messages); "
                                       "absent: chosen/rejected hold the whole text")
    chosen_column: str = opt("chosen", "column with the preferred response (string, or a list of chat messages)")
    rejected_column: str = opt("rejected", "column with the dispreferred response (same form as chosen)")
    margin_column: Optional[str] = opt(None, "optional numeric column: "
                                             "loss = -logsigmoid(r_chosen - r_rejected - margin)")
    subset_column: Optional[str] = opt(None, "optional column naming each pair's subset: eval accuracy is also logged "
                                             "per subset (eval/accuracy/<subset>)")
    max_length: int = opt(512, "tokens per formatted prompt+response; longer pairs are handled by `on_long_pair`")
    on_long_pair: Literal["error", "filter"] = opt("error", "a pair over max_length stops the run naming the row, "
                                                            "or is dropped and counted")


@dataclass
class RMTrainConfig:
    steps: int = opt(100, "optimizer steps (the training pairs are cycled through in seeded epochs)")
    pairs_per_step: int = opt(16, "preference pairs per optimizer step (all processes together)")
    micro_batch_size: int = opt(16, "pairs per forward/backward on one process (each pair is 2 sequences)")
    pack_pairs: bool = opt(True, "chosen and rejected (and consecutive pairs of one prompt) share one row and "
                                 "one prompt copy (same scores, fewer tokens)")
    group_by_prompt: bool = opt(False, "keep the pairs of a prompt together in the data order, so a step's pairs "
                                       "share few prompts and pack densely")
    lr: float = opt(1e-4, "peak learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt("linear", "decay after warmup")
    warmup_steps: int = opt(0, "linear warmup, in optimizer steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    max_skipped_steps: int = opt(3, "optimizer steps with NaN/inf gradients are skipped and counted; "
                                    "this many in a row stop the run with an error (0: never stop)")
    center_rewards_coef: float = opt(0.0, "adds coef * mean((r_chosen + r_rejected)^2), keeping scores centred on 0 "
                                          "(Eisenstein et al. 2023)")
    seed: int = opt(0, "seed for the data order and the score head's initialisation")


@dataclass
class RMEvalConfig:
    every: int = opt(25, "evaluate on the held-out pairs every N optimizer steps (0: only at the end)")
    at_start: bool = opt(True, "also evaluate before the first step (the untrained baseline)")
    batch_size: int = opt(32, "pairs per evaluation forward on one process")


@dataclass
class RMSaveConfig:
    every: int = opt(0, "save a loadable model to checkpoints/step_N every N optimizer steps (0: only the final model)")
    keep_last: int = opt(2, "checkpoints kept on disk")
    final: bool = opt(True, "save <output_dir>/final "
                            "(merged if LoRA: loads with AutoModelForSequenceClassification, no peft)")


@dataclass
class RewardModelConfig:
    output_dir: str = opt("runs/reward_model", "run directory: metrics.jsonl, checkpoints, final model")
    model: ModelConfig = opt(ModelConfig(), "backbone (any local causal LM); a 1-output score head is added on top")
    data: PreferenceDataConfig = opt(PreferenceDataConfig(), "preference pairs")
    train: RMTrainConfig = opt(RMTrainConfig(), "optimisation and batch sizes")
    eval: RMEvalConfig = opt(RMEvalConfig(), "held-out pairwise accuracy")
    save: RMSaveConfig = opt(RMSaveConfig(), "checkpoints and the final model")
    progress: bool = opt(True, "print one line per optimizer step")

    def validate(self, world_size: int = 1) -> None:
        """Check values up front; raise ConfigError naming the key."""
        t = self.train
        for key in ("steps", "pairs_per_step", "micro_batch_size"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
        if t.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {t.lr}")
        if t.center_rewards_coef < 0:
            raise ConfigError(f"train.center_rewards_coef must be >= 0, got {t.center_rewards_coef}")
        if t.pairs_per_step % world_size:
            raise ConfigError(f"train.pairs_per_step={t.pairs_per_step} must be divisible by the number of processes "
                              f"({world_size})")
        per_rank = t.pairs_per_step // world_size
        if per_rank % t.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size={t.micro_batch_size} must divide the pairs per process per step "
                f"({per_rank} = pairs_per_step {t.pairs_per_step} / {world_size} processes)"
            )
        d = self.data
        if not 0 <= d.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
        if d.eval is not None and d.eval_fraction > 0:
            raise ConfigError("data.eval and data.eval_fraction are both set: give held-out pairs one way")
        if d.max_length < 2:
            raise ConfigError(f"data.max_length must be >= 2, got {d.max_length}")
        if len({d.prompt_column, d.chosen_column, d.rejected_column}) < 3:
            raise ConfigError("data.prompt_column, data.chosen_column and data.rejected_column "
                              "must be three different names")
        if self.eval.every < 0 or self.eval.batch_size < 1:
            raise ConfigError(f"eval.every must be >= 0 and eval.batch_size >= 1, "
                              f"got {self.eval.every}, {self.eval.batch_size}")
        if self.save.every < 0 or self.save.keep_last < 1:
            raise ConfigError(f"save.every must be >= 0 and save.keep_last >= 1, "
                              f"got {self.save.every}, {self.save.keep_last}")
        from reward_models.tasks import PREFERENCE_TASKS

        for key in ("train", "eval"):
            spec = getattr(d, key)
            if spec is not None and spec not in PREFERENCE_TASKS and not Path(spec).expanduser().exists():
                raise ConfigError(
                    f"data.{key}: '{spec}' is neither a built-in preference task "
                    f"({', '.join(PREFERENCE_TASKS.names())}) nor an existing file or directory"
                )

    @property
    def has_eval(self) -> bool:
        return self.data.eval is not None or self.data.eval_fraction > 0


def load_rm_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RewardModelConfig:
    """Read YAML `path` (optional), apply dotted overrides, return a typed RewardModelConfig."""
    return load_config(path, overrides, cls=RewardModelConfig)
