"""HF-named weights for engine sync: tied embeddings once, LoRA merged per layer without touching the model."""
import torch

from rlhf.engine.weights import cast, hf_weights
from rlhf.models.loading import load_causal_lm


def lora_model(path, r=4, seed=1):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_causal_lm(str(path)),
                           LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (B starts at zero)
    return model


def test_full_weights_are_the_checkpoint_names_with_the_tied_head_once(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    assert model.config.tie_word_embeddings
    pushed = dict(hf_weights(model))
    saved = {k for k in model.state_dict() if k != "lm_head.weight"}
    assert set(pushed) == saved
    assert all(pushed[n].data_ptr() == p.data_ptr() for n, p in model.named_parameters())  # no copy up front


def test_untied_head_is_pushed(tmp_path):
    from tests.conftest import build_tiny_model

    model = load_causal_lm(str(build_tiny_model(tmp_path / "untied", tie_word_embeddings=False)))
    names = [n for n, _ in hf_weights(model)]
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names


def test_lora_weights_equal_peft_merge_and_leave_the_model_alone(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pushed = dict(hf_weights(model))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any("lora_" in n or "base_layer" in n or n.startswith("base_model") for n in pushed)

    merged = model.merge_and_unload().state_dict()  # peft's own merge, as the reference
    assert set(pushed) == {k for k in merged if k != "lm_head.weight"}
    for name, w in pushed.items():
        assert torch.allclose(w, merged[name], atol=1e-6), name
    q = "model.layers.0.self_attn.q_proj.weight"
    base_q = before[f"base_model.model.{q.removesuffix('.weight')}.base_layer.weight"]
    assert not torch.allclose(pushed[q], base_q)  # the adapter is really in there


def test_cast_converts_lazily():
    calls = []

    def weights():
        for i in range(3):
            calls.append(i)
            yield f"w{i}", torch.ones(2)

    it = cast(weights(), torch.bfloat16)
    name, t = next(it)
    assert calls == [0] and name == "w0" and t.dtype == torch.bfloat16
