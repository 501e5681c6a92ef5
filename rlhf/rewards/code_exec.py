"""Code-execution reward: run model-written Python in a sandboxed process and score it against tests.

    reward:
      functions: [{fn: code_exec}]        # completions hold a ```python block; the dataset has a `tests` column

Each row's `tests` (a list, or a JSON string of one) holds test cases of one of three forms:

    {"call": "add(2, 3)", "expected": 5}        evaluate the call after running the program
    "assert add(2, 3) == 5"                     the same, written as an assert (parsed here, not run)
    {"stdin": "2 3\\n", "stdout": "5\\n"}          run the program as a script on that input

The score is the fraction of tests passed, 0.0 for a completion without code. The program runs in
a fresh `python -I` process (`sandbox_harness.py`) that, before running it, moves into its own
network namespace, drops root to `nobody`, sets limits on CPU time, address space, file size,
processes and open files, works in a temporary directory it cannot leave, and refuses sockets,
process creation, signals and ctypes through an audit hook. The parent kills the whole process
group after `wall_s`. The score is computed HERE, by comparing what the program returned (one
JSON line per test, through a pipe) with the expected values, which never enter the sandbox:
printing or writing a fake score anywhere cannot raise it. `sandbox_report()` says which
isolation layers the current machine allows.

`make_code_exec_reward(cpu_s=..., memory_mb=..., ...)` builds a variant with other limits.
"""
from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from rlhf.rewards.rules import completion_text

HARNESS = Path(__file__).with_name("sandbox_harness.py")
NOBODY = 65534
MAX_RESULT_BYTES = 4 * 1024 * 1024
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.S | re.I)


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU; SIGKILL one second later)
    wall_s: float = 10.0  # wall-clock seconds before the process group is killed
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    file_mb: int = 16  # largest file it may write (RLIMIT_FSIZE), stdout and stderr included
    processes: int = 1  # RLIMIT_NPROC for the sandbox user: no new processes or threads
    open_files: int = 64  # RLIMIT_NOFILE
    audit_hook: bool = True  # defence in depth on top of the OS layers (tests turn it off to check those alone)


@dataclass
class SandboxResult:
    passed: list[bool]
    returncode: Optional[int] = None
    timed_out: bool = False
    isolation: dict[str, str] = field(default_factory=dict)
    outputs: list[Any] = field(default_factory=list)  # what each test produced (value / stdout / error), for debugging
    error: str = ""  # why the program itself failed (raised while loading), if it did
    pid: Optional[int] = None  # of the sandbox process, which led its own session
    stdout: str = ""
    stderr: str = ""

    @property
    def score(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


# ----------------------------------------------------------------------------- tests and code


def extract_code(text: str) -> Optional[str]:
    """The last fenced code block (```python ... ```), else None."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else None


def parse_tests(tests: Any) -> list[dict]:
    """Normalise one row's test cases; `assert CALL == VALUE` strings become {'call', 'expected'}."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not isinstance(tests, (list, tuple)):
        raise ValueError(f"tests must be a list of test cases, got {type(tests).__name__}")
    out = []
    for i, t in enumerate(tests):
        if isinstance(t, str):
            node = ast.parse(t.strip()).body
            ok = len(node) == 1 and isinstance(node[0], ast.Assert) and isinstance(node[0].test, ast.Compare)
            cmp = node[0].test if ok else None
            if not (ok and len(cmp.ops) == 1 and isinstance(cmp.ops[0], ast.Eq)):
                raise ValueError(f"test {i}: only 'assert CALL == VALUE' strings are supported, got {t!r}")
            t = {"call": ast.unparse(cmp.left), "expected": ast.literal_eval(cmp.comparators[0])}
        if not isinstance(t, dict) or not ({"call", "expected"} <= set(t) or {"stdin", "stdout"} <= set(t)):
            raise ValueError(f"test {i}: expected {{'call', 'expected'}} or {{'stdin', 'stdout'}}, got {t!r}")
        out.append(dict(t))
    kinds = {"call" in t for t in out}
    if len(kinds) > 1:
        raise ValueError("tests of one row must all be calls or all be stdin/stdout cases")
    return out


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return type(got) is type(want) and got == want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    return got == want


def _same_stdout(got: str, want: str) -> bool:
    norm = lambda s: [line.rstrip() for line in s.rstrip().splitlines()]  # noqa: E731
    return norm(got) == norm(want)


def _passed(test: dict, out: Optional[dict]) -> bool:
    if out is None or "error" in out:
        return False
    if "call" in test:
        try:
            return _same(json.loads(out.get("value", "")), json.loads(json.dumps(test["expected"])))
        except (ValueError, TypeError):
            return False
    return isinstance(out.get("stdout"), str) and _same_stdout(out["stdout"], test["stdout"])


# ----------------------------------------------------------------------------- one sandboxed run


def _drain(fd: int, sink: bytearray) -> None:
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(65536):
            if len(sink) < MAX_RESULT_BYTES:
                sink += chunk[: MAX_RESULT_BYTES - len(sink)]


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[:n].decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(code: str, tests: list[dict], limits: Limits = Limits()) -> SandboxResult:
    """Run `code` against `tests` (already parsed) in a fresh sandboxed process; never raises for what the code does."""
    root = os.getuid() == 0
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-sandbox-"))
    if root:
        os.chown(workdir, NOBODY, NOBODY)
    read_fd, write_fd = os.pipe()
    job = {"code": code, "tests": [{k: v for k, v in t.items() if k in ("call", "stdin")} for t in tests],
           "workdir": str(workdir), "result_fd": write_fd, "uid": NOBODY, "gid": NOBODY, "limits": asdict(limits),
           "audit_hook": limits.audit_hook}
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(workdir), "TMPDIR": str(workdir),
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # no secrets inherited
    raw = bytearray()
    result = SandboxResult(passed=[False] * len(tests))
    try:
        with open(workdir / ".stdout", "wb") as out_f, open(workdir / ".stderr", "wb") as err_f:
            proc = subprocess.Popen([sys.executable, "-I", str(HARNESS)], stdin=subprocess.PIPE, stdout=out_f,
                                    stderr=err_f, pass_fds=(write_fd,), start_new_session=True, env=env, cwd=workdir)
        os.close(write_fd)
        write_fd, result.pid = -1, proc.pid
        reader = threading.Thread(target=_drain, args=(read_fd, raw), daemon=True)
        reader.start()
        try:
            proc.communicate(json.dumps(job).encode(), timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            result.timed_out = True
            with contextlib.suppress(ProcessLookupError):  # not reaped yet, so the group id is still ours
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except BrokenPipeError:  # died before reading its job
            proc.wait()
        reader.join(timeout=5)
        result.returncode = proc.returncode
        result.stdout, result.stderr = _tail(workdir / ".stdout"), _tail(workdir / ".stderr")
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        shutil.rmtree(workdir, ignore_errors=True)
    outputs: dict[int, dict] = {}
    for line in bytes(raw).decode("utf-8", "replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if not isinstance(msg, dict):
            continue
        if "isolation" in msg and not result.isolation and isinstance(msg["isolation"], dict):
            result.isolation = {str(k): str(v) for k, v in msg["isolation"].items()}
        if "error" in msg and "i" not in msg and not result.error:
            result.error = str(msg["error"])[:2000]
        if isinstance(msg.get("i"), int) and 0 <= msg["i"] < len(tests) and msg["i"] not in outputs:
            outputs[msg["i"]] = msg
    result.outputs = [outputs.get(i) for i in range(len(tests))]
    result.passed = [_passed(t, outputs.get(i)) for i, t in enumerate(tests)]
    return result


def sandbox_report() -> dict[str, str]:
    """Which isolation layers this machine allows (runs a trivial program)."""
    return run_program("x = 1", [{"call": "x", "expected": 1}]).isolation


# ----------------------------------------------------------------------------- the reward function


def make_code_exec_reward(limits: Optional[Limits] = None, tests_column: str = "tests", workers: Optional[int] = None,
                          **limit_overrides: Any):
    """A TRL-signature reward: the fraction of the row's tests the completion's code passes."""
    lim = limits or Limits(**limit_overrides)
    n_workers = workers or max(1, min(8, os.cpu_count() or 1))

    def code_exec(prompts=None, completions=None, completion_ids=None, **columns) -> list[Optional[float]]:
        if tests_column not in columns:
            raise ValueError(f"code_exec needs a '{tests_column}' dataset column "
                             f"(columns: {', '.join(columns) or 'none'})")
        jobs = []
        for completion, tests in zip(completions, columns[tests_column]):
            parsed = parse_tests(tests)
            jobs.append((extract_code(completion_text(completion)), parsed))

        def score(job) -> Optional[float]:
            code, parsed = job
            if not parsed:
                return None  # no tests: not applicable
            return 0.0 if code is None else run_program(code, parsed, lim).score

        with ThreadPoolExecutor(n_workers, thread_name_prefix="code-exec") as pool:
            return list(pool.map(score, jobs))

    code_exec.limits = lim
    return code_exec


code_exec = make_code_exec_reward()
