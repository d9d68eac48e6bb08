"""Watches as Server-Sent Events, and the event list."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator.api import routes
from coordinator.codec import encode_command
from coordinator.state import Limits
from coordinator.types import Command
from tests.coordinator.api.conftest import Harness, HarnessFactory
from tests.sse import open_stream, read_event


async def test_kv_watch_streams_changes_under_the_prefix_only(h: Harness) -> None:
    await h.put("a/old", "before the watch")
    response = await open_stream(h.http, "/v1/watch?prefix=a/")
    try:
        r1 = await h.put("a/1", "one")
        await h.put("b/1", "elsewhere")
        await h.put("ab", "not under a/")
        await h.call("DELETE", "/v1/kv/a/1", expect=200)
        r3 = await h.put("a/2", {"two": 2})

        put = await read_event(response)
        assert put["id"] == r1 and put["event"] == "put"
        assert put["data"]["key"] == "a/1" and put["data"]["value"] == "one" and put["data"]["revision"] == r1
        deleted = await read_event(response)
        assert deleted["event"] == "delete" and deleted["data"]["key"] == "a/1"
        assert deleted["data"]["value"] is None and deleted["id"] == deleted["data"]["revision"]
        last = await read_event(response)
        assert last["id"] == r3 and last["data"]["key"] == "a/2" and last["data"]["value"] == {"two": 2}
    finally:
        response.close()


async def test_kv_watch_from_revision_replays_history(h: Harness) -> None:
    r1 = await h.put("a/1", 1)
    await h.put("b/1", 1)
    r3 = await h.put("a/2", 2)
    response = await open_stream(h.http, f"/v1/watch?prefix=a/&from_revision={r1}")
    try:
        assert [(e["id"], e["data"]["key"]) for e in [await read_event(response), await read_event(response)]] == [
            (r1, "a/1"), (r3, "a/2")]
        r4 = await h.put("a/3", 3)  # then live changes follow
        assert (await read_event(response))["id"] == r4
    finally:
        response.close()


async def test_kv_watch_resumes_after_last_event_id(h: Harness) -> None:
    r1 = await h.put("a/1", 1)
    r2 = await h.put("a/2", 2)
    r3 = await h.put("a/3", 3)
    # Last-Event-ID wins over from_revision: a reconnecting browser sends both.
    response = await open_stream(h.http, f"/v1/watch?prefix=a/&from_revision={r1}", headers={"Last-Event-ID": str(r2)})
    try:
        event = await read_event(response)
        assert event["id"] == r3 and event["data"]["key"] == "a/3"
    finally:
        response.close()


async def test_kv_watch_from_compacted_revision_is_410(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(kv_history=3))
    for i in range(5):
        await h.put(f"a/{i}", i)  # revisions 1..5; 3..5 retained
    status, body = await h.call("GET", "/v1/watch?prefix=a/&from_revision=1")
    assert status == 410
    assert body["error"]["code"] == "compacted"
    assert body["error"]["compact_revision"] == 2
    status, _ = await h.call("GET", "/v1/watch?from_revision=2")
    assert status == 410
    response = await open_stream(h.http, "/v1/watch?prefix=a/&from_revision=3")
    try:
        assert [(await read_event(response))["id"] for _ in range(3)] == [3, 4, 5]
    finally:
        response.close()


async def test_kv_watch_falling_behind_the_history_ends_with_an_error_event(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(kv_history=3))
    await h.put("a/0", 0)
    response = await open_stream(h.http, "/v1/watch?prefix=a/")
    try:
        # Five changes commit in one go, before the watcher runs again: its cursor is compacted.
        for i in range(1, 6):
            command = Command(op="kv.put", args={"key": f"a/{i}", "value": i}, now_ms=h.clock.now_ms())
            h.engine.submit(encode_command(command), lambda reason: None)
        event = await read_event(response)
        assert event["event"] == "error"
        assert event["data"]["code"] == "compacted"
        async with asyncio.timeout(5):
            assert await response.content.read() == b""  # the server ended the stream
    finally:
        response.close()


async def test_watch_client_disconnect_ends_the_stream_cleanly(h: Harness, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The handler is cancelled when the client goes away while it waits for
    changes; it used to call ``aclose()`` on the watch generator while that
    generator was still running, which raised RuntimeError (logged as an
    unhandled 500) and left the generator to be finalized later."""
    closed = asyncio.Event()
    watch_kv = routes.watch.watch_kv

    async def tracked(*args: Any) -> AsyncIterator[Any]:
        try:
            async for batch in watch_kv(*args):
                yield batch
        finally:
            closed.set()

    monkeypatch.setattr(routes.watch, "watch_kv", tracked)
    caplog.set_level(logging.ERROR, logger="coordinator.api.app")
    response = await open_stream(h.http, "/v1/watch?prefix=a/")
    await h.put("a/1", 1)
    assert (await read_event(response))["data"]["key"] == "a/1"
    response.close()
    async with asyncio.timeout(5):
        await closed.wait()
    for _ in range(10):
        await asyncio.sleep(0)
    assert [r.getMessage() for r in caplog.records if r.name == "coordinator.api.app"] == []


async def test_event_watch_streams_agent_and_lock_events(h: Harness) -> None:
    response = await open_stream(h.http, "/v1/watch/events?types=agent.*")
    try:
        await h.call("POST", "/v1/locks/l", {"holder": "x"}, expect=200)  # filtered out
        await h.register("worker", id="w1")
        await h.call("DELETE", "/v1/agents/w1", expect=200)
        spawned = await read_event(response)
        assert spawned["event"] == "agent.spawned"
        assert spawned["data"]["data"]["agentId"] == "w1"
        assert spawned["id"] == spawned["data"]["seq"]
        terminated = await read_event(response)
        assert terminated["event"] == "agent.terminated" and terminated["id"] > spawned["id"]
    finally:
        response.close()


async def test_event_watch_replays_from_seq(h: Harness) -> None:
    await h.register("worker", id="w1")
    await h.register("worker", id="w2")
    events = await h.events("agent.*")
    response = await open_stream(h.http, f"/v1/watch/events?from_seq={events[0]['seq']}")
    try:
        first, second = await read_event(response), await read_event(response)
        assert [first["data"]["data"]["agentId"], second["data"]["data"]["agentId"]] == ["w1", "w2"]
    finally:
        response.close()


async def test_events_list_filters_by_type_and_seq(h: Harness) -> None:
    await h.register("worker", id="w1")
    await h.call("POST", "/v1/locks/l", {"holder": "w1"}, expect=200)
    await h.call("POST", "/v1/agents/w1/heartbeat", {"health": "healthy"}, expect=200)
    await h.call("DELETE", "/v1/agents/w1", expect=200)

    _, everything = await h.call("GET", "/v1/events", expect=200)
    types = [e["type"] for e in everything["events"]]
    # The node's own registration and the leader's election come first, in either order.
    assert sorted(types[:2]) == ["system.leader.elected", "system.member.joined"]
    assert types[2:] == ["agent.spawned", "lock.acquired", "agent.health.changed", "agent.terminated",
                         "lock.released"]
    assert everything["last_seq"] == len(types)
    assert [e["seq"] for e in everything["events"]] == list(range(1, len(types) + 1))

    _, agents = await h.call("GET", "/v1/events?types=agent.*", expect=200)
    assert [e["type"] for e in agents["events"]] == ["agent.spawned", "agent.health.changed", "agent.terminated"]
    _, exact = await h.call("GET", "/v1/events?types=lock.acquired,agent.spawned", expect=200)
    assert [e["type"] for e in exact["events"]] == ["agent.spawned", "lock.acquired"]
    _, later = await h.call("GET", "/v1/events?from_seq=5&types=agent.*", expect=200)
    assert [e["seq"] for e in later["events"]] == [5, 6]
    _, limited = await h.call("GET", "/v1/events?limit=2", expect=200)
    assert [e["seq"] for e in limited["events"]] == [1, 2]
    _, future = await h.call("GET", "/v1/events?from_seq=100", expect=200)
    assert future["events"] == []


async def test_events_from_compacted_seq_is_410(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(events_retained=2))
    for i in range(4):
        await h.register("worker", id=f"w{i}")
    status, body = await h.call("GET", "/v1/events?from_seq=1")
    assert status == 410 and body["error"]["code"] == "compacted"
    first_seq = body["error"]["first_seq"]
    _, retained = await h.call("GET", f"/v1/events?from_seq={first_seq}", expect=200)
    assert len(retained["events"]) == 2
