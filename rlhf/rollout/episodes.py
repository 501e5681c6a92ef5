"""Multi-turn episodes: G per prompt, the model and an environment (or tools) taking turns, token-in token-out.

    completions = run_episodes(spec, engine, batch, G, sampling, return_logps)

Each turn, every episode still running is continued by the engine from its own tokens (the first turn of a
group shares its prompt's prefill). The model's tokens are kept exactly as sampled; when its turn calls tools,
their results are rendered through the chat template and appended as the template's token difference
(rlhf.envs.chat), with action mask 0 and no log-prob. An episode ends when the model answers without a tool
call, at `env.max_turns`, when a turn is cut at generation.max_new_tokens, or when a tool result would overflow
`env.max_tokens` (the result is dropped, as TRL does). A raising or hanging tool and a malformed call are
answered with an error message and counted; a raising `reset` or `get_reward` stops the run naming the row.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from rlhf.calls import call
from rlhf.envs import (
    TOOL_PARSERS,
    ChatFormat,
    EnvError,
    MalformedCall,
    Tool,
    describe,
    environment_tools,
    load_environment,
    load_object,
    run_tool,
)
from rlhf.envs.hooks import Generate, HookResult
from rlhf.rollout.samples import Completions

STATS = ("episodes", "turns", "tool_calls", "tool_errors", "tool_timeouts", "malformed_calls", "overflows", "truncated",
         "model_tokens", "env_tokens")


@dataclass
class EpisodeSpec:
    """What episodes need besides the engine: the chat format, where tools come from, the budgets."""

    chat: ChatFormat
    cfg: Any  # rlhf.config.EnvConfig
    factory: Optional[Callable] = None  # the environment class: one instance per episode
    tools: list[Tool] = field(default_factory=list)  # plain function tools
    parser: Optional[Callable[[str], list]] = None  # rlhf.envs.TOOL_PARSERS entry
    hook: Optional[Callable] = None  # a rollout hook (rlhf.envs.hooks) instead of the tool loop
    data_name: str = "data"


@dataclass
class Episode:
    env: Any
    row: int  # the dataset row, for errors
    prompt: Any
    prompt_ids: list[int]
    tools: dict[str, Tool]
    messages: list[dict] = field(default_factory=list)  # after the prompt
    ids: list[int] = field(default_factory=list)  # the model's and the environment's tokens
    mask: list[int] = field(default_factory=list)  # 1: sampled by the model
    logps: list[float] = field(default_factory=list)
    done: bool = False
    finished: bool = True  # False: a budget ended it
    reward: Optional[float] = None  # from a rollout hook
    stats: dict = field(default_factory=lambda: dict.fromkeys(STATS, 0))


def build_episodes(cfg, tokenizer, factory=None, tools=None, rollout_fn=None) -> Optional[EpisodeSpec]:
    """Multi-turn episodes from `env.*` (or the Python objects that replace them), or None for single-turn
    sampling. The chat template is checked for prefix preservation before anything trains on it."""
    e = cfg.env
    factory = factory if factory is not None else (load_environment(e.factory) if e.factory else None)
    tools = list(tools) if tools is not None else [load_object(t, "tool") for t in e.tools]
    hook = rollout_fn if rollout_fn is not None else (load_object(e.rollout_fn, "rollout hook") if e.rollout_fn
                                                      else None)
    if factory is None and not tools and hook is None:
        return None
    parser = TOOL_PARSERS.get(e.tool_parser) if ":" not in e.tool_parser else load_object(e.tool_parser, "tool parser")
    tools = [describe(t) for t in tools]
    probe = environment_tools(factory()) if factory is not None else []  # one instance shows the methods' schemas
    chat = ChatFormat(tokenizer, tools + probe, e.tool_format, e.result_role)
    if hook is None:
        chat.check_prefix_preserving()
    return EpisodeSpec(chat, e, factory, tools, parser, hook, cfg.data.train)


def episode_rewards(spec: Optional[EpisodeSpec]) -> list[tuple[Callable, float]]:
    """The reward sources episodes bring, beside `reward.functions`: an environment's get_reward (named after its
    class) or a rollout hook's reward (named after the hook), each of weight 1, as TRL does."""
    owner = None if spec is None else (spec.hook or (spec.factory if callable(getattr(spec.factory, "get_reward", None))
                                                     else None))
    if owner is None:
        return []

    def reward(env_reward, **kwargs):
        return env_reward

    reward.__name__ = owner.__name__
    return [(reward, 1.0)]


def _env_call(ep: Episode, spec: EpisodeSpec, method: str, kwargs: dict) -> Any:
    try:
        return call(getattr(ep.env, method), kwargs, spec.cfg.tool_timeout_s)
    except Exception as e:  # noqa: BLE001 - the user's environment can raise anything
        raise EnvError(f"environment {type(ep.env).__name__}.{method} failed on {spec.data_name} row {ep.row}: "
                       f"{type(e).__name__}: {e}") from e


def _start(spec: EpisodeSpec, prompt: Any, row: int, columns: dict) -> Episode:
    env = spec.factory() if spec.factory is not None else None
    ep = Episode(env, row, prompt, [], {t.name: t for t in spec.tools})
    text = _env_call(ep, spec, "reset", {"prompt": prompt, **columns}) if env is not None else None
    if env is not None:
        ep.tools.update({t.name: t for t in environment_tools(env)})
    ep.prompt_ids = spec.chat.prompt_ids(spec.chat.prompt_messages(prompt, text))
    return ep


def cut_at_stop(tokens: list[int], tokenizer, stops: list[str]) -> Optional[int]:
    """The length of the shortest prefix of `tokens` whose text holds one of `stops`, or None."""
    if not stops or not any(s in tokenizer.decode(tokens) for s in stops):
        return None
    return next(k for k in range(1, len(tokens) + 1) if any(s in tokenizer.decode(tokens[:k]) for s in stops))


def _take_turn(ep: Episode, spec: EpisodeSpec, tokens: list[int], logps: Optional[list[float]], finished: bool,
               tokenizer, last_turn: bool) -> None:
    """Append one sampled turn (cut after a stop string: the model's tokens up to it, exactly as sampled), then answer
    its tool calls (or end the episode)."""
    cut = cut_at_stop(tokens, tokenizer, spec.cfg.stop) if ep.tools else None
    if cut is not None:
        tokens, logps, finished = tokens[:cut], (logps[:cut] if logps is not None else None), True
    ep.ids += tokens
    ep.mask += [1] * len(tokens)
    ep.logps += logps if logps is not None else [0.0] * len(tokens)
    ep.stats["turns"] += 1
    ep.stats["model_tokens"] += len(tokens)
    ep.messages.append({"role": "assistant", "content": tokenizer.decode(tokens, skip_special_tokens=True)})
    if not finished:  # cut at generation.max_new_tokens (or the episode's budget): the turn never ended
        ep.done, ep.finished = True, False
        return
    if not ep.tools:
        ep.done = True
        return
    try:
        calls = spec.parser(ep.messages[-1]["content"])
        replies = []
    except MalformedCall as e:
        ep.stats["malformed_calls"] += 1
        calls, replies = [], [spec.chat.result_message("error", f"error: malformed tool call: {e}")]
    if not calls and not replies:
        ep.done = True  # an answer without tool calls ends the episode
        return
    if last_turn:  # env.max_turns: no turn is left to read a result, so the calls are not made
        ep.done, ep.finished = True, False
        return
    for c in calls:
        result = run_tool(ep.tools, c.name, c.arguments, spec.cfg.tool_timeout_s)
        ep.stats["tool_calls"] += 1
        ep.stats["tool_errors"] += result.status == "error"
        ep.stats["tool_timeouts"] += result.status == "timeout"
        replies.append(spec.chat.result_message(result.name, result.content))
    env_ids = spec.chat.env_ids(replies, ep.ids[-1] if ep.ids else None)
    if len(ep.ids) + len(env_ids) >= spec.cfg.max_tokens:  # the result would overflow the episode: drop it, end
        ep.stats["overflows"] += 1
        ep.done, ep.finished = True, False
        return
    ep.ids += env_ids
    ep.mask += [0] * len(env_ids)
    ep.logps += [0.0] * len(env_ids)
    ep.stats["env_tokens"] += len(env_ids)
    ep.messages += replies


def run_episodes(spec: EpisodeSpec, engine, tokenizer, batch, G: int, sampling, return_logps: bool) -> Completions:
    """G episodes for each prompt of `batch` (rlhf.data.PromptBatch), prompt-major."""
    eps = []
    for b, prompt in enumerate(batch.prompts):
        columns = {k: v[b] for k, v in batch.columns.items()}
        eps += [_start(spec, prompt, batch.rows[b], columns) for _ in range(G)]
    if spec.hook is not None:
        for ep in eps:
            _run_hook(ep, spec, engine, tokenizer, sampling, return_logps)
    for turn in range(spec.cfg.max_turns):
        active = [e for e in eps if not e.done]
        if not active:
            break
        budgets = {}
        for e in active:
            budgets.setdefault(min(sampling.max_new_tokens, spec.cfg.max_tokens - len(e.ids)), []).append(e)
        for budget, group in budgets.items():
            if budget < 1:
                for e in group:
                    e.done, e.finished = True, False
                continue
            # a group's first turn: one prefill per prompt, shared by its G episodes (as single-turn sampling does)
            shared = turn == 0 and len(group) == len(eps) and all(
                eps[i].prompt_ids == eps[i - i % G].prompt_ids for i in range(len(eps)))
            prompts = [e.prompt_ids for e in group[::G]] if shared else [e.prompt_ids + e.ids for e in group]
            out = engine.generate(prompts, G if shared else 1, replace(sampling, max_new_tokens=budget),
                                  return_logps=return_logps)
            for i, e in enumerate(group):
                logps = out.sampler_logps[i] if out.sampler_logps is not None else None
                _take_turn(e, spec, out.completion_ids[i], logps, out.finished[i], tokenizer,
                           turn == spec.cfg.max_turns - 1)
    return _completions(eps, spec, tokenizer, return_logps)


def _run_hook(ep: Episode, spec: EpisodeSpec, engine, tokenizer, sampling, return_logps: bool) -> None:
    generate = Generate(engine, sampling, spec.cfg.max_tokens)
    result = HookResult.of(spec.hook(prompt_ids=ep.prompt_ids, prompt=ep.prompt, generate=generate,
                                     tokenizer=tokenizer), spec.hook)
    ep.ids, ep.mask, ep.logps, ep.reward = result.completion_ids, result.loss_mask, result.logprobs, result.reward
    ep.messages = result.messages or [{"role": "assistant",
                                       "content": tokenizer.decode(ep.ids, skip_special_tokens=True)}]
    ep.finished, ep.done = result.finished, True
    ep.stats.update(turns=generate.calls, model_tokens=sum(ep.mask), env_tokens=len(ep.mask) - sum(ep.mask))


def _completions(eps: list[Episode], spec: EpisodeSpec, tokenizer, return_logps: bool) -> Completions:
    stats = {k: float(sum(e.stats[k] for e in eps)) for k in STATS}
    stats["episodes"], stats["truncated"] = float(len(eps)), float(sum(not e.finished for e in eps))
    columns: dict = {"environments": [e.env for e in eps]}
    if spec.factory is not None and callable(getattr(spec.factory, "get_reward", None)):
        columns["env_reward"] = [_env_call(e, spec, "get_reward", {}) for e in eps]
    if spec.hook is not None:
        columns["env_reward"] = [e.reward for e in eps]
    texts = ["".join(f"[{m['role']}] {m['content']}\n" for m in e.messages).rstrip() for e in eps]
    return Completions(
        prompts=[e.prompt for e in eps], prompt_ids=[e.prompt_ids for e in eps], completion_ids=[e.ids for e in eps],
        completions=[list(e.messages) for e in eps], texts=texts, finished=[e.finished for e in eps],
        sampler_logps=[e.logps for e in eps] if return_logps else None, action_masks=[e.mask for e in eps],
        transcripts=[e.messages for e in eps], columns=columns, stats=stats,
    )
