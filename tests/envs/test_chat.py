"""Chat templates in episodes: tool schemas (native or fallback), token differences, the prefix check."""
import pytest

from rlhf.envs import ChatFormat, TemplateDriftError, describe
from tests.conftest import build_tokenizer, requires_smollm2


def lookup(item: str) -> str:
    """Look up an item's code.

    Args:
        item: The item's name.
    """
    return "1234"


REWRITING = (  # drops the content of every assistant turn but the last: what reasoning-stripping templates do
    "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|assistant|> . <eos> "
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def test_a_prefix_preserving_template_passes_and_env_tokens_extend_the_conversation():
    tok = build_tokenizer()
    chat = ChatFormat(tok, [describe(lookup)])
    assert not chat.native  # the test template ignores tools=: the fallback system message carries them
    chat.check_prefix_preserving()
    msgs = chat.prompt_messages([{"role": "user", "content": "What is 1 + 2 ?"}], " yes")
    assert msgs[0]["role"] == "system" and "lookup" in msgs[0]["content"] and msgs[-1]["content"].endswith("? yes")
    prompt = chat.prompt_ids(msgs)
    said = tok("a b", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    env = chat.env_ids([chat.result_message("lookup", "3")], said[-1])
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "a b"}, {"role": "tool", "content": "3"}],
                                   tokenize=False, add_generation_prompt=True)
    assert prompt + said + env == tok(full, add_special_tokens=False)["input_ids"]


def test_a_template_that_rewrites_earlier_turns_is_caught():
    tok = build_tokenizer()
    tok.chat_template = REWRITING
    with pytest.raises(TemplateDriftError, match="rewrites earlier turns"):
        ChatFormat(tok, [describe(lookup)]).check_prefix_preserving()


@requires_smollm2
def test_smollm2_uses_the_fallback_format_and_is_prefix_preserving():
    from rlhf.models.loading import load_tokenizer

    chat = ChatFormat(load_tokenizer("smollm2-135m-instruct"), [describe(lookup)])
    assert not chat.native
    chat.check_prefix_preserving()
    text = chat.tokenizer.decode(chat.prompt_ids(chat.prompt_messages("Code of apple?")))
    assert "<tool_call>" in text and "lookup(item: string)" in text
