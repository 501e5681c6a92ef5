"""The environment and reward of recipes/tool_lookup.yaml: secret codes only a lookup tool knows.

The rows come from the `secret_codes` task (prompt, item, code). The model is told how to call the tool; it
succeeds when its final answer holds the code, which it can only read from the tool's result.
"""
import re


class CodeBook:
    """One episode: the row's item and its code, and the one tool that reveals it."""

    def reset(self, item: str, code: str, **row) -> str:
        self.item, self.code = item, str(code)
        return (f' Look it up: reply with <tool_call>'
                f'{{"name": "lookup", "arguments": {{"item": "{item}"}}}}</tool_call>'
                " and then answer with the code.")

    def lookup(self, item: str) -> str:
        """Look up the secret code of an item.

        Args:
            item: The item's name, for example "apple".
        """
        if item.strip().lower().removeprefix("the ") != self.item:
            return f"There is no code for {item!r}."
        return f"The code of the {self.item} is {self.code}."


def answered(completions, code, **kwargs) -> list[float]:
    """1.0 when the model's last message (after any tool call) states the code, else 0.0."""
    out = []
    for messages, c in zip(completions, code):
        last = messages[-1] if messages[-1]["role"] == "assistant" else {"content": ""}
        said = "<tool_call>" not in last["content"] and c in re.findall(r"\d+", last["content"])
        out.append(1.0 if said else 0.0)
    return out
