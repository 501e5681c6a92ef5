"""`rlhf sweep RECIPE --seeds 0,1,2 [key=value ...]`: one recipe over several seeds, and one report of them all.

Each seed is a whole run (`rlhf train RECIPE train.seed=S output_dir=OUT/seed_S ...`) in its own process, one
after another by default; `--parallel N` runs N at a time, each on its own GPU where there are several. The
report, OUT/sweep.html with OUT/sweep.png and OUT/sweep.json, gives every curve as the mean over seeds with the
band from the lowest to the highest seed, a table of the eval results per seed (greedy accuracy before and
after, pass@k), when each run first reached a reward level and how far it fell after, and how long each took.
A seed that fails is reported by name, with the last line of its log, and the others are kept.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from rlhf.report import CSS, _table, load_metrics, series

CURVES = ("reward/mean", "kl", "completion/len_mean", "grad_norm", "distill/reverse_kl")  # those a run logs


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"rlhf sweep: --seeds takes integers separated by commas, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"rlhf sweep: --seeds needs distinct integers, got {text!r}")
    return seeds


def visible_gpus() -> list[str]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES, else all of them); [] without any."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_seeds(recipe: Optional[str], seeds: list[int], out: Path, overrides: list[str],
              parallel: int = 1, gpus: Optional[list[str]] = None) -> dict[int, dict]:
    """Run every seed (at most `parallel` at a time; with GPUs, run i of those at once sees only GPU i mod their
    number); {seed: {"dir", "returncode", "seconds", "log"}}."""
    out.mkdir(parents=True, exist_ok=True)
    gpus = visible_gpus() if gpus is None else gpus
    results: dict[int, dict] = {}
    running: list[tuple[int, subprocess.Popen, float, int]] = []  # (seed, process, start, slot)
    queue = list(seeds)
    while queue or running:
        while queue and len(running) < parallel:
            seed = queue.pop(0)
            slot = min(set(range(parallel)) - {r[3] for r in running})
            run_dir, log = out / f"seed_{seed}", out / f"seed_{seed}.log"
            cmd = [sys.executable, "-m", "rlhf.cli", "train", *([recipe] if recipe else []), *overrides,
                   f"train.seed={seed}", f"output_dir={run_dir}", "log.progress=false"]
            env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus and parallel > 1 else {})}
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            running.append((seed, proc, time.perf_counter(), slot))
        for seed, proc, t0, slot in list(running):
            if proc.poll() is not None:
                running.remove((seed, proc, t0, slot))
                results[seed] = {"dir": str(out / f"seed_{seed}"), "returncode": proc.returncode,
                                 "seconds": round(time.perf_counter() - t0, 1), "log": str(out / f"seed_{seed}.log")}
        time.sleep(0.5)
    return results


def _last_line(path: str) -> str:
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def aggregate(curves: dict[int, list[dict]], key: str) -> dict[str, list[float]]:
    """Over the seeds that logged `key` at a step: mean, min and max per step (steps in order)."""
    by_step: dict[int, list[float]] = {}
    for records in curves.values():
        xs, ys = series(records, key)
        for x, y in zip(xs, ys):
            by_step.setdefault(x, []).append(y)
    steps = sorted(by_step)
    return {"step": steps, "mean": [statistics.mean(by_step[s]) for s in steps],
            "min": [min(by_step[s]) for s in steps], "max": [max(by_step[s]) for s in steps],
            "seeds": [len(by_step[s]) for s in steps]}


def hold(records: list[dict], level: float = 0.8, floor: float = 0.7, window: int = 5) -> dict[str, Any]:
    """When the `window`-step mean reward first reached `level`, and its lowest value after (held: >= floor)."""
    xs, ys = series(records, "reward/mean")
    ends = range(window - 1, len(ys))  # whole windows only
    means = {i: statistics.mean(ys[i - window + 1: i + 1]) for i in ends}
    first = next((i for i in ends if means[i] >= level), None)
    if first is None:
        return {"reached_at": None, "min_after": None, "held": False}
    after = min(means[i] for i in ends if i >= first)
    return {"reached_at": xs[first], "min_after": round(after, 4), "held": after >= floor}


def plot(agg: dict[str, dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in agg if agg[k].get("step")]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.2 * max(1, len(keys)), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        a = agg[key]
        ax.fill_between(a["step"], a["min"], a["max"], alpha=0.25, color="tab:blue", label="min-max over seeds")
        ax.plot(a["step"], a["mean"], color="tab:blue", label="mean")
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(recipe: str, results: dict[int, dict], curves_keys: Sequence[str] = CURVES) -> dict:
    """sweep.json: per seed (status, time, eval, the hold of the reward), and the aggregated curves."""
    per_seed, curves = {}, {}
    for seed, r in sorted(results.items()):
        entry: dict[str, Any] = {"returncode": r["returncode"], "seconds": r["seconds"], "dir": r["dir"]}
        if r["returncode"] != 0:
            entry["error"] = _last_line(r["log"])
        try:
            curves[seed] = load_metrics(Path(r["dir"]))
            entry.update(steps=len(curves[seed]), **hold(curves[seed]))
        except Exception as e:  # noqa: BLE001 - a failed seed may have no metrics at all
            entry.setdefault("error", str(e))
        ev = Path(r["dir"]) / "eval.json"
        if ev.is_file():
            data = json.loads(ev.read_text())
            entry["eval"] = {when: {k: v for k, v in (data.get(when) or {}).items() if k == "greedy_accuracy"
                                    or k.startswith("pass@")} for when in ("before", "after")}
        per_seed[seed] = entry
    agg = {key: aggregate(curves, key) for key in curves_keys}
    return {"recipe": recipe, "seeds": per_seed, "curves": agg,
            "failed": [s for s, e in per_seed.items() if e["returncode"] != 0]}


def _num(v: Optional[float]) -> Any:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else v


def render(summary: dict, png: Path) -> str:
    rows = []
    for seed, e in summary["seeds"].items():
        before = (e.get("eval") or {}).get("before", {})
        after = (e.get("eval") or {}).get("after", {})
        pass_key = next((k for k in after if k.startswith("pass@") and k != "pass@1"), None)
        rows.append([seed, "ok" if e["returncode"] == 0 else f"failed: {e.get('error', '')}", e.get("steps", 0),
                     _num(before.get("greedy_accuracy")), _num(after.get("greedy_accuracy")),
                     _num(after.get(pass_key)) if pass_key else "-", _num(e.get("reached_at")),
                     _num(e.get("min_after")), e["seconds"]])
    headers = ["seed", "status", "steps", "greedy before", "greedy after", "pass@k after",
               "5-step mean >= 0.8 at step", "lowest 5-step mean after", "seconds"]
    img = base64.b64encode(png.read_bytes()).decode("ascii") if png.is_file() else ""
    title = f"rlhf sweep: {summary['recipe']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
<p class="sub">{len(summary['seeds'])} seeds, {len(summary['failed'])} failed</p>
<h2>Curves (mean over seeds, band: lowest to highest seed)</h2>
<img alt="curves over seeds" src="data:image/png;base64,{img}">
<h2>Per seed</h2>{_table(headers, rows, ["num", "", "num", "num", "num", "num", "num", "num", "num"])}
</body></html>
"""


def write_report(recipe: str, out: Path, results: dict[int, dict], curves_keys: Sequence[str] = CURVES) -> dict:
    summary = summarize(recipe, results, curves_keys)
    png = plot(summary["curves"], out / "sweep.png", title=Path(recipe).stem) if any(
        a["step"] for a in summary["curves"].values()) else out / "sweep.png"
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    (out / "sweep.html").write_text(render(summary, png), encoding="utf-8")
    return summary


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="rlhf sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe YAML (or a recipe script's .yaml)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", default=None, help="where the runs and the report go (default runs/sweep_<recipe>)")
    p.add_argument("--parallel", type=int, default=1,
                   help="seeds run at a time (one per device where there are several)")
    p.add_argument("--curve", action="append", default=[], metavar="KEY",
                   help="a metrics.jsonl key to plot too (repeatable), e.g. reward/first_number_matches/mean")
    p.add_argument("overrides", nargs="*", help="config overrides for every seed (key=value)")
    a = p.parse_intermixed_args(argv)  # options may come before or after the overrides
    if "=" in a.recipe:  # no YAML, only overrides (as `rlhf train` takes them)
        a.overrides, a.recipe = [a.recipe, *a.overrides], None
    from rlhf.checks import check_config
    from rlhf.config import load_config
    from rlhf.errors import user_errors_exit

    with user_errors_exit("rlhf sweep: "):  # a bad recipe or override fails before any seed starts
        check_config(load_config(a.recipe, a.overrides))
    out = Path(a.out or f"runs/sweep_{Path(a.recipe or 'overrides').stem}")
    results = run_seeds(a.recipe, parse_seeds(a.seeds), out, a.overrides, max(1, a.parallel))
    summary = write_report(a.recipe or "overrides", out, results, [*CURVES, *a.curve])
    for seed, e in summary["seeds"].items():
        status = "ok" if e["returncode"] == 0 else f"FAILED ({e.get('error', '')})"
        print(f"seed {seed}: {status}, {e['seconds']} s, 5-step mean >= 0.8 at step {e.get('reached_at')}, "
              f"lowest after {e.get('min_after')}, eval {e.get('eval')}")
    print(f"report: {(out / 'sweep.html').resolve()}")
    if summary["failed"]:
        sys.exit(f"rlhf sweep: seed(s) {', '.join(map(str, summary['failed']))} failed (see their logs in {out})")
    return summary
