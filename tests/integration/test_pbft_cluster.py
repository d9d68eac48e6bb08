"""Four PBFT nodes in real processes on loopback (``--engine pbft``): the
same HTTP API as Raft, writes through any node, bad input refused, and a
crash of every node at once that loses nothing acknowledged."""

from __future__ import annotations

import io

import aiohttp
import pytest

from coordinator.client import CoordinatorClient
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster


async def test_writes_through_any_node_and_bad_input(make_cluster) -> None:
    cluster = make_cluster(nodes=4, engine="pbft")
    leader = cluster.wait_leader()
    assert leader == "n1"  # the primary of view 0: replica 0, the first node id
    # The primary of view 0 is known before the links are up; a node is healthy once it reaches 2f peers.
    async def all_healthy() -> dict | None:
        statuses = {n: cluster.status(n) for n in cluster.members}
        return statuses if all(s and s["healthy"] for s in statuses.values()) else None

    statuses = await eventually(all_healthy, "every PBFT node healthy", 30, interval_s=CLUSTER_POLL_S)
    assert [s["role"] for s in statuses.values()].count("leader") == 1
    assert {s["term"] for s in statuses.values()} == {0}
    for i, node_id in enumerate(cluster.members):
        async with CoordinatorClient(cluster.url(node_id)) as client:
            assert await client.put(f"through/{node_id}", {"n": i}) >= 1
    for node_id in cluster.members:  # reads go through the protocol on every node
        async with CoordinatorClient(cluster.url(node_id)) as client:
            assert [item["value"]["n"] for item in await client.list("through/")] == [0, 1, 2, 3]
    async with aiohttp.ClientSession() as session:
        url = cluster.url("n3")
        async with session.put(f"{url}/v1/kv/bad", data=b'{"valu": 1}',
                               headers={"content-type": "application/json"}) as response:
            assert response.status == 400 and "valu" in (await response.json())["error"]["message"]
        big = io.BytesIO(b'{"value": "' + b"x" * (2 << 20) + b'"}')
        async with session.put(f"{url}/v1/kv/big", data=big, headers={"content-type": "application/json"}) as response:
            assert response.status == 413
        async with session.get(f"{url}/v1/kv/bad") as response:
            assert response.status == 404  # nothing of the refused writes was applied
    applied = {n: cluster.status(n)["applied_index"] for n in cluster.members}
    assert len(set(applied.values())) <= 2  # every replica executes the same entries (one may trail)


async def test_every_node_killed_at_once_loses_nothing_acknowledged(make_cluster) -> None:
    cluster = make_cluster(nodes=4, engine="pbft")
    acked: dict[str, int] = {}
    async with CoordinatorClient(cluster.url("n2")) as client:
        for k in range(40):  # past two checkpoints (every 16 entries) and into the next interval
            await client.put(f"durable/{k:02d}", {"k": k})
            acked[f"durable/{k:02d}"] = k
    for node_id in cluster.members:
        cluster.kill(node_id)
    cluster.start_all()
    cluster.wait_leader(30)

    async def readable() -> list | None:
        try:
            async with CoordinatorClient(cluster.url("n3")) as client:
                return await client.list("durable/")
        except Exception:
            return None

    items = await eventually(readable, "reads after the restart", 30, interval_s=CLUSTER_POLL_S)
    assert {item["key"]: item["value"]["k"] for item in items} == acked
    async with CoordinatorClient(cluster.url("n4")) as client:  # and the cluster takes writes again
        assert await client.put("durable/after", {"k": 99}) >= 1
    statuses = [cluster.status(n) for n in cluster.members]
    assert all(s["term"] >= 1 for s in statuses)  # recovered replicas were muted in view 0: a view change


async def test_a_forging_replica_is_outvoted_and_its_forgeries_are_counted(make_cluster) -> None:
    cluster = make_cluster(nodes=4, engine="pbft", pbft_fault={"n4": "forge"})
    async with CoordinatorClient(cluster.url("n2")) as client:
        for k in range(10):
            await client.put(f"forged/{k}", {"k": k})
        assert len(await client.list("forged/")) == 10
    async with aiohttp.ClientSession() as session, session.get(cluster.url("n2") + "/metrics") as response:
        text = await response.text()
    counts = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("coord_engine_events_total{")}
    assert counts.get("dropped_bad_signature", 0) > 0 and counts.get("dropped_unsigned", 0) > 0, counts
    assert counts.get("engine_result_mismatch", 0) == 0
