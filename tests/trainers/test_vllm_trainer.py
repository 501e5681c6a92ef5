"""GRPO with generation.engine=vllm on the tiny model: the engine follows every optimizer step; gap and IS metrics."""
import math

import pytest

from rlhf.engine import SamplingParams
from rlhf.engine.sync_check import check_sync
from rlhf.trainers import Trainer
from tests.conftest import requires_vllm

pytestmark = [pytest.mark.slow, requires_vllm]
PROMPTS = [[7, 8, 9], [10, 11], [12, 13, 14, 15]]


def run_and_check(trainer: Trainer, steps: int) -> list[dict]:
    """Train `steps` steps; after each weight sync the engine must match the trainer's model, which moved."""
    records, dtype = [], trainer.cfg.model.compute_dtype
    greedy = SamplingParams(max_new_tokens=10, greedy=True)
    try:
        start = trainer.engine.generate(PROMPTS, 1, greedy, return_logps=True)
        for step in range(steps):
            records += trainer.step()
            report = check_sync(trainer.engine, trainer.unwrapped, trainer.tokenizer, PROMPTS, 10, dtype)
            assert report.ok(), f"after step {step + 1}: {report}"
        end = trainer.engine.generate(PROMPTS, 1, greedy, return_logps=True)
        moved = max(abs(a - b) for x, y in zip(start.sampler_logps, end.sampler_logps) for a, b in zip(x, y))
        assert end.completion_ids != start.completion_ids or moved > 1e-3  # the engine follows a policy that moved
    finally:
        trainer.engine.close()
    return records


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_engine_follows_training_and_logs_the_gap(tiny_cfg, tiny_vllm_model_dir, yes_reward, lora):
    cfg = tiny_cfg(f"model.path={tiny_vllm_model_dir}", yes_reward, "generation.engine=vllm",
                   "generation.vllm.kv_cache_gb=0.25", f"model.lora.enabled={str(lora).lower()}", "model.lora.r=4",
                   "train.lr=3e-2", "algo.is_correction=token_truncate", "algo.kl.coef=0")
    records = run_and_check(Trainer(cfg), steps=2)
    for r in records:
        assert 0 <= r["engine/logp_gap_mean"] <= r["engine/logp_gap_max"]
        assert math.exp(r["engine/logp_gap_mean"]) < 1.01  # fp32 engine and trainer: the same distribution
        assert r["is/ratio_mean"] == pytest.approx(1.0, abs=0.01) and r["is/truncated_frac"] == 0.0
        assert r["time/sync_s"] > 0


def test_updates_per_batch_two_uses_the_stored_old_logps(tiny_cfg, tiny_vllm_model_dir, yes_reward):
    cfg = tiny_cfg(f"model.path={tiny_vllm_model_dir}", yes_reward, "generation.engine=vllm",
                   "generation.vllm.kv_cache_gb=0.25", "train.updates_per_batch=2", "train.lr=3e-2",
                   "algo.is_correction=token_mask", "algo.kl.coef=0")
    records = run_and_check(Trainer(cfg), steps=2)
    assert len(records) == 4  # one record per optimizer step, each pair carrying its batch's gap
    for first, second in (records[:2], records[2:]):
        assert first["engine/logp_gap_mean"] == second["engine/logp_gap_mean"] < 0.01
        assert first["is/masked_frac"] == 0.0
