"""Generation engines behind one protocol; `ENGINES[name](model, tokenizer, cfg)` builds one."""
from rlhf.engine.base import GenerationEngine, Rollouts, SamplingParams
from rlhf.registry import Registry

ENGINES: Registry = Registry("generation engine")


@ENGINES.register("hf")
def _hf(model, tokenizer, cfg):
    from rlhf.engine.hf import HFEngine

    return HFEngine(model, tokenizer, cfg)


__all__ = ["ENGINES", "GenerationEngine", "Rollouts", "SamplingParams"]
