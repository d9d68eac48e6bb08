"""Both modes of a bound topic on a real three-node cluster and real brokers,
through a leader SIGKILL in the middle of a publish stream: every message a
publisher got an answer for is delivered (log mode: exactly once, the
broker dedupes and the acked keys are committed; direct mode: at least
once). Direct mode also shows that its data plane needs no consensus: with
two of three nodes killed, the last one still publishes, fetches and acks."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from typing import Any

import pytest

from coordinator.client import CoordinatorClient
from coordinator.errors import NotFound, Unavailable
from tests.transports.conftest import PLUGINS, transport_class
from tests.waiting import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

BATCHES = 10
PER_BATCH = 20


async def _consume(client: CoordinatorClient, sub: str, want: set[str], delivered: list[str],
                   timeout_s: float = 30) -> None:
    """Fetch and ack until every id in ``want`` was delivered (bounded)."""

    async def all_came() -> bool:
        try:
            got = await client.fetch(sub, max=100, wait_s=0.5)
            if got:
                await client.ack(sub, [d["delivery_id"] for d in got])
        except Unavailable:
            return False
        delivered.extend(d["message"]["id"] for d in got)
        return want <= set(delivered)

    await eventually(all_came, lambda: f"{len(want - set(delivered))} acknowledged messages still missing",
                     timeout_s, interval_s=0)


@pytest.mark.parametrize("plugin", ["nats", "kafka"])
@pytest.mark.parametrize("mode", ["log", "direct"])
async def test_a_leader_kill_mid_stream_loses_no_acknowledged_message(make_cluster: Any, mode: str,
                                                                      plugin: str) -> None:
    url = PLUGINS[plugin][1]
    namespace = f"coordit{secrets.token_hex(3)}"
    cluster = make_cluster(extra_args=("--transport", f"{plugin}={url}", "--transport-namespace", namespace))
    leader = cluster.wait_leader()
    survivor, other = [n for n in cluster.members if n != leader]
    topic = "stream.eu"
    acknowledged: set[str] = set()
    delivered: list[str] = []
    # Publishers on both followers; the consumer talks to the survivor only (in
    # direct mode its delivery ids are that node's).
    async with CoordinatorClient(cluster.url(survivor), timeout_s=20) as client, \
            CoordinatorClient(cluster.url(other), timeout_s=20) as second:
        binding = await client.request("PUT", f"/v1/topics/{topic}/binding", {"transport": plugin, "mode": mode})
        assert binding["mode"] == mode
        sub = await client.subscribe(topic, group="readers")
        half = asyncio.Event()

        async def publish(publisher: CoordinatorClient, name: str) -> None:
            for b in range(BATCHES):
                batch = [{"id": f"{name}{b}.{i}", "payload": {"b": b, "i": i}} for i in range(PER_BATCH)]
                answer = await publisher.publish(topic, messages=batch)  # retried with one request id
                acknowledged.update(m["id"] for m in answer["messages"])
                if b == BATCHES // 2:
                    half.set()

        stream = asyncio.gather(publish(client, "a"), publish(second, "b"))
        await half.wait()
        cluster.kill(leader)  # SIGKILL by its PID (blocking the loop: the publishers go on after it)
        at_kill = len(acknowledged)
        await stream
        assert at_kill < 2 * BATCHES * PER_BATCH  # the kill was in the middle of the stream
        assert len(acknowledged) == 2 * BATCHES * PER_BATCH

        if mode == "direct":
            # No quorum left: the survivor publishes and serves its subscription alone.
            cluster.kill(other)
            answer = await client.publish(topic, messages=[{"id": f"q{i}", "payload": i} for i in range(5)])
            acknowledged.update(m["id"] for m in answer["messages"])
        else:
            await asyncio.to_thread(cluster.wait_leader, 30, [survivor, other])
        await _consume(client, sub, acknowledged, delivered)
        if mode == "log":
            assert len(delivered) == len(set(delivered))  # exactly once: nothing acked came back, no re-send kept
        assert set(delivered) == acknowledged  # nothing unacknowledged appeared either
    cleaner = transport_class(plugin)(url, namespace=namespace, timeout_s=5.0)
    await cleaner.start()
    try:
        await cleaner.unbind(topic)
    finally:
        await cleaner.close()


def _group_reader(members: list[str], consumer_key: str) -> str:
    """The member that reads a one-reader direct group while all are up: the
    first in the rendezvous ranking of the consumer's key
    (``CoordinatorNode.ranked_members``)."""
    return max(members, key=lambda m: hashlib.sha256(f"{consumer_key}\0{m}".encode()).digest())


async def _visible(client: CoordinatorClient, sub: str) -> None:
    async def known() -> bool:
        try:
            await client.request("GET", f"/v1/subscriptions/{sub}?consistency=stale")
        except NotFound:
            return False
        return True

    await eventually(known, f"subscription {sub} to reach the node", 10)


async def test_a_kafka_direct_group_is_read_once_through_any_node_and_moves_on_a_kill(make_cluster: Any) -> None:
    """Kafka's transport reads a group's partition by hand, so the group is
    read by one member, whichever node its consumers talk to: consumers of
    one group on two nodes get every message once while no node fails. The
    reader killed, the next member in the ranking reads the group from its
    committed offset: every message comes at least once. The nodes require
    credentials: a forwarded request carries the caller's, signed."""
    url = PLUGINS["kafka"][1]
    namespace = f"coordit{secrets.token_hex(3)}"
    cluster = make_cluster(extra_args=("--transport", f"kafka={url}", "--transport-namespace", namespace),
                           secure=True)
    cluster.wait_leader()
    reader = _group_reader(cluster.members, "g:readers")
    other, third = [n for n in cluster.members if n != reader]
    topic = "orders.direct"
    token = cluster.admin_token
    async with CoordinatorClient(cluster.url(reader), timeout_s=20, token=token) as on_reader, \
            CoordinatorClient(cluster.url(other), timeout_s=20, token=token) as on_other, \
            CoordinatorClient(cluster.url(third), timeout_s=20, token=token) as on_third:
        await on_other.request("PUT", f"/v1/topics/{topic}/binding", {"transport": "kafka", "mode": "direct"})
        first = await on_reader.subscribe(topic, group="readers")
        second = await on_other.subscribe(topic, group="readers")
        await _visible(on_reader, second)
        await _visible(on_other, first)
        published: set[str] = set()
        for b in range(5):  # through the third node: no consumer there
            answer = await on_third.publish(topic, messages=[{"id": f"a{b}.{i}", "payload": i} for i in range(40)])
            published.update(m["id"] for m in answer["messages"])
        per_consumer: dict[str, list[str]] = {first: [], second: []}

        async def both_took_turns() -> bool:  # small batches, in turn: both consumers get some
            for client, sub in ((on_reader, first), (on_other, second)):
                got = await client.fetch(sub, max=25, wait_s=0.3)
                if got:
                    await client.ack(sub, [d["delivery_id"] for d in got])
                per_consumer[sub].extend(d["message"]["id"] for d in got)
            return published <= set(per_consumer[first]) | set(per_consumer[second])

        await eventually(both_took_turns, "the group to get every message", 30, interval_s=0)
        delivered = per_consumer[first] + per_consumer[second]
        assert per_consumer[first] and per_consumer[second]  # both consumers were served
        assert sorted(delivered) == sorted(published)  # every message once: one node read the group

        # The reader killed: the next member reads the group from its committed offset.
        cluster.kill(reader)
        later: set[str] = set()
        for b in range(3):
            answer = await on_other.publish(topic, messages=[{"id": f"b{b}.{i}", "payload": i} for i in range(40)])
            later.update(m["id"] for m in answer["messages"])
        after: list[str] = []

        async def all_came() -> bool:
            for client, sub in ((on_other, second), (on_third, first)):  # the first consumer moved to the third node
                try:
                    got = await client.fetch(sub, max=50, wait_s=0.2)
                    if got:
                        await client.ack(sub, [d["delivery_id"] for d in got])
                except Unavailable:
                    return False
                after.extend(d["message"]["id"] for d in got)
            return later <= set(after)

        await eventually(all_came, lambda: f"{len(later - set(after))} messages after the kill still missing", 30,
                         interval_s=0)
        assert set(after) <= later | published  # nothing that was not published
    cleaner = transport_class("kafka")(url, namespace=namespace, timeout_s=5.0)
    await cleaner.start()
    try:
        await cleaner.unbind(topic)
    finally:
        await cleaner.close()
