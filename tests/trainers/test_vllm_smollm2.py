"""The vLLM engine on the embedded SmolLM2-135M: after every sync it samples from the trained policy.

bf16 (the demo's setting): two correct implementations round differently, so a greedy path may
part at a near-tie; the check allows that only where the trainer's own margin between the two
tokens is below TIE_TOL, and requires exp(mean |delta logp|) < 1.05. fp32: greedy must be exact.
"""
import math

import pytest
import torch

from rlhf.config import load_config
from rlhf.engine import ENGINES
from rlhf.engine.sync_check import check_sync
from rlhf.trainers import Trainer
from tests.conftest import requires_smollm2, requires_vllm

pytestmark = [pytest.mark.slow, requires_vllm, requires_smollm2]
TIE_TOL = 0.25  # nats; wrong weights give margins of ~20
RECIPE = "recipes/grpo_arithmetic.yaml"


def prompts(trainer, k=4):
    return trainer.prompts.batch(k, 0, 1).prompt_ids


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_training_keeps_the_engine_in_sync(tmp_path, lora):
    cfg = load_config(RECIPE, [
        f"output_dir={tmp_path}", "generation.engine=vllm", "generation.vllm.kv_cache_gb=1",
        f"model.lora.enabled={str(lora).lower()}",
        "train.steps=2", "train.prompts_per_step=2", "train.samples_per_prompt=4", "train.micro_batch_size=8",
        "generation.max_new_tokens=16",
        "generation.temperature=1.0", "algo.kl.coef=0",  # log-probs at T < 1 scale the bf16 logit noise by 1/T
        "train.lr=1e-4" if lora else "train.lr=2e-5", "log.progress=false", "checkpoint.save_final=false",
    ])
    trainer = Trainer(cfg)
    fixed = prompts(trainer)
    try:
        start = check_sync(trainer.engine, trainer.unwrapped, trainer.tokenizer, fixed, 16, "bf16")
        for step in range(2):
            record = trainer.step()[0]
            report = check_sync(trainer.engine, trainer.unwrapped, trainer.tokenizer, fixed, 16, "bf16")
            print(f"{'lora' if lora else 'full'} step {step + 1}: {report}; training gap exp(mean) = "
                  f"{math.exp(record['engine/logp_gap_mean']):.4f}, max {record['engine/logp_gap_max']:.3f}, "
                  f"generate {record['time/generate_s']:.2f} s, sync {record['time/sync_s']:.2f} s")
            assert report.ok(max_ratio=1.05, tie_tol=TIE_TOL), f"step {step + 1}: {report}"
            # over sampled tokens (temperature 1, unlikely tokens included) bf16 noise is larger than on greedy ones
            assert math.exp(record["engine/logp_gap_mean"]) < 1.10
        assert report.logp_gap_mean != start.logp_gap_mean or report.engine_ids != start.engine_ids
    finally:
        trainer.engine.close()


def test_fp32_greedy_is_exact_after_a_sync():
    from rlhf.models.loading import load_policy, load_tokenizer

    cfg = load_config(RECIPE, ["generation.engine=vllm", "model.compute_dtype=fp32", "generation.vllm.kv_cache_gb=1"])
    tokenizer, model = load_tokenizer(cfg.model.path), load_policy(cfg.model)
    engine = ENGINES.get("vllm")(model, tokenizer, cfg)
    try:
        fixed = [tokenizer.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}?"}],
                                               add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                 for a, b in [(3, 4), (12, 7), (5, 9)]]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a stand-in for an optimizer step: every weight moves by ~1e-3 of its scale
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * p.abs().mean() * 1e-3)
        engine.update_weights(model)
        report = check_sync(engine, model, tokenizer, fixed, 16, "fp32")
        print(f"fp32: {report}")
        assert report.ok(max_ratio=1.01, tie_tol=0.0), report
    finally:
        engine.close()
