"""The procedures of docs/operations.md, each run end to end on real node
processes over loopback sockets, with the ``coordinator`` command as an
operator would type it:

- backup and restore: ``snapshot save`` from a running secure cluster (admin
  only), ``snapshot status``, ``snapshot restore`` of every member of a NEW
  cluster on other ports, which starts with the same state and digest and
  takes writes; then, on that cluster, replacing a dead member (members
  remove + add, the new one started with every member as --peer);
- recovering when a majority is gone: ``snapshot save --from-data-dir`` of
  the survivor, restored as a one-node cluster that then grows again;
- a rolling change of the cluster secret in three rolling restarts (accept
  the new one, send the new one, drop the old one: the rolling upgrade's
  procedure, one node at a time, each caught up before the next) while
  writes keep succeeding; a node left with the old secret is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coordinator import cli
from coordinator.client import CoordinatorClient
from devcluster.cluster import LocalCluster, fetch_json
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def coordinator_cli(*args: str, in_process: bool = True) -> Ran:
    """``coordinator ARGS``: in this process by default (``coordinator.cli.main``;
    a child interpreter costs seconds of imports on a loaded machine), or in a
    child process (bounded in time) to prove the installed command."""
    if not in_process:
        env = {k: v for k, v in os.environ.items() if k not in ("COORD_ADMIN_TOKEN", "COORD_CLUSTER_SECRET")}
        done = subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True,
                              timeout=120, check=False, stdin=subprocess.DEVNULL, env=env)
        return Ran(done.returncode, done.stdout, done.stderr)
    out, err = io.StringIO(), io.StringIO()
    with _CLI_OUTPUT, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return Ran(code, out.getvalue(), err.getvalue())


_CLI_OUTPUT = threading.Lock()  # one redirected command at a time


def cli_json(*args: str, in_process: bool = True) -> dict[str, Any]:
    done = coordinator_cli(*args, "--json", in_process=in_process)
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


def committed(cluster: LocalCluster) -> int:
    """The highest commit index a running member reports: at least the log
    index of every write acknowledged before this call (a put answers with
    the kv revision, not the log index)."""
    found = [st["commit_index"] for st in (cluster.status(n) for n in cluster.members) if st]
    assert found, "no member answers"
    return max(found)


def digests(cluster: LocalCluster, at_least: int, timeout_s: float = 30) -> set[tuple[int, str]]:
    """Every member's (digest index, digest value) once all of them report the
    same index, at least ``at_least`` (a leader's own entries may still be
    arriving: compared at one index only)."""
    deadline = time.monotonic() + timeout_s
    seen: list[Any] = []
    while time.monotonic() < deadline:
        seen = [cluster.status(n) for n in cluster.members]
        found = {(st["digest"]["index"], st["digest"]["value"]) for st in seen if st}
        indexes = {index for index, _ in found}
        if all(seen) and len(indexes) == 1 and indexes.pop() >= at_least:
            return found
        time.sleep(CLUSTER_POLL_S)
    raise AssertionError(f"the members did not reach one digest index >= {at_least}: "
                         f"{[st and st['digest'] for st in seen]}")


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
                                    "--admin-token-file", str(old.admin_token_file), in_process=False)
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
        await client.put("after/restore", 1)
    written = await asyncio.to_thread(committed, new)
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
        await client.put("after/replace", 1)
    index = await asyncio.to_thread(committed, cluster)
    same = await asyncio.to_thread(digests, cluster, index)
    assert len(same) == 1
    status = cluster.status(leader)
    assert sorted(m["id"] for m in status["members"]) == sorted(cluster.members)


async def rolling_restart(cluster: LocalCluster, prefix: str) -> None:
    """docs/operations.md, "Rolling upgrade": one node at a time goes down and
    comes back (with ``cluster.extra_args``, what the new version or setting
    needs) and has caught up (``coordinator status``) before the next goes;
    a write through the other nodes succeeds while each one is down."""
    token = cluster.admin_token
    async with CoordinatorClient([cluster.url(n) for n in cluster.members], token=token) as client:
        for node_id in list(cluster.members):
            cluster.stop(node_id)
            await client.put(f"{prefix}/{node_id}", node_id)
            index = await asyncio.to_thread(committed, cluster)  # the members still up
            cluster.start(node_id)
            table = await asyncio.to_thread(wait_all_caught_up, cluster, index)
            assert {row["id"] for row in table["members"]} == set(cluster.members)
        items = await client.list(f"{prefix}/", limit=10)
    assert [item["value"] for item in items] == sorted(cluster.members)


def wait_all_caught_up(cluster: LocalCluster, index: int, timeout_s: float = 30) -> dict[str, Any]:
    """``coordinator status --json`` until every member is reachable, healthy
    and has applied ``index`` (what the operator checks between two nodes)."""
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


async def test_recovering_when_a_majority_is_gone(make_cluster, tmp_path: Path) -> None:
    old = make_cluster(extra_args=("--compaction-entries", "40"))
    async with CoordinatorClient([old.url(n) for n in old.members]) as client:
        for i in range(60):  # past a compaction: the survivor holds a snapshot and a journal tail
            await client.put(f"data/{i:02d}", i)
    index = await asyncio.to_thread(committed, old)
    for node_id in old.members:
        await asyncio.to_thread(old.wait_caught_up, node_id, index, 30)
    survivor, *lost = old.members
    await eventually(lambda: (old.dir / survivor / "raft.snapshot").exists(), "the survivor to compact its log",
                     20, interval_s=CLUSTER_POLL_S)
    for node_id in lost:
        old.kill(node_id)  # their disks are gone
    old.stop(survivor)

    rescued = tmp_path / "rescued.snap"
    saved = await asyncio.to_thread(cli_json, "snapshot", "save", str(rescued), "--from-data-dir",
                                    str(old.dir / survivor))
    assert saved["index"] >= index and saved["holds"]["keys"] == 60
    assert saved["source"]["snapshot_index"] > 0 and saved["source"]["entries_replayed"] > 0

    # a one-node cluster from it, then grown back to three members
    new = make_cluster(nodes=1, start=False)
    await restore_cluster(rescued, new)
    new.start_all()
    await asyncio.to_thread(new.wait_leader, 30)
    async with CoordinatorClient(new.url("n1")) as client:
        assert [item["value"] for item in await client.list("data/", limit=100)] == list(range(60))
        for i in (2, 3):
            spec = new.add_spec(i)
            new.members.append(spec.id)
            new.start(spec.id)  # --peer of every member
            await client.add_member(spec.id, spec.raft, spec.http)
        await client.put("after/recovery", 1)
    written = await asyncio.to_thread(committed, new)
    same = await asyncio.to_thread(digests, new, written)
    assert len(same) == 1


async def test_rolling_secret_change(make_cluster, tmp_path: Path) -> None:
    cluster = make_cluster(secure=True)
    old_secret = cluster.secret_file.read_text().strip()
    new_secret = secrets.token_urlsafe(32)
    new_file = tmp_path / "secret.new"
    new_file.write_text(new_secret + "\n")
    accept_new, accept_old = tmp_path / "accept-new.toml", tmp_path / "accept-old.toml"
    accept_new.write_text(f'accept_secret_file = "{new_file}"\n')
    accept_old.write_text(f'accept_secret_file = "{cluster.secret_file}"\n')

    # 1: every node also accepts the new secret (still sends the old one)
    cluster.extra_args = ("--config", str(accept_new))
    await rolling_restart(cluster, "roll1")
    # 2: every node sends the new secret and still accepts the old one
    cluster.extra_args = ("--config", str(accept_old), "--secret-file", str(new_file))
    await rolling_restart(cluster, "roll2")
    # 3: the old secret is dropped
    cluster.extra_args = ("--secret-file", str(new_file))
    await rolling_restart(cluster, "roll3")

    # writes through a follower carry the principal under a key of the new secret
    leader = await asyncio.to_thread(cluster.wait_leader, 30)
    follower = next(n for n in cluster.members if n != leader)
    async with CoordinatorClient(cluster.url(follower), token=cluster.admin_token) as client:
        await client.put("after/secret", 1)

    # a node that knows only the old secret is refused on the Raft port now
    # (pysyncobj dials from the higher address to the lower, so the side that
    # sees a frame it cannot open, and logs it, depends on the addresses)
    straggler = follower
    cluster.stop(straggler)
    logged = {n: len((cluster.dir / f"{n}.log").read_bytes()) for n in cluster.members}
    cluster.extra_args = ()
    cluster.start(straggler)

    def refused_since() -> bool:
        return any(b"does not verify with the cluster secret" in (cluster.dir / f"{n}.log").read_bytes()[logged[n]:]
                   for n in cluster.members)
    await eventually(refused_since, "a frame under the old secret to be refused", 20, interval_s=CLUSTER_POLL_S)
    async with CoordinatorClient(cluster.url(leader), token=cluster.admin_token) as client:
        await client.put("after/straggler", 1)  # the two others still make a majority
    index = cluster.status(leader)["commit_index"]
    status = cluster.status(straggler)
    assert status is not None and status["applied_index"] < index and status["leader_id"] is None
    for node_id in cluster.members:  # never a secret in a log
        text = (cluster.dir / f"{node_id}.log").read_text(errors="replace")
        assert old_secret not in text and new_secret not in text
