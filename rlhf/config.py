"""Typed run configuration: YAML file + dotted `key=value` overrides, validated before anything loads.

    cfg = load_config("recipes/grpo_arithmetic.yaml", ["train.steps=10", "algo.kl.coef=0"])

Every key has a type and a help text (`rlhf train --help` prints them). An unknown
key fails naming the closest valid one; a wrong type or value fails naming the key
(the machinery: rlhf.typed).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from rlhf.typed import ConfigError, from_dict, load_typed, opt, parse_overrides, to_dict
from rlhf.typed import describe as _describe

__all__ = ["Config", "ConfigError", "describe", "from_dict", "load_config", "opt", "parse_overrides", "to_dict"]


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
    path: str = opt("smollm2-135m-instruct", "local transformers model directory, "
                                             "or 'smollm2-135m-instruct' (embedded)")
    compute_dtype: Literal["bf16", "fp32"] = opt(
        "bf16", "dtype of forward/backward compute (autocast); weights and optimizer state stay fp32"
    )
    trust_remote_code: bool = opt(False, "allow model code from the model directory (off unless you trust it)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    lora: LoraConfig = opt(LoraConfig(), "LoRA adapter settings")


@dataclass
class DataConfig:
    train: str = opt("arithmetic", "built-in task name (see rlhf.data.TASKS) or a jsonl/csv/parquet file "
                                   "or saved dataset dir")
    eval: Optional[str] = opt(None, "eval prompts, same forms as `train` (a task name gives its eval split)")
    task_args: dict[str, Any] = opt({}, "keyword arguments for a built-in task generator")
    prompt_column: str = opt("prompt", "column holding the prompt (string, or a list of chat messages)")
    max_prompt_tokens: int = opt(512, "prompts longer than this are handled by `on_long_prompt`")
    on_long_prompt: Literal["error", "filter", "truncate"] = opt("error",
                                                                 "what to do with a prompt over max_prompt_tokens")
    shuffle: bool = opt(True, "reshuffle prompts every epoch (seeded)")


@dataclass
class VLLMConfig:
    dtype: Literal["auto", "bf16", "fp32"] = opt("auto", "vLLM weight/compute dtype (auto: model.compute_dtype)")
    kv_cache_gb: float = opt(1.0, "CPU: KV cache size in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = opt(0.3, "GPU: fraction of GPU memory vLLM takes (weights + KV cache); "
                                             "training uses the rest")
    sleep: bool = opt(True, "GPU: free vLLM's weights and KV cache between generation and the next weight sync")
    enforce_eager: bool = opt(True, "run eagerly (on CPU, compiled mode took ~70 s to start and was no faster; "
                                    "on GPU false enables CUDA graphs)")
    lora_sync: Literal["adapter", "merged"] = opt(
        "adapter", "with model.lora.enabled: vLLM loads the trained adapter itself, under a new adapter name "
        "per policy version (adapter), or the adapter is merged into every weight and the whole model reloaded "
        "(merged)")


@dataclass
class GenerationConfig:
    engine: str = opt("hf", "generation engine: hf (transformers) or vllm (pip install 'rlhf[vllm]', see the Makefile)")
    max_new_tokens: int = opt(32, "maximum completion length in tokens")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling mass")
    top_k: int = opt(0, "top-k sampling (0: off)")
    seed_per_prompt: bool = opt(
        False, "hf engine: sample each prompt's group with its own seed (train.seed, the prompt's tokens, "
        "the call count), so completions do not depend on the number of processes or the batch (one generate call "
        "per prompt: slower)")
    vllm: VLLMConfig = opt(VLLMConfig(), "settings of the vllm engine")


@dataclass
class KLConfig:
    coef: float = opt(0.04, "beta, the KL-to-reference coefficient (0: no reference model is loaded)")
    estimator: str = opt("k3", "KL estimator: k1, k2 or k3 (Schulman's approximations)")
    placement: Literal["in_loss", "in_reward"] = opt("in_loss", "add beta*KL to the loss (GRPO) or subtract it "
                                                                "from the per-token reward (PPO)")
    target: Optional[float] = opt(
        None, "adaptive KL controller (Ziegler et al. 2019): the target KL per completion (nats, summed over "
        "its tokens, averaged over samples); beta starts at `coef` and moves towards it every step (None: fixed beta)")
    horizon: int = opt(10000, "adaptive KL controller horizon in samples: "
                              "beta *= 1 + clip(KL/target - 1, +-0.2) * samples_per_step / horizon")


@dataclass
class NaturalConfig:
    max_kl: float = opt(0.01, "delta: KL budget of one npg/trpo step, the mean over tokens of KL(pi_old || pi)")
    cg_iters: int = opt(10, "conjugate-gradient iterations solving F x = g (npg, trpo)")
    damping: float = opt(0.1, "added to the Fisher diagonal, F + damping I, for a stable CG solve (npg, trpo)")
    fisher_samples: int = opt(0, "sequences per process in the Fisher-vector products (0: all); fewer is faster "
                                 "(Schulman et al. 2015 used 10% of the batch); their double-backprop graph "
                                 "is kept for CG")
    backtrack_coef: float = opt(0.5, "trpo line search: factor the step shrinks by after each rejected try")
    max_backtracks: int = opt(10, "trpo line search: shrinkings tried after the full step "
                                  "before keeping the old policy")


@dataclass
class MDPOConfig:
    eta: float = opt(1.0, "mirror-descent step size: algo.update=mdpo adds (1/eta) KL(pi || pi_old) to the loss")


@dataclass
class DynamicSamplingConfig:
    enabled: bool = opt(False, "DAPO dynamic sampling: drop groups whose rewards are all equal (no gradient) and "
                               "generate more prompts until train.prompts_per_step groups remain")
    max_extra_rounds: int = opt(3, "at most this many extra generation rounds per step; groups still missing "
                                   "are filled with dropped ones")


@dataclass
class OverlongConfig:
    buffer: int = opt(0, "DAPO soft overlong punishment: completions longer than max_new_tokens - buffer lose "
                         "up to `penalty` linearly, reaching it at max_new_tokens (0: off)")
    penalty: float = opt(1.0, "the overlong penalty at max_new_tokens")


@dataclass
class AlgoConfig:
    advantage: str = opt("grpo", "advantage estimator (rlhf.algos.ADVANTAGES)")
    policy_loss: str = opt("ppo_clip", "policy objective (rlhf.algos.POLICY_LOSSES)")
    loss_agg: str = opt("token_mean", "loss aggregation (rlhf.algos.LOSS_AGGREGATIONS)")
    update: str = opt("adamw", "update rule (rlhf.algos.UPDATES): adamw, mdpo, npg or trpo")
    eps_low: float = opt(0.2, "PPO clip range below 1 (ratio >= 1 - eps_low); gspo uses ~3e-4")
    eps_high: float = opt(0.2, "PPO clip range above 1 (ratio <= 1 + eps_high); DAPO uses 0.28, gspo ~4e-4")
    dual_clip: Optional[float] = opt(None, "dual-clip constant c > 1 for negative advantages (None: off)")
    std_eps: float = opt(1e-4, "added to the group std before dividing (grpo)")
    gamma: float = opt(1.0, "discount factor for per-token returns")
    lam: float = opt(1.0, "GAE lambda")
    n_step: int = opt(3, "n for nstep_td")
    is_correction: str = opt(
        "none", "importance-sampling correction for the sampler/trainer mismatch (rlhf.algos.IS_CORRECTIONS): "
        "none, token_truncate, token_mask, seq_mask or seq_truncate"
    )
    is_cap: float = opt(2.0, "cap C on the ratio pi_old/pi_sampler for is_correction (> 1)")
    whiten_advantages: bool = opt(False, "normalise the advantages to mean 0, std 1 over the batch's loss tokens "
                                         "(all processes; PPO)")
    mask_truncated: bool = opt(False, "exclude completions cut at generation.max_new_tokens (no EOS) "
                                      "from the loss (DAPO)")
    kl: KLConfig = opt(KLConfig(), "KL penalty to the reference policy")
    natural: NaturalConfig = opt(NaturalConfig(), "natural-gradient updates (algo.update=npg or trpo)")
    mdpo: MDPOConfig = opt(MDPOConfig(), "mirror-descent updates (algo.update=mdpo)")
    dynamic_sampling: DynamicSamplingConfig = opt(DynamicSamplingConfig(), "DAPO dynamic sampling")
    overlong: OverlongConfig = opt(OverlongConfig(), "DAPO soft overlong punishment")


@dataclass
class TrainConfig:
    steps: int = opt(25, "RL steps: each generates one batch and updates on it")
    prompts_per_step: int = opt(2, "prompts per RL step (all processes together)")
    samples_per_prompt: int = opt(8, "completions sampled per prompt (the group size G)")
    micro_batch_size: int = opt(8, "samples per forward/backward pass on one process")
    pack_prompts: bool = opt(True, "training forwards compute each prompt once per group (shared-prompt packing)")
    updates_per_batch: int = opt(1, "passes (epochs) over each batch (mu); >1 keeps old log-probs for the ratio")
    mini_batches_per_pass: int = opt(
        1, "optimizer steps per pass: each pass splits the batch into this many mini-batches (contiguous whole groups "
        "where possible), one optimizer step each; a step makes updates_per_batch x mini_batches_per_pass "
        "optimizer steps")
    lr: float = opt(1e-5, "peak learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = opt("constant", "decay after warmup")
    warmup_steps: int = opt(0, "linear warmup, in optimizer steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: off)")
    max_skipped_steps: int = opt(
        3, "optimizer steps with NaN/inf gradients are skipped and counted; this many in a row save a checkpoint "
        "and stop the run with an error (0: never stop)"
    )
    seed: int = opt(0, "seed for data order, sampling and initialisation")
    max_staleness: int = opt(
        0, "asynchronous rollouts: batches are generated while the trainer updates, at most this many policy versions "
        "behind the policy that trains on them (0: the synchronous loop); pair with algo.is_correction")


@dataclass
class EnvConfig:
    factory: Optional[str] = opt(None, "an environment class, 'module.path:Class' or 'file.py:Class': "
                                 "one instance per episode, reset(**row), public methods as tools, "
                                 "optional get_reward() (TRL's contract)")
    tools: list[str] = opt([], "plain tool functions, 'module.path:function' or 'file.py:function' "
                               "(type hints + docstring)")
    rollout_fn: Optional[str] = opt(None, "a rollout hook 'module:function' that drives the engine "
                                    "for one episode itself (rlhf.envs.hooks); instead of factory/tools")
    max_turns: int = opt(4, "model turns per episode at most (each up to generation.max_new_tokens tokens)")
    max_tokens: int = opt(256, "tokens per episode after the prompt (the model's and the environment's); "
                               "a tool result that would overflow it is dropped and the episode ends")
    tool_timeout_s: float = opt(10.0, "per tool call (and reset / get_reward); "
                                      "a call that hangs is answered with an error")
    tool_parser: str = opt("hermes", "how tool calls are read from the model's output: "
                                     "a name in rlhf.envs.TOOL_PARSERS (hermes: <tool_call>{json}</tool_call>) "
                                     "or 'module:function'")
    tool_format: Literal["auto", "template", "fallback"] = opt(
        "auto", "where the tool schemas go: the chat template's tools= rendering (template), a system message of ours "
        "(fallback, for templates without tool support such as SmolLM2's), or auto: template when it renders tools")
    result_role: Literal["tool", "user"] = opt("tool", "the role of a tool's result message")
    stop: list[str] = opt(["</tool_call>"], "a model turn ends right after the first of these strings (what it sampled "
                                            "after it is dropped, as a stop sequence does; "
                                            "the template then closes the turn)")

    @property
    def enabled(self) -> bool:
        return bool(self.factory or self.tools or self.rollout_fn)


@dataclass
class DistillConfig:
    teacher: Optional[str] = opt(
        None, "on-policy distillation: a teacher causal LM (local directory or embedded name) "
        "with the policy's tokenizer; every token the policy samples is rewarded with coef * "
        "(log pi_teacher - log pi), minus the per-token reverse KL to the teacher (a dense reward, beside "
        "reward.functions)")
    coef: float = opt(1.0, "weight of the distillation reward")


@dataclass
class SpeedConfig:
    engine_bf16_casts: bool = opt(
        True, "the HF engine's decode loop casts the policy's linear weights to bf16 at every weight sync: reuse those "
        "casts in the next training forwards instead of autocast casting every weight again (bf16 compute, full "
        "fine-tuning, one process or DDP; the same numbers to the bit, ~90 ms less per forward for SmolLM2 on a CPU)")
    malloc_mmap_threshold_mb: int = opt(
        32, "glibc: memory blocks up to this size (MiB, at most 32) stay in malloc's heap "
        "and are reused from step to step instead of being mapped fresh (page faults) each time; "
        "0: leave the allocator alone"
    )


CRITIC_LORA = LoraConfig()


@dataclass
class CriticConfig:
    type: Literal["auto", "none", "separate", "shared"] = opt(
        "auto", "the value model V(s_t) of actor-critic advantages (td, nstep_td, gae): 'separate' = its own network "
        "(full or LoRA, from critic.path), 'shared' = a value head on the policy's own hidden states (no second model; "
        "the head trains, the backbone moves with the policy loss only), 'none'; "
        "'auto' = separate when algo.advantage needs values")
    path: Optional[str] = opt(None, "critic.type=separate: the network it starts from "
                                    "(local causal-LM dir or embedded name); default model.path")
    lora: LoraConfig = opt(CRITIC_LORA, "critic.type=separate: LoRA adapter of the critic "
                                        "(enabled=false: full weights)")
    lr: float = opt(5e-5, "critic learning rate (its own AdamW; train.lr_schedule, warmup_steps, weight_decay, "
                          "max_grad_norm apply)")
    value_clip: Optional[float] = opt(
        0.2, "clip of the value update around the values at sampling time, 0.5 max((V-R)^2, (V_clip-R)^2) "
        "(None: plain squared error)")
    warmup_steps: int = opt(0, "first RL steps in which only the critic trains (the policy is frozen)")


@dataclass
class RewardSpec:
    fn: str = opt("", "registry name, 'module.path:function' or 'path/to/file.py:function'")
    weight: float = opt(1.0, "weight in the combined score")
    name: Optional[str] = opt(None, "name used in metrics (default: the function's name)")


@dataclass
class RewardConfig:
    functions: list[RewardSpec] = opt([RewardSpec(fn="first_number_matches")], "reward functions and weights")
    on_error: Literal["raise", "skip"] = opt("raise", "a raising function stops the run, or its samples score None")
    timeout_s: Optional[float] = opt(
        None, "per-call timeout in seconds; a call that hangs is abandoned and handled by reward.on_error "
        "(None: no limit)"
    )


@dataclass
class CheckpointConfig:
    every: int = opt(0, "save a checkpoint every N RL steps (0: only at the end)")
    keep_last: int = opt(2, "checkpoints kept on disk (>= 1; the one `latest` points to is never deleted)")
    resume: str = opt("none", "'none', 'latest' (in output_dir) or a checkpoint directory")
    save_final: bool = opt(True, "save the final model with save_pretrained")
    merge_lora: bool = opt(False, "also save LoRA merged into the base weights")


TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class LogConfig:
    completions_per_step: int = opt(4, "completions written to completions.jsonl per step (the first group's samples)")
    completions_parquet: bool = opt(False, "also write each step's completions to completions/step_NNNNNN.parquet")
    progress: bool = opt(True, "show a progress bar (ETA, live reward and KL) with one log line per step above it")
    trackers: list[str] = opt(
        ["tensorboard"], "experiment trackers through accelerate, any of tensorboard (<output_dir>/tensorboard), "
        "wandb, mlflow ([] for none); wandb and mlflow need their package installed"
    )
    project: str = opt("rlhf", "wandb project / mlflow experiment name")
    run_name: Optional[str] = opt(None, "run name shown by wandb and mlflow (default: the output_dir folder name)")
    wandb_mode: Optional[Literal["online", "offline", "disabled"]] = opt(
        None, "wandb mode (default: $WANDB_MODE, else wandb's own default); offline runs sync later with `wandb sync`"
    )
    mlflow_tracking_uri: Optional[str] = opt(
        None, "mlflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local file store <output_dir>/mlruns)"
    )
    report: bool = opt(True, "`rlhf train` and recipe scripts end by writing <output_dir>/report.html (rlhf report)")


@dataclass
class EvalConfig:
    k: int = opt(4, "pass@k: completions sampled per eval prompt at generation.temperature (0: greedy only)")
    samples: int = opt(0, "samples per prompt for the unbiased pass@k estimate (0: k; more lowers its variance)")
    threshold: float = opt(1.0, "a completion counts as correct when its combined reward >= threshold")
    functions: list[RewardSpec] = opt(
        [], "what counts as correct, when it is not what trains (e.g. a task reward at weight 0 in reward.functions): "
        "these functions' weighted sum >= threshold; []: reward.functions")
    max_prompts: int = opt(0, "evaluate only the first N eval prompts (0: all)")
    batch_size: int = opt(32, "eval prompts per generate call")
    before_after: bool = opt(
        True, "`rlhf train` and recipe scripts evaluate the policy on data.eval before and after training (eval.json)"
    )


@dataclass
class Config:
    output_dir: str = opt("runs/default", "run directory: metrics.jsonl, checkpoints, final model")
    model: ModelConfig = opt(ModelConfig(), "policy model")
    data: DataConfig = opt(DataConfig(), "prompt data")
    generation: GenerationConfig = opt(GenerationConfig(), "sampling")
    algo: AlgoConfig = opt(AlgoConfig(), "algorithm")
    train: TrainConfig = opt(TrainConfig(), "optimisation and batch sizes")
    reward: RewardConfig = opt(RewardConfig(), "reward functions")
    critic: CriticConfig = opt(CriticConfig(), "value model for td / nstep_td / gae (PPO)")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "checkpoints and resume")
    log: LogConfig = opt(LogConfig(), "logging, trackers and the report")
    eval: EvalConfig = opt(EvalConfig(), "evaluation on data.eval (rlhf eval, and before/after training)")
    env: EnvConfig = opt(EnvConfig(), "multi-turn episodes: an environment, tools or a rollout hook (rlhf.envs)")
    distill: DistillConfig = opt(DistillConfig(), "on-policy distillation from a teacher model")
    speed: SpeedConfig = opt(SpeedConfig(), "named speed tricks, each an explicit opt-in (on by default)")

    @property
    def samples_per_step(self) -> int:
        return self.train.prompts_per_step * self.train.samples_per_prompt

    def validate(self, world_size: int = 1) -> None:
        """Check values and registry names up front; raise ConfigError naming the key."""
        t = self.train
        for key in ("steps", "prompts_per_step", "samples_per_prompt", "micro_batch_size", "updates_per_batch",
                    "mini_batches_per_pass"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
        if t.max_staleness < 0:
            raise ConfigError(f"train.max_staleness must be >= 0, got {t.max_staleness}")
        if t.max_staleness and self.algo.dynamic_sampling.enabled:
            raise ConfigError("algo.dynamic_sampling.enabled=true generates extra rounds on demand "
                              "(collective, synchronous); it cannot run with train.max_staleness > 0")
        if t.max_skipped_steps < 0:
            raise ConfigError(f"train.max_skipped_steps must be >= 0, got {t.max_skipped_steps}")
        if not 0 <= self.speed.malloc_mmap_threshold_mb <= 32:
            raise ConfigError(f"speed.malloc_mmap_threshold_mb must be in [0, 32] (glibc's limit), "
                              f"got {self.speed.malloc_mmap_threshold_mb}")
        if self.checkpoint.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.checkpoint.keep_last}")
        if self.reward.timeout_s is not None and self.reward.timeout_s <= 0:
            raise ConfigError(f"reward.timeout_s must be > 0 (or null for no limit), got {self.reward.timeout_s}")
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
                f"({per_rank} = prompts_per_step {t.prompts_per_step} x samples_per_prompt {t.samples_per_prompt} "
                f"/ {world_size} processes)"
            )
        if per_rank % (t.mini_batches_per_pass * t.micro_batch_size):
            raise ConfigError(
                f"train.mini_batches_per_pass={t.mini_batches_per_pass} x train.micro_batch_size={t.micro_batch_size} "
                f"must divide the samples per process per step ({per_rank}), so every mini-batch is whole micro-batches"
            )
        self._validate_critic()
        g = self.generation
        if g.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens must be >= 1, got {g.max_new_tokens}")
        if g.temperature <= 0:
            raise ConfigError(f"generation.temperature must be > 0, got {g.temperature}")
        if not 0 < g.top_p <= 1:
            raise ConfigError(f"generation.top_p must be in (0, 1], got {g.top_p}")
        if g.top_k < 0:
            raise ConfigError(f"generation.top_k must be >= 0 (0: off), got {g.top_k}")
        if g.seed_per_prompt and g.engine != "hf":
            raise ConfigError(f"generation.seed_per_prompt=true needs generation.engine=hf, got {g.engine}")
        if g.vllm.kv_cache_gb <= 0:
            raise ConfigError(f"generation.vllm.kv_cache_gb must be > 0, got {g.vllm.kv_cache_gb}")
        if not 0 < g.vllm.gpu_memory_utilization < 1:
            raise ConfigError(f"generation.vllm.gpu_memory_utilization must be in (0, 1), "
                              f"got {g.vllm.gpu_memory_utilization}")
        a = self.algo
        if a.kl.coef < 0:
            raise ConfigError(f"algo.kl.coef must be >= 0, got {a.kl.coef}")
        if a.dual_clip is not None and a.dual_clip <= 1:
            raise ConfigError(f"algo.dual_clip must be > 1, got {a.dual_clip}")
        self._validate_log_and_eval()
        e = self.env
        if e.enabled:
            if e.rollout_fn and (e.factory or e.tools):
                raise ConfigError("env.rollout_fn drives whole episodes itself: set it alone, "
                                  "without env.factory or env.tools")
            for key, ok in (("env.max_turns", e.max_turns >= 1), ("env.max_tokens", e.max_tokens >= 1),
                            ("env.tool_timeout_s", e.tool_timeout_s > 0)):
                if not ok:
                    raise ConfigError(f"{key} must be > 0, got {_get(self, key)}")
        for key, ok, rule in [
            ("algo.eps_low", a.eps_low >= 0, ">= 0 (>= 1: no lower clip, as CISPO)"),
            ("algo.eps_high", a.eps_high >= 0, ">= 0"),
            ("algo.std_eps", a.std_eps >= 0, ">= 0"), ("algo.gamma", 0 <= a.gamma <= 1, "in [0, 1]"),
            ("algo.lam", 0 <= a.lam <= 1, "in [0, 1]"), ("algo.n_step", a.n_step >= 1, ">= 1"),
            ("algo.natural.max_kl", a.natural.max_kl > 0, "> 0"),
            ("algo.natural.cg_iters", a.natural.cg_iters >= 1, ">= 1"),
            ("algo.natural.damping", a.natural.damping >= 0, ">= 0"),
            ("algo.natural.fisher_samples", a.natural.fisher_samples >= 0, ">= 0"),
            ("algo.natural.backtrack_coef", 0 < a.natural.backtrack_coef < 1, "in (0, 1)"),
            ("algo.natural.max_backtracks", a.natural.max_backtracks >= 0, ">= 0"),
            ("algo.mdpo.eta", a.mdpo.eta > 0, "> 0"),
            ("algo.dynamic_sampling.max_extra_rounds", a.dynamic_sampling.max_extra_rounds >= 0, ">= 0"),
            ("algo.overlong.buffer", 0 <= a.overlong.buffer <= g.max_new_tokens,
             f"in [0, generation.max_new_tokens={g.max_new_tokens}]"),
            ("algo.overlong.penalty", a.overlong.penalty >= 0, ">= 0"), ("algo.is_cap", a.is_cap > 1, "> 1"),
        ]:
            if not ok:
                raise ConfigError(f"{key} must be {rule}, got {_get(self, key)}")
        if self.distill.coef <= 0:
            raise ConfigError(f"distill.coef must be > 0, got {self.distill.coef}")
        if not self.reward.functions and not self.env.enabled:
            raise ConfigError("reward.functions is empty: give at least one reward function (or an environment whose "
                              "get_reward scores episodes, env.factory)")
        for i, spec in enumerate(self.reward.functions):
            if not spec.fn:
                raise ConfigError(f"reward.functions[{i}].fn is empty")

    def _validate_critic(self) -> None:
        c, kl = self.critic, self.algo.kl
        if c.lr <= 0:
            raise ConfigError(f"critic.lr must be > 0, got {c.lr}")
        if c.value_clip is not None and c.value_clip <= 0:
            raise ConfigError(f"critic.value_clip must be > 0 (or null for no clipping), got {c.value_clip}")
        if not 0 <= c.warmup_steps < self.train.steps:
            raise ConfigError(f"critic.warmup_steps must be in [0, train.steps={self.train.steps}), "
                              f"got {c.warmup_steps}")
        if c.path is not None and c.type == "shared":
            raise ConfigError("critic.path is used by critic.type=separate only (a shared head sits on the policy)")
        if kl.target is not None and (kl.target <= 0 or kl.coef == 0):
            raise ConfigError(f"algo.kl.target must be > 0 and needs algo.kl.coef > 0 to adapt, "
                              f"got target {kl.target}, coef {kl.coef}")
        if kl.horizon < 1:
            raise ConfigError(f"algo.kl.horizon must be >= 1, got {kl.horizon}")

    def _validate_log_and_eval(self) -> None:
        lg, ev = self.log, self.eval
        if lg.completions_per_step < 0:
            raise ConfigError(f"log.completions_per_step must be >= 0, got {lg.completions_per_step}")
        for name in lg.trackers:
            if name not in TRACKERS:
                raise ConfigError(f"log.trackers: unknown tracker '{name}'; choose from {', '.join(TRACKERS)}")
            if importlib.util.find_spec(name) is None:  # the package names equal the tracker names
                raise ConfigError(f"log.trackers includes '{name}' but the {name} package is not installed "
                                  f"(pip install {name}, or remove it from log.trackers)")
        for key in ("k", "samples", "max_prompts"):
            if getattr(ev, key) < 0:
                raise ConfigError(f"eval.{key} must be >= 0, got {getattr(ev, key)}")
        if ev.samples and ev.samples < ev.k:
            raise ConfigError(f"eval.samples={ev.samples} must be >= eval.k={ev.k} (or 0 for k)")
        if ev.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {ev.batch_size}")

    def derived_summary(self, world_size: int = 1) -> str:
        t = self.train
        per_rank = self.samples_per_step // world_size
        return (
            f"batch: {t.prompts_per_step} prompts x {t.samples_per_prompt} samples = {self.samples_per_step} "
            f"samples/step | {world_size} process(es) x {per_rank} samples | micro_batch_size {t.micro_batch_size} -> "
            f"{per_rank // t.micro_batch_size // t.mini_batches_per_pass} micro-batches per optimizer step | "
            f"{t.updates_per_batch} pass(es) x {t.mini_batches_per_pass} mini-batch(es) per batch "
            f"| {t.steps} steps = {t.steps * t.updates_per_batch * t.mini_batches_per_pass} optimizer steps"
        )


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type | None = None) -> Any:
    """Read YAML `path` (optional), apply dotted overrides, return a typed `cls` (default: the RL Config)."""
    return load_typed(cls or Config, path, overrides)


def describe(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf key of `cls` (default: the RL Config), for `--help`."""
    return _describe(cls or Config, prefix)
