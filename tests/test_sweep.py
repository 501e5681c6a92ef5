"""`rlhf sweep`: seeds run one after another, curves aggregated (mean, min, max), a failed seed reported by name
while the others are kept; parallel seeds spread over the GPUs."""
import json
import subprocess
import sys

from rlhf import sweep
from rlhf.sweep import aggregate, hold


def test_aggregation_and_hold_by_hand():
    curves = {0: [{"step": 1, "reward/mean": 0.2}, {"step": 2, "reward/mean": 0.6}],
              1: [{"step": 1, "reward/mean": 0.4}, {"step": 2, "reward/mean": float("nan")}]}
    a = aggregate(curves, "reward/mean")
    assert a == {"step": [1, 2], "mean": [0.30000000000000004, 0.6], "min": [0.2, 0.6], "max": [0.4, 0.6],
                 "seeds": [2, 1]}
    rec = [{"step": i + 1, "reward/mean": r} for i, r in enumerate([0.9, 0.9, 0.9, 0.9, 0.9, 0.2, 0.2])]
    assert hold(rec, window=5) == {"reached_at": 5, "min_after": 0.62, "held": False}
    assert hold(rec[:5], window=5)["held"] is True


def test_two_seeds_and_one_that_fails(tiny_overrides, tmp_path):
    good = tmp_path / "good.py"
    good.write_text("def r(completions, **kw):\n    return [float(len(c) % 3) for c in completions]\n")
    bad = tmp_path / "bad.py"  # fails only for seed 1: the other seed's run and curves must survive
    bad.write_text("import os, sys\n"
                   "def r(completions, **kw):\n"
                   "    if any('seed_1' in a for a in sys.argv):\n"
                   "        raise RuntimeError('seed one is cursed')\n"
                   "    return [float(len(c) % 3) for c in completions]\n")
    out = tmp_path / "sweep"
    args = [a for a in tiny_overrides("train.steps=2") if not a.startswith("output_dir=")]
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "sweep", "--seeds", "0,1", "--out", str(out), *args,
                           f"reward.functions=[{{fn: '{bad}:r'}}]"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "seed(s) 1 failed" in proc.stderr
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["failed"] == [1] and summary["seeds"]["0"]["returncode"] == 0
    assert "seed one is cursed" in summary["seeds"]["1"]["error"] and summary["seeds"]["0"]["steps"] == 2
    assert summary["curves"]["reward/mean"]["seeds"] == [1, 1]  # seed 0's curve alone
    page = (out / "sweep.html").read_text()
    assert "failed: " in page and "seed one is cursed" in page and "data:image/png;base64," in page
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "sweep", "--seeds", "0,1", "--out", str(out / "ok"), *args,
                           f"reward.functions=[{{fn: '{good}:r'}}]", "--curve", "reward/r/mean"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "ok" / "sweep.json").read_text())
    means = summary["curves"]["reward/mean"]
    per_seed = [json.loads(line)["reward/mean"] for s in (0, 1)
                for line in (out / "ok" / f"seed_{s}" / "metrics.jsonl").read_text().splitlines()[:1]]
    assert means["seeds"] == [2, 2] and abs(means["mean"][0] - sum(per_seed) / 2) < 1e-9
    assert summary["curves"]["reward/r/mean"]["mean"] == means["mean"]  # --curve: one reward function's own curve
    assert "distill/reverse_kl" not in summary["curves"] or not summary["curves"]["distill/reverse_kl"]["step"]


def test_parallel_seeds_get_a_gpu_each(tmp_path, monkeypatch):
    """--parallel 2 over two GPUs: the runs at once see different GPUs, and a finished run's GPU goes to the next."""
    started = []

    class Finished:
        returncode = 0

        def __init__(self, cmd, env, **kw):
            started.append((cmd[-3], env.get("CUDA_VISIBLE_DEVICES")))

        def poll(self):
            return 0

    monkeypatch.setattr(sweep.subprocess, "Popen", Finished)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sweep.run_seeds(None, [0, 1, 2], tmp_path, [], parallel=2, gpus=["4", "7"])
    assert started == [("train.seed=0", "4"), ("train.seed=1", "7"), ("train.seed=2", "4")]
    started.clear()
    sweep.run_seeds(None, [0, 1], tmp_path, [], parallel=1, gpus=["4", "7"])  # one at a time: the GPUs as given
    assert [gpu for _, gpu in started] == [None, None]
