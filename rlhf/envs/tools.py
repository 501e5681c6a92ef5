"""Tools: plain functions (`tools=[fn]`) and an environment's public methods, with the JSON schema a chat
template renders (`transformers.utils.get_json_schema`: the name, type hints and the docstring's Args) and a
call that never crashes the run: a raising tool, a hanging one, an unknown name or bad arguments each come
back as an error message for the model, counted by kind.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from rlhf.calls import CallTimeout, call
from rlhf.errors import UserError

RESERVED = ("reset", "get_reward")  # environment methods that are not tools


class ToolDefinitionError(UserError):
    """A tool cannot be described to the model (no type hints or no docstring); the message names it."""


@dataclass
class Tool:
    name: str
    fn: Callable
    schema: dict  # {"type": "function", "function": {"name", "description", "parameters"}}


def describe(fn: Callable, owner: str = "") -> Tool:
    """The tool of a function or bound method; a ToolDefinitionError names it when transformers cannot build its
    schema (every argument needs a type hint and an `Args:` line in a Google-style docstring)."""
    from transformers.utils import get_json_schema

    where = f"{owner}.{fn.__name__}" if owner else getattr(fn, "__qualname__", repr(fn))
    try:
        schema = get_json_schema(fn)
    except Exception as e:  # noqa: BLE001 - transformers raises several kinds
        raise ToolDefinitionError(f"tool {where}: {e} "
                                  "(a tool needs type hints and a docstring with an Args section)") from None
    return Tool(fn.__name__, fn, schema)


def environment_tools(env: Any) -> list[Tool]:
    """The public methods of environment `env` (not `reset` or `get_reward`), as tools, in name order."""
    cls = type(env)
    names = [n for n, _ in inspect.getmembers(cls, predicate=inspect.isfunction)
             if not n.startswith("_") and n not in RESERVED]
    return [describe(getattr(env, n), cls.__name__) for n in names]


@dataclass
class ToolResult:
    name: str
    content: str
    status: str  # "ok", "error" (the tool raised, or no such tool / bad arguments) or "timeout"


def run_tool(tools: dict[str, Tool], name: str, arguments: dict, timeout_s: Optional[float]) -> ToolResult:
    """Call tool `name` with `arguments`; its return value as text (dicts and lists as JSON), or the error."""
    tool = tools.get(name)
    if tool is None:
        return ToolResult(name, f"error: no tool named {name!r} (tools: {', '.join(tools) or 'none'})", "error")
    try:
        inspect.signature(tool.fn).bind(**arguments)
    except TypeError as e:
        return ToolResult(name, f"error: bad arguments for {name}: {e}", "error")
    try:
        out = call(tool.fn, arguments, timeout_s)
    except CallTimeout as e:
        return ToolResult(name, f"error: {name} {e}", "timeout")
    except Exception as e:  # noqa: BLE001 - a tool can raise anything; the model is told, the run goes on
        return ToolResult(name, f"error: {name} raised {type(e).__name__}: {e}", "error")
    return ToolResult(name, out if isinstance(out, str) else json.dumps(out, default=str), "ok")
