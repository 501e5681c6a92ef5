"""`rlhf bench`: GRPO steps of rlhf and of TRL's GRPOTrainer at equal settings, timed in one run on one machine.

Each framework runs in its own subprocess (so peak RSS is its own); the parent measures the
machine's matmul FLOP/s and prints ONE JSON line: samples/s of each, their ratios, rlhf's
phase breakdown, peak RSS, and how close rlhf's step is to the compute limit
(about 8 x parameters x tokens / matmul FLOP/s: forward + backward of the policy, forward of
the reference). TRL is needed only in the benchmark environment (`make bench` makes one).

Equal settings: SmolLM2-135M-Instruct, the arithmetic prompts, 2 prompts x 8 samples, at most
32 new tokens, one update per batch, KL coefficient 0.04, full fine-tuning, lr 2e-5.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SETTINGS = dict(model=os.environ.get("RLHF_BENCH_MODEL", "smollm2-135m-instruct"), prompts_per_step=2, samples_per_prompt=8, max_new_tokens=32,
                kl_coef=0.04, lr=2e-5, updates_per_batch=1, full_finetune=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory() -> dict:
    """Peak host RSS, and on a GPU the peak of torch's allocations there (MB)."""
    import torch

    out = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def matmul_gflops(dtype_name: str, reps: int = 5) -> float:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if dev == "cuda" else 2048  # a GPU needs a larger product to reach its rate
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    a @ b
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


# ----------------------------------------------------------------------------- workers (subprocesses)


def run_rlhf(steps: int, warmup: int, out_dir: str, extra: list[str]) -> dict:
    import torch

    from rlhf.config import load_config
    from rlhf.trainers import Trainer

    s = SETTINGS
    cfg = load_config(None, [
        f"model.path={s['model']}", "model.lora.enabled=false", f"train.prompts_per_step={s['prompts_per_step']}",
        f"train.samples_per_prompt={s['samples_per_prompt']}", f"generation.max_new_tokens={s['max_new_tokens']}",
        f"algo.kl.coef={s['kl_coef']}", f"train.lr={s['lr']}", f"train.updates_per_batch={s['updates_per_batch']}",
        f"train.steps={steps + warmup}", f"output_dir={out_dir}", "log.progress=false", "checkpoint.save_final=false",
        "train.micro_batch_size=16", "log.trackers=[]", *extra,
    ])
    trainer = Trainer(cfg)
    params = sum(p.numel() for p in trainer.unwrapped.parameters())
    records = []
    for i in range(steps + warmup):
        rec = trainer.step()[0]
        if i >= warmup:
            records.append(rec)
    step_s = statistics.mean(r["time/step_s"] for r in records)
    phases = {k.removeprefix("time/").removesuffix("_s"): statistics.mean(r[k] for r in records)
              for k in records[0] if k.startswith("time/") and k != "time/step_s"}
    tokens = statistics.mean(r["tokens/total"] for r in records) if "tokens/total" in records[0] else None
    return {"step_s": step_s, "samples_per_s": s["prompts_per_step"] * s["samples_per_prompt"] / step_s, "phases_s": phases,
            **peak_memory(), "params": params, "tokens_per_step": tokens,
            "reward_mean": statistics.mean(r["reward/mean"] for r in records), "threads": torch.get_num_threads()}


def run_trl(steps: int, warmup: int, out_dir: str, gradient_checkpointing: bool | None) -> dict:
    import torch
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward_models.rules import first_number_matches
    from rlhf.data import TASKS
    from rlhf.models.loading import resolve_model_path

    s = SETTINGS
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    kw = {} if gradient_checkpointing is None else {"gradient_checkpointing": gradient_checkpointing}
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=s["prompts_per_step"] * s["samples_per_prompt"],
        num_generations=s["samples_per_prompt"], max_completion_length=s["max_new_tokens"], learning_rate=s["lr"],
        beta=s["kl_coef"], num_iterations=s["updates_per_batch"], max_steps=steps + warmup, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0, **kw,
    )

    def reward(completions, answer, **kwargs):
        return first_number_matches(completions, answer)

    trainer = GRPOTrainer(model=str(resolve_model_path(s["model"])), reward_funcs=[reward], args=args,
                          train_dataset=TASKS.get("arithmetic")("train"), callbacks=[StepTimer()])
    trainer.train()
    step_s = statistics.mean(times[warmup:])
    return {"step_s": step_s, "samples_per_s": s["prompts_per_step"] * s["samples_per_prompt"] / step_s,
            **peak_memory(), "trl_version": trl.__version__, "bf16": bool(args.bf16),
            "gradient_checkpointing": bool(args.gradient_checkpointing), "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- orchestration


def _worker(argv: list[str]) -> None:
    kind, steps, warmup, out_dir, *rest = argv
    if kind == "rlhf":
        result = run_rlhf(int(steps), int(warmup), out_dir, rest)
    else:
        gc = {"default": None, "on": True, "off": False}[rest[0]]
        result = run_trl(int(steps), int(warmup), out_dir, gc)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def _spawn(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "rlhf.bench", "--worker", *args], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise RuntimeError(f"benchmark worker {args[0]} failed (exit {proc.returncode}):\n{tail}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="rlhf bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--no-trl", action="store_true", help="time rlhf only")
    p.add_argument("--out", default="runs/bench", help="scratch directory for the runs")
    p.add_argument("--model", default=SETTINGS["model"], help="model for both frameworks (a name or a local directory)")
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra rlhf config overrides (key=value)")
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return {}
    SETTINGS["model"] = os.environ["RLHF_BENCH_MODEL"] = a.model  # the workers read it
    result: dict = {"settings": SETTINGS, "steps": a.steps, "warmup": a.warmup}
    result["matmul_gflops"] = {d: round(matmul_gflops(d), 1) for d in ("bf16", "fp32")}
    result["rlhf"] = _spawn(["rlhf", str(a.steps), str(a.warmup), f"{a.out}/rlhf", *a.overrides])
    if not a.no_trl:
        result["trl_defaults"] = _spawn(["trl", str(a.steps), str(a.warmup), f"{a.out}/trl", "default"])
        result["trl_no_gradient_checkpointing"] = _spawn(["trl", str(a.steps), str(a.warmup), f"{a.out}/trl_nogc", "off"])
        for key in ("trl_defaults", "trl_no_gradient_checkpointing"):
            result[f"speedup_vs_{key}"] = round(result["rlhf"]["samples_per_s"] / result[key]["samples_per_s"], 2)
        result["rlhf_rss_le_trl"] = result["rlhf"]["peak_rss_mb"] <= result["trl_defaults"]["peak_rss_mb"]
        if "peak_gpu_mb" in result["rlhf"]:
            result["rlhf_gpu_mem_le_trl"] = result["rlhf"]["peak_gpu_mb"] <= result["trl_defaults"]["peak_gpu_mb"]
    r = result["rlhf"]
    if r.get("tokens_per_step"):
        flops = 8 * r["params"] * r["tokens_per_step"]
        limit_s = flops / (result["matmul_gflops"]["bf16"] * 1e9)
        result["compute_limit_step_s"] = round(limit_s, 2)
        result["rlhf_step_over_limit"] = round(r["step_s"] / limit_s, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
