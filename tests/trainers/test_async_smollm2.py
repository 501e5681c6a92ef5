"""The demo recipe with asynchronous rollouts (train.max_staleness=1) on the embedded SmolLM2: it still learns,
and no sample is ever trained more than one policy version after the weights that generated it."""
import statistics

import pytest

from rlhf.config import load_config
from rlhf.trainers import Trainer
from tests.conftest import requires_smollm2

pytestmark = [pytest.mark.slow, requires_smollm2]


def test_the_demo_learns_with_samples_one_version_stale(tmp_path):
    cfg = load_config("recipes/grpo_arithmetic.yaml", [
        f"output_dir={tmp_path}", "train.max_staleness=1", "algo.is_correction=token_truncate", "train.steps=30",
        "data.eval=null", "log.progress=false", "log.report=false", "checkpoint.save_final=false", "log.trackers=[]"])
    trainer = Trainer(cfg)
    seen = []
    take = trainer.next_batch

    def next_batch(timer):  # every sample of the batch, with the version that generated it
        batch = take(timer)
        seen.append([trainer.state["step"] - batch.version] * len(batch.samples))
        return batch

    trainer.next_batch = next_batch
    records = trainer.train()
    assert all(s <= 1 for per_sample in seen for s in per_sample) and len(seen) == 30
    assert [r["staleness"] for r in records] == [0.0] + [1.0] * 29
    rewards = [r["reward/mean"] for r in records]
    means = [statistics.mean(rewards[i - 4: i + 1]) for i in range(4, len(rewards))]
    assert max(means) >= 0.8, rewards
