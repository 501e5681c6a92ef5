"""Every algorithm piece end to end on the tiny model: combinations, update rules, DAPO shaping."""
import copy
import itertools
import math

import pytest
import torch

from rlhf import algos
from rlhf.algos.dapo import overlong_penalty
from rlhf.algos.natural import assign_flat_, backtracking_line_search, categorical_kl_NT, natural_step
from rlhf.checks import check_config
from rlhf.config import ConfigError, load_config
from rlhf.logging import PhaseTimer
from rlhf.models.logprobs import sample_log_softmax
from rlhf.trainers import Trainer
from rlhf.trainers.natural import PolicyBatch

DENSE_REWARD = '''
def dense(prompts, completions, completion_ids, **kwargs):
    """Varies within every group: length and first token."""
    return [len(ids) / 8 + (ids[0] % 3 if ids else 0) / 3 for ids in completion_ids]

def by_kind(prompts, completions, completion_ids, kind, **kwargs):
    """'flat' prompts score 0 for every sample (a group with no signal); 'vary' prompts score 0, 1, 2, ..."""
    return [0.0 if k == "flat" else float(i) for i, k in enumerate(kind)]

def zero(prompts, completions, completion_ids, **kwargs):
    return [0.0] * len(completions)
'''


def policy_batch(trainer, exp, capture_old=True):
    """The natural-gradient view of `exp` on the trainer's policy (rlhf.trainers.natural)."""
    return PolicyBatch(trainer.unwrapped, exp, trainer.losses, trainer.fwd, trainer.rt, trainer.policy.guard,
                       trainer.cfg.algo.natural.fisher_samples, capture_old)


@pytest.fixture
def rewards(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(DENSE_REWARD)
    return lambda name: f"reward.functions=[{{fn: '{path}:{name}'}}]"


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- invalid combinations


@pytest.mark.parametrize("overrides, message", [
    (["algo.advantage=gae", "critic.type=none"], "algo.advantage=gae needs a critic"),
    (["algo.advantage=td", "critic.type=none"], "algo.advantage=td needs a critic"),
    (["critic.type=shared"], "critic.type=shared builds a critic, but algo.advantage=grpo uses no values"),
    (["algo.update=npg", "train.mini_batches_per_pass=2"],
     r"algo.update=npg takes one natural-gradient step per batch"),
    (["algo.policy_loss=pg", "train.mini_batches_per_pass=2"], "algo.policy_loss=pg is on-policy only"),
    (["algo.policy_loss=pg", "train.updates_per_batch=2"], "algo.policy_loss=pg is on-policy only"),
    (["algo.update=trpo", "train.updates_per_batch=2"], r"algo.update=trpo takes one natural-gradient step per batch"),
    (["algo.update=npg", "train.updates_per_batch=3"], r"algo.update=npg takes one natural-gradient step per batch"),
    (["algo.update=mdpo"], r"algo.update=mdpo needs train.updates_per_batch >= 2"),
    (["algo.dynamic_sampling.enabled=true", "algo.advantage=reinforce"], r"algo.advantage=reinforce is not one"),
])
def test_invalid_combinations_fail_before_any_model_loads(tiny_cfg, monkeypatch, overrides, message):
    import rlhf.trainers.trainer as trainer_module

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the combination was checked")

    monkeypatch.setattr(trainer_module, "load_policy", no_loading)
    monkeypatch.setattr(trainer_module, "load_tokenizer", no_loading)
    with pytest.raises(ConfigError, match=message):
        Trainer(tiny_cfg(*overrides))


@pytest.mark.parametrize("override, key", [
    ("algo.update=sgd", "algo.update"), ("algo.natural.max_kl=0", "algo.natural.max_kl"),
    ("algo.natural.cg_iters=0", "algo.natural.cg_iters"),
    ("algo.natural.backtrack_coef=1.0", "algo.natural.backtrack_coef"),
    ("algo.natural.damping=-1", "algo.natural.damping"), ("algo.mdpo.eta=0", "algo.mdpo.eta"),
    ("algo.overlong.buffer=64", "algo.overlong.buffer"),
    ("algo.dynamic_sampling.max_extra_rounds=-1", "algo.dynamic_sampling.max_extra_rounds"),
    ("algo.gamma=1.5", "algo.gamma"), ("algo.natural.fisher_samples=-2", "algo.natural.fisher_samples"),
])
def test_new_keys_are_validated_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(load_config(None, [override]))
    assert "adamw, mdpo, npg, trpo" in repr(algos.UPDATES).replace("Registry(update rule: ", "").rstrip(")")


# ---------------------------------------------------------------------------- every valid combination

CRITIC_FREE = [n for n in algos.ADVANTAGES.names() if not algos.ADVANTAGES.meta(n).get("needs_values")]
COMBOS = [
    c for c in itertools.product(CRITIC_FREE, algos.POLICY_LOSSES.names(), ["in_loss", "in_reward"],
                                 algos.UPDATES.names())
    if not (c[1] == "pg" and c[3] == "mdpo")  # mdpo needs several passes, pg is on-policy only
]


def test_the_combination_grid_is_complete():
    assert len(CRITIC_FREE) == 6 and len(COMBOS) == 6 * 4 * 2 * 4 - 6 * 2


@pytest.mark.parametrize("advantage, loss, placement, update", COMBOS)
def test_two_optimizer_steps_for_every_valid_combination(tiny_cfg, rewards, advantage, loss, placement, update):
    passes = 2 if update == "mdpo" else 1
    cfg = tiny_cfg(
        rewards("dense"), f"algo.advantage={advantage}", f"algo.policy_loss={loss}", f"algo.kl.placement={placement}",
        f"algo.update={update}", "algo.kl.coef=0.05", f"train.updates_per_batch={passes}", f"train.steps={2 // passes}",
        "train.samples_per_prompt=2", "generation.max_new_tokens=4", "algo.natural.cg_iters=3",
        "log.completions_per_step=0",
    )
    trainer = Trainer(cfg)
    before = params(trainer.unwrapped)
    records = trainer.train()
    assert [r["opt_step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    after = params(trainer.unwrapped)
    assert any(not torch.equal(before[n], after[n]) for n in before), (
        "the policy did not move",
        [{k: v for k, v in r.items() if k.startswith(("natural", "frac", "grad"))} for r in records])
    if placement == "in_reward":
        assert all("kl_in_reward" in r and r["kl"] is None for r in records)
    else:
        assert all(r["kl"] is not None and "kl_in_reward" not in r for r in records)


# ---------------------------------------------------------------------------- natural gradient on the tiny model


def batch_kl(old_model, new_model, trainer, exp) -> float:
    """Mean over completion tokens of the exact KL(pi_old || pi_new), measured independently of the trainer."""
    dev = next(new_model.parameters()).device
    with torch.no_grad():  # one row per sample (no prompt sharing): a layout independent of the trainer's
        old, _ = sample_log_softmax(old_model, exp.prompt_ids, exp.completion_ids, trainer.tokenizer.pad_token_id,
                                    device=dev, pack_prompts=False)
        new, _ = sample_log_softmax(new_model, exp.prompt_ids, exp.completion_ids, trainer.tokenizer.pad_token_id,
                                    device=dev, pack_prompts=False)
    return float(categorical_kl_NT(old, new).mean())  # every packed token is a completion token


def test_trpo_step_keeps_the_measured_kl_within_delta(tiny_cfg, rewards):
    delta = 0.01
    trainer = Trainer(tiny_cfg(rewards("dense"), "algo.update=trpo", f"algo.natural.max_kl={delta}", "algo.kl.coef=0"))
    exp, _ = trainer.make_experience(PhaseTimer())
    old_model = copy.deepcopy(trainer.unwrapped)
    (record,) = trainer.update(exp)
    assert record["natural/accepted"] == 1.0
    kl = batch_kl(old_model, trainer.unwrapped, trainer, exp)
    assert 0 < kl <= delta * (1 + 1e-4), kl
    assert kl == pytest.approx(record["natural/kl"], rel=1e-3)
    assert record["natural/improvement"] > 0


def test_trpo_line_search_rejects_a_step_that_violates_the_kl_budget(tiny_cfg, rewards):
    delta = 0.002
    trainer = Trainer(tiny_cfg(rewards("dense"), "algo.update=trpo", "algo.kl.coef=0"))
    exp, _ = trainer.make_experience(PhaseTimer())
    problem = policy_batch(trainer, exp)
    theta_old = problem.flat_params()
    g, _ = problem.loss_and_grad()
    step = natural_step(g, problem.fisher_vector_product(), max_kl=delta, cg_iters=10, damping=0.01)
    big = 30.0 * step.delta_P  # ~900x the KL budget under the quadratic model
    seen = []

    def evaluate(fraction):
        problem.set_flat_params(theta_old + fraction * big)
        loss_old, loss_new, kl = problem.measure(theta_old)
        seen.append((fraction, kl))
        return loss_old - loss_new, kl

    result = backtracking_line_search(evaluate, delta, backtrack_coef=0.5, max_backtracks=12)
    assert seen[0][0] == 1.0 and seen[0][1] > delta  # the full step violates the budget and is rejected
    assert result.accepted and result.fraction < 1.0 and result.kl <= delta
    problem.set_flat_params(theta_old + result.fraction * big)
    old_model = copy.deepcopy(trainer.unwrapped)
    assign_flat_([p for p in old_model.parameters() if p.requires_grad], theta_old)
    assert batch_kl(old_model, trainer.unwrapped, trainer, exp) <= delta * (1 + 1e-4)


def test_npg_step_spends_the_kl_budget(tiny_cfg, rewards):
    """Small delta: the quadratic model holds, so the measured KL of the npg step is close to delta."""
    delta = 1e-4
    trainer = Trainer(tiny_cfg(rewards("dense"), "algo.update=npg", f"algo.natural.max_kl={delta}", "algo.kl.coef=0",
                               "algo.natural.damping=0.001", "algo.natural.cg_iters=20"))
    exp, _ = trainer.make_experience(PhaseTimer())
    old_model = copy.deepcopy(trainer.unwrapped)
    (record,) = trainer.update(exp)
    kl = batch_kl(old_model, trainer.unwrapped, trainer, exp)
    assert 0.5 * delta < kl < 1.5 * delta, kl
    assert record["natural/improvement"] > 0 and record["natural/expected_improvement"] > 0


def test_fisher_subsample_uses_fewer_rows(tiny_cfg, rewards):
    trainer = Trainer(tiny_cfg(rewards("dense"), "algo.update=npg", "algo.natural.fisher_samples=2"))
    exp, _ = trainer.make_experience(PhaseTimer())
    assert policy_batch(trainer, exp)._fisher_rows() == [0, 4]  # evenly spread over the 8 samples


# ---------------------------------------------------------------------------- mdpo


def test_mdpo_kl_term_keeps_the_policy_closer_for_small_eta(tiny_cfg, rewards):
    def last_kl(eta):
        cfg = tiny_cfg(rewards("dense"), "algo.update=mdpo", f"algo.mdpo.eta={eta}", "train.updates_per_batch=4",
                       "train.steps=1", "algo.kl.coef=0", "train.lr=3e-3")
        records = Trainer(cfg).train()
        assert records[0]["mdpo/kl_old"] == pytest.approx(0.0, abs=1e-7)  # the first pass is at pi_old
        return records[-1]["mdpo/kl_old"]

    strong, weak = last_kl(0.01), last_kl(100.0)
    assert 0 < strong < weak, (strong, weak)


# ---------------------------------------------------------------------------- KL placement


def test_kl_in_reward_shapes_the_advantages(tiny_cfg, rewards):
    base = [rewards("dense"), "algo.kl.coef=0.5", "algo.advantage=reinforce"]
    trainer = Trainer(tiny_cfg(*base, "algo.kl.placement=in_reward"))
    trainer.step()  # move away from the reference so the KL is non-zero
    torch.manual_seed(0)
    exp, info = trainer.make_experience(PhaseTimer())
    assert info.metrics["kl_in_reward"] != 0
    kl_NT = trainer.losses.kl(exp.old_logp_NT, exp.ref_logp_NT) * exp.mask_NT
    # reinforce with gamma = 1: the advantage of token t is the score minus beta * (KL of tokens t..end)
    future_kl_NT = kl_NT.flip(-1).cumsum(-1).flip(-1)
    expected = (exp.scores_N.unsqueeze(-1) - 0.5 * future_kl_NT) * exp.mask_NT
    assert torch.allclose(exp.adv_NT, expected, atol=1e-5)


# ---------------------------------------------------------------------------- DAPO


@pytest.fixture
def kinds(tmp_path):
    import json

    path = tmp_path / "kinds.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} ?", "kind": "flat" if i % 2 else "vary"}) + "\n"
                            for i in range(8)))
    return path


def test_dynamic_sampling_refills_the_batch_with_informative_groups(tiny_cfg, rewards, kinds):
    trainer = Trainer(tiny_cfg(rewards("by_kind"), f"data.train={kinds}", "data.shuffle=false",
                               "algo.dynamic_sampling.enabled=true", "algo.dynamic_sampling.max_extra_rounds=3"))
    rec = trainer.step()[0]
    # each round of 2 prompts has one 'vary' and one 'flat' group: one extra round fills the batch
    assert rec["dynamic_sampling/dropped_groups"] == 2 and rec["dynamic_sampling/extra_rounds"] == 1
    assert rec["dynamic_sampling/filled_groups"] == 0 and rec["frac_zero_std"] == 0.0
    assert trainer.prompts.state()["pos"] == 4  # two rounds of prompts were drawn


def test_dynamic_sampling_cap_fills_with_dropped_groups(tiny_cfg, rewards, kinds):
    trainer = Trainer(tiny_cfg(rewards("by_kind"), f"data.train={kinds}", "data.shuffle=false",
                               "algo.dynamic_sampling.enabled=true", "algo.dynamic_sampling.max_extra_rounds=0"))
    exp, info = trainer.make_experience(PhaseTimer())
    assert len(exp) == 8  # still prompts_per_step x samples_per_prompt
    assert info.metrics["dynamic_sampling/filled_groups"] == 1 and info.metrics["dynamic_sampling/dropped_groups"] == 1


def test_overlong_penalty_is_added_to_the_score(tiny_cfg, rewards):
    trainer = Trainer(tiny_cfg(rewards("zero"), "algo.overlong.buffer=6", "algo.overlong.penalty=0.5"))
    exp, info = trainer.make_experience(PhaseTimer())
    lengths = torch.tensor([len(c) for c in exp.completion_ids])
    expected = overlong_penalty(lengths, 8, 6, 0.5)
    assert torch.allclose(exp.scores_N, expected) and expected.min() < 0
    assert info.samples.per_fn["overlong_penalty"] == pytest.approx(expected.tolist())


def test_mask_truncated_drops_truncated_samples_from_the_loss(tiny_cfg, rewards):
    trainer = Trainer(tiny_cfg(rewards("dense"), "algo.mask_truncated=true", "generation.max_new_tokens=3",
                               "algo.kl.coef=0"))
    exp, info = trainer.make_experience(PhaseTimer())
    finished = torch.tensor(info.samples.finished)
    assert (~finished).any(), "no truncated sample to test with"
    assert torch.equal(exp.loss_mask_NT.sum(-1) > 0, finished & (exp.mask_NT.sum(-1) > 0))
    g_masked, _ = policy_batch(trainer, exp).loss_and_grad()
    kept = exp.select([i for i in range(len(exp)) if finished[i]]) if finished.any() else None
    if kept is None:  # everything truncated: no gradient at all
        assert torch.count_nonzero(g_masked) == 0
        return
    kept.old_logp_NT = None
    g_kept, _ = policy_batch(trainer, kept).loss_and_grad()
    assert torch.allclose(g_masked, g_kept, atol=1e-6)


def test_trpo_with_lora_in_bf16_moves_only_the_adapter_within_delta(tiny_cfg, rewards):
    delta = 0.01
    trainer = Trainer(tiny_cfg(rewards("dense"), "algo.update=trpo", "model.lora.enabled=true", "model.lora.r=4",
                               "model.compute_dtype=bf16", f"algo.natural.max_kl={delta}", "algo.kl.coef=0.05"))
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    records = trainer.train()
    after = dict(trainer.unwrapped.named_parameters())
    assert all(r["natural/kl"] <= delta for r in records) and any(r["natural/accepted"] for r in records)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)


# ---------------------------------------------------------------------------- two processes


def test_trpo_and_dynamic_sampling_keep_ranks_in_sync_on_two_processes(tiny_model_dir, rewards, kinds, tmp_path):
    """TRPO's gradient, Fisher-vector products and line-search measurements are reduced by hand over
    processes (no DDP hook sees them), and dynamic-sampling rounds are collective: both ranks must
    end with the same parameters, and a rank that is full keeps drawing prompts with the other."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp.json"
    env = {**os.environ, "RLHF_TEST_OUT": str(out), "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    overrides = [f"model.path={tiny_model_dir}", "model.compute_dtype=fp32", "model.lora.enabled=false",
                 f"output_dir={tmp_path / 'run'}", "train.steps=2", "train.prompts_per_step=2",
                 "train.samples_per_prompt=4", "train.micro_batch_size=2", "train.lr=1e-3",
                 "generation.max_new_tokens=6", "log.progress=false",
                 "checkpoint.save_final=false", f"data.train={kinds}", "data.shuffle=false", rewards("by_kind"),
                 "algo.dynamic_sampling.enabled=true", "algo.update=trpo", "algo.natural.cg_iters=3"]
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("ddp_updates.py")), *overrides],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    assert res["rank_diff"] == 0.0 and res["moved"] > 0
    first = res["records"][0]
    assert first["world_size"] == 2 and first["natural/accepted"] == 1.0
    # rank 0 holds the even ('vary') prompt of every round and is full at once; rank 1 holds the odd
    # ('flat') prompt, drops it in every round, and after the 3 extra rounds fills with a dropped group
    assert first["dynamic_sampling/extra_rounds"] == 3 and first["dynamic_sampling/dropped_groups"] == 4
    assert first["dynamic_sampling/filled_groups"] == 1 and first["frac_zero_std"] == 0.5


# ---------------------------------------------------------------------------- on-policy distillation


def test_distillation_pulls_the_student_towards_the_teacher(tiny_cfg, rewards, tmp_path):
    from tests.conftest import build_tiny_model

    teacher = build_tiny_model(tmp_path / "teacher", seed=7)
    trainer = Trainer(tiny_cfg(rewards("zero"), f"distill.teacher={teacher}", "algo.advantage=reinforce",
                               "algo.gamma=0", "algo.kl.coef=0", "train.steps=10", "train.lr=3e-3"))
    assert trainer.old_logp == "forward"  # the reward reads log pi_old before the update
    exp, info = trainer.make_experience(PhaseTimer())
    gap_NT = (exp.old_logp_NT - exp.teacher_logp_NT) * exp.mask_NT
    assert torch.allclose(exp.rewards_NT, -gap_NT, atol=1e-6)  # the task reward (weight 1, always 0) adds nothing
    records = trainer.train()
    kl = [r["distill/reverse_kl"] for r in records]
    assert kl[-1] < 0.7 * kl[0], kl


def test_a_teacher_with_another_tokenizer_is_refused(tiny_cfg, rewards, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlhf.errors import BadModel

    other = tmp_path / "other"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                                  unk_token="<unk>", eos_token="a")
    LlamaForCausalLM(LlamaConfig(vocab_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(BadModel, match="another tokenizer"):
        Trainer(tiny_cfg(rewards("zero"), f"distill.teacher={other}"))
