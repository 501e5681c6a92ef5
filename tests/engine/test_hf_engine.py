import pytest
import torch

from rlhf.config import Config
from rlhf.engine import SamplingParams
from rlhf.engine.decode import fast_sampling, inverse_cdf_sample
from rlhf.engine.hf import HFEngine, split_completions
from rlhf.models.loading import load_causal_lm
from rlhf.models.logprobs import sample_logprobs


def test_split_completions_cuts_after_first_eos():
    comps, finished = split_completions(torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9]]), eos={2})
    assert comps == [[5, 6, 2], [5, 6, 7, 8, 9]] and finished == [True, False]


def test_generate_groups_lengths_and_sampler_logps(tiny_model_dir, tokenizer):
    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_model_dir))
    cfg = Config()
    cfg.model.compute_dtype = "fp32"
    engine = HFEngine(model, tokenizer, cfg)
    prompts = [[7, 8, 9], [10]]
    out = engine.generate(prompts, n=3, sampling=SamplingParams(max_new_tokens=6, temperature=0.9), return_logps=True)
    assert len(out) == 6 and out.prompt_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    for comp, fin in zip(out.completion_ids, out.finished):
        assert 1 <= len(comp) <= 6
        assert fin == (comp[-1] == tokenizer.eos_token_id)
        assert tokenizer.eos_token_id not in comp[:-1]
    # sampler log-probs equal the trainer's log-probs at the same temperature
    with torch.no_grad():
        logp, _ = sample_logprobs(model.eval(), out.prompt_ids, out.completion_ids, tokenizer.pad_token_id,
                                  temperature=0.9)
    for i, comp in enumerate(out.completion_ids):
        assert torch.allclose(torch.tensor(out.sampler_logps[i]), logp[i, : len(comp)], atol=1e-4)


def test_greedy_is_deterministic(tiny_model_dir, tokenizer):
    model = load_causal_lm(str(tiny_model_dir))
    cfg = Config()
    cfg.model.compute_dtype = "fp32"
    engine = HFEngine(model, tokenizer, cfg)
    a = engine.generate([[7, 8]], n=2, sampling=SamplingParams(max_new_tokens=5, greedy=True))
    b = engine.generate([[7, 8]], n=1, sampling=SamplingParams(max_new_tokens=5, greedy=True))
    assert a.completion_ids[0] == a.completion_ids[1] == b.completion_ids[0]


def test_bf16_generation_copy_follows_the_policy(tiny_model_dir, tokenizer):
    """The bf16 copy keeps only what the fused decoder neither packs nor reads from the policy (the norms: the
    embedding rows are looked up in the policy) and follows the policy."""
    model = load_causal_lm(str(tiny_model_dir))
    cfg = Config()
    cfg.model.compute_dtype = "bf16"
    engine = HFEngine(model, tokenizer, cfg)
    assert engine.copy_weights and next(engine.model.parameters()).dtype == torch.bfloat16
    packed = engine.decoder.packed_names
    assert "model.layers.0.self_attn.q_proj.weight" in packed and "model.embed_tokens.weight" in packed
    assert "model.norm.weight" not in packed
    assert all(p.numel() == 0 for name, p in engine.model.named_parameters() if name in packed)  # no second copy
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    engine.update_weights(model)
    for name, p in model.named_parameters():
        if name not in packed:
            assert torch.equal(dict(engine.model.named_parameters())[name], p.to(torch.bfloat16)), name
    out = engine.generate([[7, 8]], n=2, sampling=SamplingParams(max_new_tokens=4))
    assert len(out) == 2


def test_seed_per_prompt_makes_a_group_independent_of_its_batch(tiny_model_dir, tokenizer):
    """generation.seed_per_prompt: a prompt's group is the same whether it is sampled alone or beside others
    (so the completions do not depend on how prompts are sharded over processes)."""
    model = load_causal_lm(str(tiny_model_dir))
    cfg = Config()
    cfg.model.compute_dtype = "fp32"
    cfg.generation.seed_per_prompt = True
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0)
    together = HFEngine(model, tokenizer, cfg).generate([[7, 8, 9], [10, 11]], n=4, sampling=sampling)
    torch.manual_seed(123)  # the global RNG plays no part
    alone = HFEngine(model, tokenizer, cfg).generate([[10, 11]], n=4, sampling=sampling)
    assert together.completion_ids[4:] == alone.completion_ids
    assert len(set(map(tuple, together.completion_ids[:4]))) > 1  # still sampling within the group


def test_inverse_cdf_sampling_draws_from_the_given_distribution():
    """The CPU sampler used inside generate: frequencies match the probabilities (zeros never drawn),
    seeded draws repeat, and torch.multinomial is restored after the call."""
    probs_BV = torch.tensor([[0.0, 0.5, 0.2, 0.0, 0.3], [0.9, 0.0, 0.0, 0.1, 0.0]])
    torch.manual_seed(0)
    draws = torch.cat([inverse_cdf_sample(probs_BV, 1) for _ in range(20000)], dim=1)  # [2, 20000]
    for row in range(2):
        freq = torch.bincount(draws[row], minlength=5).double() / draws.shape[1]
        assert torch.allclose(freq, probs_BV[row].double(), atol=0.015), (row, freq)
        assert freq[probs_BV[row] == 0].sum() == 0
    torch.manual_seed(1)
    a = inverse_cdf_sample(probs_BV, 1)
    torch.manual_seed(1)
    assert torch.equal(a, inverse_cdf_sample(probs_BV, 1))
    original = torch.multinomial
    with fast_sampling(torch.device("cpu")):
        assert torch.multinomial is inverse_cdf_sample
        assert torch.multinomial(probs_BV, 2).shape == (2, 2)  # several draws: torch's own sampler
    assert torch.multinomial is original


def test_generate_feeds_the_output_layer_contiguous_input_and_removes_its_hook(tiny_model_dir, tokenizer):
    """A frozen lm_head given generate's strided last-position slice makes torch expand the weight per
    sequence (0.9 GB more per call for SmolLM2): the engine hands it a contiguous copy, only during generate."""
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm(str(tiny_model_dir)).requires_grad_(False)
    lora = get_peft_model(load_causal_lm(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj"]))
    cfg = Config()
    cfg.model.compute_dtype = "fp32"
    for model in (base, lora):
        engine = HFEngine(model, tokenizer, cfg)
        head = engine.model.get_output_embeddings()  # LoRA: the engine's merged copy samples
        seen = []
        handle = head.register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))
        engine.generate([[7, 8, 9], [10, 11]], n=2, sampling=SamplingParams(max_new_tokens=4))
        handle.remove()
        assert seen and all(seen)
        assert not head._forward_pre_hooks  # removed after the call


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_lora_policy_samples_from_a_merged_copy(tiny_model_dir, tokenizer, dtype):
    """LoRA on the fast path: the engine keeps a plain copy with the adapter merged (the decode loop in bf16),
    refreshed at every sync; greedy output equals the adapter model's own (fp32 exactly, bf16 up to near-ties)."""
    from rlhf.config import LoraConfig, ModelConfig
    from rlhf.engine.sync_check import check_sync
    from rlhf.models.loading import load_policy

    torch.manual_seed(0)  # the adapter's initialisation
    policy = load_policy(ModelConfig(path=str(tiny_model_dir), compute_dtype=dtype, lora=LoraConfig(r=4)))
    cfg = Config()
    cfg.model.compute_dtype = dtype
    engine = HFEngine(policy, tokenizer, cfg)
    assert engine.model is not policy and not hasattr(engine.model, "peft_config")
    assert (engine.decoder is not None) == (dtype == "bf16")
    prompts = [[7, 8, 9], [10, 11, 12, 13], [14, 8]]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):  # stand-ins for optimizer steps on the adapter
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_" in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        assert not check_sync(engine, policy, tokenizer, prompts, 8, dtype).ok()  # stale until the sync
        engine.update_weights(policy)
        report = check_sync(engine, policy, tokenizer, prompts, 8, dtype)
        # bf16: merged-then-rounded weights vs peft's separate low-rank path; stale weights give margins of ~10
        assert report.ok(tie_tol=0.0 if dtype == "fp32" else 0.5), report
