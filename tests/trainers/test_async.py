"""Asynchronous rollouts (train.max_staleness): the staleness bound on every sample, training that still moves,
an exact resume, and k = 0 as the synchronous loop."""
import pytest
import torch

from rlhf.trainers import Trainer
from tests.trainers.test_resume import assert_same_run, trainable


def test_zero_staleness_is_the_synchronous_loop(tiny_cfg, yes_reward):
    a = Trainer(tiny_cfg(yes_reward, "train.steps=2"))
    rec_a = a.train()
    b = Trainer(tiny_cfg(yes_reward, "train.steps=2", "train.max_staleness=0"))
    rec_b = b.train()
    assert b.producer is None and [r["loss"] for r in rec_a] == [r["loss"] for r in rec_b]
    assert all(torch.equal(x, y) for x, y in zip(a.unwrapped.parameters(), b.unwrapped.parameters()))
    assert [r["staleness"] for r in rec_a] == [0.0, 0.0]


@pytest.mark.parametrize("k", [1, 2])
def test_samples_are_at_most_k_versions_stale_and_the_policy_learns(tiny_cfg, yes_reward, k):
    """fp32: the engine's log-probs equal the trainer's for the same weights, so the sampler/trainer gap is the
    staleness itself: 0 while the engine holds the policy's version, > 0 once it lags."""
    trainer = Trainer(tiny_cfg(yes_reward, "train.steps=5", f"train.max_staleness={k}",
                               "algo.is_correction=token_truncate", "algo.kl.coef=0", "train.lr=3e-3"))
    before = trainable(trainer)
    records = trainer.train()
    assert [r["staleness"] for r in records] == [float(min(k, s)) for s in range(5)]  # step s+1 trains on version s - k
    for r in records:
        stale = r["staleness"] > 0
        assert (r["engine/logp_gap_mean"] > 1e-4) == stale, r
        assert r["is/ratio_mean"] == pytest.approx(1.0, abs=1e-4) or stale
    assert any(not torch.equal(before[n], p) for n, p in trainable(trainer).items())
    assert all("time/async_generate_s" in r and "time/wait_s" in r for r in records)


def test_an_asynchronous_run_resumes_exactly(tiny_cfg, yes_reward, tmp_path):
    """The checkpoint at step 2 holds batch 3 (generated with version 1, not trained yet) and the prompts after it:
    resumed from there, steps 3 and 4 and the final weights equal the run that never stopped."""
    overrides = [yes_reward, "train.steps=4", "train.max_staleness=1", "train.lr=3e-3",
                 "algo.is_correction=token_truncate", "algo.kl.coef=0.1", "checkpoint.every=2",
                 "checkpoint.keep_last=3"]
    straight = Trainer(tiny_cfg(*overrides, f"output_dir={tmp_path}/a"))
    rec_a = straight.train()
    resumed = Trainer(tiny_cfg(*overrides, f"output_dir={tmp_path}/b",
                               f"checkpoint.resume={tmp_path}/a/checkpoints/step_000002"))
    rec_b = resumed.train()
    assert [r["step"] for r in rec_b] == [3, 4]
    assert_same_run(rec_a[2:], rec_b, trainable(straight), trainable(resumed))


def test_lora_runs_asynchronously_from_the_engines_merged_copy(tiny_cfg, yes_reward):
    trainer = Trainer(tiny_cfg(yes_reward, "train.steps=3", "train.max_staleness=1", "model.lora.enabled=true",
                               "model.lora.r=4", "algo.is_correction=token_truncate", "train.lr=3e-2"))
    assert trainer.engine.model is not trainer.unwrapped
    records = trainer.train()
    assert [r["staleness"] for r in records] == [0.0, 1.0, 1.0]
    assert records[0]["engine/logp_gap_mean"] < 1e-4 < records[2]["engine/logp_gap_mean"]


def test_dropout_in_an_asynchronous_run_is_warned_about(tiny_cfg, yes_reward):
    """Sampling in the producer thread and the dropout masks of training share torch's global generator."""
    from rlhf.logging import RlhfWarning

    with pytest.warns(RlhfWarning, match="dropout"):
        Trainer(tiny_cfg(yes_reward, "train.max_staleness=1", "model.lora.enabled=true", "model.lora.dropout=0.1"))
