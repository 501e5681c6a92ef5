"""The trainer under bad rewards, degenerate batches, bad data and secrets in its inputs."""
import json
import math
import time

import pytest
import torch

from rlhf.engine import ENGINES, Rollouts
from rlhf.logging import read_jsonl
from rlhf.redact import REDACTED
from rlhf.rewards import RewardError
from rlhf.trainers import Trainer


def params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}


def all_finite(trainer) -> bool:
    return all(torch.isfinite(p).all() for p in trainer.unwrapped.parameters())


def steer_eos(trainer, logit: float) -> None:
    """Add `logit` to the EOS logit everywhere (generation and training): +1e4 ends every completion at
    once, -1e9 never lets one end."""
    eos = trainer.tokenizer.eos_token_id

    def hook(module, inputs, out):
        out = out.clone()
        out[..., eos] += logit
        return out

    trainer.unwrapped.lm_head.register_forward_hook(hook)


# ----------------------------------------------------------------------------- bad rewards

UNSCORABLE = '''
def unscorable(prompts, completions, completion_ids, **kw):
    """Group 0 (samples 0-3) gets NaN, +inf, -inf, None; group 1 gets 1, 0, 1, 0."""
    return [float("nan"), float("inf"), float("-inf"), None, 1.0, 0.0, 1.0, 0.0]
'''


def test_nan_inf_none_rewards_get_zero_advantage_and_are_counted(tiny_cfg, reward_file):
    trainer = Trainer(tiny_cfg(reward_file(UNSCORABLE, "unscorable"), "train.steps=2", "log.completions_per_step=8"))
    records = trainer.train()
    assert all(r["reward/unscored"] == 4 and r["reward/unscorable/unscored"] == 4 for r in records)
    assert all(r["reward/mean"] == 0.5 and math.isfinite(r["loss"]) for r in records)
    comps = read_jsonl(trainer.out / "completions.jsonl")
    for c in comps:
        i = comps.index(c) % 8
        assert (c["advantage"] == 0.0 and c["reward"] is None) if i < 4 else (c["advantage"] != 0.0)
    assert all_finite(trainer)
    rows = read_jsonl(trainer.out / "metrics.jsonl")
    assert [r["reward/unscored"] for r in rows] == [4, 4]


BY_COLUMN = '''
import time

def picky(prompts, completions, completion_ids, bad, **kw):
    if any(bad):
        raise KeyError("no answer field")
    return [1.0] * len(completions)

def hangs(prompts, completions, completion_ids, **kw):
    time.sleep(30)
    return [1.0] * len(completions)
'''


@pytest.fixture
def flagged_data(tmp_path):
    path = tmp_path / "flagged.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1 + 1 ?", "bad": True}) + "\n"
                    + json.dumps({"prompt": "What is 2 + 2 ?", "bad": False}) + "\n")
    return f"data.train={path}"


def test_raising_reward_names_function_and_sample_or_is_skipped_and_counted(tiny_cfg, reward_file, flagged_data):
    spec = reward_file(BY_COLUMN, "picky")
    with pytest.raises(RewardError, match=r"reward function 'picky' failed on sample \d: KeyError: 'no answer field'"):
        Trainer(tiny_cfg(spec, flagged_data, "data.shuffle=false", "train.steps=1")).train()
    trainer = Trainer(tiny_cfg(spec, flagged_data, "reward.on_error=skip", "train.steps=2",
                               "output_dir=" + str(tiny_cfg().output_dir) + "2"))
    records = trainer.train()
    assert [r["reward/picky/errors"] for r in records] == [4, 4] and [r["reward/unscored"] for r in records] == [4, 4]
    assert all_finite(trainer)


def test_hanging_reward_times_out_and_is_skipped_and_counted(tiny_cfg, reward_file):
    trainer = Trainer(tiny_cfg(reward_file(BY_COLUMN, "hangs"), "reward.timeout_s=0.5", "reward.on_error=skip",
                               "train.steps=1"))
    t0 = time.time()
    (record,) = trainer.train()
    assert time.time() - t0 < 15
    assert record["reward/hangs/timeouts"] == 8 and record["reward/unscored"] == 8
    assert record["frac_zero_std"] == 1.0 and record["loss"] == 0.0 and all_finite(trainer)


# ----------------------------------------------------------------------------- degenerate batches

CONSTANT = '''
def constant(prompts, completions, completion_ids, **kw):
    return [1.0] * len(completions)
'''


def test_all_equal_rewards_give_zero_advantages_and_unchanged_weights(tiny_cfg, reward_file):
    # With the default KL term (k3, coef 0.04): the policy starts equal to the reference, so the
    # KL gradient is exactly zero too, and nothing can move the weights.
    trainer = Trainer(tiny_cfg(reward_file(CONSTANT, "constant"), "train.steps=2", "log.completions_per_step=8"))
    before = params(trainer)
    records = trainer.train()
    assert all(r["frac_zero_std"] == 1.0 and r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in records)
    assert all(c["advantage"] == 0.0 for c in read_jsonl(trainer.out / "completions.jsonl"))
    after = params(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_eos_as_first_token_gives_empty_completions_and_does_not_crash(tiny_cfg, reward_file):
    trainer = Trainer(tiny_cfg(reward_file(CONSTANT, "constant"), "train.steps=2", "algo.kl.coef=0.1"))
    steer_eos(trainer, 1e4)
    records = trainer.train()
    texts = [c["completion"] for c in read_jsonl(trainer.out / "completions.jsonl")]
    assert texts and all(t == "" for t in texts)
    assert all(r["completion/len_mean"] == 1.0 and r["completion/truncated_frac"] == 0.0 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records) and all_finite(trainer)


def test_all_truncated_batch_does_not_crash(tiny_cfg, yes_reward):
    trainer = Trainer(tiny_cfg(yes_reward, "train.steps=2", "algo.kl.coef=0.1"))
    steer_eos(trainer, -1e9)
    records = trainer.train()
    assert all(r["completion/truncated_frac"] == 1.0 and r["completion/len_mean"] == 8 for r in records)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records) and all_finite(trainer)


class NoTokensEngine:
    """An engine whose completions are empty token lists (e.g. an engine that strips the EOS)."""

    def __init__(self, model, tokenizer, cfg):
        self.eos = tokenizer.eos_token_id

    def generate(self, prompt_ids, n, sampling, return_logps=False):
        comps = [[] if i % 2 == 0 else [self.eos] for i in range(len(prompt_ids) * n)]
        return Rollouts([p for p in prompt_ids for _ in range(n)], comps, [True] * len(comps))

    def update_weights(self, model):
        pass

    def sleep(self):  # the trainer calls the protocol's sleep()/wake() around training
        pass

    def wake(self):
        pass


ENGINES.register("test_no_tokens")(NoTokensEngine)


def test_zero_length_completions_do_not_crash(tiny_cfg, yes_reward):
    trainer = Trainer(tiny_cfg(yes_reward, "train.steps=2", "generation.engine=test_no_tokens", "algo.kl.coef=0.1"))
    records = trainer.train()
    assert all(r["completion/len_mean"] == 0.5 and math.isfinite(r["loss"]) for r in records)
    assert trainer.state["skipped_steps"] == 0 and all_finite(trainer)


# ----------------------------------------------------------------------------- data and secrets


def test_long_prompt_counts_reach_the_metrics(tiny_cfg, yes_reward, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n"
                            for p in ["What is 1 ?", "What is 2 ?", "What is 1 + 2 + 3 + 4 + 5 ?"]))
    trainer = Trainer(tiny_cfg(yes_reward, f"data.train={data}", "data.max_prompt_tokens=6",
                               "data.on_long_prompt=filter", "train.steps=1"))
    (record,) = trainer.train()
    assert record["prompts/too_long"] == 1 and record["prompts/filtered"] == 1 and record["prompts/truncated"] == 0
    assert read_jsonl(trainer.out / "metrics.jsonl")[0]["prompts/filtered"] == 1


def test_secrets_never_reach_the_saved_config_metrics_or_completions(tiny_cfg, yes_reward, tmp_path, monkeypatch):
    hf, key = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4", "s3cr3t-value-of-my-key"
    monkeypatch.setenv("HF_TOKEN", hf)
    monkeypatch.setenv("MY_SERVICE_API_KEY", key)
    data = tmp_path / "leaky.jsonl"  # a user pasted a token into a prompt
    data.write_text(json.dumps({"prompt": f"What is {key} ?"}) + "\n"
                    + json.dumps({"prompt": f"What is {hf} ?"}) + "\n")
    trainer = Trainer(tiny_cfg(yes_reward, f"data.train={data}", "train.steps=1", "log.completions_per_step=8",
                               f"data.task_args={{wandb_api_key: abcdefgh12345678, note: 'token is {hf}', url: 'https://me:pa55word@host/x'}}"))
    trainer.train()
    out = trainer.out
    written = "".join((out / f).read_text() for f in ("config.json", "metrics.jsonl", "completions.jsonl"))
    for secret in (hf, key, "abcdefgh12345678", "pa55word"):
        assert secret not in written
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["task_args"] == {"wandb_api_key": REDACTED, "note": f"token is {REDACTED}", "url": f"https://me:{REDACTED}@host/x"}
    assert saved["data"]["max_prompt_tokens"] == 512 and saved["output_dir"] == str(out)  # ordinary values stay
    assert saved["model"]["trust_remote_code"] is False
