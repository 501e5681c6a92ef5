"""PPO on the tiny model: the critic (separate full / LoRA, or a shared head), the KL penalty in the
per-token reward, GAE / td / nstep_td in training, mini-batches, warm-up, the adaptive KL controller."""
import math

import pytest
import torch

from rlhf.algos.kl_control import KLController
from rlhf.config import ConfigError, load_config
from rlhf.logging import PhaseTimer
from rlhf.trainers import Trainer
from rlhf.trainers.experience import score_at_last_token
from rlhf.trainers.forward import batch_values
from rlhf.trainers.update import update


def critic_module(trainer):
    """The critic's ValueModel, unwrapped from DDP."""
    return trainer.acc.unwrap_model(trainer.critic.model)

DENSE_REWARD = '''
def dense(prompts, completions, completion_ids, **kwargs):
    """Varies within every group: length and first token."""
    return [len(ids) / 8 + (ids[0] % 3 if ids else 0) / 3 for ids in completion_ids]
'''
PPO = ["algo.advantage=gae", "algo.lam=0.95", "algo.kl.placement=in_reward", "algo.kl.estimator=k1", "algo.kl.coef=0.1",
       "algo.whiten_advantages=true", "critic.lr=1e-3", "generation.max_new_tokens=6"]
METRICS = ["kl_in_reward", "kl_coef", "clipfrac", "approx_kl", "entropy", "loss", "critic/value_loss",
           "critic/explained_var", "critic/value_mean", "critic/return_mean", "critic/grad_norm",
           "critic/value_clipfrac"]


@pytest.fixture
def dense(tmp_path):
    path = tmp_path / "dense.py"
    path.write_text(DENSE_REWARD)
    return f"reward.functions=[{{fn: '{path}:dense'}}]"


def trainable(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def moved(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("policy_lora, critic", [(False, "full"), (True, "lora"), (False, "shared"), (True, "shared")])
def test_ppo_moves_policy_and_critic_with_finite_metrics(tiny_cfg, dense, policy_lora, critic):
    extra = {"full": ["critic.type=separate", "critic.lora.enabled=false"], "lora": ["critic.lora.r=4"],
             "shared": ["critic.type=shared"]}[critic]
    pol = ["model.lora.enabled=true", "model.lora.r=4", "train.lr=1e-2"] if policy_lora else []
    trainer = Trainer(tiny_cfg(dense, *PPO, *pol, *extra, "train.steps=2", "train.updates_per_batch=2"))
    assert critic_module(trainer).shared == (critic == "shared")
    policy0, critic0 = trainable(trainer.unwrapped), trainable(critic_module(trainer))
    if critic == "shared":
        assert sorted(critic0) == ["head.bias", "head.weight"]  # the backbone is the policy's, not a copy
    elif critic == "lora":
        assert all("lora_" in n or n.startswith("head.") for n in critic0)
    records = trainer.train()
    assert [r["opt_step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for key in METRICS:
            assert r[key] is not None, key
        assert all(math.isfinite(r[k]) for k in METRICS if k != "critic/explained_var")
    assert records[-1]["kl_in_reward"] != 0 and records[-1]["critic/value_loss"] > 0
    assert math.isfinite(records[-1]["critic/explained_var"])  # the returns vary (dense reward)
    assert moved(policy0, trainable(trainer.unwrapped)), "the policy did not move"
    assert moved(critic0, trainable(critic_module(trainer))), "the critic did not move"
    if policy_lora:
        assert all("lora_" in n for n in trainable(trainer.unwrapped))


def test_kl_penalty_is_per_token_in_the_reward(tiny_cfg, dense):
    trainer = Trainer(tiny_cfg(dense, *PPO, "algo.kl.coef=0.5"))
    trainer.step()  # move away from the reference so the KL is non-zero
    exp, info = trainer.make_experience(PhaseTimer())
    kl_NT = (exp.old_logp_NT - exp.ref_logp_NT) * exp.mask_NT  # k1 of pi_old against pi_ref, per token
    assert kl_NT.abs().sum() > 0 and info.metrics["kl_in_reward"] != 0
    expected_NT = score_at_last_token(exp.scores_N, exp.mask_NT) - 0.5 * kl_NT
    assert torch.allclose(exp.rewards_NT, expected_NT, atol=1e-6)
    last_N = exp.mask_NT.sum(-1).long() - 1
    inner = exp.mask_NT.clone()
    inner[torch.arange(len(exp)), last_N] = 0  # tokens before the last carry only the KL penalty
    assert torch.allclose(exp.rewards_NT * inner, -0.5 * kl_NT * inner, atol=1e-6)
    # GAE on exactly these rewards and the critic's values
    assert exp.values_NT is not None and exp.ret_NT is not None
    adv_NT, _ = trainer.adv_fn(__import__("rlhf").algos.AdvantageInputs(exp.rewards_NT, exp.mask_NT, 4, exp.values_NT),
                               trainer.cfg.algo)
    # unbiased, as everywhere
    whitened_NT = (adv_NT - adv_NT[exp.mask_NT.bool()].mean()) / adv_NT[exp.mask_NT.bool()].std()
    assert torch.allclose(exp.adv_NT, whitened_NT * exp.mask_NT, atol=1e-4)


@pytest.mark.parametrize("advantage", ["td", "nstep_td", "gae"])
def test_critic_advantages_train(tiny_cfg, dense, advantage):
    trainer = Trainer(tiny_cfg(dense, *PPO, f"algo.advantage={advantage}", "algo.n_step=2", "train.steps=2"))
    critic0 = trainable(critic_module(trainer))
    policy0 = trainable(trainer.unwrapped)
    records = trainer.train()
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["critic/value_loss"])
                                     for r in records)
    assert moved(critic0, trainable(critic_module(trainer))) and moved(policy0, trainable(trainer.unwrapped))
    # the values enter the advantages: step 2's critic is no longer zero
    assert records[1]["critic/value_mean"] != 0


@pytest.mark.parametrize("critic", ["full", "shared"])
def test_value_loss_drives_values_to_the_returns(tiny_cfg, dense, critic):
    extra = ["critic.lora.enabled=false"] if critic == "full" else ["critic.type=shared"]
    trainer = Trainer(tiny_cfg(dense, *PPO, *extra, "critic.value_clip=null", "critic.lr=3e-3"))
    exp, _ = trainer.make_experience(PhaseTimer())
    torch.manual_seed(0)
    exp.ret_NT = torch.rand(exp.mask_NT.shape) * exp.mask_NT  # fixed targets
    m = exp.mask_NT.bool()
    err0 = float(((exp.values_NT - exp.ret_NT)[m] ** 2).mean())
    losses = []
    for _ in range(15):
        losses += [r["critic/value_loss"] for r in update(exp, None, trainer.critic, trainer.losses, trainer.fwd,
                                                          trainer.cfg.train, trainer.rt)]
    err1 = float(((batch_values(critic_module(trainer), exp, trainer.fwd, trainer.rt) - exp.ret_NT)[m] ** 2).mean())
    assert losses[-1] < 0.5 * losses[0] and err1 < 0.5 * err0


def test_critic_warmup_freezes_the_policy(tiny_cfg, dense):
    trainer = Trainer(tiny_cfg(dense, *PPO, "critic.warmup_steps=1", "train.steps=2"))
    policy0, critic0 = trainable(trainer.unwrapped), trainable(critic_module(trainer))
    trainer.cfg.train.steps = 1  # stop after the warm-up step
    records = trainer.train()
    assert records[0]["policy_frozen"] == 1.0 and "loss" not in records[0]
    assert not moved(policy0, trainable(trainer.unwrapped)) and moved(critic0, trainable(critic_module(trainer)))
    trainer.cfg.train.steps = 2  # the step after the warm-up trains both
    records = trainer.train()
    assert "policy_frozen" not in records[-1] and moved(policy0, trainable(trainer.unwrapped))


def test_epochs_times_mini_batches_optimizer_steps(tiny_cfg, dense):
    trainer = Trainer(tiny_cfg(dense, *PPO, "train.updates_per_batch=2", "train.mini_batches_per_pass=2",
                               "train.micro_batch_size=2", "train.steps=1"))
    assert trainer.total_opt_steps == 4
    records = trainer.train()
    assert [r["opt_step"] for r in records] == [1, 2, 3, 4]
    assert all("critic/value_loss" in r and "clipfrac" in r for r in records)
    assert records[0]["approx_kl"] == 0.0  # the first mini-batch is on-policy ...
    assert records[1]["approx_kl"] > 0  # ... the second is seen after a step, against the up-front old log-probs


def test_adaptive_kl_controller_moves_beta_towards_the_target():
    up, down = KLController(0.1, target=1.0, horizon=100), KLController(0.1, target=1.0, horizon=100)
    assert up.update(5.0, 10) > 0.1 and down.update(0.1, 10) < 0.1
    assert up.coef == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # the error is clipped at 0.2
    fixed = KLController(0.1)
    assert fixed.update(5.0, 10) == 0.1


@pytest.mark.parametrize("target, direction", [(1e-6, 1), (100.0, -1)])
def test_trainer_adapts_beta_by_the_measured_kl(tiny_cfg, dense, target, direction):
    trainer = Trainer(tiny_cfg(dense, *PPO, "algo.kl.estimator=k3", f"algo.kl.target={target}", "algo.kl.horizon=16",
                               "train.steps=3"))
    assert "kl_controller" in trainer.stateful
    records = trainer.train()
    coefs, kls = [r["kl_coef"] for r in records] + [trainer.kl_coef], [r["kl_seq"] for r in records]
    assert coefs[0] == 0.1 and kls[0] == 0.0 and kls[-1] > 0  # pi_old = pi_ref at the start, then it drifts
    for i, kl in enumerate(kls):  # Ziegler's rule, with the step's 8 samples
        assert coefs[i + 1] == pytest.approx(coefs[i] * (1 + min(max(kl / target - 1, -0.2), 0.2) * 8 / 16))
    assert (coefs[-1] - coefs[1]) * direction > 0, coefs  # once the policy has moved: towards the target


@pytest.mark.parametrize("override, key", [
    ("critic.lr=0", "critic.lr"), ("critic.value_clip=0", "critic.value_clip"),
    ("critic.warmup_steps=3", "critic.warmup_steps"),
    ("algo.kl.target=0", "algo.kl.target"), ("algo.kl.horizon=0", "algo.kl.horizon"),
    ("train.mini_batches_per_pass=0", "train.mini_batches_per_pass"),
    ("train.mini_batches_per_pass=3", "train.mini_batches_per_pass"),
    ("critic.type=value", "critic.type"),
])
def test_critic_keys_are_validated_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["train.steps=3", "train.micro_batch_size=4", override]).validate()


def test_a_critic_without_a_value_estimator_is_rejected(tiny_cfg):
    with pytest.raises(ConfigError, match="critic.type=separate builds a critic, but algo.advantage=grpo"):
        Trainer(tiny_cfg("critic.type=separate"))


def test_ppo_keeps_policy_and_critic_in_sync_on_two_processes(tiny_model_dir, dense, tmp_path):
    """The critic goes through accelerate.prepare: DDP all-reduces its gradients, so both ranks end with the
    same policy and critic although each rank trains on its own prompts; the normalisers are global."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp.json"
    env = {**os.environ, "RLHF_TEST_OUT": str(out), "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}  # two CPU processes over gloo, also on a machine with one GPU
    overrides = [f"model.path={tiny_model_dir}", "model.compute_dtype=fp32", "model.lora.enabled=false",
                 f"output_dir={tmp_path / 'run'}", "train.steps=2", "train.prompts_per_step=2",
                 "train.samples_per_prompt=4", "train.micro_batch_size=2", "train.lr=1e-3", "log.progress=false",
                 "checkpoint.save_final=false", dense,
                 *PPO, "critic.lora.enabled=false", "train.mini_batches_per_pass=2", "algo.kl.target=0.01"]
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("ddp_updates.py")), *overrides],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2 and res["records"][0]["world_size"] == 2
    assert res["rank_diff"] == 0.0 and res["moved"] > 0
    assert res["critic_rank_diff"] == 0.0 and res["critic_moved"] > 0
    assert len(res["records"]) == 4 and all(math.isfinite(r["critic/value_loss"]) for r in res["records"])
