"""`rlhf bench`: GRPO steps of rlhf and of TRL's GRPOTrainer at equal settings, timed in one run on one machine.

Each framework runs in its own process (so peak RSS is its own). rlhf is timed against each TRL
setting in a pair of processes that take turns: the parent lets one run ONE step while the other
waits idle, round after round, so a drift of the machine's speed during the run (other tenants of a
VM) reaches both alike instead of whichever ran last. (Three processes taking turns slowed every
step by 15-35% here, unevenly, so each ratio comes from its own pair.) The parent measures the
machine's matmul FLOP/s (before and after) and prints ONE JSON line: samples/s of each, their
ratios, rlhf's phase breakdown, peak RSS (and GPU memory), and how close rlhf's step is to the
compute limit (about 8 x parameters x tokens / matmul FLOP/s: forward + backward of the policy,
forward of the reference). TRL is needed only in the benchmark environment (`make bench` makes one).

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
from pathlib import Path

DEFAULTS = dict(model="smollm2-135m-instruct", prompts_per_step=2, samples_per_prompt=8, max_new_tokens=32,
                kl_coef=0.04, lr=2e-5, updates_per_batch=1, full_finetune=True)
SETTINGS = {**DEFAULTS, **json.loads(os.environ.get("RLHF_BENCH_SETTINGS", "{}"))}  # the parent's, in a worker

# Realistic sizes without a download: random weights in the shape of Qwen2 models (the vocabulary is the embedded
# SmolLM2's, whose tokenizer they use). Learning is not measured with them, only throughput.
SHAPES = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, tie_word_embeddings=True),
}


def shaped_model(name: str, cache: Path) -> Path:
    """A model directory of `SHAPES[name]` with random weights (bf16 on disk) and SmolLM2's tokenizer; built once."""
    path = cache / name
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=4096, rope_theta=1e6, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[name])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def memory_gbs(mb: int = 256) -> float:
    """Memory bandwidth (GB/s read + write) of copying a `mb` MB tensor: the ceiling of decoding, which reads every
    weight once per token."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.empty(mb << 18, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    sync()
    return 2 * a.numel() * 4 * 5 / (time.perf_counter() - t) / 1e9


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


def _say(tag: str, payload: str = "") -> None:
    print(f"BENCH_{tag} {payload}", flush=True)


def _command() -> str:
    """The parent's next word: STEP (run one step) or END."""
    return sys.stdin.readline().strip() or "END"


def rlhf_config(steps: int, warmup: int, out_dir: str, extra: list[str]):
    from rlhf.config import load_config

    s = SETTINGS
    return load_config(None, [
        f"model.path={s['model']}", "model.lora.enabled=false", f"train.prompts_per_step={s['prompts_per_step']}",
        f"train.samples_per_prompt={s['samples_per_prompt']}", f"generation.max_new_tokens={s['max_new_tokens']}",
        f"algo.kl.coef={s['kl_coef']}", f"train.lr={s['lr']}", f"train.updates_per_batch={s['updates_per_batch']}",
        f"train.steps={steps + warmup}", f"output_dir={out_dir}", "log.progress=false", "checkpoint.save_final=false",
        "train.micro_batch_size=16", "log.trackers=[]", *extra,
    ])


def run_rlhf(steps: int, warmup: int, out_dir: str, extra: list[str]) -> dict:
    import torch

    from rlhf.trainers import Trainer

    s = SETTINGS
    cfg = rlhf_config(steps, warmup, out_dir, extra)
    trainer = Trainer(cfg)
    params = sum(p.numel() for p in trainer.unwrapped.parameters())
    _say("READY")
    records = []
    while _command() == "STEP":
        records.append(trainer.step()[0])
        _say("DONE")
    records = records[warmup:]
    step_s = statistics.mean(r["time/step_s"] for r in records)
    phases = {k.removeprefix("time/").removesuffix("_s"): statistics.mean(r[k] for r in records)
              for k in records[0] if k.startswith("time/") and k != "time/step_s"}
    tokens = statistics.mean(r["tokens/total"] for r in records) if "tokens/total" in records[0] else None
    samples = s["prompts_per_step"] * s["samples_per_prompt"]
    generated = statistics.mean(r["completion/len_mean"] for r in records) * samples
    overlap = {k: statistics.mean(r.get(f"time/{k}_s", 0.0) for r in records) for k in ("async_generate", "wait")}
    return {"step_s": step_s, "async_generate_s": overlap["async_generate"], "wait_s": overlap["wait"],
            "samples_per_s": s["prompts_per_step"] * s["samples_per_prompt"] / step_s,
            "step_times_s": [r["time/step_s"] for r in records], "phases_s": phases,
            **peak_memory(), "params": params, "tokens_per_step": tokens, "generated_tokens": generated,
            "decode_steps": s["max_new_tokens"],
            "reward_mean": statistics.mean(r["reward/mean"] for r in records), "threads": torch.get_num_threads()}


def run_trl(steps: int, warmup: int, out_dir: str, gradient_checkpointing: bool | None) -> dict:
    import torch
    import trl
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.data import TASKS
    from rlhf.models.loading import resolve_model_path
    from rlhf.rewards.rules import first_number_matches

    s = SETTINGS
    times: list[float] = []

    class Stepper(TrainerCallback):  # each step waits for the parent's turn
        def on_train_begin(self, args, state, control, **kw):
            _say("READY")

        def on_step_begin(self, args, state, control, **kw):
            if _command() != "STEP":
                raise RuntimeError("the benchmark parent ended the run early")
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            _say("DONE")

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
                          train_dataset=TASKS.get("arithmetic")("train"), callbacks=[Stepper()])
    trainer.train()
    _command()  # END
    step_s = statistics.mean(times[warmup:])
    return {"step_s": step_s, "samples_per_s": s["prompts_per_step"] * s["samples_per_prompt"] / step_s,
            "step_times_s": times[warmup:], **peak_memory(), "trl_version": trl.__version__, "bf16": bool(args.bf16),
            "gradient_checkpointing": bool(args.gradient_checkpointing), "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- orchestration


def _worker(argv: list[str]) -> None:
    kind, steps, warmup, out_dir, *rest = argv
    if kind == "rlhf":
        result = run_rlhf(int(steps), int(warmup), out_dir, rest)
    else:
        gc = {"default": None, "on": True, "off": False}[rest[0]]
        result = run_trl(int(steps), int(warmup), out_dir, gc)
    _say("RESULT", json.dumps(result))


class _Worker:
    """One framework's benchmark process, run one step at a time by the parent."""

    def __init__(self, args: list[str], log_path: Path):
        self.name, self.log_path = args[0], log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "rlhf.bench", "--worker", *args], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)

    def expect(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(f"BENCH_{tag} "):
                return line.removeprefix(f"BENCH_{tag} ").strip()
        code = self.proc.wait()
        tail = self.log_path.read_text()[-3000:]
        raise RuntimeError(f"benchmark worker {self.name} failed (exit {code}; log {self.log_path}):\n{tail}")

    def send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def step(self) -> None:
        self.send("STEP")
        self.expect("DONE")

    def finish(self) -> dict:
        self.send("END")
        result = json.loads(self.expect("RESULT"))
        self.proc.wait()
        return result


def run_interleaved(runs: dict[str, list[str]], rounds: int, out: Path) -> dict[str, dict]:
    """Start every run's worker, then `rounds` rounds of one step each, in turn; their results by name."""
    out.mkdir(parents=True, exist_ok=True)
    workers = {name: _Worker(args, out / f"{name}.log") for name, args in runs.items()}
    try:
        for w in workers.values():
            w.expect("READY")
        for _ in range(rounds):
            for w in workers.values():
                w.step()
        return {name: w.finish() for name, w in workers.items()}
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()


def run_async_pair(steps: int, warmup: int, out: Path, overrides: list[str], k: int = 1, rounds: int = 2) -> dict:
    """The synchronous and the asynchronous loop (train.max_staleness=k), each run alone (taking turns step by step
    would hand the asynchronous run's background generation the other run's time), ABAB: samples/s of each, how
    much of the generation the asynchronous loop hid behind training, peak RSS."""
    runs: dict[str, list[dict]] = {"sync": [], "async": []}
    for r in range(rounds):
        for name, extra in (("sync", []), ("async", [f"train.max_staleness={k}"])):
            args = ["rlhf", str(steps), str(warmup), str(out / f"{name}{r}"), *overrides, *extra]
            runs[name].append(run_interleaved({name: args}, steps + warmup, out / f"{name}{r}")[name])
    mean = lambda name, key: statistics.mean(x[key] for x in runs[name])  # noqa: E731
    gen_s, wait_s = mean("async", "async_generate_s"), mean("async", "wait_s")
    return {"max_staleness": k, "sync_samples_per_s": round(mean("sync", "samples_per_s"), 3),
            "async_samples_per_s": round(mean("async", "samples_per_s"), 3),
            "async_speedup": round(mean("async", "samples_per_s") / mean("sync", "samples_per_s"), 3),
            "sync_phases_s": {k2: round(statistics.mean(x["phases_s"][k2] for x in runs["sync"]), 3)
                              for k2 in runs["sync"][0]["phases_s"]},
            "async_generate_s": round(gen_s, 3), "async_wait_s": round(wait_s, 3),
            "generation_hidden_frac": round(1 - wait_s / gen_s, 3) if gen_s else None,
            "peak_rss_mb": {n: max(x["peak_rss_mb"] for x in runs[n]) for n in runs}}


def ceilings(r: dict, gflops: float, gbs: float) -> dict:
    """How close each phase is to its limit: the training phase's model FLOPs utilisation (6 x params x tokens per
    forward + backward, over the measured matmul rate), and generation's tokens/s beside the memory-bandwidth limit
    (every bf16 weight read once per decoding step: 2 bytes x params x steps / bandwidth)."""
    out = {}
    train_s = r["phases_s"].get("train")
    if train_s:
        out["train_mfu"] = float(f"{6 * r['params'] * r['tokens_per_step'] / train_s / (gflops * 1e9):.3g}")
    gen_s, steps = r["phases_s"].get("generate"), r.get("decode_steps")
    if gen_s and steps:
        limit_s = 2 * r["params"] * steps / (gbs * 1e9)
        out.update(decode_tokens_per_s=round(r["generated_tokens"] / gen_s, 1),
                   decode_bandwidth_limit_s=float(f"{limit_s:.3g}"), decode_over_limit=float(f"{gen_s / limit_s:.3g}"))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="rlhf bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--no-trl", action="store_true", help="time rlhf only")
    p.add_argument("--async", dest="async_k", type=int, default=0, metavar="K",
                   help="also time the asynchronous loop (train.max_staleness=K) beside the synchronous one")
    p.add_argument("--out", default="runs/bench", help="scratch directory for the runs")
    p.add_argument("--model", default=DEFAULTS["model"],
                   help="model for both frameworks: a name, a local directory, or a shape with random weights "
                        f"({', '.join(SHAPES)})")
    p.add_argument("--prompts", type=int, default=DEFAULTS["prompts_per_step"], help="prompts per step")
    p.add_argument("--samples", type=int, default=DEFAULTS["samples_per_prompt"], help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"], help="completion budget (<= 1024)")
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra rlhf config overrides (key=value)")
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker)
        return {}
    if not 1 <= a.max_new_tokens <= 1024:
        raise SystemExit(f"rlhf bench: --max-new-tokens must be in [1, 1024], got {a.max_new_tokens}")
    model = str(shaped_model(a.model, Path(a.out) / "models")) if a.model in SHAPES else a.model
    SETTINGS.update(model=model, prompts_per_step=a.prompts, samples_per_prompt=a.samples,
                    max_new_tokens=a.max_new_tokens)
    os.environ["RLHF_BENCH_SETTINGS"] = json.dumps(SETTINGS)  # the workers read it
    result: dict = {"settings": {**SETTINGS, "shape": a.model if a.model in SHAPES else None}, "steps": a.steps,
                    "warmup": a.warmup, "memory_gbs": round(memory_gbs(), 1)}
    result["matmul_gflops"] = {d: round(matmul_gflops(d), 1) for d in ("bf16", "fp32")}
    rounds, out = a.steps + a.warmup, Path(a.out)
    from rlhf.checks import check_config

    # a bad override fails here, not in a worker
    check_config(rlhf_config(a.steps, a.warmup, str(out / "rlhf"), a.overrides))
    rlhf_args = lambda d: ["rlhf", str(a.steps), str(a.warmup), str(d / "rlhf"), *a.overrides]  # noqa: E731
    if a.no_trl:
        result.update(run_interleaved({"rlhf": rlhf_args(out)}, rounds, out))
    else:  # one pair per TRL setting: rlhf and TRL take turns, each ratio from its own pair
        for key, gc in (("trl_defaults", "default"), ("trl_no_gradient_checkpointing", "off")):
            pair = run_interleaved({"rlhf": rlhf_args(out / key),
                                    key: ["trl", str(a.steps), str(a.warmup), str(out / key / "trl"), gc]},
                                   rounds, out / key)
            result.setdefault("rlhf", pair["rlhf"])
            result[key] = pair[key]
            result[f"speedup_vs_{key}"] = round(pair["rlhf"]["samples_per_s"] / pair[key]["samples_per_s"], 2)
            result[f"rlhf_step_s_beside_{key}"] = round(pair["rlhf"]["step_s"], 3)
        result["rlhf_rss_le_trl"] = result["rlhf"]["peak_rss_mb"] <= result["trl_defaults"]["peak_rss_mb"]
        if "peak_gpu_mb" in result["rlhf"]:
            result["rlhf_gpu_mem_le_trl"] = result["rlhf"]["peak_gpu_mb"] <= result["trl_defaults"]["peak_gpu_mb"]
    if a.async_k:
        result["async"] = run_async_pair(a.steps, a.warmup, out / "async", a.overrides, a.async_k)
    result["matmul_gflops_end"] = {d: round(matmul_gflops(d), 1) for d in ("bf16", "fp32")}
    r = result["rlhf"]
    if r.get("tokens_per_step"):
        flops = 8 * r["params"] * r["tokens_per_step"]
        limit_s = flops / (result["matmul_gflops"]["bf16"] * 1e9)
        result["compute_limit_step_s"] = round(limit_s, 2)
        result["rlhf_step_over_limit"] = round(r["step_s"] / limit_s, 2)
        result.update(ceilings(r, result["matmul_gflops"]["bf16"], result["memory_gbs"]))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
