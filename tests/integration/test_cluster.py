"""A three-node cluster in real processes on loopback: election, writes
through any node, leader SIGKILL under load, restarts, membership."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from coordinator.client import CoordinatorClient
from coordinator.errors import CoordinatorError
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster


async def test_election_and_writes_through_any_node(make_cluster) -> None:
    cluster = make_cluster()
    leader = cluster.wait_leader()
    statuses = {n: cluster.status(n) for n in cluster.members}
    assert [s["role"] for s in statuses.values()].count("leader") == 1
    assert statuses[leader]["role"] == "leader"
    assert {s["term"] for s in statuses.values()} == {statuses[leader]["term"]}
    for status in statuses.values():
        assert {m["raft"] for m in status["members"]} == {cluster.specs[n].raft for n in cluster.members}

    for i, node_id in enumerate(cluster.members):
        async with CoordinatorClient(cluster.url(node_id)) as client:
            revision = await client.put(f"through/{node_id}", {"n": i})
            assert revision >= 1
    for node_id in cluster.members:  # linearizable reads on every node see every write
        async with CoordinatorClient(cluster.url(node_id)) as client:
            items = await client.list("through/")
            assert [item["value"]["n"] for item in items] == [0, 1, 2]


async def _writer(endpoints: list[str], worker: int, acked: list[str], stop: asyncio.Event) -> None:
    async with CoordinatorClient(endpoints, timeout_s=15) as client:
        i = 0
        while not stop.is_set() and i < 5000:
            key = f"load/{worker}/{i}"
            try:
                await client.put(key, i)
            except CoordinatorError:
                continue  # unknown or refused: not acknowledged, not counted
            acked.append(key)
            i += 1


async def test_leader_sigkill_under_load_loses_no_acknowledged_write(make_cluster) -> None:
    cluster = make_cluster()
    old = cluster.wait_leader()
    endpoints = [cluster.url(n) for n in cluster.members]
    acked: list[str] = []
    stop = asyncio.Event()
    writers = [asyncio.create_task(_writer(endpoints[w % 3:] + endpoints[:w % 3], w, acked, stop)) for w in range(6)]
    await eventually(lambda: len(acked) >= 200, "200 acknowledged writes before the kill", 30,
                     interval_s=CLUSTER_POLL_S)
    before_kill = len(acked)
    killed_at = time.monotonic()
    cluster.kill(old)
    await eventually(lambda: len(acked) >= before_kill + 200, "writes to resume after the kill", 60,
                     interval_s=CLUSTER_POLL_S)
    recovered_s = time.monotonic() - killed_at
    stop.set()
    await asyncio.gather(*writers)

    survivors = [n for n in cluster.members if n != old]
    new = await asyncio.to_thread(cluster.wait_leader, 30, survivors)
    assert new != old
    async with CoordinatorClient([cluster.url(n) for n in survivors]) as client:
        stored = {item["key"] for item in await client.list("load/", limit=10_000)}
    missing = [k for k in acked if k not in stored]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    print(f"writes resumed {recovered_s:.2f}s after SIGKILL of the leader; {len(acked)} acknowledged")

    # the killed node comes back and catches up from the others
    cluster.start(old)
    target = cluster.status(new)["commit_index"]
    await asyncio.to_thread(cluster.wait_caught_up, old, target, 30)
    async with CoordinatorClient(cluster.url(old)) as client:
        items = await client.request("GET", "/v1/kv", params={"prefix": "load/", "limit": 10_000,
                                                              "consistency": "stale"})
        assert {item["key"] for item in items["items"]} >= set(acked)



async def test_all_nodes_killed_at_once_keep_every_acknowledged_write(make_cluster) -> None:
    cluster = make_cluster()
    endpoints = [cluster.url(n) for n in cluster.members]
    acked = {}
    async with CoordinatorClient(endpoints) as client:
        for i in range(150):
            acked[f"restart/{i:03d}"] = await client.put(f"restart/{i:03d}", {"i": i})
    for node_id in cluster.members:  # no graceful shutdown: nothing gets flushed on the way out
        cluster.signal(node_id, 9)
    for node_id in cluster.members:
        cluster._wait_gone(node_id, 10)
    cluster.start_all()
    await asyncio.to_thread(cluster.wait_leader, 30)
    async with CoordinatorClient(endpoints) as client:
        items = await client.list("restart/", limit=1000)
    assert {item["key"]: item["revision"] for item in items} == acked


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                          timeout=60)


async def test_a_fourth_member_joins_and_leaves_through_the_cli(make_cluster) -> None:
    cluster = make_cluster()
    leader = cluster.wait_leader()
    spec = cluster.add_spec(4)
    async with CoordinatorClient(cluster.url(leader)) as client:
        await client.put("before/join", 1)
    cluster.start("n4", peers=list(cluster.members))
    added = await asyncio.to_thread(_cli, "members", "add", "--endpoint", cluster.specs[leader].http, "--id", "n4",
                                    "--raft", spec.raft, "--http", spec.http)
    assert added.returncode == 0, added.stderr
    async with CoordinatorClient(cluster.url(leader)) as client:
        status = await client.status()
    assert spec.raft in {m["raft"] for m in status["members"]}
    await asyncio.to_thread(cluster.wait_caught_up, "n4", status["commit_index"], 30)

    table = await asyncio.to_thread(_cli, "status", "--endpoint", spec.http)
    assert table.returncode == 0, table.stdout + table.stderr
    lines = table.stdout.strip().splitlines()
    assert [c.lower() for c in lines[0].split()[:4]] == ["id", "http", "raft", "role"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"n1", "n2", "n3", "n4"}
    assert [row[3] for row in rows.values()].count("leader") == 1 and rows[leader][3] == "leader"

    async with CoordinatorClient(cluster.url("n4")) as client:
        assert (await client.get("before/join"))["value"] == 1
        await client.put("via/n4", 4)  # a write through the new member
        assert (await client.get("via/n4"))["value"] == 4

    removed = await asyncio.to_thread(_cli, "members", "remove", "--endpoint", cluster.specs[leader].http,
                                      "--id", "n4")
    assert removed.returncode == 0, removed.stderr
    async with CoordinatorClient(cluster.url(leader)) as client:
        status = await client.status()
        assert spec.raft not in {m["raft"] for m in status["members"]}
        await client.put("after/leave", 3)
        assert (await client.get("after/leave"))["value"] == 3
