"""Crash-safe checkpoints: kill -9 at every point of a save, keep-last-N, components, no unpickling."""
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.trainers import checkpoint as ckpt

HERE = Path(__file__).parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from kill_during_save import components  # noqa: E402


def run_killed(root: Path, point: str, keep_last: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(HERE / "kill_during_save.py"), str(root), point, str(keep_last)],
                          env=env, capture_output=True, text=True, timeout=120)


def loaded_step(path: Path) -> int:
    """Load `path` into fresh components and return the step its weights encode."""
    comps = components(0)
    state = ckpt.load(path, comps, rank=0)
    w = comps["policy"].weight
    assert torch.all(w == w.flatten()[0]) and comps["optimizer"].state_dict()["state"], "partially restored"
    assert state["step"] == int(w.flatten()[0])
    return state["step"]


@pytest.mark.parametrize("point, keep_last, expected", [
    ("mid_file", 2, 1),  # killed while optimizer.pt of step 2 is half written
    ("before_rename", 2, 1),  # step 2 complete in staging, not renamed yet
    ("before_latest", 2, 1),  # step_000002 renamed into place, `latest` still says step 1
    ("mid_prune", 1, 2),  # step 2 committed, killed while deleting step 1
])
def test_kill_9_during_save_resumes_from_last_complete_checkpoint(tmp_path, point, keep_last, expected):
    root = tmp_path / "checkpoints"
    proc = run_killed(root, point, keep_last)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    found = ckpt.find_latest(root)
    assert found is not None and loaded_step(found) == expected
    # The next save cleans up what the crash left and keeps the newest keep_last complete checkpoints.
    ckpt.commit(root, 3, components(3), {"step": 3}, keep_last)
    names = sorted(p.name for p in root.iterdir())
    assert not [n for n in names if n.startswith((".tmp", ".trash"))], names
    assert loaded_step(ckpt.find_latest(root)) == 3
    assert len(ckpt.complete_checkpoints(root)) == keep_last


def test_keep_last_never_deletes_the_only_good_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.commit(root, 1, components(1), {"step": 1}, keep_last=1)
    # A crashed save of step 2 (staging only) and an incomplete step directory are not "good" ones.
    (root / f"{ckpt.STAGING_PREFIX}000002").mkdir()
    (root / "step_000005").mkdir()
    ckpt.prune(root, keep_last=1)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000001"]
    assert loaded_step(ckpt.find_latest(root)) == 1
    # `latest` pointing at an older checkpoint (resumed from it) protects it from pruning.
    ckpt.commit(root, 2, components(2), {"step": 2}, keep_last=2)
    (root / "latest").write_text("step_000001\n")
    ckpt.prune(root, keep_last=1)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_000001", "step_000002"]


def test_resaving_a_step_replaces_it_atomically(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.commit(root, 1, components(1), {"step": 1}, keep_last=2)
    ckpt.commit(root, 1, components(7), {"step": 7}, keep_last=2)
    assert [p.name for p in root.iterdir() if not p.name == "latest"] == ["step_000001"]
    assert loaded_step(root / "step_000001") == 7


class Counter:
    """An extra stateful component, as a PPO trainer registers a KL controller."""

    def __init__(self, value=0.0):
        self.value = value

    def state_dict(self):
        return {"value": torch.tensor(self.value)}

    def load_state_dict(self, sd):
        self.value = float(sd["value"])


def test_named_components_are_saved_and_a_missing_one_is_named(tmp_path):
    root = tmp_path / "checkpoints"
    critic = torch.nn.Linear(2, 1)
    comps = {**components(1), "critic": critic, "kl_ctl": Counter(0.125)}
    path = ckpt.commit(root, 1, comps, {"step": 1}, keep_last=1)
    fresh = {**components(0), "critic": torch.nn.Linear(2, 1), "kl_ctl": Counter()}
    ckpt.load(path, fresh, rank=0)
    assert fresh["kl_ctl"].value == 0.125 and torch.equal(fresh["critic"].weight, critic.weight)
    path = ckpt.commit(root, 2, components(2), {"step": 2}, keep_last=1)
    with pytest.raises(ckpt.CheckpointError, match=r"no state for \['critic', 'kl_ctl'\]"):
        ckpt.load(path, fresh, rank=0)


def test_rng_state_covers_torch_python_and_numpy(tmp_path):
    import random

    import numpy as np

    comps, fresh = components(1), components(0)
    ckpt.write_rank_files(tmp_path, 1, rank=0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.commit(tmp_path, 1, comps, {"step": 1}, keep_last=1)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    ckpt.load(tmp_path / "step_000001", fresh, rank=0)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/rlhf-test-pickle-exploit-ran")


def test_a_malicious_pickle_in_a_checkpoint_is_refused(tmp_path):
    MARKER.unlink(missing_ok=True)
    path = ckpt.commit(tmp_path, 1, components(1), {"step": 1}, keep_last=1)
    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump({"state": Exploit()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ckpt.load(path, components(0), rank=0)
    assert not MARKER.exists()


def test_no_code_path_unpickles():
    """Every torch.load in the library passes weights_only=True; nothing calls pickle.load(s)."""
    offenders = []
    for py in (REPO / "rlhf").rglob("*.py"):
        text = py.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{py}: {m.group(0)}")
        if re.search(r"pickle\.loads?\(", text):
            offenders.append(f"{py}: pickle.load")
    assert not offenders, offenders
