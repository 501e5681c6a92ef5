"""Environments and tools for multi-turn episodes, with TRL's contract so a TRL user's environment runs unchanged:

    class Lookup:                                    # one instance per episode
        def reset(self, **row) -> str | None: ...    # the row's columns; returned text is added to the prompt
        def lookup(self, item: str) -> str:          # a public method with type hints and a docstring: a tool
            '''Look up an item's code.

            Args:
                item: The item's name.
            '''
        def get_reward(self) -> float: ...           # optional (sync or async): the environment owns a reward

Plain functions are tools too (`env.tools`). For loops that are not tool calls (games, simulated users), a
rollout hook drives the engine itself (`rlhf.envs.hooks`). Recipes name them like reward functions:
`module.path:Class` or `path/to/file.py:Class`.
"""
from __future__ import annotations

from typing import Any, Callable

from rlhf.envs.chat import ChatFormat, TemplateDriftError
from rlhf.envs.parsing import TOOL_PARSERS, MalformedCall, ToolCall
from rlhf.envs.tools import Tool, describe, environment_tools, run_tool
from rlhf.errors import UserError


class EnvError(UserError):
    """An environment's reset or get_reward raised; the message names the class and the dataset row."""


def load_object(spec: str, what: str) -> Any:
    """`module.path:name` or `path/to/file.py:name` (as reward functions are named)."""
    from rlhf.rewards.registry import load_reward_fn

    if ":" not in spec:
        raise UserError(f"{what} '{spec}': name it as module.path:name or path/to/file.py:name")
    try:
        return load_reward_fn(spec)
    except UserError as e:
        raise UserError(str(e).replace("reward function", what)) from None


def load_environment(spec: str) -> Callable:
    """The environment class (or factory) named by `spec`; it must define `reset`."""
    factory = load_object(spec, "environment")
    if not callable(getattr(factory, "reset", None)):
        raise UserError(f"environment '{spec}' has no reset method (an environment class defines reset(**row))")
    return factory


__all__ = ["ChatFormat", "EnvError", "MalformedCall", "TOOL_PARSERS", "TemplateDriftError", "Tool", "ToolCall",
           "describe", "environment_tools", "load_environment", "load_object", "run_tool"]
