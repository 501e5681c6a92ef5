"""The child side of `rlhf.rewards.code_exec`: isolate this process, then run untrusted code.

Run as `python -I sandbox_harness.py` with a JSON job on stdin (see `code_exec.run_program`).
Stdlib only and self-contained: with `-I` nothing from the caller's environment is imported.

Order matters, everything below happens BEFORE the untrusted code runs:
 1. read the job, point stdin at /dev/null;
 2. namespaces (as root; else inside a user namespace): a fresh network namespace, whose only
    interface is a down loopback, so nothing can be reached; a private mount namespace where every
    mount is remounted read-only except the working directory;
 3. `no_new_privs`, then drop root to the sandbox uid/gid (nobody), so RLIMIT_NPROC applies and
    nothing owned by root can be written or read;
 4. resource limits: CPU seconds, address space, file size, processes, open files, no core dumps;
 5. an audit hook that refuses sockets, process creation, signals, ctypes, and any file access
    outside the working directory (reads of the Python installation excepted).
Results go to the pipe fd the parent gave us, one JSON line per test: the returned value (as
JSON) or the captured stdout. The parent compares them with expected values that never enter
this process, so nothing the program writes anywhere can raise its score.
"""
import ctypes
import io
import json
import os
import resource
import sys

CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWNS, PR_SET_NO_NEW_PRIVS = 0x40000000, 0x10000000, 0x00020000, 38
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
BLOCKED_EVENTS = {
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "socket.gethostbyname",
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn",
    "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink", "os.link", "os.setuid", "os.setgid",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof", "ctypes.string_at",
    "sys.remote_exec",
}
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
               "os.listdir", "os.scandir", "os.chdir", "shutil.rmtree", "shutil.copyfile", "shutil.move"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    return libc


def python_roots() -> list[str]:
    """Directories the interpreter imports from (outermost only)."""
    dirs = sorted({os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path]
                   if p and os.path.isdir(p)})
    return [d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs)]


def expose_python(libc, uid: int) -> None:
    """If the Python installation sits below a directory the sandbox user cannot enter (e.g. /root/.pyenv),
    cover that directory with an empty tmpfs in our mount namespace and bind the installation back in:
    imports keep working after the uid drop, and the rest of that directory stays invisible."""
    hidden: dict[str, list[str]] = {}
    for root in python_roots():
        parts = root.split("/")
        for i in range(2, len(parts) + 1):
            d = "/".join(parts[:i])
            st = os.stat(d)
            if not st.st_mode & 0o001 and st.st_uid != uid:
                hidden.setdefault(d, []).append(root)
                break
    fds = {root: os.open(root, os.O_PATH) for roots in hidden.values() for root in roots}
    for d, roots in hidden.items():
        libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"mode=0755,size=1m")
        for root in roots:
            os.makedirs(root, exist_ok=True)
            libc.mount(f"/proc/self/fd/{fds[root]}".encode(), root.encode(), None, MS_BIND | MS_REC, None)


def isolate_namespaces(workdir: str, uid: int) -> dict:
    """New network and mount namespaces (as root; else inside a user namespace): no network, and every
    mount read-only except the working directory. Nothing here affects the host's namespaces."""
    libc = _libc()
    for extra, label in ((0, ""), (CLONE_NEWUSER, "userns+")):
        if libc.unshare(extra | CLONE_NEWNET | CLONE_NEWNS) == 0:
            break
    else:
        return {"network": "none (audit hook only)", "filesystem": "none (audit hook only)"}
    wd = workdir.encode()
    ok = libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0 and libc.mount(wd, wd, None, MS_BIND, None) == 0
    if ok:
        expose_python(libc, uid)
    failed = 0
    if ok:
        for line in open("/proc/self/mountinfo"):
            mountpoint = line.split()[4]
            if mountpoint != workdir and libc.mount(None, mountpoint.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY,
                                                    None):
                failed += 1
    fs = f"{label}mntns: read-only except the working directory" if ok else "none (audit hook only)"
    return {"network": f"{label}netns",
            "filesystem": fs + (f" ({failed} mounts stayed writable)" if ok and failed else "")}


def drop_privileges(uid: int, gid: int) -> str:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if os.getuid() != 0:
        return f"uid {os.getuid()} (not root: kept)"
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    return f"uid {uid}"


def set_limits(lim: dict) -> None:
    mb = 1024 * 1024
    for res, value in ((resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
                       (resource.RLIMIT_AS, (lim["memory_mb"] * mb,) * 2),
                       (resource.RLIMIT_FSIZE, (lim["file_mb"] * mb,) * 2),
                       (resource.RLIMIT_NPROC, (lim["processes"],) * 2),
                       (resource.RLIMIT_NOFILE, (lim["open_files"],) * 2),
                       (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(res, value)


def install_audit_hook(workdir: str) -> None:
    workdir = os.path.realpath(workdir)
    readable = set(python_roots()) | {"/usr/lib", "/usr/local/lib", "/lib", "/lib64", "/usr/lib64",
                                      "/usr/share/zoneinfo", "/etc/localtime", "/dev/null", "/dev/urandom", "/dev/zero"}

    def inside(path, roots) -> bool:
        real = os.path.realpath(os.path.join(workdir, os.fsdecode(path)))
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)

    def hook(event, args):
        if event in BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int) or path is None:
                return
            writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
            if not inside(path, {workdir} if writes else {workdir} | readable):
                raise PermissionError(f"sandbox: access to {os.fsdecode(path)} is not allowed")
        elif event in PATH_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
            roots = {workdir} | readable if event in ("os.listdir", "os.scandir") else {workdir}
            for p in args[:2] if event in ("os.rename", "shutil.copyfile", "shutil.move") else args[:1]:
                if isinstance(p, (str, bytes, os.PathLike)) and not inside(p, roots):
                    raise PermissionError(f"sandbox: {event} on {os.fsdecode(p)} is not allowed")

    sys.addaudithook(hook)


def run_tests(code: str, tests: list, send) -> None:
    if all("call" in t for t in tests):
        ns = {"__name__": "solution", "__builtins__": __builtins__}
        try:
            exec(compile(code, "<solution>", "exec"), ns)
        except BaseException as e:  # noqa: BLE001 - the program may raise anything, SystemExit included
            send({"error": f"{type(e).__name__}: {e}"})
            return
        for i, t in enumerate(tests):
            try:
                send({"i": i, "value": json.dumps(eval(t["call"], ns))})
            except BaseException as e:  # noqa: BLE001
                send({"i": i, "error": f"{type(e).__name__}: {e}"})
        return
    real_stdin, real_stdout = sys.stdin, sys.stdout
    for i, t in enumerate(tests):
        sys.stdin, sys.stdout = io.StringIO(t.get("stdin", "")), io.StringIO()
        try:
            exec(compile(code, "<solution>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
            error = None
        except SystemExit as e:
            error = None if e.code in (None, 0) else f"SystemExit: {e.code}"
        except BaseException as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        captured = sys.stdout.getvalue()
        sys.stdin, sys.stdout = real_stdin, real_stdout
        send({"i": i, "stdout": captured[:1_000_000]} if error is None else {"i": i, "error": error})


def main() -> None:
    job = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    out = os.fdopen(job["result_fd"], "w", buffering=1)

    def send(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    isolation = isolate_namespaces(job["workdir"], job["uid"])
    isolation["user"] = drop_privileges(job["uid"], job["gid"])
    os.chdir(job["workdir"])
    set_limits(job["limits"])
    isolation["limits"] = "cpu, memory, file size, processes, open files"
    if job["audit_hook"]:
        install_audit_hook(job["workdir"])
    isolation["audit_hook"] = "on" if job["audit_hook"] else "off"
    send({"isolation": isolation})
    code, tests = job.pop("code"), job.pop("tests")
    del job
    run_tests(code, tests, send)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
