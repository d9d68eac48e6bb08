"""ReadIndex on real node processes: linearizable reads append nothing to the
log, on the leader and through a follower, and a leader cut off from the
majority refuses them (503) instead of answering from its stale state."""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request

import aiohttp
import pytest

from coordinator.client import CoordinatorClient
from tests.integration.conftest import isolate, proxied_cluster

pytestmark = pytest.mark.cluster


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:_total)? ([0-9.e+]+)$", text, re.MULTILINE)
    if found is None:
        raise AssertionError(f"{name} not in /metrics")
    return float(found.group(1))


async def metrics(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_linearizable_reads_append_no_entries(make_cluster) -> None:
    cluster = make_cluster()
    leader = await asyncio.to_thread(cluster.wait_leader, 30)
    follower = next(n for n in cluster.members if n != leader)
    async with aiohttp.ClientSession() as session:
        async with session.put(cluster.url(leader) + "/v1/kv/ri/k", json={"value": "v1"}) as response:
            assert response.status == 200

        async def settled() -> int:
            """The leader's commit index once the post-election entries stopped
            coming (unchanged for a whole second)."""
            last, same = None, 0
            for _ in range(300):  # bounded: 300 x 0.1 s
                index = (await asyncio.to_thread(cluster.status, leader))["commit_index"]
                same = same + 1 if index == last else 0
                if same >= 10:
                    return index
                last = index
                await asyncio.sleep(0.1)
            raise AssertionError("the commit index never settled")

        before = await settled()
        leader_metrics = await metrics(session, cluster.url(leader))
        follower_metrics = await metrics(session, cluster.url(follower))
        expected = "v1"
        for node in (leader, follower):
            for _ in range(50):
                async with session.get(cluster.url(node) + "/v1/kv/ri/k") as response:
                    assert response.status == 200
                    assert (await response.json())["value"] == expected
            # a read after a write through this node sees it
            async with session.put(cluster.url(node) + "/v1/kv/ri/k", json={"value": f"by {node}"}) as response:
                assert response.status == 200
            async with session.get(cluster.url(node) + "/v1/kv/ri/k") as response:
                assert (await response.json())["value"] == f"by {node}"
            expected = f"by {node}"
        after = (await asyncio.to_thread(cluster.status, leader))["commit_index"]
        # The two writes, and no entry per read: 102 reads through barriers appended 102 entries
        # (8 -> 112 before ReadIndex). A member's registration retry (backing off up to 5 s) may
        # still land in between on a loaded machine, so a few unrelated entries are tolerated;
        # that the reads proposed nothing is what the barrier counters below show exactly.
        assert before + 2 <= after <= before + 8, (before, after)
        for node, earlier in ((leader, leader_metrics), (follower, follower_metrics)):
            now = await metrics(session, cluster.url(node))
            assert metric(now, "coord_read_barriers") == metric(earlier, "coord_read_barriers")
            assert metric(now, "coord_read_index_reads") - metric(earlier, "coord_read_index_reads") == 51


def get_status(url: str, timeout_s: float) -> tuple[int, dict]:
    import json

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


async def test_a_leader_cut_off_from_the_majority_refuses_linearizable_reads(make_cluster) -> None:
    async with proxied_cluster(make_cluster) as (cluster, proxy):
        old = await asyncio.to_thread(cluster.wait_leader, 30)
        async with CoordinatorClient([cluster.url(n) for n in cluster.members]) as client:
            await client.put("ri/p", "before")
        assert (await asyncio.to_thread(get_status, cluster.url(old) + "/v1/kv/ri/p", 10))[0] == 200
        isolate(cluster, proxy, old)
        majority = [n for n in cluster.members if n != old]
        await asyncio.to_thread(cluster.wait_leader, 30, majority)
        async with CoordinatorClient([cluster.url(n) for n in majority]) as client:
            await client.put("ri/p", "after")
        # The old leader may still believe it leads (pysyncobj steps down after
        # leader_fallback_s without a majority): its reads must not confirm.
        code, body = await asyncio.to_thread(get_status, cluster.url(old) + "/v1/kv/ri/p", 10)
        assert code == 503, f"the isolated old leader answered a linearizable read: {code} {body}"
        assert body.get("value") is None
        stale_code, stale = await asyncio.to_thread(get_status, cluster.url(old) + "/v1/kv/ri/p?consistency=stale",
                                                    10)
        assert stale_code == 200 and stale["value"] == "before"  # it holds the old value: the 503 mattered
        for node in majority:
            code, body = await asyncio.to_thread(get_status, cluster.url(node) + "/v1/kv/ri/p", 10)
            assert code == 200 and body["value"] == "after"
