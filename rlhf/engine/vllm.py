"""Colocated in-process vLLM: sampling from token ids, weight sync after every optimizer step.

The engine lives in the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor
`uni`), so `llm.collective_rpc(fn)` runs `fn(worker)` right here and the new weights are
handed over as tensors, never through disk or a socket. Weight sync streams the policy's
HF-named weights (`rlhf.engine.weights`: full, or LoRA merged per layer) into
`worker.model_runner.reload_weights(..., is_checkpoint_format=True)`, which re-runs vLLM's own
checkpoint loading layer by layer (fusing q/k/v and gate/up, repacking for oneDNN on CPU), then
resets the prefix cache so no KV block computed with the old weights is reused.

Under `accelerate launch` with several processes every rank runs its own engine on its own
prompts (data parallel, as TRL's colocate mode): vLLM's `external_launcher` executor joins the
process group accelerate made (a tensor-parallel group of one per rank) instead of starting its
own, and each rank samples with seed `train.seed + rank`.

On CPU the KV cache size is `generation.vllm.kv_cache_gb`; on a GPU vLLM takes
`generation.vllm.gpu_memory_utilization` of its memory and, with `generation.vllm.sleep`,
releases it (weights and KV cache) between generation and the next weight sync so that training
has the GPU to itself.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch

from rlhf.engine.base import Rollouts, SamplingParams
from rlhf.engine.hf import eos_ids
from rlhf.engine.weights import cast, hf_weights
from rlhf.models.loading import resolve_model_path
from rlhf.models.lora import is_peft
from rlhf.models.precision import DTYPES

GiB = 1 << 30


def _lora_rank(model: torch.nn.Module) -> int:
    return int(getattr(model.peft_config[model.active_adapter], "r", 8))


def engine_dtype(cfg) -> torch.dtype:
    """vLLM's weight/compute dtype: `generation.vllm.dtype`, or the trainer's compute dtype ('auto')."""
    name = cfg.generation.vllm.dtype
    return DTYPES[cfg.model.compute_dtype if name == "auto" else name]


def max_model_len(model: torch.nn.Module, cfg) -> int:
    """Longest sequence the engine must hold: prompt budget + completion budget, within the model's positions."""
    budget = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(budget, limit) if limit else budget


def _benign_reload_warning(record: logging.LogRecord) -> bool:
    """Filter: drop "<layer>: Failed to load weights" at every sync for layers that have no weights of their
    own in a checkpoint (rotary caches; a tied lm_head, refreshed by `refresh_tied_lm_head`)."""
    return not (str(record.msg).endswith("Failed to load weights") and record.args
                and record.args[0] in ("RotaryEmbedding", "ParallelLMHead"))


@contextlib.contextmanager
def _keep_torch_threads():
    """vLLM's worker sets torch to 1 thread and disables `torch.set_num_threads` for the whole
    process (sound for a dedicated server, crippling for a trainer in the same process): undo both."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def refresh_tied_lm_head(vmodel: torch.nn.Module) -> None:
    """Rebuild a tied lm_head's kernel from the (reloaded) embedding it shares.

    vLLM never loads a tied `lm_head` (it shares `embed_tokens.weight`), so `reload_weights`
    updates the shared tensor but leaves the head's CPU GEMM kernel, prepacked from the old
    embedding at start-up, in place: logits would come from stale weights. Re-running the head's
    post-load processing repacks it (on GPU that processing is a no-op).
    """
    head = getattr(vmodel, "lm_head", None)
    embed = getattr(getattr(vmodel, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and head.weight is embed.weight:
        head.quant_method.process_weights_after_loading(head)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of the process group accelerate initialised, or (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class VLLMEngine:
    """`GenerationEngine` on an in-process vLLM `LLM` built from `model.path`."""

    free_logps = True  # the sampled token's log-prob only (logprobs=0)

    def __init__(self, model: torch.nn.Module, tokenizer, cfg):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the worker is reachable
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        # vLLM warms up a chat template it cannot render without its tokenizer (we pass token ids
        # and skip the tokenizer); that harmless failure is logged as a traceback: silence it.
        logging.getLogger("vllm.renderers.base").setLevel(logging.ERROR)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_benign_reload_warning)
        v = cfg.generation.vllm
        self.dtype = engine_dtype(cfg)
        self.eos = sorted(eos_ids(model, tokenizer))
        self.on_gpu = torch.cuda.is_available()
        self.sleep_mode = self.on_gpu and v.sleep
        memory = (
            {"gpu_memory_utilization": v.gpu_memory_utilization, "enable_sleep_mode": self.sleep_mode}
            if self.on_gpu else {"kv_cache_memory_bytes": int(v.kv_cache_gb * GiB)}
        )
        rank, self.world = distributed_rank()
        # LoRA, adapter sync: vLLM keeps the base weights and loads each version of the adapter by name; the
        # versions still in flight (train.max_staleness + 1) stay loaded
        self.adapter_sync = is_peft(model) and v.lora_sync == "adapter"
        self.keep_versions = cfg.train.max_staleness + 1
        self.adapters: list[tuple[int, Path]] = []  # (version, directory), oldest first
        self.lora = None  # the LoRARequest of the version in use (None: the base, as an untrained adapter)
        self.adapter_root = Path(tempfile.mkdtemp(prefix="rlhf-vllm-adapters-")) if self.adapter_sync else None
        # removed by close(), or with the engine, or at exit, whichever comes first
        self._remove_adapters = (weakref.finalize(self, shutil.rmtree, self.adapter_root, ignore_errors=True)
                                 if self.adapter_root is not None else lambda: None)
        lora = ({"enable_lora": True, "max_lora_rank": max(8, _lora_rank(model)), "max_loras": self.keep_versions}
                if self.adapter_sync else {})
        with _keep_torch_threads():
            self.llm = LLM(
                model=str(resolve_model_path(cfg.model.path)),
                skip_tokenizer_init=True,  # prompts go in and completions come out as token ids
                dtype=self.dtype,
                seed=cfg.train.seed + rank,
                max_model_len=max_model_len(model, cfg),
                enforce_eager=v.enforce_eager,
                enable_prefix_caching=True,
                logprobs_mode="processed_logprobs",  # log-probs of the distribution actually sampled
                # one process: vLLM's own one-rank group; several: join accelerate's (RANK, MASTER_ADDR... are set)
                distributed_executor_backend="external_launcher" if self.world > 1 else "uni",
                trust_remote_code=cfg.model.trust_remote_code,
                **memory, **lora,
            )
        self.asleep = False

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams,
                 return_logps: bool = False) -> Rollouts:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep: call wake() and update_weights(model) before generate()")
        params = VSamplingParams(
            n=1 if sampling.greedy else n,  # greedy samples are all equal
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=0 if sampling.greedy else sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=self.eos,  # the stop token stays in the output: completions end with EOS
            logprobs=0 if return_logps else None,  # 0: only the sampled token's log-prob
            detokenize=False,
        )
        start = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False,
                                    lora_request=self.lora)
        completions, finished, logps = [], [], []
        for out in outputs:  # in prompt order; each holds its samples
            samples = out.outputs * n if sampling.greedy else out.outputs
            for s in samples:
                ids = list(s.token_ids)
                completions.append(ids)
                finished.append(bool(ids) and ids[-1] in self.eos)
                if return_logps:
                    logps.append([step[tok].logprob for tok, step in zip(ids, s.logprobs)])
        prompts_N = [p for p in prompt_ids for _ in range(n)]
        return Rollouts(prompts_N, completions, finished, logps if return_logps else None,
                        timings={"vllm_generate_s": time.perf_counter() - start})

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Stream `model`'s HF-named weights (LoRA merged) into the engine, then drop cached prefixes; or (LoRA,
        adapter sync) hand vLLM the adapter alone under a new name."""
        if self.adapter_sync:
            self._load_adapter(model)
        else:
            self._reload(model)
        if self.asleep:  # weights are in place: bring back the KV cache
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def _reload(self, model: torch.nn.Module) -> None:
        weights = cast(hf_weights(model), self.dtype)

        def reload(worker) -> None:
            worker.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
            refresh_tied_lm_head(worker.model_runner.get_model())

        self.llm.collective_rpc(reload)
        self.llm.reset_prefix_cache()

    def _load_adapter(self, model: torch.nn.Module) -> None:
        """Save the adapter (a few MB) as version n + 1 and sample with it from now on. vLLM keys its prefix cache
        and its loaded LoRAs by the request's name and id: a new version never reuses an old version's KV blocks.
        Versions beyond the last `keep_versions` are removed from vLLM and from disk."""
        from vllm.lora.request import LoRARequest

        version = (self.adapters[-1][0] + 1) if self.adapters else 1
        path = self.adapter_root / f"v{version}"
        model.save_pretrained(path, safe_serialization=True)
        self.adapters.append((version, path))
        self.lora = LoRARequest(f"rlhf-policy-v{version}", version, str(path))
        while len(self.adapters) > self.keep_versions:
            old, old_path = self.adapters.pop(0)
            self.llm.llm_engine.remove_lora(old)
            shutil.rmtree(old_path, ignore_errors=True)

    def sleep(self) -> None:
        """GPU with `generation.vllm.sleep`: free the KV cache and the weights until the next sync. A full-weight
        sync refills the weights, so they are discarded (level 2); an adapter sync keeps the base, so it goes to
        CPU memory and comes back (level 1)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1 if self.adapter_sync else 2)
            self.asleep = True

    def wake(self) -> None:
        """Re-allocate the weights' memory (level 1: with their values); `update_weights` then restores the KV
        cache."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])

    def close(self) -> None:
        """Shut the engine down and release vLLM's process-wide state, so that another can start
        (its own one-process group; a group accelerate made stays up)."""
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        self._remove_adapters()
        destroy_model_parallel()
        if self.world == 1:
            destroy_distributed_environment()
