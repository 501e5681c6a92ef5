"""Typed run configuration: YAML file + dotted `key=value` overrides, validated before anything loads.

    cfg = load_config("recipes/grpo_arithmetic.yaml", ["train.steps=10", "algo.kl.coef=0"])

Every key has a type and a help text (`rlhf train --help` prints them). An unknown
key fails naming the closest valid one; a wrong type or value fails naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (lists and dicts are copied per instance)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        proto = default
        return field(default_factory=lambda: _copy(proto), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _copy(x: Any) -> Any:
    import copy

    return copy.deepcopy(x)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraConfig:
    enabled: bool = opt(True, "train a LoRA adapter (false: full fine-tuning)")
    r: int = opt(16, "LoRA rank")
    alpha: float = opt(32.0, "LoRA alpha (scale = alpha / r)")
    dropout: float = opt(0.0, "LoRA dropout")
    target_modules: list[str] = opt(ALL_LINEAR, "module names LoRA wraps, or ['all-linear']")


@dataclass
class ModelConfig:
    path: str = opt("smollm2-135m-instruct", "local transformers model directory, or 'smollm2-135m-instruct' (embedded)")
    compute_dtype: Literal["bf16", "fp32"] = opt(
        "bf16", "dtype of forward/backward compute (autocast); weights and optimizer state stay fp32"
    )
    trust_remote_code: bool = opt(False, "allow model code from the model directory (off unless you trust it)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    lora: LoraConfig = opt(LoraConfig(), "LoRA adapter settings")


@dataclass
class DataConfig:
    train: str = opt("arithmetic", "built-in task name (see rlhf.data.TASKS) or a jsonl/csv/parquet file or saved dataset dir")
    eval: Optional[str] = opt(None, "eval prompts, same forms as `train` (a task name gives its eval split)")
    task_args: dict[str, Any] = opt({}, "keyword arguments for a built-in task generator")
    prompt_column: str = opt("prompt", "column holding the prompt (string, or a list of chat messages)")
    max_prompt_tokens: int = opt(512, "prompts longer than this are handled by `on_long_prompt`")
    on_long_prompt: Literal["error", "filter", "truncate"] = opt("error", "what to do with a prompt over max_prompt_tokens")
    shuffle: bool = opt(True, "reshuffle prompts every epoch (seeded)")


@dataclass
class GenerationConfig:
    engine: str = opt("hf", "generation engine: hf (transformers) or vllm")
    max_new_tokens: int = opt(32, "maximum completion length in tokens")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling mass")
    top_k: int = opt(0, "top-k sampling (0: off)")


@dataclass
class KLConfig:
    coef: float = opt(0.04, "beta, the KL-to-reference coefficient (0: no reference model is loaded)")
    estimator: str = opt("k3", "KL estimator: k1, k2 or k3 (Schulman's approximations)")
    placement: Literal["in_loss", "in_reward"] = opt("in_loss", "add beta*KL to the loss (GRPO) or subtract it from the per-token reward (PPO)")


@dataclass
class AlgoConfig:
    advantage: str = opt("grpo", "advantage estimator (rlhf.algos.ADVANTAGES)")
    policy_loss: str = opt("ppo_clip", "policy objective (rlhf.algos.POLICY_LOSSES)")
    loss_agg: str = opt("token_mean", "loss aggregation (rlhf.algos.LOSS_AGGREGATIONS)")
    eps_low: float = opt(0.2, "PPO clip range below 1 (ratio >= 1 - eps_low)")
    eps_high: float = opt(0.2, "PPO clip range above 1 (ratio <= 1 + eps_high); DAPO uses 0.28")
    dual_clip: Optional[float] = opt(None, "dual-clip constant c > 1 for negative advantages (None: off)")
    std_eps: float = opt(1e-4, "added to the group std before dividing (grpo)")
    gamma: float = opt(1.0, "discount factor for per-token returns")
    lam: float = opt(1.0, "GAE lambda")
    n_step: int = opt(3, "n for nstep_td")
    kl: KLConfig = opt(KLConfig(), "KL penalty to the reference policy")


@dataclass
class TrainConfig:
    steps: int = opt(25, "RL steps: each generates one batch and updates on it")
    prompts_per_step: int = opt(2, "prompts per RL step (all processes together)")
    samples_per_prompt: int = opt(8, "completions sampled per prompt (the group size G)")
    micro_batch_size: int = opt(8, "samples per forward/backward pass on one process")
    pack_prompts: bool = opt(True, "training forwards compute each prompt once per group (shared-prompt packing)")
    updates_per_batch: int = opt(1, "passes over each batch (mu); >1 keeps old log-probs for the ratio")
    lr: float = opt(1e-5, "peak learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt("constant", "decay after warmup")
    warmup_steps: int = opt(0, "linear warmup, in optimizer steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    seed: int = opt(0, "seed for data order, sampling and initialisation")


@dataclass
class RewardSpec:
    fn: str = opt("", "registry name, 'module.path:function' or 'path/to/file.py:function'")
    weight: float = opt(1.0, "weight in the combined score")
    name: Optional[str] = opt(None, "name used in metrics (default: the function's name)")


@dataclass
class RewardConfig:
    functions: list[RewardSpec] = opt([RewardSpec(fn="first_number_matches")], "reward functions and weights")
    on_error: Literal["raise", "skip"] = opt("raise", "a raising function stops the run, or its samples score None")
    timeout_s: Optional[float] = opt(None, "per-call timeout in seconds (None: no limit)")


@dataclass
class CheckpointConfig:
    every: int = opt(0, "save a checkpoint every N RL steps (0: only at the end)")
    keep_last: int = opt(2, "checkpoints kept on disk")
    resume: str = opt("none", "'none', 'latest' (in output_dir) or a checkpoint directory")
    save_final: bool = opt(True, "save the final model with save_pretrained")
    merge_lora: bool = opt(False, "also save LoRA merged into the base weights")


@dataclass
class LogConfig:
    completions_per_step: int = opt(4, "completions written to completions.jsonl per step")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class Config:
    output_dir: str = opt("runs/default", "run directory: metrics.jsonl, checkpoints, final model")
    model: ModelConfig = opt(ModelConfig(), "policy model")
    data: DataConfig = opt(DataConfig(), "prompt data")
    generation: GenerationConfig = opt(GenerationConfig(), "sampling")
    algo: AlgoConfig = opt(AlgoConfig(), "algorithm")
    train: TrainConfig = opt(TrainConfig(), "optimisation and batch sizes")
    reward: RewardConfig = opt(RewardConfig(), "reward functions")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "checkpoints and resume")
    log: LogConfig = opt(LogConfig(), "logging")

    @property
    def samples_per_step(self) -> int:
        return self.train.prompts_per_step * self.train.samples_per_prompt

    def validate(self, world_size: int = 1) -> None:
        """Check values and registry names up front; raise ConfigError naming the key."""
        t = self.train
        for key in ("steps", "prompts_per_step", "samples_per_prompt", "micro_batch_size", "updates_per_batch"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
        if t.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {t.lr}")
        if t.prompts_per_step % world_size:
            raise ConfigError(
                f"train.prompts_per_step={t.prompts_per_step} must be divisible by the number of processes "
                f"({world_size}) so that each prompt's whole group stays on one process"
            )
        per_rank = self.samples_per_step // world_size
        if per_rank % t.micro_batch_size:
            raise ConfigError(
                f"train.micro_batch_size={t.micro_batch_size} must divide the samples per process per step "
                f"({per_rank} = prompts_per_step {t.prompts_per_step} x samples_per_prompt {t.samples_per_prompt} / {world_size} processes)"
            )
        g = self.generation
        if g.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens must be >= 1, got {g.max_new_tokens}")
        if g.temperature <= 0:
            raise ConfigError(f"generation.temperature must be > 0, got {g.temperature}")
        if not 0 < g.top_p <= 1:
            raise ConfigError(f"generation.top_p must be in (0, 1], got {g.top_p}")
        a = self.algo
        if a.kl.coef < 0:
            raise ConfigError(f"algo.kl.coef must be >= 0, got {a.kl.coef}")
        if a.dual_clip is not None and a.dual_clip <= 1:
            raise ConfigError(f"algo.dual_clip must be > 1, got {a.dual_clip}")
        if not self.reward.functions:
            raise ConfigError("reward.functions is empty: give at least one reward function")
        for i, spec in enumerate(self.reward.functions):
            if not spec.fn:
                raise ConfigError(f"reward.functions[{i}].fn is empty")
        from rlhf import algos  # registries are filled on import

        for key, reg in (
            ("algo.advantage", algos.ADVANTAGES),
            ("algo.policy_loss", algos.POLICY_LOSSES),
            ("algo.loss_agg", algos.LOSS_AGGREGATIONS),
            ("algo.kl.estimator", algos.KL_ESTIMATORS),
        ):
            name = _get(self, key)
            try:
                reg.get(name)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
        from rlhf.engine import ENGINES

        try:
            ENGINES.get(g.engine)
        except ValueError as e:
            raise ConfigError(f"generation.engine: {e}") from None

    def derived_summary(self, world_size: int = 1) -> str:
        t = self.train
        per_rank = self.samples_per_step // world_size
        return (
            f"batch: {t.prompts_per_step} prompts x {t.samples_per_prompt} samples = {self.samples_per_step} samples/step "
            f"| {world_size} process(es) x {per_rank} samples | micro_batch_size {t.micro_batch_size} -> "
            f"{per_rank // t.micro_batch_size} micro-batches per optimizer step | {t.updates_per_batch} update(s) per batch "
            f"| {t.steps} steps = {t.steps * t.updates_per_batch} optimizer steps"
        )


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: invalid value {value!r}; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, failing on unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(prefix + n for n in names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['a.b=1', 'c=x'] into {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Read YAML `path` (optional), apply dotted overrides, return a typed `cls` (default: the RL Config)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf key, for `rlhf train --help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, prefix + f.name + "."))
            continue
        rows.append((prefix + f.name, _type_name(tp), repr(default if not dataclasses.is_dataclass(default) else to_dict(default)), f.metadata.get("help", "")))
    return rows
