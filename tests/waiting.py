"""Waiting for a condition in tests: poll it until it holds, or fail the test
naming what was awaited. Never a sleep for luck: every wait has a condition
and a deadline.

One rule for both forms: ``condition`` is called at once, then every
``interval_s``; its first truthy value is returned. Once ``timeout_s`` has
passed since the first call, the next falsy value fails the test. A
condition that blocks (a long-poll fetch, an HTTP call) counts its own time
against the deadline; ``interval_s=0`` polls it back to back.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import pytest

DEADLINE_S = 5.0  # the default wait: in-process conditions, with room for a loaded machine
POLL_S = 0.005  # the default interval: cheap in-process checks
CLUSTER_POLL_S = 0.05  # conditions that call node processes or brokers: go easy on them

What = str | Callable[[], str]  # a callable is asked at the deadline, for a message with the latest state


async def eventually(condition: Callable[[], Any], what: What, timeout_s: float = DEADLINE_S, *,
                     interval_s: float = POLL_S) -> Any:
    """Poll ``condition`` (plain, or returning an awaitable) on the running
    loop until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        _fail_after(deadline, what, timeout_s)
        await asyncio.sleep(interval_s)


def wait_until(condition: Callable[[], Any], what: What, timeout_s: float = DEADLINE_S, *,
               interval_s: float = POLL_S) -> Any:
    """``eventually`` for synchronous tests: blocks the thread between calls."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        _fail_after(deadline, what, timeout_s)
        time.sleep(interval_s)
    return value


def _fail_after(deadline: float, what: What, timeout_s: float) -> None:
    if time.monotonic() > deadline:
        pytest.fail(f"timed out after {timeout_s}s waiting for {what() if callable(what) else what}")
