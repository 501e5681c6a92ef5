"""Multi-process training under `accelerate launch`: DDP with world size 2, invariance of a step to the
layout (1 process x 2 micro-batches == 2 processes x 1 micro-batch == ZeRO-2/3 == FSDP2), and 2 steps
with checkpoint under each sharded layout. The runs are subprocesses of `tests/trainers/layout_run.py`.

Generation is made identical across layouts with `generation.seed_per_prompt=true` (each prompt's
group is sampled with a seed of its own), so the comparison is between updates on the same data.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import LENGTH_REWARD

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
HELPER = Path(__file__).with_name("layout_run.py")

# Each case: the overrides of one algorithm. A case must leave the group on one process (all do).
CASES = {
    "grpo": [],  # GRPO, ppo_clip, KL in the loss to the frozen (unsharded) reference
    # PPO: a separate critic, GAE over per-token rewards with the KL penalty in them
    "ppo": ["algo.advantage=gae", "algo.kl.placement=in_reward", "algo.kl.estimator=k1", "critic.type=separate"],
    # asynchronous rollouts: each rank's producer thread samples its prompts from the engine's private copy; 3 steps,
    # so that steps 2 and 3 train on samples one version stale
    "async": ["train.max_staleness=1", "algo.is_correction=token_truncate", "train.steps=3"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_overrides(model_dir: Path, root: Path, case: str) -> list[str]:
    reward = root / "length_reward.py"
    reward.write_text(LENGTH_REWARD)
    return [
        f"model.path={model_dir}", "model.compute_dtype=fp32", "model.lora.enabled=false", "train.steps=1",
        "train.prompts_per_step=2", "train.samples_per_prompt=4", "train.micro_batch_size=4", "train.lr=1e-4",
        "generation.max_new_tokens=6", "generation.seed_per_prompt=true", "log.progress=false", "log.trackers=[]",
        "checkpoint.save_final=false", f"reward.functions=[{{fn: '{reward}:length'}}]", *CASES[case],
    ]


def run_layout(config: str | None, overrides: list[str], out_dir: Path, nproc: int = 2, env: dict | None = None,
               timeout: int = 1200) -> dict:
    """Run layout_run.py (under `accelerate launch --config_file launch/<config>` unless config is None)."""
    out = out_dir / "result.pt"
    if config is None:
        cmd = [sys.executable, str(HELPER)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / config),
               "--num_processes", str(nproc), "--main_process_port", str(free_port()), str(HELPER)]
    full_env = {**os.environ, "RLHF_TEST_OUT": str(out), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([*cmd, *overrides, f"output_dir={out_dir / 'run'}"], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line and not line.lstrip().startswith("File")]
    assert proc.returncode == 0, "\n".join(errors[-10:]) + "\n" + proc.stderr[-4000:]
    res = torch.load(out, weights_only=False)
    res["metrics"] = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    res["run"] = out_dir / "run"
    return res


ON_GPU = torch.cuda.is_available()
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    """The reference: one process, 2 micro-batches of 4 samples, one step (per case and device)."""
    cache = {}

    def get(case: str, gpu: bool = False) -> tuple[dict, list[str]]:
        if (case, gpu) not in cache:
            root = tmp_path_factory.mktemp(f"single-{case}")
            overrides = base_overrides(tiny_model_dir, root, case)
            cache[case, gpu] = run_layout(None, overrides, root, env=None if gpu else CPU_ONLY), overrides
        return cache[case, gpu]

    return get


def assert_same_step(ref: dict, got: dict, tol: float = 1e-5) -> None:
    assert sorted(got["completions"]) == sorted(ref["completions"]), "generation differs between layouts"
    r, g = ref["records"][0], got["records"][0]
    assert abs(r["loss"] - g["loss"]) <= tol, (r["loss"], g["loss"])
    assert abs(r["grad_norm"] - g["grad_norm"]) <= tol * max(1.0, r["grad_norm"]), (r["grad_norm"], g["grad_norm"])
    assert r["reward/mean"] == pytest.approx(g["reward/mean"], abs=1e-6)
    if "critic/value_loss" in r:  # PPO: the critic's step is global too
        assert abs(r["critic/value_loss"] - g["critic/value_loss"]) <= tol, (r["critic/value_loss"],
                                                                             g["critic/value_loss"])
    assert ref["params"].keys() == got["params"].keys()
    diff = max(float((ref["params"][n] - got["params"][n]).abs().max()) for n in ref["params"])
    assert diff <= tol, diff


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_two_processes_match_one_process(case, single, tiny_model_dir, tmp_path):
    """`accelerate launch --config_file launch/cpu_2proc.yaml`: world size 2 in metrics.jsonl, and the step
    equals the one-process step (same completions, loss, gradient norm and parameters within 1e-5, fp32)."""
    ref, overrides = single(case)
    assert ref["world_size"] == 1 and ref["layout"] == "single"
    got = run_layout("cpu_2proc.yaml", overrides, tmp_path, env=CPU_ONLY)
    assert got["world_size"] == 2 and got["layout"] == "ddp"
    assert [m["world_size"] for m in got["metrics"]] == [2] * len(ref["metrics"])
    assert [m.get("staleness") for m in got["metrics"]] == [m.get("staleness") for m in ref["metrics"]]
    assert len(got["completions"]) == 8  # 2 prompts x 4 samples, one prompt's group on each rank
    assert_same_step(ref, got)
    init = initial_params(tiny_model_dir)
    moved = max(float((got["params"][n] - init[n]).abs().max()) for n in init.keys() & got["params"].keys())
    assert moved > 5e-5  # the step is not trivially small next to the tolerance


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_2proc.yaml", "zero3.yaml", "fsdp2.yaml"])
def test_vllm_engine_on_every_rank(config, tiny_vllm_model_dir, tmp_path):
    """generation.engine=vllm under `accelerate launch` (2 processes): each rank runs its own colocated engine
    on its own prompts (vLLM's external_launcher on accelerate's process group), and after the last weight
    sync every rank's engine matches its model (greedy output, exp(gap) < 1.01 in fp32). DDP syncs from the
    policy itself, ZeRO-3 and FSDP2 from the whole copy gathered from the shards."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm not installed (make setup installs its CPU build)")
    if config == "zero3.yaml" and not deepspeed_runs_here():
        pytest.skip("deepspeed not installed")
    root = tmp_path / "cfg"
    root.mkdir()
    overrides = [*base_overrides(tiny_vllm_model_dir, root, "grpo"), "generation.seed_per_prompt=false",
                 "generation.engine=vllm", "generation.vllm.kv_cache_gb=0.25", "train.steps=2", "train.lr=3e-2"]
    got = run_layout(config, overrides, tmp_path, env={**CPU_ONLY, **SHARDED_ENV})
    assert (got["world_size"] == 2
            and got["layout"] == {"cpu_2proc.yaml": "ddp"}.get(config, config.removesuffix(".yaml")))
    assert [m["world_size"] for m in got["metrics"]] == [2, 2]
    assert [s["rank"] for s in got["sync"]] == [0, 1]
    assert all(s["ok"] and s["gap_mean"] < 0.01 for s in got["sync"]), got["sync"]
    for m in got["metrics"]:  # the sampler/trainer gap of each step, the max over both ranks
        assert m["engine/logp_gap_max"] < 0.01, m["engine/logp_gap_max"]
    init = initial_params(tiny_vllm_model_dir)
    moved = max(float((got["params"][n] - init[n]).abs().max()) for n in init.keys() & got["params"].keys())
    assert moved > 1e-3  # the engines followed a policy that moved


def initial_params(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {n: t.float() for n, t in load_file(model_dir / "model.safetensors").items()}


def deepspeed_runs_here() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


# On a CPU machine: 2 processes over gloo (DeepSpeed's CPU accelerator). With GPUs: up to 2 GPU processes
# (one GPU still runs the sharded code paths: ZeRO-3 partitions and FSDP2 DTensors over a world of 1).
NPROC = min(2, torch.cuda.device_count()) if ON_GPU else 2
SHARDED_ENV = {} if ON_GPU else {"DS_ACCELERATOR": "cpu"}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml", "fsdp2.yaml"])
def test_sharded_layout_runs_two_steps_and_matches_one_process(config, single, tmp_path):
    """ZeRO-2, ZeRO-3 and FSDP2: 2 steps, a checkpoint, a resume to step 3; step 1 equals the
    one-process step (generation from the gathered whole copy, global normaliser)."""
    if config.startswith("zero") and not deepspeed_runs_here():
        pytest.skip("deepspeed not installed (pip install 'rlhf[deepspeed]'; make setup installs it)")
    ref, overrides = single("grpo", gpu=ON_GPU)
    got = run_layout(config, [*overrides, "train.steps=2"], tmp_path, nproc=NPROC, env=SHARDED_ENV)
    assert got["world_size"] == NPROC and got["layout"] == config.removesuffix(".yaml")
    assert [m["world_size"] for m in got["metrics"]] == [NPROC, NPROC]
    first = {**got, "records": got["records"][:1], "params": ref["params"]}  # params are after step 2 here
    assert_same_step(ref, first)
    assert (got["run"] / "checkpoints" / "step_000002" / "sharded").is_dir()
    # resume from step 2 and run a third step under the same layout
    again = run_layout(config, [*overrides, "train.steps=3", "checkpoint.resume=latest"], tmp_path, nproc=NPROC,
                       env=SHARDED_ENV)
    assert [m["step"] for m in again["metrics"]] == [1, 2, 3]


# ----------------------------------------------------------------------------- launch commands


def accelerate_args(argv: list[str]):
    """The arguments `accelerate launch` would run with: its own parser, then the config file's defaults."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    args, *_ = _validate_launch_command(args)
    return args


def test_multi_node_config_renders_2_nodes_x_8_gpus():
    for rank in (0, 1):
        args = accelerate_args(["--config_file", str(LAUNCH / "multi_node.yaml"), "--machine_rank", str(rank),
                                "--main_process_ip", "10.1.2.3", "recipes/grpo_arithmetic.py", "train.steps=2"])
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, rank)
        assert (args.main_process_ip, args.main_process_port) == ("10.1.2.3", 29500)
        assert args.multi_gpu and args.training_script == "recipes/grpo_arithmetic.py"
        assert args.training_script_args == ["train.steps=2"]


def test_slurm_script_starts_accelerate_on_every_node(tmp_path):
    """Run launch/slurm.sbatch with stand-in `scontrol`, `srun` (runs the task once per node with its
    SLURM_NODEID) and `accelerate` (prints its arguments); parse every rendered command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\nprintf "gpu-node-07\\ngpu-node-08\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n'
                                  'for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n "$@" || exit 1; done\n')
    (bin_dir / "accelerate").write_text('#!/bin/bash\nprintf "%s\\0" "$@" >> "$RENDER_OUT"; '
                                        'printf "\\n" >> "$RENDER_OUT"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "commands"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RENDER_OUT": str(out), "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_GPUS_ON_NODE": "8"}
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "recipes/grpo_arithmetic.py", "output_dir=runs/big"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [line.rstrip("\0").split("\0") for line in out.read_text().split("\n") if line.strip("\0")]
    assert len(commands) == 2
    for rank, argv in enumerate(commands):
        assert argv[0] == "launch"
        args = accelerate_args(argv[1:])
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, rank)
        assert (args.main_process_ip, args.main_process_port) == ("gpu-node-07", 29500)
        assert (args.training_script == "recipes/grpo_arithmetic.py"
                and args.training_script_args == ["output_dir=runs/big"])


def test_every_launch_config_parses():
    names = {p.stem for p in LAUNCH.glob("*.yaml")}
    assert {"cpu_2proc", "single_gpu", "multi_gpu_ddp", "zero2", "zero3", "fsdp2", "multi_node"} <= names
    expect = {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
              "fsdp2": "FSDP", "multi_node": "MULTI_GPU", "cpu_2proc": "MULTI_GPU"}
    from accelerate.commands.config.config_args import load_config_from_file

    for name, kind in expect.items():
        cfg = load_config_from_file(str(LAUNCH / f"{name}.yaml"))
        assert str(cfg.distributed_type).split(".")[-1] == kind, name
    assert load_config_from_file(str(LAUNCH / "zero3.yaml")).deepspeed_config["zero3_init_flag"] is False
    assert load_config_from_file(str(LAUNCH / "fsdp2.yaml")).fsdp_config["fsdp_version"] == 2
