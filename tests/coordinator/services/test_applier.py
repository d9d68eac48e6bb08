"""Applier: the node's replica, driven by the engine in log order."""

from __future__ import annotations

import asyncio
import logging

import pytest

from coordinator.codec import encode_command
from coordinator.commands.kv import KvPut
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


# -- state digest and halting (issue 20, item 10) ----------------------------------------------

def _history() -> list[bytes]:
    return [_put(f"k{i % 3}", i) for i in range(1, 41)]


def test_replicas_applying_the_same_history_have_the_same_digest() -> None:
    a, b = Applier(), Applier()
    for index, blob in enumerate(_history(), start=1):
        assert a.apply(index, blob) == b.apply(index, blob)
    assert a.digest.index == b.digest.index == 40
    assert a.digest.value == b.digest.value
    assert a.digest.points() == b.digest.points()


def test_restore_then_continue_gives_the_uninterrupted_digest() -> None:
    history = _history()
    uninterrupted = Applier()
    for index, blob in enumerate(history, start=1):
        uninterrupted.apply(index, blob)
    source = Applier()
    for index, blob in enumerate(history[:25], start=1):
        source.apply(index, blob)
    replica = Applier()
    replica.restore(source.snapshot())
    assert (replica.digest.index, replica.digest.value) == (source.digest.index, source.digest.value)
    for index, blob in enumerate(history[25:], start=26):
        replica.apply(index, blob)
    assert (replica.digest.index, replica.digest.value) == (uninterrupted.digest.index, uninterrupted.digest.value)
    assert replica.snapshot() == uninterrupted.snapshot()


def test_a_different_result_gives_a_different_digest(monkeypatch) -> None:
    history = _history()
    honest, other = Applier(), Applier()
    for index, blob in enumerate(history[:10], start=1):
        honest.apply(index, blob)
        other.apply(index, blob)
    assert honest.digest.value == other.digest.value
    # the same entry, another result on one replica (a non-deterministic handler)
    monkeypatch.setattr(other, "_result_bytes", lambda result: b"another result")
    honest.apply(11, history[10])
    other.apply(11, history[10])
    assert honest.digest.value != other.digest.value


def _failing_kv_put(monkeypatch) -> None:
    from coordinator.state import machine

    def broken(sm, ctx, cmd):  # kv.put's handler takes its typed command (coordinator.commands.kv.KvPut)
        sm.kv.put(ctx, cmd.key, cmd.value)  # half-applied: the store moved, then the bug
        raise KeyError(cmd.value)  # the exception's text quotes a caller's value

    monkeypatch.setitem(machine._HANDLERS, KvPut, broken)


async def test_an_exception_in_a_handler_halts_the_replica(monkeypatch, caplog) -> None:
    from coordinator.errors import OutcomeUnknown, ReplicaHalted

    caplog.set_level(logging.CRITICAL, logger="coordinator.services.applier")
    applier = Applier()
    applier.apply(1, _put("a", 1))
    pending = applier.expect("p-2")
    reader = asyncio.create_task(applier.wait_applied(5))
    await asyncio.sleep(0)
    _failing_kv_put(monkeypatch)
    with pytest.raises(ReplicaHalted, match="apply failed at index 2: KeyError"):
        applier.apply(2, encode_command(Command(op="kv.put", args={"key": "b", "value": "secret-value-42"},
                                                now_ms=1, proposal_id="p-2")))
    assert applier.failure is not None and applier.failure.problem == "apply failed at index 2: KeyError"
    with pytest.raises(OutcomeUnknown):
        await pending
    with pytest.raises(ReplicaHalted):
        await reader
    # nothing later is applied over the half-applied state, nor snapshotted, nor restored
    monkeypatch.undo()
    with pytest.raises(ReplicaHalted):
        applier.apply(3, _put("c", 3))
    assert applier.machine.kv.get("c") is None
    with pytest.raises(ReplicaHalted):
        applier.snapshot()
    with pytest.raises(ReplicaHalted):
        applier.restore(Applier().snapshot())
    with pytest.raises(ReplicaHalted):
        await applier.wait_applied(1)
    applier.reset()  # a halt lasts for the process: a restart replays
    assert applier.failure is not None
    assert applier.digest.index == 0
    assert "secret-value-42" not in caplog.text
    assert "apply failed at index 2: KeyError" in caplog.text


async def test_a_snapshot_that_cannot_be_restored_halts_the_replica(caplog) -> None:
    from coordinator.errors import ReplicaHalted

    caplog.set_level(logging.CRITICAL, logger="coordinator.services.applier")
    applier = Applier()
    with pytest.raises(ReplicaHalted, match="restore failed at index 0: InvalidInput"):
        applier.restore(b"not a snapshot")
    with pytest.raises(ReplicaHalted):
        applier.apply(1, _put("a", 1))


async def test_the_unsafe_failpoint_fails_the_first_entry_at_or_past_its_index(caplog) -> None:
    from coordinator.errors import ReplicaHalted

    caplog.set_level(logging.CRITICAL, logger="coordinator.services.applier")
    applier = Applier(fail_apply_at=4)
    applier.apply(1, _put("a", 1))
    applier.apply(3, _put("a", 3))
    with pytest.raises(ReplicaHalted, match="apply failed at index 5: InjectedApplyFailure"):
        applier.apply(5, _put("a", 5))
    assert applier.machine.kv.get("a").value == 3
