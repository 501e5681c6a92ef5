import json
import math

import pytest
import torch

from rlhf.config import ConfigError
from rlhf.logging import PhaseTimer, read_jsonl
from rlhf.trainers import Trainer
from rlhf.trainers.forward import batch_logprobs

REQUIRED = ["step", "reward/mean", "reward/std", "kl", "loss", "completion/len_mean", "time/step_s", "time/generate_s",
            "time/train_s"]

def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lora_run_changes_adapter_only_and_writes_outputs(tiny_cfg, yes_reward):
    cfg = tiny_cfg("model.lora.enabled=true", "model.lora.r=4", yes_reward, "checkpoint.save_final=true")
    trainer = Trainer(cfg)
    before = params(trainer.unwrapped)
    records = trainer.train()
    after = params(trainer.unwrapped)
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    assert any(not torch.equal(before[n], after[n]) for n in lora), "LoRA weights did not change"
    assert all(torch.equal(before[n], after[n]) for n in base), "base weights changed under LoRA"
    assert records[0]["kl"] == 0.0  # adapter starts at zero: policy == reference

    out = trainer.out
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in REQUIRED:
        assert all(key in r for r in rows), key
    comps = read_jsonl(out / "completions.jsonl")
    assert {"step", "prompt", "completion", "reward", "advantage", "reward/yes_fraction"} <= set(comps[0])
    assert (out / "final" / "adapter_config.json").is_file()
    from peft import AutoPeftModelForCausalLM

    reloaded = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    sd = {n: p for n, p in reloaded.named_parameters() if "lora_B" in n}
    assert sd and any(p.abs().sum() > 0 for p in sd.values())


def test_full_finetune_changes_weights_and_kl_starts_at_zero(tiny_cfg, yes_reward):
    trainer = Trainer(tiny_cfg(yes_reward, "algo.kl.coef=0.1"))
    before = params(trainer.unwrapped)
    records = trainer.train()
    after = params(trainer.unwrapped)
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] > 0
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) == len(before)
    assert all(not p.requires_grad for p in trainer.ref.parameters())


def test_no_reference_without_kl(tiny_cfg, yes_reward):
    trainer = Trainer(tiny_cfg(yes_reward, "algo.kl.coef=0", "train.steps=1"))
    assert trainer.ref is None
    assert trainer.train()[0]["kl"] is None


def test_tiny_model_learns_a_trivial_reward(tiny_cfg, yes_reward):
    cfg = tiny_cfg(yes_reward, "train.steps=40", "train.prompts_per_step=4", "train.samples_per_prompt=8",
                   "train.micro_batch_size=16", "train.lr=3e-3", "algo.kl.coef=0")
    rewards = [r["reward/mean"] for r in Trainer(cfg).train()]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, (first, last)


def test_reward_functions_receive_dataset_columns(tiny_cfg, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} ?", "target": f"t{i}", "level": i}) + "\n"
                            for i in range(4)))
    seen = tmp_path / "seen.jsonl"
    (tmp_path / "spy.py").write_text(f'''
import json
def spy(prompts, completions, completion_ids, target, level, **kwargs):
    with open({str(seen)!r}, "a") as f:
        f.write(json.dumps({{"prompts": prompts, "target": target, "level": level, "ids": completion_ids}}) + "\\n")
    return [0.0] * len(completions)
''')
    cfg = tiny_cfg(f"data.train={data}", f"reward.functions=[{{fn: '{tmp_path}/spy.py:spy'}}]", "train.steps=2")
    Trainer(cfg).train()
    calls = read_jsonl(seen)
    assert len(calls) == 2
    for call in calls:
        assert len(call["target"]) == 8 and call["target"][0] == call["target"][3]  # G copies per prompt
        for p, t, lv in zip(call["prompts"], call["target"], call["level"]):
            assert p == f"What is {lv} ?" and t == f"t{lv}"
        assert all(isinstance(i, int) for ids in call["ids"] for i in ids)


def test_critic_estimator_rejected_before_loading(tiny_cfg):
    with pytest.raises(ConfigError, match="algo.advantage=gae needs a critic"):
        Trainer(tiny_cfg("algo.advantage=gae", "critic.type=none"))


def test_old_logprobs_are_taken_from_the_first_pass(tiny_cfg, yes_reward):
    trainer = Trainer(tiny_cfg(yes_reward, "train.updates_per_batch=3", "algo.kl.coef=0"))
    exp, _ = trainer.make_experience(PhaseTimer())
    assert trainer.old_logp == "first_pass" and exp.old_logp_NT is None  # no separate old-log-prob pass
    explicit = batch_logprobs(trainer.unwrapped, exp, trainer.fwd, trainer.rt)
    records = trainer.update(exp)
    assert torch.allclose(exp.old_logp_NT, explicit, atol=1e-5)
    assert records[0]["clipfrac"] == 0.0 and len(records) == 3  # pass 1 is exactly on-policy


@pytest.mark.parametrize("correction", ["token_truncate", "seq_mask"])
def test_is_correction_uses_sampler_logps_and_logs_the_gap(tiny_cfg, yes_reward, correction):
    """The HF engine samples from the policy itself: the gap is ~0 and every IS weight is ~1."""
    records = Trainer(tiny_cfg(yes_reward, f"algo.is_correction={correction}", "train.steps=2")).train()
    for r in records:
        assert 0 <= r["engine/logp_gap_mean"] <= r["engine/logp_gap_max"] < 1e-3
        assert r["is/ratio_mean"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_hf_engine_reports_its_sampler_trainer_gap_where_it_is_free(tiny_cfg, yes_reward, dtype):
    """bf16: the decode loop's bf16 copy has the sampled tokens' log-probs at hand, so the gap is measured every
    step without an IS correction, within the bound the vLLM engine's bf16 sync test uses. fp32 samples from the
    policy itself through transformers' generate, which would keep [N, T, vocab] scores for them: the gap is
    measured only when an IS correction asks for them (the test above)."""
    trainer = Trainer(tiny_cfg(yes_reward, "train.steps=2", f"model.compute_dtype={dtype}"))
    assert trainer.engine.free_logps == (dtype == "bf16")
    for r in trainer.train():
        if dtype == "bf16":
            assert 0 <= r["engine/logp_gap_mean"] <= r["engine/logp_gap_max"]
            assert math.exp(r["engine/logp_gap_mean"]) < 1.10
        else:
            assert "engine/logp_gap_mean" not in r


def test_the_trainer_shares_the_engine_sync_casts_and_trains_to_the_same_weights(tiny_cfg, yes_reward):
    from rlhf.models.precision import Bf16CastLinear

    overrides = ["model.compute_dtype=bf16", "train.steps=2", yes_reward]
    shared_run = Trainer(tiny_cfg(*overrides))
    linears = [m for m in shared_run.unwrapped.modules() if isinstance(m, torch.nn.Linear)]
    assert shared_run.engine.decoder is not None and all(type(m) is Bf16CastLinear for m in linears)
    casts = linears[0].casts
    shared_run.step()
    assert {id(w) for w in casts.copies} == {id(lin.weight) for lin in linears}  # the sync offered every weight
    shared_run.step()
    plain_run = Trainer(tiny_cfg(*overrides, "speed.engine_bf16_casts=false"))
    assert not any(type(m) is Bf16CastLinear for m in plain_run.unwrapped.modules())
    plain_run.step()
    plain_run.step()
    for (name, a), b in zip(shared_run.unwrapped.named_parameters(), plain_run.unwrapped.parameters()):
        assert torch.equal(a, b), name
