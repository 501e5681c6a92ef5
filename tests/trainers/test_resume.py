"""Exact resume: N steps straight == k steps, a checkpoint, then N - k steps in another trainer or process."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.logging import read_jsonl
from rlhf.trainers import Trainer
from rlhf.trainers import checkpoint as ckpt

RUNNER = Path(__file__).with_name("run_trainer.py")
REPO = Path(__file__).resolve().parents[2]
# Everything that makes resuming non-trivial: a decaying schedule with warmup, two passes per batch
# (old log-probs and the clip ratio), a KL term against the reference, shuffled data.
HARD = ["train.steps=4", "train.lr_schedule=linear", "train.warmup_steps=1", "train.updates_per_batch=2",
        "algo.kl.coef=0.1"]


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def assert_same_run(rec_a: list[dict], rec_b: list[dict], params_a: dict, params_b: dict) -> None:
    a, b = comparable(rec_a), comparable(rec_b)
    assert [r["opt_step"] for r in a] == [r["opt_step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float) and rb[k] is not None:
                assert ra[k] == pytest.approx(rb[k], abs=1e-5), (ra["step"], k)
            else:
                assert ra[k] == rb[k], (ra["step"], k)
    assert params_a.keys() == params_b.keys()
    for n in params_a:
        assert torch.allclose(params_a[n], params_b[n], atol=1e-5), n


def straight_and_split(tiny_cfg, tmp_path, split: int, *overrides: str):
    straight = Trainer(tiny_cfg(*overrides, f"output_dir={tmp_path}/a"))
    straight.train()
    first = Trainer(tiny_cfg(*overrides, f"output_dir={tmp_path}/b", f"checkpoint.every={split}"))
    first.cfg.train.steps = split  # stop at the checkpoint (the schedule still spans the whole run)
    first.train()
    second = Trainer(tiny_cfg(*overrides, f"output_dir={tmp_path}/b", "checkpoint.resume=latest"))
    history = second.train()
    assert [r["step"] for r in history][0] == split + 1, "the resumed run did not continue after the checkpoint"
    return straight, second


@pytest.mark.parametrize("variant", ["full_weights_with_reference", "lora"])
def test_resume_continues_exactly(tiny_cfg, yes_reward, tmp_path, variant):
    extra = ["model.lora.enabled=true", "model.lora.r=4", "train.lr=1e-2"] if variant == "lora" else []
    straight, resumed = straight_and_split(tiny_cfg, tmp_path, 2, yes_reward, *HARD, *extra)
    rec_a, rec_b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rec_b] == [1, 1, 2, 2, 3, 3, 4, 4]  # two optimizer steps per RL step, none twice
    assert all(r["kl"] is not None for r in rec_a) and rec_a[-1]["kl"] > 0  # the reference matters
    assert_same_run(rec_a, rec_b, trainable(straight), trainable(resumed))
    assert resumed.policy.scheduler.get_last_lr() == straight.policy.scheduler.get_last_lr()
    if variant == "lora":
        assert all("lora_" in n for n in trainable(resumed))


def test_resume_on_an_epoch_boundary_runs_the_remaining_steps(tiny_cfg, yes_reward, tmp_path):
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + {i} ?"}) + "\n" for i in range(4)))
    # 4 prompts, 2 per step: the checkpoint at step 2 sits exactly at the end of epoch 0.
    straight, resumed = straight_and_split(tiny_cfg, tmp_path, 2, yes_reward, f"data.train={data}", "train.steps=4",
                                           "log.completions_per_step=8")
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["data"] == {"epoch": 0, "pos": 4}
    rec_a, rec_b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rec_b] == [1, 2, 3, 4]
    assert_same_run(rec_a, rec_b, trainable(straight), trainable(resumed))
    prompts = lambda run: [(c["step"], c["prompt"]) for c in read_jsonl(tmp_path / run / "completions.jsonl")]  # noqa: E731
    assert prompts("a") == prompts("b")
    epoch1 = {p for s, p in prompts("b") if s > 2}
    assert len(epoch1) == 4  # steps 3 and 4 saw every prompt of epoch 1 once
    assert resumed.prompts.state() == {"epoch": 1, "pos": 4}


def test_kill_9_during_a_trainer_save_then_resume_exactly(tiny_cfg, tiny_overrides, yes_reward, tmp_path):
    """A run SIGKILLed while writing its step-2 checkpoint resumes, in another process, from step 1."""
    out = tmp_path / "b"
    args = tiny_overrides(yes_reward, f"output_dir={out}", "checkpoint.every=1", "checkpoint.keep_last=1")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RLHF_TEST_KILL_AT": "optimizer.pt:2"}
    proc = subprocess.run([sys.executable, str(RUNNER), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    root = out / "checkpoints"
    assert (root / f"{ckpt.STAGING_PREFIX}000002" / "optimizer.pt").read_bytes().endswith(b"partial")
    assert ckpt.find_latest(root) == root / "step_000001"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]  # step 2 ran, its save did not finish

    straight = Trainer(tiny_cfg(yes_reward, f"output_dir={tmp_path}/a"))
    straight.train()
    resumed = Trainer(tiny_cfg(yes_reward, f"output_dir={out}", "checkpoint.every=1", "checkpoint.keep_last=1",
                               "checkpoint.resume=latest"))
    resumed.train()
    assert_same_run(read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl"),
                    trainable(straight), trainable(resumed))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003"]  # leftovers pruned, keep_last=1


PPO = ["algo.advantage=gae", "algo.lam=0.95", "algo.kl.placement=in_reward", "algo.kl.estimator=k1", "algo.kl.coef=0.1",
       "algo.kl.target=0.001", "algo.kl.horizon=16", "algo.whiten_advantages=true", "critic.lr=1e-3",
       "train.mini_batches_per_pass=2", "train.micro_batch_size=2"]


@pytest.mark.parametrize("critic", ["critic.lora.enabled=false", "critic.type=shared"])
def test_ppo_resume_restores_critic_and_kl_controller(tiny_cfg, yes_reward, tmp_path, critic):
    straight, resumed = straight_and_split(tiny_cfg, tmp_path, 2, yes_reward, *HARD, *PPO, critic)
    rec_a, rec_b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rec_b] == [s for s in (1, 2, 3, 4) for _ in range(4)]  # 2 passes x 2 mini-batches
    coefs = [r["kl_coef"] for r in rec_a[::4]]
    assert len(set(coefs)) == 4, coefs  # the adaptive beta moved every step: resuming must restore it
    assert_same_run(rec_a, rec_b, trainable(straight), trainable(resumed))
    critic = lambda t: {n: p.detach().clone()  # noqa: E731
                        for n, p in t.acc.unwrap_model(t.critic.model).named_parameters() if p.requires_grad}
    assert_same_run([], [], critic(straight), critic(resumed))
    assert resumed.kl_coef == pytest.approx(straight.kl_coef, abs=1e-12)
    assert resumed.critic.scheduler.get_last_lr() == straight.critic.scheduler.get_last_lr()
    saved = sorted(p.name for p in (tmp_path / "b" / "checkpoints" / "step_000002").iterdir())
    assert {"critic.safetensors", "critic_optimizer.pt", "critic_scheduler.pt", "kl_controller.pt"} <= set(saved)
