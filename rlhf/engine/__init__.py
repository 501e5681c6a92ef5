"""Generation engines behind one protocol; `ENGINES[name](model, tokenizer, cfg)` builds one.

Each entry declares in its metadata what it offers and needs: `sampler_logps` (the engine
returns the sampled tokens' log-probs at no extra cost, so the trainer always asks for them and
logs the sampler/trainer gap) and `requires` (an optional package).
"""
from rlhf.engine.base import GenerationEngine, Rollouts, SamplingParams
from rlhf.registry import Registry

ENGINES: Registry = Registry("generation engine")


@ENGINES.register("hf")
def _hf(model, tokenizer, cfg):
    from rlhf.engine.hf import HFEngine

    return HFEngine(model, tokenizer, cfg)


@ENGINES.register("vllm", sampler_logps=True, requires="vllm")
def _vllm(model, tokenizer, cfg):
    from rlhf.engine.vllm import VLLMEngine  # vllm itself is imported only when the engine is built

    return VLLMEngine(model, tokenizer, cfg)


__all__ = ["ENGINES", "GenerationEngine", "Rollouts", "SamplingParams"]
