"""The HF engine's own decode loop (rlhf.engine.decode) against transformers' generate and warpers."""
import pytest
import torch
import transformers

from rlhf.config import Config
from rlhf.engine import SamplingParams
from rlhf.engine.decode import FusedDecoder, left_pad, sample, warp_logits
from rlhf.engine.hf import HFEngine, contiguous_head_input
from rlhf.models.loading import inference_copy, load_causal_lm


def _bf16(model_dir):
    return (transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
            .requires_grad_(False))


def _hf_greedy(model, prompts, pad_id, eos_id, max_new_tokens):
    ids_BP, mask_BP = left_pad(prompts, pad_id, "cpu")
    cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                        eos_token_id=[eos_id], return_dict_in_generate=True, output_scores=True)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), contiguous_head_input(model):
        out = model.generate(input_ids=ids_BP, attention_mask=mask_BP, generation_config=cfg)
    tokens_NT = out.sequences[:, ids_BP.shape[1]:]
    logp_NT = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, tokens_NT[..., None]).squeeze(-1)
    return tokens_NT, logp_NT


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory, tokenizer):
    """A random Qwen2 (q/k/v projections with biases) with the tiny tokenizer."""
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                   tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:  # visible biases, so a dropped one would show
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_decoding_matches_generate_with_left_padded_prompts(arch, tiny_model_dir, tiny_qwen2_dir, tokenizer):
    model = _bf16(tiny_model_dir if arch == "llama" else tiny_qwen2_dir)
    assert FusedDecoder.supports(model)
    prompts = [[7, 8, 9, 10, 11, 12], [13, 14], [9, 7, 15]]  # three lengths: left padding inside the prefill
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ref_NT, ref_logp_NT = _hf_greedy(model, prompts, pad, eos, max_new_tokens=12)
    tokens_NT, logp_NT = sample(FusedDecoder(model), prompts, 1, SamplingParams(max_new_tokens=12, greedy=True),
                                {eos}, pad)
    assert tokens_NT.shape == ref_NT.shape
    assert torch.equal(tokens_NT, ref_NT)
    real_NT = ref_NT != pad
    # bf16 network, same ops up to fp32 rounding in the norms
    assert (logp_NT - ref_logp_NT)[real_NT].abs().max() < 2e-2


def test_warping_matches_transformers_warpers():
    torch.manual_seed(0)
    logits_NV = torch.randn(6, 50) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6)]:
        warpers = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(temperature)])
        if top_k:
            warpers.append(transformers.TopKLogitsWarper(top_k))
        if top_p < 1:
            warpers.append(transformers.TopPLogitsWarper(top_p))
        ours = warp_logits(logits_NV, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        theirs = warpers(None, logits_NV.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert torch.allclose(ours.softmax(-1), theirs.softmax(-1), atol=1e-6)


def test_sampled_rows_follow_the_warped_distribution_and_report_its_logps(tiny_model_dir, tokenizer):
    """A one-token prompt's first draws: frequencies match the warped next-token probabilities, and each
    returned log-prob is the sampled token's log-prob under that distribution."""
    model = _bf16(tiny_model_dir)
    decoder = FusedDecoder(model)
    sampling = SamplingParams(max_new_tokens=1, temperature=0.8, top_k=6)
    torch.manual_seed(0)
    tokens_NT, logp_NT = sample(decoder, [[7]], 4000, sampling, set(), tokenizer.pad_token_id)
    logits_1V = decoder.forward(torch.tensor([[7]]), torch.tensor([[True]]), decoder.new_cache(1, 1))
    logp_V = warp_logits(logits_1V, sampling).log_softmax(-1)[0]
    assert torch.allclose(logp_NT[:, 0], logp_V[tokens_NT[:, 0]])
    freq_V = torch.bincount(tokens_NT[:, 0], minlength=logp_V.shape[0]) / 4000
    assert freq_V[torch.isinf(logp_V)].sum() == 0  # nothing outside the top 6
    assert (freq_V - logp_V.exp()).abs().max() < 0.03


def test_rows_stop_at_eos_and_decoding_ends_when_all_have(tiny_model_dir, tokenizer):
    model = _bf16(tiny_model_dir)
    pad = tokenizer.pad_token_id
    everything = set(range(len(tokenizer)))  # every token is an EOS: all rows end at their first token
    tokens_NT, _ = sample(FusedDecoder(model), [[7, 8]], 5, SamplingParams(max_new_tokens=8), everything, pad)
    assert tokens_NT.shape == (5, 1)
    torch.manual_seed(0)
    tokens_NT, logp_NT = sample(FusedDecoder(model), [[7, 8]], 16, SamplingParams(max_new_tokens=10, temperature=2.0),
                                {9, 10, 11}, pad)
    for row, logps in zip(tokens_NT.tolist(), logp_NT.tolist()):
        ends = [i for i, t in enumerate(row) if t in (9, 10, 11)]
        if ends:  # padding after the first EOS, with log-prob 0
            assert all(t == pad for t in row[ends[0] + 1:]) and all(lp == 0 for lp in logps[ends[0] + 1:])


def test_engine_decodes_with_the_synced_weights(tiny_model_dir, tokenizer):
    """HFEngine with bf16 compute runs the fused loop; after update_weights its greedy output is
    generate's on a bf16 copy of the updated policy (the packed weights were rebuilt from it)."""
    model = load_causal_lm(str(tiny_model_dir))
    cfg = Config()
    cfg.model.compute_dtype = "bf16"
    engine = HFEngine(model, tokenizer, cfg)
    assert engine.decoder is not None
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    before = engine.generate([[7, 8, 9]], n=1, sampling=greedy).completion_ids
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    engine.update_weights(model)
    after = engine.generate([[7, 8, 9]], n=1, sampling=greedy).completion_ids
    ref_NT, _ = _hf_greedy(inference_copy(model, torch.bfloat16), [[7, 8, 9]], tokenizer.pad_token_id,
                           tokenizer.eos_token_id, 8)
    expected = ref_NT[0].tolist()
    expected = (expected[: expected.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in expected
                else expected)
    assert after[0] == expected and after != before
