"""Preemption (SIGTERM, SIGUSR1) and non-finite gradients, on real trainer runs."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf.logging import read_jsonl
from rlhf.trainers import Trainer
from rlhf.trainers import checkpoint as ckpt
from rlhf.trainers.guards import NonFiniteGradientError, Preemption

RUNNER = Path(__file__).with_name("run_trainer.py")
REPO = Path(__file__).resolve().parents[2]


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}


def test_preemption_handler_sets_a_flag_and_restores_the_previous_handlers():
    from accelerate import Accelerator

    before = signal.getsignal(signal.SIGUSR1)
    with Preemption() as p:
        assert not p.requested(Accelerator(cpu=True))
        os.kill(os.getpid(), signal.SIGUSR1)  # would kill the process with the default handler
        time.sleep(0.05)
        assert p.requested(Accelerator(cpu=True)) and p.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_signal_to_one_process_stops_every_process():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(Path(__file__).with_name("preempt_ranks.py"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: before=False after=True signalled=False" in proc.stdout
    assert "rank 1: before=False after=True signalled=True" in proc.stdout


def test_sigterm_saves_at_the_next_step_boundary_and_exits_0(tiny_cfg, tiny_overrides, yes_reward, tmp_path):
    sig = signal.SIGTERM
    out = tmp_path / "b"
    args = tiny_overrides(yes_reward, f"output_dir={out}", "train.steps=200")
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLOW_REWARD_S": "0.3"}
    proc = subprocess.Popen([sys.executable, str(RUNNER), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None and time.time() < deadline, (proc.stdout.read() if proc.poll() is not None
                                                                    else "timeout")
            time.sleep(0.05)
        at_signal = len(read_jsonl(out / "metrics.jsonl"))
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert f"{signal.Signals(sig).name}: saved a checkpoint at step" in output
    logged = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    saved = ckpt.find_latest(out / "checkpoints")
    state = json.loads((saved / "state.json").read_text())
    # The step in progress when the signal arrived finished and was saved: nothing is lost.
    assert state["step"] == logged[-1] and at_signal <= state["step"] <= at_signal + 1 and state["step"] < 200
    assert not (out / "final").exists()

    # Resuming continues exactly where a run without the interruption would be.
    n = state["step"] + 1
    resumed = Trainer(tiny_cfg(yes_reward, f"output_dir={out}", f"train.steps={n}", "checkpoint.resume=latest"))
    resumed.train()
    straight = Trainer(tiny_cfg(yes_reward, f"output_dir={tmp_path}/a", f"train.steps={n}"))
    straight.train()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, n + 1))
    a, b = trainable(straight), trainable(resumed)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


SELF_SIGNAL = '''
import os
import signal

calls = []


def signal_on_second_call(prompts, completions, completion_ids, **kw):
    """SLURM's warning signal arrives while step 2 is being scored."""
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGUSR1)
    return [float(len(c)) for c in completions]
'''


def test_sigusr1_finishes_the_step_saves_and_returns(tiny_cfg, reward_file):
    before = signal.getsignal(signal.SIGUSR1)
    trainer = Trainer(tiny_cfg(reward_file(SELF_SIGNAL, "signal_on_second_call"), "train.steps=10",
                               "checkpoint.save_final=true"))
    history = trainer.train()
    assert [r["step"] for r in history] == [1, 2]
    saved = ckpt.find_latest(trainer.out / "checkpoints")
    assert saved.name == "step_000002" and json.loads((saved / "state.json").read_text())["step"] == 2
    assert not (trainer.out / "final").exists()  # an interrupted run is not final
    assert signal.getsignal(signal.SIGUSR1) is before  # the trainer's handlers are gone after train()


def poison_gradients(trainer, when) -> None:
    """Make every gradient of the first parameter NaN while `when()` is true (after backward, before the step)."""
    p = next(p for p in trainer.unwrapped.parameters() if p.requires_grad)
    p.register_hook(lambda g: torch.full_like(g, float("nan")) if when() else g)


def test_non_finite_gradient_steps_are_skipped_and_counted(tiny_cfg, length_reward):
    trainer = Trainer(tiny_cfg(length_reward, "train.steps=3", "algo.kl.coef=0"))  # a dense reward: steps 1 and 3 move
    poison_gradients(trainer, lambda: trainer.state["step"] == 1)  # the second RL step
    history = []
    snapshots = [trainable(trainer)]
    for _ in range(3):
        history += trainer.step()
        snapshots.append(trainable(trainer))
    assert [r["skipped_steps"] for r in history] == [0, 1, 1]
    assert not math.isfinite(history[1]["grad_norm"]) and math.isfinite(history[2]["grad_norm"])
    changed = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert (changed(snapshots[0], snapshots[1]) and not changed(snapshots[1], snapshots[2])
            and changed(snapshots[2], snapshots[3]))
    assert all(torch.isfinite(v).all() for v in snapshots[3].values())
    for state in trainer.policy.optimizer.state_dict()["state"].values():  # no NaN reached the Adam moments either
        assert all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t))
    rows = read_jsonl(trainer.out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]


def test_k_non_finite_steps_in_a_row_stop_the_run_with_a_checkpoint(tiny_cfg, yes_reward):
    trainer = Trainer(tiny_cfg(yes_reward, "train.steps=10", "train.max_skipped_steps=2", "algo.kl.coef=0"))
    poison_gradients(trainer, lambda: True)
    before = trainable(trainer)
    with pytest.raises(NonFiniteGradientError,
                       match=r"2 optimizer steps in a row had non-finite gradients.*saved at step 2"):
        trainer.train()
    saved = ckpt.find_latest(trainer.out / "checkpoints")
    assert saved is not None and saved.name == "step_000002"
    assert json.loads((saved / "state.json").read_text())["skipped_in_row"] == 2
    after = trainable(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights untouched
    assert [r["skipped_steps"] for r in read_jsonl(trainer.out / "metrics.jsonl")] == [1, 2]
