import pytest

from rlhf import bench
from rlhf.config import ConfigError
from tests.conftest import requires_smollm2


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


def test_realistic_shapes_ceilings_and_the_asynchronous_loop(tiny_model_dir, tmp_path):
    """Settings reach the workers; the report gives the training phase's MFU and generation beside its bandwidth
    limit; --async times the synchronous and asynchronous loops, each alone."""
    result = bench.main(["--no-trl", "--model", str(tiny_model_dir), "--steps", "1", "--warmup", "0", "--prompts", "2",
                         "--samples", "2", "--max-new-tokens", "5", "--async", "1", "--out", str(tmp_path),
                         "model.compute_dtype=fp32", "train.micro_batch_size=4"])
    r = result["rlhf"]
    assert r["samples_per_s"] == pytest.approx(4 / r["step_s"]) and r["decode_steps"] == 5
    assert 0 < result["train_mfu"] < 1 and result["decode_tokens_per_s"] > 0 and result["decode_bandwidth_limit_s"] > 0
    a = result["async"]
    assert a["max_staleness"] == 1 and a["sync_samples_per_s"] > 0 and a["async_samples_per_s"] > 0
    assert set(a["peak_rss_mb"]) == {"sync", "async"}


@requires_smollm2
def test_shaped_models_are_built_from_a_config(tmp_path, monkeypatch):
    import json

    monkeypatch.setitem(bench.SHAPES, "tiny-qwen2", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2,
                                                         tie_word_embeddings=True))
    path = bench.shaped_model("tiny-qwen2", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["num_hidden_layers"] == 2 and (path / "tokenizer.json").is_file()
    assert bench.shaped_model("tiny-qwen2", tmp_path) == path  # built once
