"""Models: loading (local dirs, the embedded SmolLM2), LoRA wrapping, memory-lean log-probs."""
