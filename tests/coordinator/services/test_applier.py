"""Applier: the node's replica, driven by the engine in log order."""

from __future__ import annotations

import asyncio
import logging

import pytest

from coordinator.codec import encode_command
from coordinator.services.applier import Applier
from coordinator.types import Command, Result


def _put(key: str, value: object, proposal_id: str | None = None) -> bytes:
    return encode_command(Command(op="kv.put", args={"key": key, "value": value}, now_ms=1, proposal_id=proposal_id))


async def test_apply_resolves_the_waiting_proposal() -> None:
    applier = Applier()
    future = applier.expect("p-1")
    applier.apply(1, _put("k", 1, "p-1"))
    result = await future
    assert result.ok and result.index == 1 and result.value == {"revision": 1}


async def test_entries_proposed_elsewhere_are_applied_without_a_waiter() -> None:
    applier = Applier()
    applier.apply(1, _put("k", 1, "someone-else"))
    assert applier.machine.kv.get("k").value == 1


async def test_undecodable_entry_is_a_noop_on_every_replica(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="coordinator.services.applier")
    applier = Applier()
    applier.apply(1, b"garbage")
    applier.apply(2, b"C\xc1")
    applier.apply(3, _put("k", 1))
    assert applier.undecodable == 2
    assert applier.applied_index == 3
    assert applier.machine.kv.get("k").value == 1


async def test_a_failing_listener_does_not_stop_the_replica(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="coordinator.services.applier")
    applier = Applier()
    seen: list[str] = []

    def broken(command: Command, result: Result) -> None:
        raise RuntimeError("listener bug")

    applier.on_apply(broken)
    applier.on_apply(lambda command, result: seen.append(command.op))
    applier.apply(1, _put("k", 1))
    assert seen == ["kv.put"]
    assert applier.machine.kv.get("k").value == 1


async def test_wait_applied_wakes_in_index_order() -> None:
    applier = Applier()
    woke: list[int] = []

    async def wait(index: int) -> None:
        await applier.wait_applied(index)
        woke.append(index)

    waiters = [asyncio.create_task(wait(i)) for i in (3, 1, 2)]
    await asyncio.sleep(0)
    applier.apply(1, _put("a", 1))
    applier.apply(2, _put("b", 1))
    await asyncio.sleep(0)
    assert sorted(woke) == [1, 2]
    applier.apply(3, _put("c", 1))
    await asyncio.gather(*waiters)
    assert sorted(woke) == [1, 2, 3]
    await applier.wait_applied(2)  # already applied: returns at once


async def test_restore_wakes_waiters_up_to_the_snapshot_and_listeners() -> None:
    source = Applier()
    for i in range(1, 6):
        source.apply(i, _put(f"k{i}", i))
    blob = source.snapshot()

    replica = Applier()
    resets: list[int] = []
    replica.on_reset(lambda: resets.append(replica.applied_index))
    waiter = asyncio.create_task(replica.wait_applied(5))
    await asyncio.sleep(0)
    version = replica.version
    replica.restore(blob)
    await asyncio.wait_for(waiter, 5)
    assert resets == [5]
    assert replica.version > version
    assert replica.machine.kv.get("k5").value == 5


async def test_wait_change_returns_after_any_change() -> None:
    applier = Applier()
    seen = applier.version
    waiter = asyncio.create_task(applier.wait_change(seen))
    await asyncio.sleep(0)
    assert not waiter.done()
    applier.reset()
    await asyncio.wait_for(waiter, 5)
    await applier.wait_change(seen)  # already past: returns at once
