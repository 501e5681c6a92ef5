"""Calling user code (reward functions, tools, environments) that may be async or hang: one piece of code for both.

    out = call(fn, kwargs, timeout_s=5.0)   # raises CallTimeout; an async function is awaited

With a timeout the call runs in a daemon thread, so a function that never returns is abandoned (it keeps its
thread) and never blocks the run, nor its exit.
"""
from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, Callable, Optional


class CallTimeout(TimeoutError):
    """The call did not return within its timeout."""


def call(fn: Callable, kwargs: dict, timeout_s: Optional[float] = None) -> Any:
    """`fn(**kwargs)`, awaited if it is a coroutine function or returns an awaitable, within `timeout_s`
    (None: no limit)."""
    if timeout_s is None and not inspect.iscoroutinefunction(fn):
        out = fn(**kwargs)
        return _run_coroutine(out, None) if inspect.isawaitable(out) else out
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            out = fn(**kwargs)
            box["out"] = _run_coroutine(out, timeout_s) if inspect.isawaitable(out) else out
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["err"] = e

    thread = threading.Thread(target=target, name="rlhf-user-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise CallTimeout(f"timed out after {timeout_s} s")
    if "err" in box:
        raise box["err"]
    return box["out"]


def _run_coroutine(awaitable: Any, timeout_s: Optional[float]) -> Any:
    async def run():
        return await asyncio.wait_for(awaitable, timeout=timeout_s)

    try:
        return asyncio.run(run())
    except asyncio.TimeoutError:
        raise CallTimeout(f"timed out after {timeout_s} s") from None
