"""Adapter-only LoRA sync for vLLM: the engine loads each version of the adapter by name (no merged reload);
its greedy output follows the trained policy version after version, and a stale or wrong adapter fails."""
import pytest

from rlhf.config import load_config
from rlhf.engine import ENGINES
from rlhf.engine.sync_check import check_sync
from rlhf.models.loading import load_policy, load_tokenizer
from tests.conftest import requires_vllm
from tests.engine.test_vllm_engine import PROMPTS, perturb

pytestmark = [pytest.mark.slow, requires_vllm]


@pytest.fixture(scope="module")
def lora_setup(tiny_vllm_model_dir):
    cfg = load_config(None, [f"model.path={tiny_vllm_model_dir}", "model.compute_dtype=fp32", "model.lora.enabled=true",
                             "model.lora.r=8", "generation.engine=vllm", "generation.vllm.kv_cache_gb=0.25",
                             "train.max_staleness=1"])
    model, tokenizer = load_policy(cfg.model), load_tokenizer(str(tiny_vllm_model_dir))
    engine = ENGINES.get("vllm")(model, tokenizer, cfg)
    yield engine, model, tokenizer
    engine.close()


def test_adapter_sync_follows_two_versions_and_a_stale_or_wrong_adapter_fails(lora_setup):
    from vllm.lora.request import LoRARequest

    engine, model, tokenizer = lora_setup
    assert engine.adapter_sync and engine.lora is None  # the base serves the untrained (zero) adapter
    assert check_sync(engine, model, tokenizer, PROMPTS, 12).ok()
    adapter = [p for n, p in model.named_parameters() if "lora_" in n]
    for version in (1, 2):
        perturb(adapter, scale=0.5, seed=version)
        stale = check_sync(engine, model, tokenizer, PROMPTS, 12)
        assert not stale.ok(), f"version {version}: the stale adapter passed ({stale})"
        engine.update_weights(model)
        report = check_sync(engine, model, tokenizer, PROMPTS, 12)
        assert report.ok(), f"version {version}: {report}"
        assert engine.lora.lora_name == f"rlhf-policy-v{version}" and engine.lora.lora_int_id == version
    assert [v for v, _ in engine.adapters] == [1, 2]  # max_staleness 1: the two versions that can be in flight
    current = engine.lora
    engine.lora = LoRARequest("rlhf-policy-v1", 1, str(engine.adapters[0][1]))  # a wrong (older) adapter
    assert not check_sync(engine, model, tokenizer, PROMPTS, 12).ok()
    engine.lora = current
    perturb(adapter, scale=0.5, seed=3)
    engine.update_weights(model)  # version 3: version 1 leaves vLLM and the disk
    assert [v for v, _ in engine.adapters] == [2, 3] and check_sync(engine, model, tokenizer, PROMPTS, 12).ok()
    assert not any(p.exists() for p in [engine.adapter_root / "v1"])
