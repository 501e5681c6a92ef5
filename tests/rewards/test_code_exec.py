"""The sandboxed code-execution reward: correct scoring, and every attack contained and scored 0."""
import json
import os
import socket
import subprocess
import time

import pytest
import torch

from rlhf.logging import read_jsonl
from rlhf.rewards import REWARDS
from rlhf.rewards.code_exec import (
    Limits,
    code_exec,
    extract_code,
    parse_tests,
    run_program,
    sandbox_report,
)
from rlhf.trainers import Trainer

FAST = Limits(cpu_s=1, wall_s=4, memory_mb=512)
ADD = "def add(a, b):\n    return a + b\n"
HIDDEN = [{"call": "add(123, 456)", "expected": 579}, {"call": "add(-1, 1)", "expected": 0}]
ROOT = os.getuid() == 0


def fenced(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}```\nIt adds the numbers."


def test_scores_calls_asserts_and_stdin_stdout_cases():
    tests = [{"call": "add(2, 3)", "expected": 5}, "assert add(1, 1) == 2", "assert add(0, 0) == 1"]
    assert code_exec(completions=[fenced(ADD)], tests=[tests]) == [pytest.approx(2 / 3)]
    script = "a, b = map(int, input().split())\nprint(a + b)\n"
    io_tests = json.dumps([{"stdin": "2 3\n", "stdout": "5\n"},
                           {"stdin": "10 -4\n", "stdout": "6"}])  # a JSON string column
    assert code_exec(completions=[fenced(script)], tests=[io_tests]) == [1.0]
    chat = [{"role": "assistant", "content": fenced(ADD)}]
    assert code_exec(completions=["no code here", chat, fenced(ADD)], tests=[HIDDEN, HIDDEN, []]) == [0.0, 1.0, None]


def test_programs_can_use_the_standard_library_and_installed_packages():
    code = ("import collections, functools, heapq, itertools, math, re, statistics\nimport numpy as np\n"
            "def solve(xs):\n    return [int(np.sum(xs)), math.isqrt(sum(xs)), heapq.nlargest(1, xs)[0]]\n")
    res = run_program(code, [{"call": "solve([4, 5, 7])", "expected": [16, 4, 7]}], FAST)
    assert res.score == 1.0, res


def test_comparison_is_by_value_and_type_not_by_the_programs_equality():
    sneaky = "class Any:\n    def __eq__(self, other):\n        return True\n\ndef add(a, b):\n    return Any()\n"
    assert run_program(sneaky, parse_tests(HIDDEN), FAST).score == 0.0  # not JSON: cannot claim equality
    floats = "def add(a, b):\n    return (a + b) * (1 + 1e-12)\n"
    assert run_program(floats, parse_tests(HIDDEN), FAST).score == 1.0
    as_bool = "def add(a, b):\n    return True if a + b == 1 else a + b\n"
    assert run_program(as_bool, [{"call": "add(0, 1)", "expected": 1}], FAST).score == 0.0


def test_test_case_errors_are_clear():
    with pytest.raises(ValueError, match="only 'assert CALL == VALUE' strings"):
        parse_tests(["assert add(1, 2) > 2"])
    with pytest.raises(ValueError, match=r"test 0: expected \{'call', 'expected'\}"):
        parse_tests([{"call": "add(1, 2)"}])
    with pytest.raises(ValueError, match="code_exec needs a 'tests' dataset column"):
        code_exec(completions=["x"], answer=[1])
    assert extract_code("```py\nfirst\n```\ntext\n```python\nsecond\n```") == "second\n"
    assert "code_exec" in REWARDS.names()


def test_this_machine_isolates_network_filesystem_and_user():
    iso = sandbox_report()
    assert iso["audit_hook"] == "on" and iso["limits"].startswith("cpu")
    if ROOT:  # documented in the README: what works here as root
        assert iso == {**iso, "network": "netns", "user": "uid 65534",
                       "filesystem": "mntns: read-only except the working directory"}


def session_processes(sid: int) -> list[str]:
    """Processes still in the sandbox's session (a fork bomb's children would be)."""
    out = subprocess.run(["ps", "-e", "-o", "sid=,pid="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(sid)]


ATTACKS = {
    "infinite_loop": "while True:\n    pass\n",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "allocate_10_GB": "blob = bytearray(10 * 1024 ** 3)\nblob[-1] = 1\n",
    "huge_file": "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (64 * 1024 * 1024))\n",
    "thread": "import threading\nthreading.Thread(target=print).start()\n",
    "kill_the_trainer": "import os\nos.kill({parent}, 9)\n",
    "read_the_trainers_environment": "print(open('/proc/{parent}/environ').read())\n",
}


@pytest.mark.parametrize("audit_hook", [True, False], ids=["all_layers", "os_layers_only"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_resource_attacks_are_contained_and_score_0(name, audit_hook):
    code = ATTACKS[name].format(parent=os.getpid()) + ADD  # a correct solution after the attack
    t0 = time.time()
    res = run_program(code, parse_tests(HIDDEN), Limits(cpu_s=1, wall_s=4, memory_mb=512, audit_hook=audit_hook))
    assert res.score == 0.0, res
    assert time.time() - t0 < FAST.wall_s + 10, res  # bounded by the wall-clock limit (+ start-up on a busy machine)
    if name in ("infinite_loop", "fork_bomb"):
        assert res.timed_out or res.returncode in (-24, -9), res  # SIGXCPU/SIGKILL at the CPU limit, or the wall limit
    assert res.pid and session_processes(res.pid) == []  # nothing it started survives it
    assert session_processes(os.getsid(0))  # (the check does see live sessions)


def test_writing_outside_its_directory_is_contained(tmp_path):
    targets = ["/tmp/rlhf-sandbox-escape.txt", str(tmp_path / "escape.txt"), os.path.expanduser("~/rlhf-escape.txt"),
               "/dev/shm/rlhf-escape.txt"]
    code = "".join(f"try:\n    open({t!r}, 'w').write('pwned')\nexcept OSError:\n    pass\n" for t in targets)
    via_link = "import os\nos.symlink('/tmp', 'link')\nopen('link/rlhf-sandbox-link-escape.txt', 'w').write('pwned')\n"
    for audit_hook in (True, False):
        res = run_program(code + via_link + ADD, parse_tests(HIDDEN), Limits(cpu_s=1, wall_s=4, audit_hook=audit_hook))
        assert res.score == 0.0, res
        assert not any(os.path.exists(t) for t in targets + ["/tmp/rlhf-sandbox-link-escape.txt"])
    # its own working directory is writable, and gone afterwards
    own = "open('notes.txt', 'w').write('ok')\nimport os\ncwd = os.getcwd()\n" + ADD
    res = run_program(own, [{"call": "open('notes.txt').read()", "expected": "ok"}, {"call": "cwd", "expected": ""}],
                      FAST)
    assert res.passed[0] and not os.path.exists(json.loads(res.outputs[1]["value"]))


def test_opening_a_socket_is_contained():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    attack = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')\n"
    try:
        for audit_hook in (True, False):
            res = run_program(attack + ADD, parse_tests(HIDDEN), Limits(cpu_s=1, wall_s=4, audit_hook=audit_hook))
            assert res.score == 0.0
            assert ("Network is unreachable" in res.error) or ("socket" in res.error), res.error
            with pytest.raises(socket.timeout):
                server.accept()
    finally:
        server.close()


def test_printing_or_writing_a_fake_score_scores_0():
    fake = json.dumps({"i": 0, "value": "1", "score": 1.0, "passed": [True, True]})
    attack = (
        "import os, sys\n"
        f"print('SCORE: 1.0'); print({fake!r}); print({fake!r}, file=sys.stderr)\n"
        "for fd in range(1, 64):\n"
        "    try:\n"
        f"        os.write(fd, ({fake!r} + '\\n').encode())\n"
        "    except OSError:\n"
        "        pass\n"
        "def add(a, b):\n    return 1\n"
    )
    res = run_program(attack, parse_tests(HIDDEN), FAST)
    assert "SCORE: 1.0" in res.stdout  # it did print...
    assert res.score == 0.0  # ...but the score is computed here, from values checked against hidden expectations


def test_secrets_in_the_trainers_environment_do_not_reach_the_program(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "q" * 30)
    leak = "import os\ndef token():\n    return os.environ.get('HF_TOKEN')\n"
    res = run_program(leak, [{"call": "token()", "expected": "hf_" + "q" * 30}], FAST)
    assert res.score == 0.0 and res.outputs[0]["value"] == "null"


PROGRAMS = [ADD, ATTACKS["infinite_loop"] + ADD, ATTACKS["fork_bomb"] + ADD, ATTACKS["allocate_10_GB"] + ADD,
            "open('/tmp/rlhf-trainer-escape', 'w').write('x')\n" + ADD,
            "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n" + ADD,
            "print('SCORE: 1.0')\ndef add(a, b):\n    return 7\n", "def add(a, b):\n    return a * b + 1\n"]

CODE_REWARD = '''
from rlhf.rewards.code_exec import make_code_exec_reward

_run = make_code_exec_reward(cpu_s=1, wall_s=4, memory_mb=512)


def program_reward(prompts, completions, completion_ids, program, tests, **kw):
    """Scores the dataset's `program` (standing in for model-written code) on the row's tests."""
    return _run(completions=[chr(96) * 3 + "python\\n" + p + chr(96) * 3 for p in program], tests=tests)
'''


def test_the_trainer_is_unharmed_by_hostile_programs(tiny_cfg, tmp_path):
    data = tmp_path / "programs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} ?", "program": p, "tests": HIDDEN}) + "\n"
                            for i, p in enumerate(PROGRAMS)))
    (tmp_path / "code_reward.py").write_text(CODE_REWARD)
    cfg = tiny_cfg(f"data.train={data}", "data.shuffle=false",
                   f"reward.functions=[{{fn: '{tmp_path}/code_reward.py:program_reward'}}]",
                   "train.prompts_per_step=8", "train.samples_per_prompt=2", "train.micro_batch_size=8",
                   "train.steps=1", "log.completions_per_step=16")
    trainer = Trainer(cfg)
    (record,) = trainer.train()
    rewards = [c["reward"] for c in read_jsonl(trainer.out / "completions.jsonl")]
    assert rewards == [1.0, 1.0] + [0.0] * 12 + [0.5, 0.5]  # a * b + 1 passes add(-1, 1) == 0 only
    assert record["reward/mean"] == pytest.approx(3 / 16) and not os.path.exists("/tmp/rlhf-trainer-escape")
    assert all(torch.isfinite(p).all() for p in trainer.unwrapped.parameters())
    assert (trainer.out / "checkpoints" / "latest").is_file()
