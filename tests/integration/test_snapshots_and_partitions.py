"""Log compaction through our snapshot codec, snapshot install on a lagging
follower, and a leader cut off from its majority refusing default reads."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from coordinator.client import CoordinatorClient
from devcluster.cluster import fetch_json
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster


async def _put_many(url: str, prefix: str, count: int) -> None:
    async with CoordinatorClient(url) as client:
        for i in range(count):
            await client.put(f"{prefix}/{i:04d}", i)


def _stale_items(cluster, node_id: str, prefix: str) -> list:
    answer = fetch_json(cluster.url(node_id) + f"/v1/kv?prefix={prefix}/&consistency=stale&limit=10000", 5)
    return [item["value"] for item in answer["items"]]


async def test_compaction_restart_and_snapshot_install(make_cluster) -> None:
    cluster = make_cluster(extra_args=("--compaction-entries", "40"))
    leader = cluster.wait_leader()
    lagging = next(n for n in cluster.members if n != leader)
    await _put_many(cluster.url(leader), "a", 150)
    snapshots = [cluster.dir / n / "raft.snapshot" for n in cluster.members]
    await eventually(lambda: all(p.exists() for p in snapshots), "every node to compact its log past 40 entries", 20,
                     interval_s=CLUSTER_POLL_S)
    assert all(p.read_bytes()[:1] == b"R" for p in snapshots)  # our codec, not pickle

    cluster.kill(lagging)
    await _put_many(cluster.url(leader), "b", 150)  # the leader compacts past what the follower has
    cluster.start(lagging)
    target = cluster.status(leader)["commit_index"]
    await asyncio.to_thread(cluster.wait_caught_up, lagging, target, 30)
    assert _stale_items(cluster, lagging, "a") == list(range(150))
    assert _stale_items(cluster, lagging, "b") == list(range(150))
    assert "installed a snapshot received from the leader (synced)" in cluster.log_tail(lagging, 200)

    # the installed snapshot is the lagging node's own now: restarted alone, with
    # no leader to send it anything, it serves what the snapshot holds
    for node_id in cluster.members:
        cluster.kill(node_id)
    cluster.start(lagging)

    def serves_the_snapshot() -> bool:
        try:
            return _stale_items(cluster, lagging, "a") == list(range(150))
        except (TypeError, KeyError):  # not answering yet
            return False

    await eventually(serves_the_snapshot, "the lagging node, alone, to serve the snapshot it had installed", 30,
                     interval_s=CLUSTER_POLL_S)

    # a whole-cluster restart from snapshots plus journal tails
    cluster.start_all()
    await asyncio.to_thread(cluster.wait_leader, 30)
    async with CoordinatorClient([cluster.url(n) for n in cluster.members]) as client:
        assert [item["value"] for item in await client.list("a/", limit=1000)] == list(range(150))
        assert [item["value"] for item in await client.list("b/", limit=1000)] == list(range(150))


async def test_a_leader_without_its_majority_serves_no_default_read(make_cluster) -> None:
    cluster = make_cluster()
    leader = cluster.wait_leader()
    followers = [n for n in cluster.members if n != leader]
    async with CoordinatorClient(cluster.url(leader)) as client:
        await client.put("fenced/read", "before")
    for node_id in followers:
        cluster.signal(node_id, signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = fetch_json(cluster.url(leader) + "/v1/kv/fenced/read", timeout=10)
        assert answer is not None and "error" in answer, f"a cut-off leader answered a default read: {answer}"
        assert answer["error"]["code"] in ("unavailable", "outcome_unknown")
        assert time.monotonic() - started < 9
        stale = fetch_json(cluster.url(leader) + "/v1/kv/fenced/read?consistency=stale", timeout=5)
        assert stale["value"] == "before"  # asked for explicitly, local state is served
    finally:
        for node_id in followers:
            cluster.signal(node_id, signal.SIGCONT)
    await asyncio.to_thread(cluster.wait_leader, 30)
    async with CoordinatorClient([cluster.url(n) for n in cluster.members]) as client:
        assert (await client.get("fenced/read"))["value"] == "before"
