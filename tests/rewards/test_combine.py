import asyncio
import time

import pytest

from rlhf.config import RewardSpec
from rlhf.rewards import REWARDS, RewardError, RewardModule, load_reward_fn

FILE_FN = '''
def length_reward(prompts, completions, completion_ids, **kwargs):
    return [float(len(c)) for c in completions]
'''


def call(module, completions, **columns):
    n = len(completions)
    return module(["p"] * n, completions, [[1]] * n, columns)


def test_weighted_combination_and_columns_reach_functions(tmp_path):
    seen = {}

    def spy(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(answer=answer, extra=kwargs["difficulty"])
        return [1.0] * len(completions)

    import sys, types
    mod = types.ModuleType("spy_mod")
    mod.spy = spy
    sys.modules["spy_mod"] = mod
    (tmp_path / "rf.py").write_text(FILE_FN)
    m = RewardModule([RewardSpec(fn="spy_mod:spy", weight=0.5), RewardSpec(fn=f"{tmp_path}/rf.py:length_reward", weight=2.0),
                      RewardSpec(fn="first_number_matches")])
    res = call(m, ["3 apples", "no"], answer=[3, 3], difficulty=["easy", "hard"])
    assert seen == {"answer": [3, 3], "extra": ["easy", "hard"]}
    assert res.scores_N.tolist() == [0.5 + 2 * 8 + 1.0, 0.5 + 2 * 2 + 0.0]
    assert res.per_fn["length_reward"] == [8.0, 2.0]


def test_none_means_not_applicable_and_all_none_is_nan():
    def half(completions, **kw):
        return [None, 1.0, None]

    import sys, types
    sys.modules["half_mod"] = types.SimpleNamespace(half=half)
    m = RewardModule([RewardSpec(fn="half_mod:half")])
    res = call(m, ["a", "b", "c"])
    assert res.scores_N[1] == 1.0 and res.scores_N[0].isnan() and res.stats["reward/unscored_frac"] == pytest.approx(2 / 3)


def _register(name, fn):
    import sys, types
    sys.modules[f"m_{name}"] = types.SimpleNamespace(**{name: fn})
    return RewardSpec(fn=f"m_{name}:{name}")


def test_raising_function_is_named_with_sample_index():
    def boom(completions, **kw):
        if "bad" in completions:
            raise KeyError("no answer")
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"reward function 'boom' failed on sample 1: KeyError"):
        call(RewardModule([_register("boom", boom)]), ["ok", "bad", "ok"])
    res = call(RewardModule([_register("boom2", boom)], on_error="skip"), ["ok", "bad", "ok"])
    assert res.scores_N[0] == 1 and res.scores_N[1].isnan() and res.stats["reward/boom2/errors"] == 1


def test_wrong_length_or_type_is_value_error_naming_function():
    with pytest.raises(ValueError, match="reward function 'short' returned 1 values for 2 completions"):
        call(RewardModule([_register("short", lambda completions, **kw: [1.0])]), ["a", "b"])
    with pytest.raises(ValueError, match="reward function 'strs' returned str 'x' for sample 0"):
        call(RewardModule([_register("strs", lambda completions, **kw: ["x", 1.0])]), ["a", "b"])


def test_nan_and_inf_are_unscored():
    res = call(RewardModule([_register("nanfn", lambda completions, **kw: [float("nan"), float("inf"), 2.0])]), ["a", "b", "c"])
    assert res.scores_N[:2].isnan().all() and res.scores_N[2] == 2.0 and res.stats["reward/nanfn/unscored"] == 2


def test_async_functions_and_timeouts():
    async def slow_async(completions, **kw):
        await asyncio.sleep(0.01)
        return [1.0] * len(completions)

    assert call(RewardModule([_register("slow_async", slow_async)]), ["a"]).scores_N.tolist() == [1.0]

    def hang(completions, **kw):
        time.sleep(5)
        return [1.0] * len(completions)

    t0 = time.time()
    with pytest.raises(RewardError, match="'hang' failed.*timed out after 0.2 s"):
        call(RewardModule([_register("hang", hang)], timeout_s=0.2), ["a"])
    assert time.time() - t0 < 2


def test_spec_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        load_reward_fn("nope")
    with pytest.raises(FileNotFoundError, match="missing.py not found"):
        load_reward_fn(f"{tmp_path}/missing.py:f")
    with pytest.raises(AttributeError, match="has no function 'nothere'"):
        load_reward_fn("reward_models.rules:nothere")
    assert "first_number_matches" in REWARDS.names()
