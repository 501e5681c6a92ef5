"""`rlhf report RUN_DIR`: learning curves as a PNG and a self-contained HTML report of a run.

    write_report("runs/demo")  ->  runs/demo/curves.png, runs/demo/report.html

The PNG has four panels: reward (mean, a band of one std, each reward function's
mean), KL to the reference, completion length (and the truncated fraction), and
step time split by phase. The HTML embeds that PNG as base64 (one file, no
network), the run's settings, its final metrics, eval accuracy before and after
training (eval.json, when present) and sample completions from the first and last
logged steps. Every text taken from the run is HTML-escaped.
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import math
from pathlib import Path
from typing import Any, Optional

from rlhf.errors import UserError
from rlhf.logging import read_jsonl
from rlhf.trackers import read_completions

CURVES_PNG = "curves.png"
REPORT_HTML = "report.html"
PHASES = ("generate", "reward", "logprob", "train", "sync")


class ReportError(UserError, FileNotFoundError):
    """The run directory lacks what a report needs; the message names the file."""


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The first record of every RL step in metrics.jsonl (it carries the step's timings)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} not found: is {run_dir} a run directory (output_dir) with at least one step?")
    first: dict[int, dict[str, Any]] = {}
    for rec in read_jsonl(path):
        first.setdefault(int(rec["step"]), rec)
    if not first:
        raise ReportError(f"{path} is empty: the run logged no step yet")
    return [first[s] for s in sorted(first)]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, skipping records where it is missing, None or not finite."""
    xs, ys = [], []
    for rec in records:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(rec["step"]))
            ys.append(float(v))
    return xs, ys


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (tensorboard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _line(ax, xs: list[int], ys: list[float], label: str, color: str) -> None:
    if len(ys) >= 10:  # noisy RL curves: raw values faint, the smoothed trend on top
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
        ax.plot(xs, smooth(ys), color=color, linewidth=2, label=f"{label} (smoothed)")
    else:
        ax.plot(xs, ys, color=color, linewidth=2, marker="o", markersize=3, label=label)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Draw reward, KL, completion length and step time against the RL step into a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), dpi=100)
    (ax_r, ax_kl), (ax_len, ax_t) = axes
    xs, mean = series(records, "reward/mean")
    _, std = series(records, "reward/std")
    if mean:
        _line(ax_r, xs, mean, "reward/mean", "tab:blue")
        if len(std) == len(mean):
            ax_r.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color="tab:blue", alpha=0.12, label="± std")
        fn_keys = sorted(k for k in records[-1]
                         if k.startswith("reward/") and k.endswith("/mean") and k != "reward/mean")
        if len(fn_keys) > 1:  # with one function its mean is the reward itself
            for key, color in zip(fn_keys, ["tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]):
                _line(ax_r, *series(records, key), key[len("reward/"):-len("/mean")], color)
        ax_r.legend(loc="best", fontsize=8)
    else:
        _empty(ax_r, "no reward logged")
    ax_r.set_title("reward")

    xs, kl = series(records, "kl")
    if not kl:
        xs, kl = series(records, "kl_in_reward")
    if kl:
        _line(ax_kl, xs, kl, "KL to reference", "tab:red")
        ax_kl.legend(loc="best", fontsize=8)
    else:
        _empty(ax_kl, "KL not computed (algo.kl.coef = 0)")
    ax_kl.set_title("KL to reference")

    xs, lens = series(records, "completion/len_mean")
    if lens:
        _line(ax_len, xs, lens, "mean completion tokens", "tab:green")
        ax_len.legend(loc="upper left", fontsize=8)
        xt, trunc = series(records, "completion/truncated_frac")
        if trunc:
            ax_tr = ax_len.twinx()
            ax_tr.plot(xt, trunc, color="0.5", linestyle="--", linewidth=1, label="truncated fraction")
            ax_tr.set_ylim(-0.05, 1.05)
            ax_tr.legend(loc="upper right", fontsize=8)
    else:
        _empty(ax_len, "no completion lengths logged")
    ax_len.set_title("completion length (tokens)")

    xs, total = series(records, "time/step_s")
    if total:
        bottom = [0.0] * len(xs)
        for phase in PHASES:
            px, py = series(records, f"time/{phase}_s")
            if px == xs and any(py):
                ax_t.bar(xs, py, bottom=bottom, label=phase, width=0.9)
                bottom = [b + v for b, v in zip(bottom, py)]
        ax_t.plot(xs, total, color="black", linewidth=1, marker=".", label="step total")
        ax_t.legend(loc="best", fontsize=8)
    else:
        _empty(ax_t, "no timings logged")
    ax_t.set_title("step time (s)")

    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- HTML


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]], classes: Optional[list[str]] = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        tds = []
        for i, v in enumerate(row):
            cls = f' class="{classes[i]}"' if classes and classes[i] else ""
            tds.append(f"<td{cls}>{html.escape(_fmt(v))}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _prompt_text(prompt: Any) -> str:
    """A prompt as a person reads it: the last user message of a conversational prompt."""
    if isinstance(prompt, str):
        try:
            prompt = json.loads(prompt)
        except ValueError:
            return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", ""))
    return str(prompt)


def completions_section(rows: list[dict[str, Any]], per_step: int = 8) -> str:
    """Tables of sample completions from the first and the last logged step."""
    if not rows:
        return "<p>No completions logged (log.completions_per_step = 0).</p>"
    steps = sorted({int(r["step"]) for r in rows})
    reward_cols = [c for c in rows[0] if c.startswith("reward/")]
    headers = ["prompt", "completion", "reward", *[c[len("reward/"):] for c in reward_cols], "advantage"]
    parts = []
    for step in dict.fromkeys([steps[0], steps[-1]]):
        chosen = [r for r in rows if int(r["step"]) == step][:per_step]
        table_rows = [[_prompt_text(r["prompt"]), r["completion"], r.get("reward"), *[r.get(c) for c in reward_cols],
                       r.get("advantage")] for r in chosen]
        classes = ["prompt", "completion"] + ["num"] * (len(headers) - 2)
        parts.append(f"<h3>step {step}</h3>" + _table(headers, table_rows, classes))
    return "".join(parts)


def eval_section(run_dir: Path) -> str:
    """Eval accuracy before and after training, from eval.json (written by `rlhf train` / recipes)."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return ""
    data = json.loads(path.read_text())
    rows = []
    for label in ("before", "after"):
        r = data.get(label)
        if r:
            k = r.get("k") or 0
            rows.append([label, r.get("num_prompts"), r.get("greedy_accuracy"), r.get("greedy_mean_reward"),
                         r.get(f"pass@{k}") if k else "-", r.get("pass@1") if k else "-"])
    if not rows:
        return ""
    k = next((data[x].get("k") for x in ("after", "before") if data.get(x)), 0)
    headers = ["model", "prompts", "greedy accuracy", "greedy mean reward", f"pass@{k}", "pass@1 (sampled)"]
    return "<h2>Evaluation on data.eval</h2>" + _table(headers, rows, ["", "num", "num", "num", "num", "num"])


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;\
color:#222;padding:0 16px}
h1{margin-bottom:4px} .sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:8px 0 20px;font-size:14px;width:100%}
th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.completion,td.prompt{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px}
img{max-width:100%;border:1px solid #eee}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:0 24px}
"""


def render_html(run_dir: Path, records: list[dict[str, Any]], png: Path) -> str:
    """The report page: curves (base64 PNG), settings, final metrics, eval results, sample completions."""
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    settings = []
    for key in ("model.path", "model.lora.enabled", "algo.advantage", "algo.policy_loss", "algo.kl.coef", "data.train",
                "train.steps", "train.prompts_per_step", "train.samples_per_prompt", "train.lr",
                "generation.max_new_tokens"):
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            settings.append([key, node])
    last = records[-1]
    final = [[k, last[k]] for k in ("step", "reward/mean", "reward/std", "kl", "loss", "entropy", "completion/len_mean",
                                      "time/step_s") if last.get(k) is not None]
    total_s = sum(r.get("time/step_s") or 0.0 for r in records)
    final.append(["total step time (s)", total_s])
    img = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    title = f"rlhf run: {run_dir.resolve().name}"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(str(run_dir.resolve()))} &middot; {len(records)} steps &middot; report written {when}</p>
<h2>Learning curves</h2>
<img alt="learning curves: reward, KL, completion length, step time" src="data:image/png;base64,{img}">
<div class="grid"><div><h2>Settings</h2>{_table(["key", "value"], settings, ["", "num"])}</div>
<div><h2>Last step</h2>{_table(["metric", "value"], final, ["", "num"])}</div></div>
{eval_section(run_dir)}
<h2>Sample completions</h2>
{completions_section(read_completions(run_dir))}
</body></html>
"""


def write_report(run_dir: str | Path, output_dir: Optional[str | Path] = None) -> Path:
    """Render `curves.png` and `report.html` for a run directory; returns the HTML path."""
    run_dir = Path(run_dir)
    out = Path(output_dir) if output_dir is not None else run_dir
    records = load_metrics(run_dir)
    png = plot_curves(records, out / CURVES_PNG, title=run_dir.resolve().name)
    path = out / REPORT_HTML
    path.write_text(render_html(run_dir, records, png), encoding="utf-8")
    return path
