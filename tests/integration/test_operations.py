"""The procedures of docs/operations.md, each run end to end on real node
processes over loopback sockets, with the ``coordinator`` command as an
operator would type it:

- backup and restore: ``snapshot save`` from a running secure cluster (admin
  only), ``snapshot status``, ``snapshot restore`` of every member of a NEW
  cluster on other ports, which starts with the same state and digest and
  takes writes; then, on that cluster, replacing a dead member (members
  remove + add, the new one started with every member as --peer) and a
  rolling restart (one node at a time, waiting for each to catch up);
- recovering when a majority is gone: ``snapshot save --from-data-dir`` of
  the survivor, restored as a one-node cluster that then grows again;
- a rolling change of the cluster secret in three rolls (accept the new one,
  send the new one, drop the old one) while writes keep succeeding.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from coordinator.client import CoordinatorClient
from devcluster.cluster import LocalCluster, fetch_json
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster


def coordinator_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``coordinator ARGS`` in a child process (bounded in time)."""
    child_env = {k: v for k, v in os.environ.items() if k not in ("COORD_ADMIN_TOKEN", "COORD_CLUSTER_SECRET")}
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                          timeout=120, check=False, stdin=subprocess.DEVNULL, env=child_env)


def cli_json(*args: str) -> dict[str, Any]:
    done = coordinator_cli(*args, "--json")
    assert done.returncode == 0, f"coordinator {' '.join(args)} failed ({done.returncode}): {done.stderr}"
    return json.loads(done.stdout)


async def restore_cluster(snapshot: Path, cluster: LocalCluster) -> list[dict[str, Any]]:
    """``snapshot restore`` for every member of ``cluster`` (not started), each
    with every other member as --peer."""
    results = []
    for node_id in cluster.members:
        spec = cluster.specs[node_id]
        peers = [f"--peer={cluster.specs[p].peer_arg()}" for p in cluster.members if p != node_id]
        results.append(await asyncio.to_thread(
            cli_json, "snapshot", "restore", str(snapshot), "--data-dir", str(cluster.dir / node_id),
            "--node-id", node_id, "--http", spec.http, "--raft", spec.raft, *peers))
    return results


def digests(cluster: LocalCluster, at_least: int) -> set[tuple[int, str]]:
    """Every member's (digest index, digest value), once each applied ``at_least``."""
    for node_id in cluster.members:
        cluster.wait_caught_up(node_id, at_least, 30)
    found = set()
    for node_id in cluster.members:
        status = cluster.status(node_id)
        assert status is not None
        found.add((status["digest"]["index"], status["digest"]["value"]))
    return found


async def test_backup_restore_replace_a_member_and_roll(make_cluster, tmp_path: Path) -> None:
    old = make_cluster(secure=True)
    token = old.admin_token
    async with CoordinatorClient([old.url(n) for n in old.members], token=token) as client:
        for i in range(20):
            await client.put(f"cfg/{i:02d}", {"i": i})
        await client.register("planner", agent_id="planner-1", ttl_s=60)
    backup = tmp_path / "backup.snap"

    # admin only: anonymous 401; the admin gets a self-checking file
    anonymous = await asyncio.to_thread(fetch_json, old.url(old.members[0]) + "/v1/snapshot", 5)
    assert anonymous["error"]["code"] == "unauthenticated"
    saved = await asyncio.to_thread(cli_json, "snapshot", "save", str(backup), "--endpoint", old.url(old.members[1]),
                                    "--admin-token-file", str(old.admin_token_file))
    assert saved["holds"]["keys"] == 20 and saved["holds"]["agents"] == 1
    assert saved["size_bytes"] == backup.stat().st_size
    refused = await asyncio.to_thread(coordinator_cli, "snapshot", "save", str(backup), "--endpoint",
                                      old.url(old.members[0]), "--admin-token-file", str(old.admin_token_file))
    assert refused.returncode == 2 and "exists" in refused.stderr
    status = await asyncio.to_thread(cli_json, "snapshot", "status", str(backup))
    assert (status["index"], status["sha256"], status["valid"]) == (saved["index"], saved["sha256"], True)
    damaged = tmp_path / "damaged.snap"
    raw = bytearray(backup.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    bad = await asyncio.to_thread(coordinator_cli, "snapshot", "status", str(damaged))
    assert bad.returncode == 2 and "checksum mismatch" in bad.stderr
    old.stop_all()

    # restore: a NEW cluster on other ports, every member from the same file
    new = make_cluster(secure=True, start=False)
    results = await restore_cluster(backup, new)
    assert {r["index"] for r in results} == {saved["index"]}
    refused = await asyncio.to_thread(coordinator_cli, "snapshot", "restore", str(backup), "--data-dir",
                                      str(new.dir / "n1"), "--node-id", "n1", "--http", new.specs["n1"].http,
                                      "--raft", new.specs["n1"].raft)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    new.start_all()
    await asyncio.to_thread(new.wait_leader, 30)
    async with CoordinatorClient([new.url(n) for n in new.members], token=new.admin_token) as client:
        assert [item["value"]["i"] for item in await client.list("cfg/", limit=100)] == list(range(20))
        assert [a["id"] for a in await client.agents()] == ["planner-1"]
        written = await client.put("after/restore", 1)
    same = await asyncio.to_thread(digests, new, written)
    assert len(same) == 1, f"the restored members disagree: {same}"
    # the member table inside the state still named the old addresses: every
    # restored node registers its own again on start (system.member.updated)
    async def members_moved() -> bool:
        async with CoordinatorClient(new.url("n1"), token=new.admin_token) as client:
            events = await client.events(limit=10_000)
        table = {}
        for event in events:
            if event["type"] in ("system.member.joined", "system.member.updated"):
                table[event["data"]["id"]] = event["data"]["http"]
        return table == {n: new.specs[n].http for n in new.members}
    await eventually(members_moved, "the restored members to register their new addresses", 20,
                     interval_s=CLUSTER_POLL_S)

    await replace_a_dead_member(new)
    await rolling_restart(new)


async def replace_a_dead_member(cluster: LocalCluster) -> None:
    """docs/operations.md, "Replacing a dead member": n3's disk is gone."""
    leader = await asyncio.to_thread(cluster.wait_leader, 30)
    dead = next(n for n in cluster.members if n != leader)
    cluster.kill(dead)
    replacement = cluster.add_spec(len(cluster.specs) + 1).id
    token = cluster.admin_token
    async with CoordinatorClient(cluster.url(leader), token=token) as client:
        await client.remove_member(dead)
    cluster.members = [n for n in cluster.members if n != dead] + [replacement]
    cluster.start(replacement)  # --peer of every member, itself excluded
    async with CoordinatorClient(cluster.url(leader), token=token) as client:
        spec = cluster.specs[replacement]
        await client.add_member(replacement, spec.raft, spec.http)
        index = await client.put("after/replace", 1)
    same = await asyncio.to_thread(digests, cluster, index)
    assert len(same) == 1
    status = cluster.status(leader)
    assert sorted(m["id"] for m in status["members"]) == sorted(cluster.members)


async def rolling_restart(cluster: LocalCluster) -> None:
    """docs/operations.md, "Rolling upgrade": one node at a time, each back
    and caught up (``coordinator status``) before the next goes down."""
    token = cluster.admin_token
    async with CoordinatorClient([cluster.url(n) for n in cluster.members], token=token) as client:
        for round_, node_id in enumerate(list(cluster.members)):
            cluster.stop(node_id)
            index = await client.put(f"roll/{round_}", node_id)
            cluster.start(node_id)
            table = await asyncio.to_thread(wait_all_caught_up, cluster, index)
            assert {row["id"] for row in table["members"]} == set(cluster.members)
        items = await client.list("roll/", limit=10)
    assert [item["value"] for item in items] == list(cluster.members)


def wait_all_caught_up(cluster: LocalCluster, index: int, timeout_s: float = 30) -> dict[str, Any]:
    """``coordinator status --json`` until every member is reachable, healthy
    and has applied ``index`` (what the operator checks between two nodes)."""
    import time

    deadline = time.monotonic() + timeout_s
    table: dict[str, Any] = {}
    while time.monotonic() < deadline:
        done = coordinator_cli("status", "--endpoint", cluster.specs[cluster.members[0]].http, "--json")
        if done.returncode == 0:
            table = json.loads(done.stdout)
            rows = table["members"]
            if all(r.get("healthy") and r.get("applied_index", 0) >= index for r in rows):
                return table
        time.sleep(CLUSTER_POLL_S)
    raise AssertionError(f"not every member caught up with index {index} in {timeout_s} s: {table}")
