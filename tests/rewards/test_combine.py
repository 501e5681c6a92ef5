import asyncio
import threading
import time

import pytest
import torch

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

    import sys
    import types
    mod = types.ModuleType("spy_mod")
    mod.spy = spy
    sys.modules["spy_mod"] = mod
    (tmp_path / "rf.py").write_text(FILE_FN)
    m = RewardModule([RewardSpec(fn="spy_mod:spy", weight=0.5),
                      RewardSpec(fn=f"{tmp_path}/rf.py:length_reward", weight=2.0),
                      RewardSpec(fn="first_number_matches")])
    res = call(m, ["3 apples", "no"], answer=[3, 3], difficulty=["easy", "hard"])
    assert seen == {"answer": [3, 3], "extra": ["easy", "hard"]}
    assert res.scores_N.tolist() == [0.5 + 2 * 8 + 1.0, 0.5 + 2 * 2 + 0.0]
    assert res.per_fn["length_reward"] == [8.0, 2.0]


def test_a_zero_weight_function_is_measured_but_not_rewarded(tmp_path):
    """recipes/ppo_reward_model.yaml logs the rule with weight 0 beside the learned reward model."""
    (tmp_path / "rf.py").write_text(FILE_FN)
    m = RewardModule([RewardSpec(fn=f"{tmp_path}/rf.py:length_reward"),
                      RewardSpec(fn="first_number_matches", weight=0.0)])
    res = call(m, ["3 apples", "no"], answer=[3, 3])
    assert res.scores_N.tolist() == [8.0, 2.0]
    assert res.per_fn["first_number_matches"] == [1.0, 0.0]


def test_none_means_not_applicable_and_all_none_is_nan():
    def half(completions, **kw):
        return [None, 1.0, None]

    import sys
    import types
    sys.modules["half_mod"] = types.SimpleNamespace(half=half)
    m = RewardModule([RewardSpec(fn="half_mod:half")])
    res = call(m, ["a", "b", "c"])
    assert (res.scores_N[1] == 1.0 and res.scores_N[0].isnan()
            and res.stats["reward/unscored_frac"] == pytest.approx(2 / 3))


def _register(name, fn):
    import sys
    import types
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
    res = call(RewardModule([_register("nanfn", lambda completions, **kw: [float("nan"), float("inf"), 2.0])]),
               ["a", "b", "c"])
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
    with pytest.raises(RewardError, match="reward function 'hang' timed out after 0.2 s on a batch of 3 samples"):
        call(RewardModule([_register("hang", hang)], timeout_s=0.2), ["a", "b", "c"])
    # skip: the batch is unscored and counted once, not retried per sample (that would cost N timeouts)
    res = call(RewardModule([_register("hang2", hang)], timeout_s=0.2, on_error="skip"), ["a", "b", "c"])
    assert res.scores_N.isnan().all() and res.stats["reward/hang2/timeouts"] == 3 and res.stats["reward/unscored"] == 3
    assert time.time() - t0 < 2


def test_hung_calls_never_block_later_calls():
    """Each timed call gets its own daemon thread: abandoned hangs neither exhaust a pool nor block exit."""
    def hang(completions, **kw):
        time.sleep(30)

    def fine(completions, **kw):
        return [2.0] * len(completions)

    m = RewardModule([_register("hang3", hang), _register("fine", fine)], timeout_s=0.1, on_error="skip")
    t0 = time.time()
    for _ in range(6):
        res = call(m, ["a", "b"])
        assert res.scores_N.tolist() == [2.0, 2.0] and res.stats["reward/hang3/timeouts"] == 2
    assert time.time() - t0 < 3
    assert all(t.daemon for t in threading.enumerate() if t.name == "reward-call")


def test_async_hangs_errors_and_exits_follow_the_same_policy():
    async def async_hang(completions, **kw):
        await asyncio.sleep(30)

    async def async_boom(completions, **kw):
        if "bad" in completions:
            raise ValueError("cannot parse")
        return [1.0] * len(completions)

    def exits(completions, **kw):
        raise SystemExit(3)  # must not end the training process

    with pytest.raises(RewardError, match="'async_hang' timed out after 0.2 s"):
        call(RewardModule([_register("async_hang", async_hang)], timeout_s=0.2), ["a"])
    with pytest.raises(RewardError, match="'async_boom' failed on sample 2: ValueError: cannot parse"):
        call(RewardModule([_register("async_boom", async_boom)], timeout_s=5), ["a", "b", "bad"])
    res = call(RewardModule([_register("async_boom2", async_boom)], on_error="skip"), ["a", "bad"])
    assert res.scores_N[0] == 1.0 and res.scores_N[1].isnan() and res.stats["reward/async_boom2/errors"] == 1
    with pytest.raises(RewardError, match="'exits' failed on sample 0: SystemExit: 3"):
        call(RewardModule([_register("exits", exits)]), ["a"])


def test_wrong_types_in_every_form_are_value_errors():
    cases = {"a_dict": {"x": 1.0}, "a_float": 1.0, "nested": [[1.0], [2.0]], "strings": ["1", "2"], "none_fn": None}
    for name, out in cases.items():
        with pytest.raises(ValueError, match=f"reward function '{name}'"):
            call(RewardModule([_register(name, lambda completions, _o=out, **kw: _o)]), ["a", "b"])
    ok = call(RewardModule([_register("tensor_out", lambda completions, **kw: torch.tensor([1.0, float("nan")]))]),
              ["a", "b"])
    assert ok.scores_N[0] == 1.0 and ok.scores_N[1].isnan()


def test_spec_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        load_reward_fn("nope")
    with pytest.raises(RewardError, match="missing.py not found"):
        load_reward_fn(f"{tmp_path}/missing.py:f")
    with pytest.raises(RewardError, match="has no function 'nothere'"):
        load_reward_fn("rlhf.rewards.rules:nothere")
    assert "first_number_matches" in REWARDS.names()
