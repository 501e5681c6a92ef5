"""`rlhf export`: merged model dirs load with transformers, adapter dirs with peft, checkpoints export too."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhf.cli import main
from rlhf.trainers.export import export_run, load_run_model
from tests.conftest import requires_vllm


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def ids():
    return torch.tensor([[7, 8, 9, 10, 11, 12, 13, 14]])


def test_merge_export_loads_with_transformers_and_matches_the_adapter(lora_run, tmp_path, ids, capsys):
    run_dir, _ = lora_run
    main(["export", str(run_dir), "--merge", "--output", str(tmp_path / "merged")])
    assert capsys.readouterr().out.strip().endswith("merged")
    merged_dir = tmp_path / "merged"
    assert not (merged_dir / "adapter_config.json").exists()
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["use_cache"] is True and "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())

    from peft import AutoPeftModelForCausalLM

    adapter = AutoPeftModelForCausalLM.from_pretrained(run_dir / "final")
    base = AutoModelForCausalLM.from_pretrained(adapter.peft_config["default"].base_model_name_or_path)
    assert torch.allclose(logits(merged, ids), logits(adapter, ids), atol=1e-5)
    assert not torch.allclose(logits(merged, ids), logits(base, ids), atol=1e-4)  # the adapter did something
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(merged_dir).pad_token == "<pad>"


def test_adapter_export_loads_with_peft(lora_run, tmp_path, ids):
    run_dir, _ = lora_run
    path = export_run(run_dir, output=tmp_path / "adapter")
    assert (path / "adapter_config.json").is_file() and not (path / "config.json").exists()
    from peft import AutoPeftModelForCausalLM

    reloaded = AutoPeftModelForCausalLM.from_pretrained(path)
    original = AutoPeftModelForCausalLM.from_pretrained(run_dir / "final")
    assert torch.allclose(logits(reloaded, ids), logits(original, ids))


def test_checkpoint_export_carries_the_checkpoint_weights(lora_run, tmp_path, ids):
    run_dir, _ = lora_run
    step3 = export_run(run_dir, merge=True, checkpoint="3", output=tmp_path / "m3", dtype="bf16")
    model3 = AutoModelForCausalLM.from_pretrained(step3)
    assert next(model3.parameters()).dtype == torch.bfloat16
    policy, _ = load_run_model(run_dir, "step_000003")
    saved = load_file(run_dir / "checkpoints" / "step_000003" / "policy.safetensors")
    params = dict(policy.named_parameters())
    assert all(torch.equal(params[n].detach(), t) for n, t in saved.items())
    assert torch.allclose(logits(model3, ids), logits(policy, ids), atol=0.05)
    latest = AutoModelForCausalLM.from_pretrained(export_run(run_dir, merge=True, checkpoint="latest",
                                                             output=tmp_path / "m6"))
    final = AutoModelForCausalLM.from_pretrained(export_run(run_dir, merge=True, output=tmp_path / "final"))
    assert torch.allclose(logits(latest, ids), logits(final, ids), atol=1e-5)  # step 6 is the final model
    assert not torch.allclose(logits(model3.float(), ids), logits(latest, ids), atol=1e-4)


def test_full_finetune_export_from_final(tiny_cfg, tmp_path, ids):
    from rlhf.trainers import Trainer

    trainer = Trainer(tiny_cfg("train.steps=1", "checkpoint.save_final=true", "log.trackers=[]",
                               "reward.functions=[{fn: contains_answer}]"))
    trainer.train()
    path = export_run(trainer.out, merge=True)
    assert path == trainer.out / "export" / "model"
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(path), ids), logits(trainer.unwrapped.cpu(), ids),
                          atol=1e-5)


def test_export_errors_name_the_missing_piece(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        export_run(tmp_path)
    from rlhf.trainers import Trainer

    trainer = Trainer(tiny_cfg("train.steps=1", "log.trackers=[]"))
    trainer.train()
    with pytest.raises(FileNotFoundError, match="--checkpoint latest"):
        export_run(trainer.out)
    with pytest.raises(FileNotFoundError, match="checkpoint 'step_9' not found"):
        export_run(trainer.out, checkpoint="step_9")
    with pytest.raises(SystemExit, match="--checkpoint latest"):
        main(["export", str(trainer.out)])


@requires_vllm
def test_merged_export_loads_in_vllm(tiny_vllm_model_dir, tiny_cfg, tmp_path, monkeypatch):
    """A merged LoRA export serves in vLLM (the tiny vLLM model: CPU attention needs head_dim >= 32)."""
    from rlhf.trainers import Trainer

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    trainer = Trainer(tiny_cfg(f"model.path={tiny_vllm_model_dir}", "model.lora.enabled=true", "model.lora.r=4",
                               "train.steps=1", "checkpoint.save_final=true", "log.trackers=[]"))
    trainer.train()
    path = export_run(trainer.out, merge=True, output=tmp_path / "merged")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), distributed_executor_backend="uni", enforce_eager=True, max_model_len=64)
    out = llm.generate(["What is 1 + 2 ?"], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) >= 1
