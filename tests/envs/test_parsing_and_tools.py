"""Tool-call parsing (hermes format) and tools: schemas from signatures, faults answered, never raised."""
import time

import pytest

from rlhf.envs import TOOL_PARSERS, MalformedCall, describe, environment_tools, run_tool
from rlhf.envs.tools import ToolDefinitionError


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


class Shop:
    def reset(self, **kwargs):
        self.stock = {"apple": 3}

    def price(self, item: str) -> str:
        """The price of an item.

        Args:
            item: The item's name.

        Returns:
            Its price.
        """
        if item not in self.stock:
            raise KeyError(f"no {item}")
        return "12"

    def get_reward(self) -> float:
        return 1.0

    def _private(self):
        pass


def test_hermes_reads_every_call_and_rejects_broken_ones():
    parse = TOOL_PARSERS.get("hermes")
    text = 'ok <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> and ' \
           '<tool_call>{"name": "price", "arguments": "{\\"item\\": \\"apple\\"}"}</tool_call>'
    calls = parse(text)
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2}), ("price", {"item": "apple"})]
    assert parse("The answer is 3.") == []
    for bad in ['<tool_call>{"name": "add", </tool_call>', '<tool_call>{"name": "add"}',
                '<tool_call>[1, 2]</tool_call>', '<tool_call>{"name": "add", "arguments": [1]}</tool_call>']:
        with pytest.raises(MalformedCall):
            parse(bad)


def test_environment_methods_are_tools_with_schemas():
    env = Shop()
    tools = environment_tools(env)
    assert [t.name for t in tools] == ["price"]  # not reset, get_reward or _private
    fn = tools[0].schema["function"]
    assert fn["name"] == "price" and fn["parameters"]["properties"]["item"]["type"] == "string"
    assert describe(add).schema["function"]["parameters"]["required"] == ["a", "b"]

    def undocumented(x):
        return x

    with pytest.raises(ToolDefinitionError, match="undocumented"):
        describe(undocumented)


def test_faults_come_back_as_messages():
    env = Shop()
    env.reset()
    tools = {t.name: t for t in environment_tools(env) + [describe(add)]}
    assert run_tool(tools, "add", {"a": 2, "b": 3}, 1.0).content == "5"
    raised = run_tool(tools, "price", {"item": "pear"}, 1.0)
    assert raised.status == "error" and "KeyError" in raised.content and "no pear" in raised.content
    assert run_tool(tools, "nope", {}, 1.0).status == "error"
    assert "bad arguments" in run_tool(tools, "add", {"a": 1}, 1.0).content

    def hang(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: How long.
        """
        time.sleep(seconds)
        return "woke"

    t0 = time.time()
    slow = run_tool({"hang": describe(hang)}, "hang", {"seconds": 30}, 0.2)
    assert slow.status == "timeout" and "timed out" in slow.content and time.time() - t0 < 5

    async def fetch(url: str) -> dict:
        """Fetch.

        Args:
            url: Where.
        """
        return {"url": url, "ok": True}

    assert run_tool({"fetch": describe(fetch)}, "fetch", {"url": "x"}, 1.0).content == '{"url": "x", "ok": true}'
