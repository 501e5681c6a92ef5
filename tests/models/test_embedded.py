import json

import pytest

from rlhf.models import embedded
from rlhf.models.loading import load_causal_lm, load_tokenizer, resolve_model_path
from tests.conftest import requires_smollm2

pytestmark = [pytest.mark.slow, requires_smollm2]


def test_embedded_model_is_prepared_once_as_plain_safetensors():
    path = embedded.prepare("smollm2-135m-instruct")
    assert resolve_model_path("smollm2-135m-instruct") == path
    assert (path / "model.safetensors").is_file() and (path / ".complete").is_file()
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    mtime = (path / "model.safetensors").stat().st_mtime
    assert embedded.prepare("smollm2-135m-instruct") == path
    assert (path / "model.safetensors").stat().st_mtime == mtime  # not rewritten


def test_embedded_model_loads_and_answers_with_its_chat_template():
    tok = load_tokenizer("smollm2-135m-instruct")
    model = load_causal_lm("smollm2-135m-instruct")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 5?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert any(ch.isalpha() for ch in answer)  # coherent English, not garbage ids
    assert tok.eos_token == "<|im_end|>"


def test_unknown_embedded_name():
    with pytest.raises(ValueError, match="unknown embedded model 'nope'"):
        embedded.prepare("nope")
