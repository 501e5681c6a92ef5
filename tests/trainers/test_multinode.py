"""Two machines for real: two `accelerate launch` commands, one per "machine" (machine_rank 0 and 1 of
--num_machines 2, one process each, meeting at --main_process_ip 127.0.0.1), as launch/multi_node.yaml and
launch/slurm.sbatch run on a cluster. Two steps with world size 2 must equal one process running the same
two steps with the same per-prompt seeds (the step does not depend on the layout)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.trainers.test_distributed import HELPER, LAUNCH, ROOT, base_overrides, free_port, run_layout


@pytest.mark.slow
def test_two_accelerate_launch_commands_as_two_machines(tiny_model_dir, tmp_path):
    overrides = [*base_overrides(tiny_model_dir, tmp_path, "grpo"), "train.steps=2", f"output_dir={tmp_path / 'run'}"]
    port, out = free_port(), tmp_path / "result.pt"
    env = {**os.environ, "RLHF_TEST_OUT": str(out), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    machines = [
        subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch",
                          "--config_file", str(LAUNCH / "multi_node.yaml"),
                          "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                          "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), str(HELPER), *overrides],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    logs = [m.communicate(timeout=900) for m in machines]
    for rank, (m, (_, err)) in enumerate(zip(machines, logs)):
        assert m.returncode == 0, f"machine {rank}:\n{err[-4000:]}"
    res = torch.load(out, weights_only=False)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res["world_size"] == 2 and res["layout"] == "ddp"
    assert [r["world_size"] for r in metrics] == [2, 2] and [r["step"] for r in metrics] == [1, 2]
    prompts = {tuple(row[: row.index(-1)]) for row in res["completions"]}  # each machine sampled its own prompt
    assert len(res["completions"]) == 8 and len(prompts) == 2, prompts

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    ref = run_layout(None, [*base_overrides(tiny_model_dir, single_dir, "grpo"), "train.steps=2"], single_dir,
                     env={"CUDA_VISIBLE_DEVICES": ""})
    for a, b in zip(ref["metrics"], metrics):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["reward/mean"] == pytest.approx(b["reward/mean"])
    diff = max(float((ref["params"][n] - res["params"][n]).abs().max()) for n in ref["params"])
    assert diff <= 1e-5, diff
