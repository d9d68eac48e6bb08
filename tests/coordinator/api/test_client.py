"""The Python client (coordinator/client.py) against the test server."""

from __future__ import annotations

import asyncio
import socket
import zlib
from contextlib import aclosing
from typing import Any

import pytest

from coordinator.client import CoordinatorClient, Registration
from coordinator.errors import Compacted, InvalidInput, OutcomeUnknown, Unavailable
from coordinator.state import Limits
from tests.coordinator.api.conftest import Harness, HarnessFactory
from tests.waiting import eventually


async def test_kv_roundtrip(h: Harness, client: CoordinatorClient) -> None:
    revision = await client.put("cfg/a", {"n": 1})
    got = await client.get("cfg/a")
    assert got is not None and got["value"] == {"n": 1} and got["revision"] == revision
    assert await client.get("cfg/missing") is None
    assert (await client.get("cfg/a", consistency="stale"))["value"] == {"n": 1}

    assert await client.cas("cfg/a", {"n": 2}, {"n": 3}) is None  # not the current value
    new_revision = await client.cas("cfg/a", {"n": 1}, {"n": 2})
    assert new_revision is not None and new_revision > revision
    assert (await client.get("cfg/a"))["value"] == {"n": 2}

    await client.put("cfg/b", "b")
    await client.put("other", "o")
    assert [i["key"] for i in await client.list("cfg/")] == ["cfg/a", "cfg/b"]
    assert [i["key"] for i in await client.list("cfg/", limit=1)] == ["cfg/a"]

    assert await client.delete("cfg/a") is True
    assert await client.delete("cfg/a") is False
    assert await client.get("cfg/a") is None


async def test_client_writes_carry_request_ids(h: Harness, client: CoordinatorClient) -> None:
    await client.put("k", 1)
    await client.put("k", 1)  # two separate writes: two revisions, not deduped
    assert (await client.get("k"))["version"] == 2


async def test_bad_input_raises_invalid_input_at_once(h: Harness, client: CoordinatorClient) -> None:
    with pytest.raises(InvalidInput) as invalid:
        await client.register("")
    assert invalid.value.field == "type"


async def test_register_heartbeat_deregister(h: Harness, client: CoordinatorClient) -> None:
    registration = await client.register("worker", agent_id="w1", ttl_s=2, metadata={"gpu": True}, weight=2)
    assert registration.id == "w1" and registration.ttl_s == 2 and registration.lease_id > 0
    generated = await client.register("worker")
    assert generated.id.startswith("agent-")

    h.clock.advance(1.5)
    beat = await client.heartbeat("w1", health="healthy")
    assert beat["health"] == "healthy"
    await h.advance_and_tick(1.5)
    agents = await client.agents("worker")
    assert {a["id"] for a in agents} == {"w1", generated.id}
    assert next(a for a in agents if a["id"] == "w1")["metadata"] == {"gpu": True}
    assert await client.agents("nobody") == []

    await client.deregister("w1")
    await client.deregister("w1")  # already gone: not an error
    assert {a["id"] for a in await client.agents()} == {generated.id}


async def test_locks_and_elections(h: Harness, client: CoordinatorClient) -> None:
    token = await client.acquire("db", "w1", ttl_s=5)
    assert token is not None
    assert await client.acquire("db", "w2") is None
    assert await client.acquire("db", "w1", ttl_s=5) == token  # refresh
    assert await client.release("db", "w2") is False
    assert await client.release("db", "w1") is True
    assert await client.release("db", "w1") is False
    assert (await client.acquire("db", "w2")) > token

    term = await client.campaign("sched", "a")
    assert term is not None
    assert await client.campaign("sched", "b") is None
    assert (await client.leader("sched"))["leader"] == "a"
    assert await client.resign("sched", "b") is False
    assert await client.resign("sched", "a") is True
    assert await client.leader("sched") is None


async def test_watch_yields_changes(h: Harness, client: CoordinatorClient) -> None:
    r1 = await client.put("w/1", "one")
    await client.put("x/1", "elsewhere")
    r2 = await client.put("w/2", "two")
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(5), aclosing(client.watch("w/", from_revision=r1)) as stream:
        async for change in stream:
            seen.append(change)
            if len(seen) == 2:
                break
    assert [(c["key"], c["revision"], c["type"]) for c in seen] == [("w/1", r1, "put"), ("w/2", r2, "put")]


async def test_watch_sees_live_changes(h: Harness, client: CoordinatorClient) -> None:
    async def writer() -> None:
        await eventually(lambda: h.applier._change_waiters, "the watcher to wait")
        await client.put("live/1", 1)
        await client.delete("live/1")

    task = asyncio.create_task(writer())
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(5), aclosing(client.watch("live/")) as stream:
        async for change in stream:
            seen.append(change)
            if len(seen) == 2:
                break
    await task
    assert [c["type"] for c in seen] == ["put", "delete"]


async def test_watch_events(h: Harness, client: CoordinatorClient) -> None:
    await client.register("worker", agent_id="w1")
    await client.acquire("l", "w1")
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(5), aclosing(client.watch_events(from_seq=1, types=("agent.*", "lock.*"))) as stream:
        async for event in stream:
            seen.append(event)
            if len(seen) == 2:
                break
    assert [e["type"] for e in seen] == ["agent.spawned", "lock.acquired"]
    listed = await client.events(from_seq=1)
    assert [e["type"] for e in listed if not e["type"].startswith("system.")] == ["agent.spawned", "lock.acquired"]


async def test_watch_from_compacted_revision_raises(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(kv_history=2))
    async with CoordinatorClient([str(h.http.make_url(""))], timeout_s=3) as client:
        for i in range(4):
            await client.put(f"k{i}", i)
        with pytest.raises(Compacted):
            async with asyncio.timeout(5), aclosing(client.watch("", from_revision=1)) as stream:
                async for _ in stream:
                    pass


async def test_no_quorum_raises_unavailable_after_the_deadline(h: Harness) -> None:
    h.engine.no_leader = True
    async with CoordinatorClient([str(h.http.make_url(""))], timeout_s=0.5) as client:
        with pytest.raises(Unavailable):
            await client.put("k", 1)
        assert (await client.get("k", consistency="stale")) is None
    assert h.applier.machine.kv.get("k") is None


async def test_status(h: Harness, client: CoordinatorClient) -> None:
    status = await client.status()
    assert status["node"] == "n1" and status["role"] == "leader"


@pytest.mark.parametrize("key", ["q?x", "q#x", "q%2Fx"])
async def test_keys_with_url_special_characters_roundtrip(h: Harness, client: CoordinatorClient, key: str) -> None:
    await client.put(key, "value")
    assert [i["key"] for i in await client.list("q")] == [key]


async def test_agent_ids_with_a_slash_can_heartbeat(h: Harness, client: CoordinatorClient) -> None:
    await client.register("worker", agent_id="team/a")
    beat = await client.heartbeat("team/a")
    assert beat["id"] == "team/a"


async def test_a_call_that_timed_out_on_a_hung_node_moves_the_next_call_elsewhere(h: Harness) -> None:
    """A node that accepts connections and never answers (a partitioned old
    leader, a paused process) costs one call, not every call after it."""
    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    hung = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with CoordinatorClient([hung, str(h.http.make_url(""))], timeout_s=0.3,
                                     request_timeout_s=0.3) as client:
            with pytest.raises(OutcomeUnknown):
                await client.get("k")
            assert client.endpoint != f"http://{hung}"
            assert await client.put("k", 1) > 0
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_heartbeats_start_at_the_node_the_agent_id_hashes_to_and_fail_over(make_harness: HarnessFactory
                                                                                  ) -> None:
    """Two one-node clusters stand in for two nodes that both know every agent."""
    a, b = await make_harness(), await make_harness()
    nodes = [a, b]
    ids = [f"spread-{i}" for i in range(12)]
    for node in nodes:
        async with CoordinatorClient([str(node.http.make_url(""))], timeout_s=3) as c:
            for agent_id in ids:
                await c.register("worker", agent_id=agent_id, ttl_s=30)
    expected = [0, 0]
    async with CoordinatorClient([str(n.http.make_url("")) for n in nodes], timeout_s=3) as c:
        for agent_id in ids:
            assert (await c.heartbeat(agent_id))["id"] == agent_id
            expected[zlib.crc32(agent_id.encode()) % 2] += 1
    assert [n.node.heartbeats_answered for n in nodes] == expected and min(expected) > 0
    dead = "http://127.0.0.1:1"  # nothing listens: the connection is refused, the client moves on
    async with CoordinatorClient([dead, str(a.http.make_url(""))], timeout_s=3) as c:
        for agent_id in ids:
            assert (await c.heartbeat(agent_id))["id"] == agent_id
    assert a.node.heartbeats_answered == expected[0] + len(ids)


async def test_a_udp_heartbeat_nobody_acks_falls_back_to_http(h: Harness) -> None:
    async with CoordinatorClient([str(h.http.make_url(""))], timeout_s=3, heartbeat_over="udp",
                                 datagram_timeout_s=0.05) as c:
        registration = await c.register("worker", agent_id="w1", ttl_s=5)
        assert registration.heartbeat_key is None  # this node takes no datagrams (no cluster secret)
        assert await c.heartbeat_udp(registration) == "http"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
            silent.bind(("127.0.0.1", 0))
            keyed = Registration("w1", registration.lease_id, 5, b"k" * 32,
                                 (f"127.0.0.1:{silent.getsockname()[1]}",) * 2)
            assert "k" * 8 not in repr(keyed)  # the key is never printed
            before = h.node.heartbeats_answered
            assert await c.heartbeat_udp(keyed) == "http"
            assert h.node.heartbeats_answered == before + 1
            assert len(silent.recv(100)) == 34  # the datagram went out
