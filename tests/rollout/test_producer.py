"""The producer thread of asynchronous rollouts: admission control, what a checkpoint saves, errors."""
import threading
import time

import pytest

from rlhf.errors import RewardError
from rlhf.rollout.producer import AsyncError, Producer


class Prompts:
    """A prompt cursor: each batch draws the next one; `state` is what a checkpoint saves."""

    def __init__(self):
        self.cursor, self.made = 0, []
        self.gate = threading.Event()

    def state(self) -> dict:
        return {"cursor": self.cursor}

    def make(self, s: int) -> tuple:
        if s == 4:
            self.gate.wait(5)  # batch 4 stays in flight until the test lets it go
        self.made.append(s)
        self.cursor += 1
        return (s, self.cursor)


def wait_until(cond, timeout=5.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def test_generation_stays_within_k_versions_and_a_checkpoint_is_the_same_however_far_the_thread_got():
    prompts = Prompts()
    p = Producer(prompts.make, k=1, first=1, last=6, seed=0, snapshot=prompts.state)
    try:
        wait_until(lambda: prompts.made == [1, 2])
        time.sleep(0.05)
        assert prompts.made == [1, 2]  # batch 3 needs version 1: not admitted before step 1 is published
        assert p.take(1) == (1, 1)
        p.idle_for(1)  # batch 2 is ready: the thread is idle
        p.admit(1)  # the engine holds version 1: batch 3 goes
        wait_until(lambda: 3 in p.done)
        # a checkpoint after step 1: batch 2 and the prompts before batch 3, although batch 3 is done here
        # (another process may not have started it): a resume regenerates batch 3 from the same state
        assert p.pending() == ({2: (2, 2)}, {"cursor": 2})
        assert p.take(2) == (2, 2)
        p.idle_for(2)
        p.admit(2)
        wait_until(lambda: prompts.cursor == 3 and 4 in p.states)
        assert p.pending() == ({3: (3, 3)}, {"cursor": 3})  # batch 4 in flight: the state it was drawn from
        prompts.gate.set()
        wait_until(lambda: 4 in p.done)
        assert p.pending() == ({3: (3, 3)}, {"cursor": 3})
    finally:
        prompts.gate.set()
        p.close()


def test_a_users_error_in_the_thread_keeps_its_type_and_a_bug_is_wrapped():
    def bad_reward(s):
        raise RewardError("reward function 'r' raised on sample 0")

    p = Producer(bad_reward, k=1, first=1, last=3, seed=0)
    with pytest.raises(RewardError, match="reward function 'r'"):
        p.take(1)
    p.close()
    p = Producer(lambda s: 1 / 0, k=1, first=1, last=3, seed=0)
    with pytest.raises(AsyncError, match="generating batch 1 failed: ZeroDivisionError"):
        p.take(1)
    p.close()
