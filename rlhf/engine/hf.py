"""Generation in the training process: our own decode loop (rlhf.engine.decode) on a bf16 copy where it applies,
`transformers.generate` otherwise (works everywhere)."""
from __future__ import annotations

import contextlib
import zlib
from typing import Optional

import torch
import transformers

from rlhf.engine.base import Rollouts, SamplingParams
from rlhf.engine.decode import FusedDecoder, fast_sampling, left_pad, sample
from rlhf.engine.weights import hf_weights
from rlhf.models.loading import inference_copy
from rlhf.models.lora import is_peft
from rlhf.models.precision import Bf16Casts, autocast


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids]
    return {i for i in ids + [tokenizer.eos_token_id] if i is not None}


def split_completions(out_NT: torch.Tensor, eos: set[int]) -> tuple[list[list[int]], list[bool]]:
    """Cut each generated row after its first EOS; rows without EOS were truncated."""
    completions, finished = [], []
    for row in out_NT.tolist():
        cut = next((i for i, tok in enumerate(row) if tok in eos), None)
        completions.append(row if cut is None else row[: cut + 1])
        finished.append(cut is not None)
    return completions, finished


@contextlib.contextmanager
def contiguous_head_input(model: torch.nn.Module):
    """Make the output layer's input contiguous while `generate` runs.

    generate feeds lm_head the last position's slice of the hidden states, [B, 1, H] with a
    stride of T*H: with a frozen lm_head (an inference copy, a LoRA base) torch's matmul then runs a
    bmm over the weight expanded per sequence (SmolLM2, 16 sequences: +0.9 GB and +1.4 s per call
    on CPU) instead of one matmul. A contiguous copy of the slice costs B*H numbers.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


class HFEngine:
    """Batched left-padded sampling from the policy itself or from a copy of its own, refreshed by `update_weights`.

    A copy is kept for bf16 compute over fp32 weights (a bf16 copy: one 2-byte copy per step instead of re-casting
    every weight at every decoding step under autocast), for asynchronous rollouts (the policy trains meanwhile)
    and for LoRA (a plain copy of the base architecture with the adapter merged: peft's extra matmuls per layer
    cost more than the merge). The copy of a Llama- or Qwen2-family model decodes on CPU through our own loop
    (rlhf.engine.decode), which also offers its bf16 casts of the policy's weights to `casts`
    (rlhf.models.precision.Bf16Casts) when the trainer gives one; everything else runs `generate`. Full fine-tuning
    in fp32 and synchronous samples from the policy itself.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, cfg, casts: Optional[Bf16Casts] = None):
        self.tokenizer = tokenizer
        self.compute_dtype = cfg.model.compute_dtype
        self.pad_id = tokenizer.pad_token_id
        self.eos = eos_ids(model, tokenizer)
        # asynchronous rollouts sample while the policy trains: from weights of the engine's own
        self.private = cfg.train.max_staleness > 0
        # LoRA: a plain copy of the base architecture with the adapter merged in (peft's forward adds two small
        # matmuls per layer and keeps generate off the decode loop: 1.9 s vs 0.8 s per step measured here)
        self.lora = is_peft(model)
        fp32_weights = any(p.dtype == torch.float32 for p in model.parameters())
        self.copy_weights = self.compute_dtype == "bf16" and fp32_weights or self.private or self.lora
        dtype = torch.bfloat16 if self.compute_dtype == "bf16" else torch.float32
        if self.lora:
            self.model = inference_copy(model.get_base_model(), dtype, load=False)
            self._copy_merged(model)
        else:
            self.model = inference_copy(model, dtype) if self.copy_weights else model
        # packed from the policy, whose embedding it also reads (unless the copy keeps its own)
        own = self.private or self.lora
        use_decoder = self.copy_weights and FusedDecoder.supports(self.model)
        source, casts = (self.model, None) if self.lora else (model, casts)
        self.decoder = FusedDecoder(self.model, source, casts, own_embedding=own) if use_decoder else None
        if self.decoder is not None and not self.lora:  # a LoRA copy keeps its merged weights: it is what packs
            self.decoder.drop_model_weights()  # the copy keeps its norms only
        self.seed_per_prompt, self.seed, self.calls = cfg.generation.seed_per_prompt, cfg.train.seed, 0
        # the decode loop has the sampled tokens' log-probs at hand; `generate` would keep [N, T, vocab] scores
        self.free_logps = self.decoder is not None

    @torch.no_grad()
    def _copy_merged(self, model: torch.nn.Module) -> None:
        """The LoRA policy's weights, adapter merged (W + scale B A, one layer at a time), into the plain copy."""
        params = dict(self.model.named_parameters())
        for name, t in hf_weights(model):
            params[name].copy_(t)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams,
                 return_logps: bool = False) -> Rollouts:
        self.calls += 1
        if not self.seed_per_prompt:
            return self._generate(prompt_ids, n, sampling, return_logps)
        parts, seen = [], {}
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        for ids in prompt_ids:  # the seed depends only on the prompt (and its repeats), not on its neighbours
            repeat = seen[tuple(ids)] = seen.get(tuple(ids), -1) + 1
            key = f"{self.seed}:{self.calls}:{repeat}:{','.join(map(str, ids))}".encode()
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(zlib.crc32(key))
                parts.append(self._generate([ids], n, sampling, return_logps))
        return Rollouts(
            prompt_ids=[p for r in parts for p in r.prompt_ids],
            completion_ids=[c for r in parts for c in r.completion_ids],
            finished=[f for r in parts for f in r.finished],
            sampler_logps=None if not return_logps else [lp for r in parts for lp in r.sampler_logps],
        )

    def _generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, return_logps: bool) -> Rollouts:
        prompts_N = [p for p in prompt_ids for _ in range(n)]
        if self.decoder is not None:
            tokens_NT, logp_NT = sample(self.decoder, prompt_ids, n, sampling, self.eos, self.pad_id)
            completions, finished = split_completions(tokens_NT, self.eos)
            logps = [logp_NT[i, : len(c)].tolist() for i, c in enumerate(completions)] if return_logps else None
            return Rollouts(prompt_ids=prompts_N, completion_ids=completions, finished=finished, sampler_logps=logps)
        model = self.model
        device = next(model.parameters()).device
        ids_BP, mask_BP = left_pad(prompt_ids, self.pad_id, device)
        gen_cfg = transformers.GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_p=sampling.top_p if not sampling.greedy else None,
            top_k=sampling.top_k if not sampling.greedy else None,
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=1 if sampling.greedy else n,  # greedy samples are all equal
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos),
            return_dict_in_generate=True,
            output_scores=return_logps,
        )
        was_training = model.training
        model.eval()
        try:
            with autocast(self.compute_dtype, device), fast_sampling(device), contiguous_head_input(model):
                out = model.generate(input_ids=ids_BP, attention_mask=mask_BP, generation_config=gen_cfg)
        finally:
            model.train(was_training)
        gen_NT = out.sequences[:, ids_BP.shape[1]:].cpu()
        if sampling.greedy and n > 1:
            gen_NT = gen_NT.repeat_interleave(n, 0)
            out.scores = tuple(s.repeat_interleave(n, 0) for s in out.scores) if out.scores else out.scores
        completions, finished = split_completions(gen_NT, self.eos)
        logps = None
        if return_logps:
            # out.scores: per step [N, V] after temperature/top-p/top-k warping = the sampling distribution
            scores_NTV = torch.stack(out.scores, dim=1).float().cpu()
            logp_NT = torch.log_softmax(scores_NTV, -1).gather(-1, gen_NT.unsqueeze(-1)).squeeze(-1)
            logps = [logp_NT[i, : len(c)].tolist() for i, c in enumerate(completions)]
        return Rollouts(prompt_ids=prompts_N, completion_ids=completions, finished=finished, sampler_logps=logps)

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        if not self.copy_weights:
            self.model = model  # generation runs on the policy itself
            return
        if self.lora:
            self._copy_merged(model)
            if self.decoder is not None:
                self.decoder.load(self.model)
            return
        src = dict(model.named_parameters())
        packed = self.decoder.packed_names if self.decoder is not None else set()
        for name, p in self.model.named_parameters():
            if name not in packed:
                p.copy_(src[name])
        if self.decoder is not None:
            self.decoder.load(model)  # packed straight from the policy's weights

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass
