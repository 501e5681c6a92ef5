"""The acceptance test of issue 9: a short training renders a report whose PNG shows the curves,
whose HTML embeds them, and whose run directory holds the tracker files."""
import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from rlhf.cli import main
from rlhf.logging import read_jsonl
from rlhf.report import ReportError, load_metrics, plot_curves, smooth, write_report


def test_training_writes_report_curves_and_tensorboard(lora_run):
    run_dir, _ = lora_run
    png, page = run_dir / "curves.png", run_dir / "report.html"
    assert png.is_file() and page.is_file()

    # The PNG shows curves: mostly white background, but a real share of drawn pixels in several colours.
    img = np.asarray(Image.open(png).convert("RGB")).astype(float)
    assert img.shape[0] > 500 and img.shape[1] > 800
    drawn = (img < 245).any(-1)
    assert 0.03 < drawn.mean() < 0.6, drawn.mean()
    assert img.std() > 20
    blue = (img[..., 2] > 150) & (img[..., 0] < 80)  # tab:blue reward line and the phase bars
    red = (img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80)  # tab:red KL line
    assert blue.sum() > 300 and red.sum() > 100

    # The HTML embeds exactly that PNG, base64, and nothing from the network.
    text = page.read_text()
    m = re.search(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert m and base64.b64decode(m.group(1)) == png.read_bytes()
    assert "http://" not in text and "https://" not in text
    assert "Sample completions" in text and "step 6" in text and "yes_fraction" in text
    assert "Evaluation on data.eval" in text

    # Tracker files: tensorboard event files with one reward/mean point per optimizer step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    points = acc.Scalars("reward/mean")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [p.step for p in points] == [r["opt_step"] for r in rows]
    assert [p.value for p in points] == pytest.approx([r["reward/mean"] for r in rows])


def test_report_escapes_run_text(lora_run, tmp_path):
    run_dir, _ = lora_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("metrics.jsonl", "config.json"):
        (copy / name).write_text((run_dir / name).read_text())
    row = {"step": 1, "prompt": "<script>alert(1)</script>", "completion": "a < b & c", "reward": 1.0, "advantage": 0.5}
    (copy / "completions.jsonl").write_text(json.dumps(row) + "\n")
    text = write_report(copy).read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "a &lt; b &amp; c" in text


def test_plot_without_kl_says_so(tmp_path):
    records = [{"step": i, "reward/mean": i / 10, "reward/std": 0.1, "kl": None, "completion/len_mean": 5.0,
                "time/step_s": 1.0, "time/generate_s": 0.6, "time/train_s": 0.4} for i in range(1, 13)]
    path = plot_curves(records, tmp_path / "c.png")
    assert Image.open(path).size == (1200, 750)


def test_report_cli_and_errors(lora_run, tmp_path, capsys):
    run_dir, _ = lora_run
    main(["report", str(run_dir), "--output", str(tmp_path / "out")])
    assert capsys.readouterr().out.strip().endswith("report.html")
    assert (tmp_path / "out" / "curves.png").is_file()
    with pytest.raises(ReportError, match="metrics.jsonl not found"):
        load_metrics(tmp_path / "nothing")
    with pytest.raises(SystemExit, match="not found"):
        main(["report", str(tmp_path / "nothing")])


def test_smooth_is_bias_corrected():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    s = smooth([0.0] * 5 + [1.0] * 20)
    assert s[4] == 0 and 0.9 < s[-1] < 1.0
