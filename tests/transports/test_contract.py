"""The contract every ``BusTransport`` keeps, checked against each plugin
(one suite, parametrized by ``plugin``; brokers are the real servers)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from coordinator.errors import Unavailable
from coordinator.ports import BusTransport
from coordinator.types import TransportDelivery, TransportEntry
from tests.transports.conftest import DEAD_URLS, PLUGINS, SECRET, URLS, TransportFactory

TOPIC = "orders.eu"


def entries(first: int, last: int, topic: str = TOPIC) -> list[TransportEntry]:
    return [TransportEntry(topic, offset, 100 + offset, {"id": f"m{offset}", "type": "event", "source": "test",
                                                         "priority": 5, "payload": {"n": offset}})
            for offset in range(first, last + 1)]


async def drain(transport: BusTransport, group: str, want: int, *, consumer: str = "c1", ack: bool = True,
                deadline_s: float = 10.0, topic: str = TOPIC) -> list[TransportDelivery]:
    """Fetch (and ack) until ``want`` deliveries arrived or the deadline passed."""
    got: list[TransportDelivery] = []
    deadline = time.monotonic() + deadline_s
    while len(got) < want and time.monotonic() < deadline:
        batch = await transport.fetch(topic, group, consumer, want - len(got), 0.5)
        got.extend(batch)
        if ack and batch:
            await transport.ack(topic, group, [d.delivery_id for d in batch])
    return got


def test_every_plugin_says_where_its_broker_is() -> None:
    """The plugins come from the entry points; each needs a broker URL here."""
    assert {"memory", "redis", "nats", "rabbitmq", "kafka"} <= set(PLUGINS)
    assert set(PLUGINS) == set(URLS), "a transport plugin without a broker URL for the tests (conftest.URLS)"
    assert set(DEAD_URLS) == set(PLUGINS) - {"memory"}


async def test_publish_fetch_ack_in_offset_order(make_transport: TransportFactory) -> None:
    transport = await make_transport()
    await transport.bind(TOPIC)
    await transport.subscribe(TOPIC, "g")
    assert await transport.publish(entries(1, 20)) == 20
    got = await drain(transport, "g", 20)
    assert [d.offset for d in got] == list(range(1, 21))
    assert [d.key for d in got] == [f"{TOPIC}:{n}" for n in range(1, 21)]
    assert got[0].message["payload"] == {"n": 1} and got[0].topic == TOPIC
    assert not any(d.redelivered for d in got)
    # acked: nothing comes back
    assert await transport.fetch(TOPIC, "g", "c1", 10, 0.3) == []
    assert await transport.lag(TOPIC, "g") == 0


def direct(keys: list[str], topic: str = TOPIC) -> list[TransportEntry]:
    return [TransportEntry(topic, 0, 0, {"id": key, "type": "event", "source": "test", "priority": 5,
                                         "payload": {"k": key}}, key) for key in keys]


async def test_direct_entries_from_two_publishers_are_all_delivered_with_their_keys(
        plugin: str, make_transport: TransportFactory) -> None:
    """Direct mode: any node publishes at once (no offsets, no fencing); the
    broker orders them; each delivery carries the publisher's key, and a
    re-sent key is dropped where the broker dedupes (NATS window, memory)."""
    first = await make_transport()
    second = first if plugin == "memory" else await make_transport()  # memory: one process, one broker
    await first.bind(TOPIC)
    await first.subscribe(TOPIC, "g")
    a = [f"a.{n}" for n in range(10)]
    b = [f"b.{n}" for n in range(10)]
    counts = await asyncio.gather(first.publish_direct(direct(a)), second.publish_direct(direct(b)))
    assert counts == [10, 10]
    again = await second.publish_direct(direct(b[:3]))  # a client's retry with the same keys
    dedupes = plugin in ("memory", "nats")
    assert again == (0 if dedupes else 3)
    got = await drain(first, "g", 20 if dedupes else 23, deadline_s=10)
    keys = [d.key for d in got]
    assert set(keys) == set(a + b)
    if dedupes:
        assert len(keys) == 20
    assert [k for k in keys if k.startswith("a.")] == a  # one publisher's order holds
    assert all(d.message["payload"] == {"k": d.key} for d in got)
    # a transport that hands over the message's JSON text hands over exactly the message's
    assert all(json.loads(d.message_json) == d.message for d in got if d.message_json)
    if plugin in ("nats", "kafka"):  # these do
        assert all(d.message_json for d in got)
    offsets = [d.offset for d in got]
    if plugin in ("memory", "nats", "kafka"):  # brokers with a sequence number: it orders deliveries
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert await first.fetch(TOPIC, "g", "c1", 10, 0.2) == []


async def test_direct_publish_to_an_unbound_topic_or_a_dead_broker_is_unavailable(
        plugin: str, make_transport: TransportFactory) -> None:
    transport = await make_transport()
    await transport.bind(TOPIC)  # the namespace exists at the broker; this topic does not
    with pytest.raises(Unavailable) as unbound:
        await transport.publish_direct(direct(["x", "y", "z"], "never.bound"))
    if plugin == "nats":  # every message of the batch answered (no responders), not a timeout
        assert "not bound" in unbound.value.message
    if plugin == "memory":
        return
    dead = await make_transport(url=DEAD_URLS[plugin], start=False)
    with pytest.raises(Unavailable) as refused:
        await dead.publish_direct(direct(["x"]))
    assert SECRET not in refused.value.message


async def test_republishing_after_a_leader_change_does_not_lose_and_dedupes_where_promised(
        make_transport: TransportFactory) -> None:
    transport = await make_transport()
    await transport.bind(TOPIC)
    await transport.subscribe(TOPIC, "g")
    await transport.publish(entries(1, 10))
    # a new leader resumes from an older committed cursor: 6..15 again and beyond
    new = await transport.publish(entries(6, 15))
    got = await drain(transport, "g", 15 if transport.guarantee == "exactly-once" else 20, deadline_s=5)
    keys = [d.key for d in got]
    assert set(keys) == {f"{TOPIC}:{n}" for n in range(1, 16)}  # nothing lost
    if transport.guarantee == "exactly-once":
        assert new == 5
        assert len(keys) == len(set(keys)) == 15  # the broker removed the re-sent ones
    else:
        assert transport.guarantee == "at-least-once"


async def test_a_deposed_and_a_new_leader_publishing_at_once_leave_a_gap_free_topic(
        plugin: str, make_transport: TransportFactory) -> None:
    """Two publishers on their own connections race over the same offsets, as
    a deposed leader and its successor can for a moment. Whatever the broker
    refuses to one of them is retried from that publisher's cursor, as the
    driver does; at the end every offset is there, and where the transport
    promises exactly-once, each once and in offset order."""
    old = await make_transport()
    new = old if plugin == "memory" else await make_transport()  # the in-process transport is its own broker
    await old.bind(TOPIC)
    await old.subscribe(TOPIC, "g")

    async def leader(transport: BusTransport) -> None:
        deadline = time.monotonic() + 20
        for first in range(1, 101, 20):
            while True:
                try:
                    await transport.publish(entries(first, first + 19))
                    break
                except Unavailable:
                    assert time.monotonic() < deadline, "a publisher never got through"
                    await asyncio.sleep(0.01)  # back off, then resend from the same cursor

    await asyncio.gather(leader(old), leader(new))
    got = await drain(old, "g", 100 if old.guarantee == "exactly-once" else 200, deadline_s=5)
    offsets = [d.offset for d in got]
    assert set(offsets) == set(range(1, 101))
    if old.guarantee == "exactly-once":
        assert offsets == list(range(1, 101))


async def test_a_consumer_group_shares_and_groups_fan_out(make_transport: TransportFactory) -> None:
    transport = await make_transport()
    await transport.bind(TOPIC)
    await transport.subscribe(TOPIC, "workers")
    await transport.subscribe(TOPIC, "audit")
    await transport.publish(entries(1, 10))
    first = await transport.fetch(TOPIC, "workers", "w1", 5, 2)
    second = await drain(transport, "workers", 10 - len(first), consumer="w2", ack=False)
    assert not {d.key for d in first} & {d.key for d in second}  # competing consumers: no message twice
    assert len(first) + len(second) == 10
    audit = await drain(transport, "audit", 10, consumer="a1")
    assert sorted(d.offset for d in audit) == list(range(1, 11))  # every group gets every message


async def test_nack_and_ack_timeout_redeliver(make_transport: TransportFactory) -> None:
    transport = await make_transport(ack_timeout_s=1.0)
    await transport.bind(TOPIC)
    await transport.subscribe(TOPIC, "g")
    await transport.publish(entries(1, 2))
    first = await drain(transport, "g", 2, ack=False)
    by_offset = {d.offset: d for d in first}
    await transport.nack(TOPIC, "g", [by_offset[1].delivery_id])
    again = await drain(transport, "g", 1, ack=False)
    assert [d.offset for d in again] == [1]
    # offset 2 was never acked: it comes back after the ack timeout
    later = await drain(transport, "g", 2, deadline_s=10)
    assert sorted(d.offset for d in later) == [1, 2]
    assert all(d.redelivered for d in later if d.offset == 2)
    assert await transport.fetch(TOPIC, "g", "c1", 10, 1.5) == []


async def test_bind_and_subscribe_are_idempotent_and_unbind_removes(make_transport: TransportFactory) -> None:
    transport = await make_transport()
    await transport.bind(TOPIC)
    await transport.bind(TOPIC)
    await transport.subscribe(TOPIC, "g")
    await transport.subscribe(TOPIC, "g")
    await transport.publish(entries(1, 3))
    assert await transport.lag(TOPIC, "g") == 3
    assert len(await drain(transport, "g", 3)) == 3
    await transport.unbind(TOPIC)
    await transport.bind(TOPIC)
    await transport.subscribe(TOPIC, "g")
    assert await transport.fetch(TOPIC, "g", "c1", 10, 0.3) == []  # the old messages went with the binding


async def test_topics_are_separate(make_transport: TransportFactory) -> None:
    transport = await make_transport()
    for topic in ("a.one", "a.two"):
        await transport.bind(topic)
        await transport.subscribe(topic, "g")
    await transport.publish(entries(1, 3, "a.one"))
    await transport.publish(entries(1, 2, "a.two"))
    one = await drain(transport, "g", 3, topic="a.one")
    two = await drain(transport, "g", 2, topic="a.two")
    assert {d.topic for d in one} == {"a.one"} and {d.topic for d in two} == {"a.two"}


async def test_health_is_green_when_connected(make_transport: TransportFactory) -> None:
    transport = await make_transport()
    health = await transport.health()
    assert health.ok is True and health.detail


async def test_a_broker_that_is_not_there_is_unavailable_in_bounded_time(plugin: str,
                                                                         make_transport: TransportFactory) -> None:
    if plugin == "memory":
        transport: Any = await make_transport()
        transport.down = True
        calls = [transport.publish(entries(1, 1))]
    else:
        transport = await make_transport(url=DEAD_URLS[plugin], start=False)
        calls = [transport.start()]
    started = time.monotonic()
    for call in calls:
        with pytest.raises(Unavailable):
            await call
    assert time.monotonic() - started < 10  # bounded by the transport's timeout, not hanging
    health = await transport.health()
    assert health.ok is False


async def test_credentials_never_appear_in_health(plugin: str, make_transport: TransportFactory) -> None:
    if plugin == "memory":
        pytest.skip("no credentials")
    transport = await make_transport(url=DEAD_URLS[plugin], start=False)
    with pytest.raises(Unavailable) as refused:
        await transport.start()
    health = await transport.health()
    assert SECRET not in health.detail and SECRET not in str(refused.value)
    assert SECRET not in repr(transport)


async def test_a_group_made_after_the_messages_reads_from_the_first(make_transport: TransportFactory) -> None:
    transport = await make_transport()
    await transport.bind(TOPIC)
    await transport.subscribe(TOPIC, "early")
    await transport.publish(entries(1, 5))
    await transport.subscribe(TOPIC, "late")
    await transport.publish(entries(6, 7))
    late = await drain(transport, "late", 7)
    assert sorted(d.offset for d in late) == list(range(1, 8))
    assert len({d.key for d in late}) == 7
