"""The episode loop (rlhf.rollout.episodes) with a scripted engine: turns, tool results as environment tokens,
token-in token-out, budgets and faults, counted."""
import time

import pytest

from rlhf.config import EnvConfig
from rlhf.data import PromptBatch
from rlhf.engine import Rollouts, SamplingParams
from rlhf.envs import TOOL_PARSERS, ChatFormat, EnvError, describe, environment_tools
from rlhf.rollout import EpisodeSpec, run_episodes
from tests.conftest import requires_smollm2

pytestmark = requires_smollm2

CALL = '<tool_call>{"name": "lookup", "arguments": {"item": "apple"}}</tool_call>'


class ScriptedEngine:
    """Answers every continuation with `script(prompt_text, turn)` (+ EOS), cut at max_new_tokens."""

    def __init__(self, tokenizer, script):
        self.tok, self.script, self.calls = tokenizer, script, []

    def generate(self, prompt_ids, n, sampling, return_logps=False):
        self.calls.append((len(prompt_ids), n))
        outs, fins = [], []
        for p in prompt_ids:
            text = self.tok.decode(p)
            turn = text.count("<|im_start|>assistant")
            for _ in range(n):
                ids = self.script(text, turn)
                ids = ((self.tok(ids, add_special_tokens=False)["input_ids"] if isinstance(ids, str) else ids)
                       + [self.tok.eos_token_id])
                outs.append(ids[: sampling.max_new_tokens])
                fins.append(len(ids) <= sampling.max_new_tokens)
        return Rollouts([p for p in prompt_ids for _ in range(n)], outs, fins,
                        [[-0.25] * len(o) for o in outs] if return_logps else None)


class Lookup:
    """The environment of these tests: one tool, a reward from its state."""

    def reset(self, prompt, code, **kwargs):
        self.code, self.answered = code, None
        return " (item codes are secret)"

    def lookup(self, item: str) -> str:
        """Look up an item's code.

        Args:
            item: The item's name.
        """
        if item == "boom":
            raise RuntimeError("warehouse on fire")
        if item == "slow":
            time.sleep(30)
        return self.code

    def get_reward(self) -> float:
        return 1.0


@pytest.fixture(scope="module")
def tok():
    from rlhf.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def spec(tok, factory=Lookup, tools=(), **env):
    cfg = EnvConfig(**{"max_turns": 3, "max_tokens": 200, "tool_timeout_s": 0.5, **env})
    tools = [describe(t) for t in tools]
    chat = ChatFormat(tok, tools + (environment_tools(factory()) if factory else []))
    return EpisodeSpec(chat, cfg, factory, tools, TOOL_PARSERS.get("hermes"), None, "test-data")


def batch(n=1):
    return PromptBatch(rows=list(range(10, 10 + n)), prompts=[[{"role": "user", "content": "Code of apple?"}]] * n,
                       prompt_ids=[[1]] * n, columns={"code": ["4711"] * n})


def run(tok, script, G=2, n=1, sampling=SamplingParams(max_new_tokens=40), **kw):
    engine = ScriptedEngine(tok, script)
    return run_episodes(spec(tok, **kw), engine, tok, batch(n), G, sampling, True), engine


def test_a_tool_call_gets_its_result_as_environment_tokens_then_the_answer(tok):
    out, engine = run(tok, lambda text, turn: CALL if turn == 1 else "The code is 4711.", G=2, n=2)
    assert engine.calls[0] == (2, 2)  # the first turn shares each prompt's prefill across its group
    assert engine.calls[1] == (4, 1)  # later turns continue each episode on its own
    ep_ids, mask, logps = out.completion_ids[0], out.action_masks[0], out.sampler_logps[0]
    transcript = out.transcripts[0]
    assert [m["role"] for m in transcript] == ["assistant", "tool", "assistant"] and transcript[1]["content"] == "4711"
    assert transcript[2]["content"] == "The code is 4711." and out.finished == [True] * 4
    # token-in token-out: prompt + the episode's tokens read exactly as the template renders the conversation.
    # The turn stops right after the call (env.stop): the EOS the model sampled after it is dropped, and the
    # template's end of turn comes with the environment's tokens.
    first = tok(CALL, add_special_tokens=False)["input_ids"]
    assert ep_ids[: len(first)] == first and mask[: len(first)] == [1] * len(first)
    env_part = [t for t, m in zip(ep_ids, mask) if m == 0]
    assert tok.decode(env_part) == "<|im_end|>\n<|im_start|>tool\n4711<|im_end|>\n<|im_start|>assistant\n"
    assert (all(lp == 0.0 for lp, m in zip(logps, mask) if m == 0)
            and all(lp == -0.25 for lp, m in zip(logps, mask) if m))
    chat = spec(tok).chat
    msgs = chat.prompt_messages(batch().prompts[0], " (item codes are secret)") + transcript
    rendered = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert out.prompt_ids[0] + ep_ids == rendered[: len(out.prompt_ids[0]) + len(ep_ids)]
    assert out.stats["tool_calls"] == 4 and out.stats["turns"] == 8 and out.stats["env_tokens"] > 0
    assert out.columns["env_reward"] == [1.0] * 4 and len(out.columns["environments"]) == 4


def test_sampled_tokens_are_never_retokenized(tok):
    odd = tok("The", add_special_tokens=False)["input_ids"] + tok(" code", add_special_tokens=False)["input_ids"]
    split = [t for w in ("T", "he") for t in tok(w, add_special_tokens=False)["input_ids"]]  # not how "The" encodes
    out, _ = run(tok, lambda text, turn: split + odd, G=1)
    assert out.completion_ids[0][: len(split)] == split


@pytest.mark.parametrize("item, status", [("boom", "tool_errors"), ("slow", "tool_timeouts")])
def test_a_raising_or_hanging_tool_is_answered_and_counted(tok, item, status):
    call = CALL.replace("apple", item)
    out, _ = run(tok, lambda text, turn: call if turn == 1 else "Sorry.", G=1)
    reply = out.transcripts[0][1]["content"]
    assert out.stats[status] == 1 and reply.startswith("error:") and out.transcripts[0][-1]["content"] == "Sorry."
    assert ("warehouse on fire" in reply) if item == "boom" else ("timed out" in reply)


def test_a_malformed_call_is_answered_and_counted(tok):
    out, _ = run(tok, lambda text, turn: '<tool_call>{"name": lookup}</tool_call>' if turn == 1 else "Fine.", G=1)
    assert out.stats["malformed_calls"] == 1 and "malformed tool call" in out.transcripts[0][1]["content"]


def test_a_result_that_would_overflow_the_budget_is_dropped_and_ends_the_episode(tok):
    out, _ = run(tok, lambda text, turn: CALL, G=1, max_tokens=30)
    assert out.stats["overflows"] == 1 and out.finished == [False] and len(out.completion_ids[0]) < 30
    assert [m["role"] for m in out.transcripts[0]] == ["assistant"] and set(out.action_masks[0]) == {1}


def test_max_turns_and_cut_turns_end_episodes(tok):
    out, _ = run(tok, lambda text, turn: CALL, G=1, max_turns=2)
    assert out.stats["turns"] == 2 and out.finished == [False]
    cut, _ = run(tok, lambda text, turn: "word " * 50, G=1, sampling=SamplingParams(max_new_tokens=8))
    assert cut.finished == [False] and len(cut.completion_ids[0]) == 8


def test_a_raising_reset_or_get_reward_names_the_environment_and_row(tok):
    class BadReset(Lookup):
        def reset(self, **kwargs):
            raise ValueError("no such level")

    class BadReward(Lookup):
        def get_reward(self):
            raise ZeroDivisionError("empty")

    with pytest.raises(EnvError, match=r"BadReset.reset failed on test-data row 10: ValueError: no such level"):
        run(tok, lambda text, turn: "x", factory=BadReset)
    with pytest.raises(EnvError, match=r"BadReward.get_reward failed on test-data row 10"):
        run(tok, lambda text, turn: "x", factory=BadReward)
