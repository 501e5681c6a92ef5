"""Layout checks that need no second process: refused combinations and the DeepSpeed config the trainer fills."""
from types import SimpleNamespace

import pytest

from rlhf.config import Config, ConfigError
from rlhf.trainers import distributed as dist


def fake_acc(zero_stage: int = 2, num_processes: int = 2):
    plugin = SimpleNamespace(zero_stage=zero_stage, deepspeed_config={"zero_optimization": {"stage": zero_stage}})
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=num_processes)


@pytest.mark.parametrize("mode", ["zero2", "zero3", "fsdp2"])
def test_natural_gradient_updates_are_refused_when_sharded(mode):
    cfg = Config()
    cfg.algo.update = "trpo"
    with pytest.raises(ConfigError, match="algo.update=trpo .* one process or DDP"):
        dist.check_layout(cfg, fake_acc(), mode)
    cfg.algo.update = "adamw"
    cfg.model.lora.enabled = mode == "zero2"  # LoRA with ZeRO-2 is fine
    dist.check_layout(cfg, fake_acc(), mode)


@pytest.mark.parametrize("mode", ["zero3", "fsdp2"])
def test_lora_is_refused_with_sharded_weights(mode):
    cfg = Config()
    cfg.model.lora.enabled = True
    with pytest.raises(ConfigError, match="model.lora.enabled=true with " + mode):
        dist.check_layout(cfg, fake_acc(3), mode)


def test_deepspeed_config_follows_the_rlhf_config():
    cfg = Config()
    cfg.train.micro_batch_size, cfg.train.max_grad_norm = 4, 0.5
    acc = fake_acc(num_processes=8)
    dist.configure_deepspeed(cfg, acc)
    ds = acc.state.deepspeed_plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 32
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5


def test_seed_per_prompt_needs_the_hf_engine():
    cfg = Config()
    cfg.generation.seed_per_prompt = True
    cfg.generation.engine = "vllm"
    with pytest.raises(ConfigError, match="seed_per_prompt=true needs generation.engine=hf"):
        cfg.validate()
