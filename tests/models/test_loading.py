import pytest
import torch

from rlhf.config import LoraConfig, ModelConfig
from rlhf.models.loading import inference_copy, load_causal_lm, load_policy, load_reference, resolve_model_path


def test_missing_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path '.*nope' is not a local transformers model directory"):
        resolve_model_path(str(tmp_path / "nope"))


def test_lora_policy_trains_only_adapters_and_has_no_reference_copy(tiny_model_dir):
    mcfg = ModelConfig(path=str(tiny_model_dir), compute_dtype="fp32",
                       lora=LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    policy = load_policy(mcfg)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
    assert load_reference(mcfg, policy, kl_coef=0.04) is None  # the adapter is disabled instead


def test_full_finetune_reference_is_frozen_copy_and_absent_without_kl(tiny_model_dir):
    mcfg = ModelConfig(path=str(tiny_model_dir), compute_dtype="fp32", lora=LoraConfig(enabled=False))
    policy = load_policy(mcfg)
    ref = load_reference(mcfg, policy, kl_coef=0.04)
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(policy.parameters(), ref.parameters()))
    assert load_reference(mcfg, policy, kl_coef=0.0) is None


def test_bad_lora_target_is_named(tiny_model_dir):
    mcfg = ModelConfig(path=str(tiny_model_dir), lora=LoraConfig(target_modules=["nonexistent_proj"]))
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        load_policy(mcfg)


def test_model_code_from_the_model_directory_never_runs_unless_trusted(tmp_path):
    """trust_remote_code is off by default: a model directory's own Python is refused, not imported."""
    from rlhf.config import Config
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    marker = tmp_path / "model_code_ran"
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        '{"model_type": "rlhf_custom", "auto_map": {"AutoConfig": "custom.CustomConfig", '
        '"AutoModelForCausalLM": "custom.CustomModel", "AutoTokenizer": ["custom.CustomTokenizer", null]}}')
    (model_dir / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": '
                                                      '["custom.CustomTokenizer", null]}}')
    (model_dir / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    assert Config().model.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_causal_lm(str(model_dir))
    with pytest.raises((ValueError, OSError)):
        load_tokenizer(str(model_dir))
    assert not marker.exists()


def test_bf16_reference_keeps_linear_weights_in_bf16_with_identical_outputs(tiny_model_dir):
    """Under bf16 autocast a linear casts its fp32 weight to bf16 anyway: the reference stores them so
    (half the memory) and its log-probs equal the fp32 policy's bit for bit; embeddings and norms stay fp32."""
    mcfg = ModelConfig(path=str(tiny_model_dir), compute_dtype="bf16", lora=LoraConfig(enabled=False))
    policy = load_policy(mcfg)
    ref = load_reference(mcfg, policy, kl_coef=0.04)
    dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.float32 and dtypes["model.norm.weight"] == torch.float32
    ids = torch.randint(3, policy.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = policy(input_ids=ids).logits, ref(input_ids=ids).logits
    assert torch.equal(a, b)
    fp32 = load_reference(ModelConfig(path=str(tiny_model_dir), compute_dtype="fp32", lora=LoraConfig(enabled=False)),
                          policy, kl_coef=0.04)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())


def test_inference_copy_lives_on_the_models_device(tiny_model_dir):
    """A GPU policy's sampling copy must be on the GPU; the meta device stands in for one here
    (a copy built on the CPU fails to load the meta model's state dict)."""
    model = load_causal_lm(str(tiny_model_dir)).to("meta")
    clone = inference_copy(model, torch.bfloat16)
    assert {p.device.type for p in clone.parameters()} == {"meta"}
    assert {p.dtype for p in clone.parameters()} == {torch.bfloat16}
