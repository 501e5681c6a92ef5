import math

import pytest
import torch
from rm_helpers import rm_overrides, separable_rows, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_models.config import load_rm_config
from reward_models.data import encode
from reward_models.model import score_sequences
from reward_models.trainer import RewardModelTrainer, bradley_terry_loss
from rlhf.config import ConfigError
from rlhf.logging import read_jsonl

STEP_KEYS = {"step", "loss", "accuracy", "margin", "reward/chosen", "reward/rejected", "lr", "grad_norm", "time/step_s"}
EVAL_KEYS = {"step", "eval/loss", "eval/accuracy", "eval/margin", "eval/pairs"}


def score_pairs(model, tokenizer, rows):
    """(r_chosen, r_rejected) lists for preference rows, scored by a plain transformers model."""
    prompts = [r["prompt"] for r in rows]
    seqs = (encode(tokenizer, prompts, [r["chosen"] for r in rows])
            + encode(tokenizer, prompts, [r["rejected"] for r in rows]))
    with torch.no_grad():
        device = next(model.parameters()).device
        s = score_sequences(model.eval(), seqs, tokenizer.pad_token_id, device, "fp32").tolist()
    return s[: len(rows)], s[len(rows):]


def test_bradley_terry_loss_and_margin():
    r_c, r_r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = [math.log1p(math.exp(-d)) for d in (2.0, 0.0, -2.0)]
    assert bradley_terry_loss(r_c, r_r).tolist() == pytest.approx(expected, rel=1e-6)
    with_margin = bradley_terry_loss(r_c, r_r, torch.tensor([1.0, 1.0, 1.0]))
    assert with_margin.tolist() == pytest.approx([math.log1p(math.exp(-d)) for d in (1.0, -1.0, -3.0)], rel=1e-6)


def test_reaches_full_accuracy_on_separable_pairs_and_logs_every_step(trained_rm):
    out, history = trained_rm
    rows = read_jsonl(out / "metrics.jsonl")
    assert rows == [pytest.approx(r, nan_ok=True) for r in history]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(STEP_KEYS <= set(r) for r in steps) and all(EVAL_KEYS <= set(r) for r in evals)
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[-1]["eval/accuracy"] == 1.0 and evals[-1]["eval/pairs"] == 4
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] / 4
    assert steps[-1]["accuracy"] == 1.0 and steps[-1]["loss"] < steps[0]["loss"]


def test_saved_model_loads_with_transformers_and_ranks_the_pairs(trained_rm):
    out, _ = trained_rm
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    r_c, r_r = score_pairs(model, tokenizer, separable_rows())
    assert all(c > r for c, r in zip(r_c, r_r)), (r_c, r_r)


def test_lora_trains_adapter_and_head_only_and_saves_merged(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", separable_rows(conversational=False))
    cfg = load_rm_config(None, rm_overrides(tiny_model_dir, data, tmp_path / "run", "model.lora.enabled=true",
                                            "model.lora.r=4", "train.steps=4", "eval.every=0", "eval.at_start=false"))
    trainer = RewardModelTrainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    history = trainer.train()
    after = dict(trainer.unwrapped.named_parameters())
    trained = [n for n in before if not torch.equal(before[n], after[n])]
    assert trained and all("lora_" in n or "score" in n for n in trained), trained
    assert any("score" in n for n in trained), "the score head did not train"
    assert [r["step"] for r in history if "eval/accuracy" in r] == [4]  # evaluated once, at the end

    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(final)  # no peft involved
    assert not hasattr(merged, "peft_config")
    rows = separable_rows(conversational=False)
    tok = trainer.tokenizer
    merged_c, merged_r = score_pairs(merged, tok, rows)
    live_c, live_r = score_pairs(trainer.unwrapped, tok, rows)
    assert merged_c + merged_r == pytest.approx(live_c + live_r, abs=1e-4)


def test_checkpoints_are_loadable_and_pruned(tiny_model_dir, separable_jsonl, tmp_path):
    cfg = load_rm_config(None, rm_overrides(tiny_model_dir, separable_jsonl, tmp_path / "run", "train.steps=4",
                                            "save.every=1", "save.keep_last=2", "save.final=false", "eval.every=0",
                                            "eval.at_start=false"))
    RewardModelTrainer(cfg).train()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000003"] and not (tmp_path / "run" / "final").exists()
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "checkpoints" / "step_000003")


def test_margin_column_enters_the_eval_loss_and_subsets_are_scored_apart(tiny_model_dir, tmp_path):
    rows = [dict(r, margin=3.0, kind=k) for r, k in zip(separable_rows(), ["x", "y", "y", "y"])]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    plain = RewardModelTrainer(load_rm_config(None, rm_overrides(tiny_model_dir, data, tmp_path / "a"))).evaluate()
    trainer = RewardModelTrainer(load_rm_config(None, rm_overrides(tiny_model_dir, data, tmp_path / "b",
                                                                   "data.margin_column=margin",
                                                                   "data.subset_column=kind")))
    margin = trainer.evaluate()
    assert margin["eval/margin"] == pytest.approx(plain["eval/margin"])  # same seed: same model
    assert margin["eval/loss"] > plain["eval/loss"] + 1.0  # -logsigmoid(d - 3) >> -logsigmoid(d) for d ~ 0
    r_c, r_r = trainer.pair_scores(trainer.unwrapped, trainer.eval_pairs, [0, 1, 2, 3])
    correct = (r_c > r_r).float().tolist()
    assert margin["eval/accuracy/x"] == correct[0] and margin["eval/accuracy/y"] == pytest.approx(sum(correct[1:]) / 3)
    assert "eval/accuracy/x" not in plain


@pytest.mark.parametrize("override, match", [
    ("train.micro_batch_size=3", r"train.micro_batch_size=3 must divide the pairs per process per step \(4"),
    ("train.step=3", r"unknown config key 'train.step'; did you mean 'train.steps'"),
    ("data.train=missing.jsonl", r"data.train: 'missing.jsonl' is neither a built-in preference task"),
    ("data.eval_fraction=0.2", r"data.eval and data.eval_fraction are both set"),
    ("model.lora.enabled=maybe", r"model.lora.enabled: expected true/false"),
])
def test_config_errors_name_the_key(tiny_model_dir, separable_jsonl, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_rm_config(None, rm_overrides(tiny_model_dir, separable_jsonl, tmp_path, override)).validate()


def test_packed_and_unpacked_training_agree(tiny_model_dir, separable_jsonl, tmp_path):
    runs = {}
    for pack in ("true", "false"):
        cfg = load_rm_config(None, rm_overrides(tiny_model_dir, separable_jsonl, tmp_path / pack,
                                                f"train.pack_pairs={pack}", "train.steps=2", "eval.every=0",
                                                "save.final=false"))
        runs[pack] = RewardModelTrainer(cfg).train()
    for a, b in zip(runs["true"], runs["false"]):
        for key in ("loss", "accuracy", "margin", "eval/loss", "eval/accuracy"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_group_by_prompt_keeps_a_prompts_pairs_together(tiny_model_dir, tmp_path, monkeypatch):
    rows = []
    for q in ("a", "b", "c"):  # rows 4k..4k+3 share prompt k
        rows += [dict(r, prompt=[{"role": "user", "content": f"What is {q} ?"}]) for r in separable_rows()]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = load_rm_config(None, rm_overrides(tiny_model_dir, data, tmp_path / "run", "train.group_by_prompt=true",
                                            "train.steps=3", "eval.at_start=false", "eval.every=0", "save.final=false"))
    trainer = RewardModelTrainer(cfg)
    order = trainer._permutation()
    assert sorted(order) == list(range(12)) and order != sorted(order)
    assert all(len({i // 4 for i in order[j: j + 4]}) == 1 for j in (0, 4, 8)), order

    import reward_models.packing as packing

    rows_per_forward = []
    real = packing.pack_groups
    monkeypatch.setattr(packing, "pack_groups",
                        lambda groups, pad: rows_per_forward.append(len(groups)) or real(groups, pad))
    trainer.train()
    # 3 steps x 2 micro-batches of 2 pairs of one prompt; eval: a row per prompt
    assert rows_per_forward == [1] * 6 + [3]
