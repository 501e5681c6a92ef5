"""Tool calls in the model's output: `TOOL_PARSERS[name](text) -> list[ToolCall]`, raising `MalformedCall`.

The default, `hermes`, reads the common `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` format
(Qwen2/2.5, Hermes, SmolLM3 and the fallback format of rlhf.envs.chat). A parser for another format is a
function registered here or named in a recipe as `module.path:function` / `file.py:function`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from rlhf.registry import Registry


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


class MalformedCall(ValueError):
    """The output tried to call a tool but the call cannot be read; the message is sent back to the model."""


ToolParser = Callable[[str], "list[ToolCall]"]
TOOL_PARSERS: Registry[ToolParser] = Registry("tool-call parser")

_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.S)


@TOOL_PARSERS.register("hermes")
def hermes(text: str) -> list[ToolCall]:
    """Every `<tool_call>{json}</tool_call>` block of `text`, in order (none: no call). The JSON holds `name` and
    `arguments` (an object, or a string holding one); a block that is not such JSON raises MalformedCall."""
    calls = []
    for body, end in _HERMES.findall(text):
        if not end:
            raise MalformedCall("a <tool_call> block is not closed with </tool_call>")
        try:
            obj = json.loads(body.strip())
        except json.JSONDecodeError as e:
            raise MalformedCall(f"the tool call is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise MalformedCall('a tool call must be a JSON object with a "name" and "arguments"')
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise MalformedCall(f'the "arguments" of {obj["name"]} are not a JSON object') from None
        if not isinstance(args, dict):
            raise MalformedCall(f'the "arguments" of {obj["name"]} must be a JSON object')
        calls.append(ToolCall(obj["name"], args))
    return calls
