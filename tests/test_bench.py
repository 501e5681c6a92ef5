import pytest

from rlhf import bench
from rlhf.config import ConfigError


def test_bench_times_rlhf_steps_in_a_worker_it_runs_step_by_step(tiny_model_dir, tmp_path):
    result = bench.main(["--no-trl", "--model", str(tiny_model_dir), "--steps", "2", "--warmup", "1",
                         "--out", str(tmp_path), "model.compute_dtype=fp32"])
    r = result["rlhf"]
    assert len(r["step_times_s"]) == 2 and r["step_s"] == pytest.approx(sum(r["step_times_s"]) / 2)
    assert {"generate", "logprob", "train", "sync"} <= set(r["phases_s"])
    assert r["samples_per_s"] == pytest.approx(16 / r["step_s"]) and r["peak_rss_mb"] > 0
    assert result["compute_limit_step_s"] >= 0 and result["rlhf_step_over_limit"] > 0
    assert (tmp_path / "rlhf" / "metrics.jsonl").read_text().count("\n") == 3  # warm-up + 2 timed steps


def test_a_bad_override_fails_before_any_worker_starts(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr"):
        bench.main(["--no-trl", "--model", str(tiny_model_dir), "--steps", "1", "--out", str(tmp_path), "train.lr=-1"])
    assert not (tmp_path / "rlhf.log").exists()


def test_a_failing_worker_is_named_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)benchmark worker rlhf failed .*rlhf\.log.*no-such-model"):
        bench.main(["--no-trl", "--model", str(tmp_path / "no-such-model"), "--steps", "1", "--out", str(tmp_path)])
