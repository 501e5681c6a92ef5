"""Generation engines behind one protocol; `ENGINES[name](model, tokenizer, cfg, casts)` builds one.

`casts` (rlhf.models.precision.Bf16Casts, or None) is where an engine that casts the policy's weights
to bf16 at every sync hands those casts to the trainer (the HF engine's decode loop); others ignore it.

Each entry declares in its metadata what it offers and needs: `sampler_logps` (the engine
returns the sampled tokens' log-probs at no extra cost, so the trainer always asks for them and
logs the sampler/trainer gap) and `requires` (an optional package).
"""
from rlhf.engine.base import GenerationEngine, Rollouts, SamplingParams
from rlhf.registry import Registry

ENGINES: Registry = Registry("generation engine")


@ENGINES.register("hf")
def _hf(model, tokenizer, cfg, casts=None):
    from rlhf.engine.hf import HFEngine

    return HFEngine(model, tokenizer, cfg, casts)


@ENGINES.register("vllm", sampler_logps=True, requires="vllm")
def _vllm(model, tokenizer, cfg, casts=None):
    from rlhf.engine.vllm import VLLMEngine  # vllm itself is imported only when the engine is built

    return VLLMEngine(model, tokenizer, cfg)


def check_engine(cfg) -> None:
    """`generation.engine` is registered and its package installed; a ConfigError says what to do."""
    import importlib.util

    from rlhf.config import ConfigError

    name = cfg.generation.engine
    try:
        ENGINES.get(name)
    except ValueError as e:
        raise ConfigError(f"generation.engine: {e}") from None
    needs = ENGINES.meta(name).get("requires")
    if needs and importlib.util.find_spec(needs) is None:
        raise ConfigError(f"generation.engine={name} needs the '{needs}' package, which is not installed "
                          f"(pip install 'rlhf[{needs}]'; on a CPU machine `make setup` installs its CPU build)")


__all__ = ["ENGINES", "GenerationEngine", "Rollouts", "SamplingParams", "check_engine"]
