"""The lower-level rollout hook, for loops that are not tool calls (games, simulated users, code agents):

    def my_rollout(prompt_ids, prompt, generate, tokenizer) -> dict:
        ids, logps, mask = [], [], []
        turn = generate(prompt_ids)                       # the policy continues these tokens
        ids += turn.ids; logps += turn.logprobs; mask += [1] * len(turn.ids)
        feedback = tokenizer("\\nTry again: ", add_special_tokens=False)["input_ids"]
        ids += feedback; logps += [0.0] * len(feedback); mask += [0] * len(feedback)   # not trained
        turn = generate(prompt_ids + ids)
        ...
        return {"completion_ids": ids, "logprobs": logps, "loss_mask": mask, "reward": 1.0}

It is called once per episode (G per prompt) with the prompt's tokens and raw prompt; `generate(ids,
max_new_tokens=None)` samples one continuation with the current policy and returns its tokens, the engine's
log-probs of them (of the distribution actually sampled) and whether it ended with EOS. The returned
`loss_mask` marks the model's own tokens (1); the others add context only (no loss, no KL, not time steps).
`reward` (or None) is a reward source of weight 1 named after the hook, beside `reward.functions`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from rlhf.errors import UserError


@dataclass
class Turn:
    ids: list[int]
    logprobs: list[float]
    finished: bool  # ended with EOS (False: cut at max_new_tokens)


class Generate:
    """The engine, one continuation at a time, for a rollout hook (within the episode's token budget)."""

    def __init__(self, engine, sampling, max_tokens: int):
        self.engine, self.sampling, self.max_tokens, self.calls = engine, sampling, max_tokens, 0

    def __call__(self, ids: list[int], max_new_tokens: Optional[int] = None) -> Turn:
        self.calls += 1
        n = min(max_new_tokens or self.sampling.max_new_tokens, self.sampling.max_new_tokens)
        out = self.engine.generate([list(ids)], 1, replace(self.sampling, max_new_tokens=max(1, n)), return_logps=True)
        return Turn(out.completion_ids[0], out.sampler_logps[0], out.finished[0])


@dataclass
class HookResult:
    completion_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    reward: Optional[float] = None
    messages: Optional[list[dict]] = None  # a transcript to show (default: the decoded tokens)
    finished: bool = True

    @classmethod
    def of(cls, out: Any, hook: Callable) -> "HookResult":
        """The hook's return value (a dict or a HookResult), checked: a UserError names the hook and the problem."""
        name = getattr(hook, "__name__", repr(hook))
        if isinstance(out, dict):
            try:
                out = cls(**out)
            except TypeError as e:
                raise UserError(f"rollout hook {name}: {e} "
                                "(return completion_ids, logprobs, loss_mask, reward)") from None
        if not isinstance(out, cls):
            raise UserError(f"rollout hook {name} returned {type(out).__name__}; expected a dict with completion_ids, "
                            "logprobs, loss_mask and reward")
        n = len(out.completion_ids)
        if len(out.logprobs) != n or len(out.loss_mask) != n or any(m not in (0, 1) for m in out.loss_mask):
            raise UserError(f"rollout hook {name}: completion_ids ({n}), logprobs ({len(out.logprobs)}) and loss_mask "
                            f"({len(out.loss_mask)}, of 0 and 1) must be lists of the same length")
        return out
