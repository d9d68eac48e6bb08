"""Both modes of a bound topic on a real three-node cluster and real brokers,
through a leader SIGKILL in the middle of a publish stream: every message a
publisher got an answer for is delivered (log mode: exactly once, the
broker dedupes and the acked keys are committed; direct mode: at least
once). Direct mode also shows that its data plane needs no consensus: with
two of three nodes killed, the last one still publishes, fetches and acks."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest

from coordinator.client import CoordinatorClient
from coordinator.errors import Unavailable
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
