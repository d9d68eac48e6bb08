"""A cluster whose Raft links run through the chaos proxy: a partitioned
leader is replaced, serves no default reads, and rejoins after the heal."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.client import CoordinatorClient
from devcluster.cluster import fetch_json
from tests.integration.conftest import isolate, proxied_cluster

pytestmark = pytest.mark.cluster


async def test_isolated_leader_is_replaced_and_rejoins(make_cluster) -> None:
    async with proxied_cluster(make_cluster) as (cluster, proxy):
        old = await asyncio.to_thread(cluster.wait_leader, 30)
        async with CoordinatorClient([cluster.url(n) for n in cluster.members]) as client:
            await client.put("p/k", "before")
        isolate(cluster, proxy, old)
        majority = [n for n in cluster.members if n != old]
        new = await asyncio.to_thread(cluster.wait_leader, 30, majority)
        assert new != old
        async with CoordinatorClient([cluster.url(n) for n in majority]) as client:
            await client.put("p/k", "after")
        answer = await asyncio.to_thread(fetch_json, cluster.url(old) + "/v1/kv/p/k", 10)
        assert "error" in answer, f"the isolated old leader answered a default read: {answer}"
        assert sum(link.dropped_bytes for link in proxy.links.values()) > 0

        proxy.heal()
        await asyncio.to_thread(cluster.wait_leader, 30)
        target = (await asyncio.to_thread(cluster.status, new))["commit_index"]
        await asyncio.to_thread(cluster.wait_caught_up, old, target, 30)
        async with CoordinatorClient(cluster.url(old)) as client:
            assert (await client.get("p/k"))["value"] == "after"
