"""Generation engines behind one protocol; `ENGINES[name](model, tokenizer, cfg)` builds one.

An engine registered with `bf16_casts=True` also takes `casts` (rlhf.models.precision.Bf16Casts): where
it casts the policy's weights to bf16 at every sync (the HF engine's decode loop), it hands them over there.

Each entry declares in its metadata what it offers and needs: `sampler_logps` (the engine
returns the sampled tokens' log-probs, of the distribution actually sampled, so the trainer always
asks for them and logs the sampler/trainer gap, `engine/logp_gap_*`) and `requires` (an optional
package). The HF engine's decode loop computes them anyway; its `generate` fallback keeps the scores.
"""
from rlhf.engine.base import GenerationEngine, Rollouts, SamplingParams
from rlhf.registry import Registry

ENGINES: Registry = Registry("generation engine")


@ENGINES.register("hf", bf16_casts=True)
def _hf(model, tokenizer, cfg, casts=None):
    from rlhf.engine.hf import HFEngine

    return HFEngine(model, tokenizer, cfg, casts)


@ENGINES.register("vllm", requires="vllm")
def _vllm(model, tokenizer, cfg):
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
