"""Watch generators over the replica's bounded history."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest

from coordinator.codec import encode_command
from coordinator.errors import Compacted
from coordinator.services import watch
from coordinator.services.applier import Applier
from coordinator.state import Limits
from coordinator.types import Command


class Log:
    """Applies commands straight to an ``Applier`` with growing indexes."""

    def __init__(self, applier: Applier) -> None:
        self.applier = applier
        self.index = 0

    def apply(self, op: str, **args: object) -> None:
        self.index += 1
        self.applier.apply(self.index, encode_command(Command(op=op, args=dict(args), now_ms=self.index)))


async def _next(stream: AsyncIterator[list[Any]]) -> list[Any]:
    async with asyncio.timeout(5):
        return await anext(stream)


async def _parked(stream: AsyncIterator[list[Any]]) -> asyncio.Task[list[Any]]:
    """The stream's next batch as a task, once the generator waits for a change."""
    task = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # the generator runs up to its wait
    assert not task.done()
    return task


async def test_watch_kv_starts_after_the_current_revision_and_filters_by_prefix() -> None:
    applier = Applier()
    log = Log(applier)
    log.apply("kv.put", key="a/old", value=0)
    async with aclosing(watch.watch_kv(applier, "a/", None)) as stream:
        pending = await _parked(stream)
        log.apply("kv.put", key="b/1", value=1)
        log.apply("kv.put", key="a/1", value=2)
        batch = await asyncio.wait_for(pending, 5)
        assert [(c.key, c.kind, c.revision) for c in batch] == [("a/1", "put", 3)]
        log.apply("kv.delete", key="a/1")
        assert [(c.key, c.kind, c.value) for c in await _next(stream)] == [("a/1", "delete", None)]


async def test_watch_kv_from_revision_and_compaction() -> None:
    applier = Applier(Limits(kv_history=3))
    log = Log(applier)
    for i in range(1, 6):
        log.apply("kv.put", key=f"k{i}", value=i)
    async with aclosing(watch.watch_kv(applier, "", 3)) as stream:
        assert [c.revision for c in await _next(stream)] == [3, 4, 5]
    async with aclosing(watch.watch_kv(applier, "", 2)) as stream:
        with pytest.raises(Compacted) as compacted:
            await _next(stream)
    assert compacted.value.details["compact_revision"] == 2


async def test_watch_kv_after_a_replay_delivers_only_new_changes() -> None:
    """The engine resets the replica and replays the same log: the replayed
    changes were delivered already, only what follows is new."""
    applier = Applier()
    log = Log(applier)
    for i in range(1, 4):
        log.apply("kv.put", key=f"k{i}", value=i)
    async with aclosing(watch.watch_kv(applier, "", None)) as stream:  # cursor: revision 4
        pending = await _parked(stream)
        applier.reset()
        log.index = 0
        for i in range(1, 4):
            log.apply("kv.put", key=f"k{i}", value=i)  # the replay
        log.apply("kv.put", key="new", value=4)
        assert [(c.key, c.revision) for c in await asyncio.wait_for(pending, 5)] == [("new", 4)]


async def test_watch_events_with_type_patterns() -> None:
    applier = Applier()
    log = Log(applier)
    async with aclosing(watch.watch_events(applier, None, ("agent.*", "lock.released"))) as stream:
        pending = await _parked(stream)
        log.apply("lock.acquire", name="l", holder="a", ttl_ms=1000)
        log.apply("agent.register", id="w", type="t", ttl_ms=1000)
        assert [e.type for e in await asyncio.wait_for(pending, 5)] == ["agent.spawned"]
        log.apply("lock.release", name="l", holder="a")
        assert [e.type for e in await _next(stream)] == ["lock.released"]


def test_event_matches() -> None:
    assert watch.event_matches("agent.spawned", ())
    assert watch.event_matches("agent.spawned", ("agent.*",))
    assert watch.event_matches("agent.health.changed", ("agent.*",))
    assert not watch.event_matches("agentx.spawned", ("agent.*",))
    assert watch.event_matches("lock.acquired", ("agent.*", "lock.acquired"))
    assert not watch.event_matches("lock.acquired", ("lock.released",))
