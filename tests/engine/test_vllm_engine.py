"""The vLLM engine on the tiny random Llama, fp32: sampling, sampler log-probs, weight sync (full, tied, LoRA)."""
import math

import pytest
import torch

from rlhf.config import load_config
from rlhf.engine import ENGINES, SamplingParams
from rlhf.engine.sync_check import check_sync
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.logprobs import sample_logprobs
from tests.conftest import requires_vllm

pytestmark = [pytest.mark.slow, requires_vllm]
PROMPTS = [[7, 8, 9], [10, 11], [12, 13, 14, 15], [20, 8]]


@pytest.fixture(scope="module")
def setup(tiny_vllm_model_dir):
    """(engine, model, tokenizer): one engine for the module (vLLM start-up is slow)."""
    cfg = load_config(None, [f"model.path={tiny_vllm_model_dir}", "model.compute_dtype=fp32",
                             "model.lora.enabled=false", "generation.engine=vllm", "generation.vllm.kv_cache_gb=0.25"])
    cfg.validate()
    tokenizer = load_tokenizer(str(tiny_vllm_model_dir))
    model = load_causal_lm(str(tiny_vllm_model_dir))
    threads = torch.get_num_threads()
    engine = ENGINES.get("vllm")(model, tokenizer, cfg)
    assert torch.get_num_threads() == threads  # vLLM's 1-thread serving setting is undone for the trainer
    yield engine, model, tokenizer
    engine.close()


def perturb(params, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_generate_groups_eos_and_sampler_logps(setup):
    engine, model, tokenizer = setup
    engine.update_weights(model)
    out = engine.generate(PROMPTS, 3, SamplingParams(max_new_tokens=10, temperature=0.9), return_logps=True)
    assert len(out) == 12 and out.prompt_ids == [p for p in PROMPTS for _ in range(3)]
    eos = tokenizer.eos_token_id
    for comp, fin in zip(out.completion_ids, out.finished):
        assert 1 <= len(comp) <= 10 and fin == (comp[-1] == eos) and eos not in comp[:-1]
        assert fin or len(comp) == 10
    assert any(out.finished) and not all(out.finished)  # both endings occur, so both are checked
    # the sampler's log-probs are the trainer's at the same temperature (fp32 on both sides)
    with torch.no_grad():
        logp_NT, _ = sample_logprobs(model.eval(), out.prompt_ids, out.completion_ids, tokenizer.pad_token_id,
                                     temperature=0.9)
    for i, comp in enumerate(out.completion_ids):
        assert torch.allclose(torch.tensor(out.sampler_logps[i]), logp_NT[i, : len(comp)], atol=1e-3)


def test_top_k_and_top_p_reach_the_sampler(setup):
    engine, model, _ = setup
    greedy = engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=8, greedy=True)).completion_ids
    top1 = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, top_k=1)).completion_ids
    nucleus = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, top_p=1e-6)).completion_ids
    expected = [c for c in greedy for _ in range(2)]
    assert top1 == expected and nucleus == expected
    sampled = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8)).completion_ids
    assert sampled != expected  # plain sampling on a random model is not greedy


def test_every_sync_makes_the_engine_match_the_trainer(setup):
    engine, model, tokenizer = setup
    engine.update_weights(model)
    for step in range(3):  # stand-ins for optimizer steps
        perturb(model.parameters(), seed=step)
        stale = check_sync(engine, model, tokenizer, PROMPTS, 12)
        assert not stale.ok(), f"step {step}: the check passed before the sync ({stale})"
        engine.update_weights(model)
        report = check_sync(engine, model, tokenizer, PROMPTS, 12)
        assert report.ok(), f"step {step}: {report}"
        assert math.exp(report.logp_gap_mean) < 1.001  # fp32 on both sides


def test_tied_embedding_change_reaches_the_output_layer(setup):
    """Only the (tied) embedding moves: vLLM must rebuild the lm_head kernel it prepacked at start-up."""
    engine, model, tokenizer = setup
    engine.update_weights(model)
    perturb([model.model.embed_tokens.weight], scale=0.3, seed=7)
    assert not check_sync(engine, model, tokenizer, PROMPTS, 12).ok()
    engine.update_weights(model)
    report = check_sync(engine, model, tokenizer, PROMPTS, 12)
    assert report.ok(), report


def test_wrong_weights_fail_the_check(setup, tmp_path):
    from tests.conftest import VLLM_TINY, build_tiny_model

    engine, model, tokenizer = setup
    other = load_causal_lm(str(build_tiny_model(tmp_path / "other", seed=123, **VLLM_TINY)))
    engine.update_weights(other)
    report = check_sync(engine, model, tokenizer, PROMPTS, 12)
    assert report.mismatches and math.exp(report.logp_gap_mean) > 1.05 and not report.ok(tie_tol=0.1), report
    engine.update_weights(model)
    assert check_sync(engine, model, tokenizer, PROMPTS, 12).ok()


def test_lora_merged_weights_match_the_adapter_model(setup, tiny_vllm_model_dir):
    from tests.engine.test_weights import lora_model

    engine, _, tokenizer = setup
    peft_model = lora_model(tiny_vllm_model_dir)
    engine.update_weights(load_causal_lm(str(tiny_vllm_model_dir)))  # the base alone: adapter not in the engine
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    assert not check_sync(engine, peft_model, tokenizer, PROMPTS, 12).ok()
    engine.update_weights(peft_model)
    report = check_sync(engine, peft_model, tokenizer, PROMPTS, 12)
    assert report.ok(), report
    assert all(torch.equal(before[n], p) for n, p in peft_model.named_parameters())  # merging did not touch the model
