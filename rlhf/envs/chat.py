"""An episode's conversation as tokens, through the model's own chat template, without ever re-tokenizing what
the model sampled.

- The prompt: the row's messages (a string prompt becomes one user message), the environment's `reset` text
  appended to the last user message, rendered with the tool schemas where the template supports tools
  (`apply_chat_template(tools=...)`); for a template without tool support (the embedded SmolLM2's ChatML
  ignores `tools=`) the schemas and the call format go into a system message of ours (`FALLBACK`).
- After a model turn: the tokens the environment adds are the difference between the template rendered with
  and without the new messages (a tool's result, feedback), computed on a stand-in conversation and appended
  after the sampled tokens (`env_ids`).
- `check_prefix_preserving` renders a multi-turn exchange and fails with `TemplateDriftError` when a later
  turn's rendering does not start with the earlier one's tokens (a template that rewrites earlier turns: strips
  reasoning, drops separators), or when the token difference would not reproduce the template: training on
  such a conversation would teach tokens the model never sees at inference.
"""
from __future__ import annotations

from typing import Any, Sequence

from rlhf.envs.tools import Tool
from rlhf.errors import UserError

FALLBACK = (
    "You can call tools. To call one, reply with only\n"
    "<tool_call>{{\"name\": NAME, \"arguments\": {{ARGUMENTS}}}}</tool_call>\n"
    "The result comes back in the next message. The tools:\n{tools}"
)


def signature(schema: dict) -> str:
    """A tool's schema as one line: `name(arg: type, ...): description. arg: its description.`"""
    fn = schema["function"]
    props = fn.get("parameters", {}).get("properties", {})
    args = ", ".join(f"{k}: {v.get('type', 'any')}" for k, v in props.items())
    notes = " ".join(f"{k}: {v['description']}" for k, v in props.items() if v.get("description"))
    return f"- {fn['name']}({args}): {fn.get('description', '')}" + (f" {notes}" if notes else "")


_SENTINEL = "rlhf0sentinel0assistant0turn"


class TemplateDriftError(UserError):
    """The chat template does not render a multi-turn exchange as a growing prefix of tokens."""


def _as_messages(prompt: Any) -> list[dict]:
    return [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def template_renders_tools(tokenizer) -> bool:
    """True when `apply_chat_template(tools=...)` puts the schemas in the prompt."""
    probe = {"type": "function", "function": {"name": "rlhf_probe_tool_x9", "description": "probe", "parameters":
             {"type": "object", "properties": {}}}}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[probe], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot take tools
        return False
    return "rlhf_probe_tool_x9" in text


class ChatFormat:
    """Renders episodes of one tokenizer with one set of tools. `tool_format`: 'auto' (the template's own tool
    rendering where it has one, else the fallback system message), 'template' or 'fallback'."""

    def __init__(self, tokenizer, tools: Sequence[Tool], tool_format: str = "auto", result_role: str = "tool"):
        self.tokenizer, self.tools, self.result_role = tokenizer, list(tools), result_role
        self.native = bool(self.tools) and (tool_format == "template"
                                            or (tool_format == "auto" and template_renders_tools(tokenizer)))
        self.schemas = [t.schema for t in self.tools]

    # ------------------------------------------------------------------ rendering

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        tools = self.schemas if self.native else None
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_messages(self, prompt: Any, reset_text: str | None = None) -> list[dict]:
        """The episode's opening messages: the row's prompt with `reset_text` appended to its last message (as TRL
        does), and (fallback format, with tools) the tools' description in a system message."""
        messages = _as_messages(prompt)
        if reset_text:
            messages[-1] = {**messages[-1], "content": messages[-1]["content"] + reset_text}
        if self.tools and not self.native:
            text = FALLBACK.format(tools="\n".join(signature(s) for s in self.schemas))
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}
            else:
                messages.insert(0, {"role": "system", "content": text})
        return messages

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The tokens the model continues from (as rlhf.data.PromptSource tokenizes chat prompts)."""
        return self._ids(self._render(messages, generation_prompt=True))

    def result_message(self, name: str, content: str) -> dict:
        if self.result_role == "tool":
            return {"role": "tool", "name": name, "content": content}
        return {"role": "user", "content": f"[{name}] {content}"}

    def env_ids(self, new_messages: list[dict], last_token: int | None) -> list[int]:
        """The tokens to append after a model turn that ended with `last_token`, so that the episode reads as the
        template renders the conversation with `new_messages` and a generation prompt after them.

        Computed on a stand-in conversation (user, assistant): the assistant turn's closing tokens (after its
        end-of-turn token, which the model sampled itself) plus the rendered difference of the new messages.
        """
        conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        closed = self._render(conv, generation_prompt=False)
        grown = self._render(conv + list(new_messages), generation_prompt=True)
        if not grown.startswith(closed):
            raise TemplateDriftError("the chat template renders an assistant turn differently once messages follow it "
                                     "(it rewrites earlier turns): an episode's tokens cannot grow by appending, "
                                     "so training would drift from inference; use a prefix-preserving "
                                     "tokenizer.chat_template")
        closing = self._ids(closed[closed.index(_SENTINEL) + len(_SENTINEL):])
        if closing and last_token == closing[0]:
            closing = closing[1:]  # the end-of-turn token the model emitted itself
        return closing + self._ids(grown[len(closed):])

    # ------------------------------------------------------------------ the start-up check

    def check_prefix_preserving(self) -> None:
        """Build a 3-turn exchange the way episodes are built (prompt, sampled turn, environment tokens, ...) and
        compare it, after every turn, with the template's own rendering of the whole conversation."""
        call = '<tool_call>{"name": "lookup", "arguments": {"item": "apple"}}</tool_call>'
        turns = [("The price of an apple?", call, "error: out of stock"), (None, "Let me try again. " + call, "12"),
                 (None, "An apple costs 12.", "Thanks! And a pear?")]
        messages = self.prompt_messages("Hi there.")
        ids = self.prompt_ids(messages)
        for k, (_, said, reply) in enumerate(turns):
            prompt_text = self._render(messages, generation_prompt=True)
            messages = messages + [{"role": "assistant", "content": said}]
            closed = self._render(messages, generation_prompt=False)
            if not closed.startswith(prompt_text):
                raise TemplateDriftError(f"chat template check, turn {k + 1}: the rendered conversation does not "
                                         "start with the prompt the model was given (the template rewrites the turn "
                                         "it generates into)")
            sampled = self._ids(closed[len(prompt_text):])  # the assistant's tokens, as a model would sample them
            eos = self.tokenizer.eos_token_id
            cut = next((i for i, t in enumerate(sampled) if t == eos), len(sampled) - 1)
            ids = ids + sampled[: cut + 1]
            new = [self.result_message("lookup", reply) if k < 2 else {"role": "user", "content": reply}]
            ids = ids + self.env_ids(new, ids[-1])
            messages = messages + new
            expected = self.prompt_ids(messages)
            if ids != expected:
                first = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
                raise TemplateDriftError(
                    f"chat template check, turn {k + 1}: an episode built turn by turn differs from the template's "
                    f"rendering of the whole conversation at token {first} "
                    f"({self.tokenizer.decode(ids[first:first + 8])!r} vs "
                    f"{self.tokenizer.decode(expected[first:first + 8])!r}): the template rewrites earlier turns "
                    "(stripped reasoning, dropped separators), so training on these tokens would drift from inference; "
                    "use a prefix-preserving template (tokenizer.chat_template) for multi-turn training")
