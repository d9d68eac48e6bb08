"""The node process: refusing to start unsafely, recovering a stalled apply
loop, keeping its secret, and the cluster scripts."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cluster.journal import DurableJournal
from coordinator.client import CoordinatorClient
from devcluster.cluster import fetch_json
from tests.waiting import CLUSTER_POLL_S, wait_until

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]


def test_serve_refuses_to_start_without_a_cluster_secret(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COORD_CLUSTER_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "serve", "--node-id", "n1", "--http", "127.0.0.1:1",
         "--raft", "127.0.0.1:2", "--data-dir", str(tmp_path / "n1")],
        capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "secret" in result.stderr
    assert not (tmp_path / "n1").exists()  # refused before touching anything


def test_serve_refuses_to_start_without_an_admin_token_unless_anonymous_access_is_allowed(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COORD_ADMIN_TOKEN"}
    env["COORD_CLUSTER_SECRET"] = "Zq3v-8kLm_W2xRt9bNc4YhPe7uJd0sAf"
    result = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "serve", "--node-id", "n1", "--http", "127.0.0.1:1",
         "--raft", "127.0.0.1:2", "--data-dir", str(tmp_path / "n1")],
        capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "admin_token: required unless allow_anonymous" in result.stderr
    assert "Zq3v-8kLm_W2xRt9bNc4YhPe7uJd0sAf" not in result.stderr
    assert not (tmp_path / "n1").exists()


def test_a_node_whose_journal_is_damaged_mid_file_refuses_to_start(make_cluster) -> None:
    """A flipped bit in the length of a record in the middle of a follower's
    journal: the node used to take it for a torn tail, cut every later entry
    off and start with a shorter log than it had acknowledged. It must exit
    instead, naming the file and the offset, and leave the file as it is."""
    cluster = make_cluster()
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.members if n != leader)

    async def write_all() -> None:
        async with CoordinatorClient(cluster.url(leader)) as client:
            for i in range(30):
                await client.put(f"journal/{i:02d}", i)

    asyncio.run(write_all())
    cluster.wait_caught_up(follower, cluster.status(leader)["commit_index"], 30)
    cluster.stop(follower)

    path = cluster.dir / follower / "raft.journal"
    journal = DurableJournal(str(path))
    middle = len(journal) // 2
    offset, command = journal._offsets[middle], journal[middle][0]
    journal._destroy()
    data = path.read_bytes()
    length_at = data.find(struct.pack("<I", 16 + len(command)), offset, offset + 8)
    assert length_at >= 0
    damaged = bytearray(data)
    damaged[length_at + 3] ^= 0x40  # the length now points far past the end of the file
    path.write_bytes(bytes(damaged))

    env = {k: v for k, v in os.environ.items() if k != "COORD_CLUSTER_SECRET"}
    proc = subprocess.Popen(cluster.command(follower), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the node started with a damaged journal instead of refusing to")
    assert proc.returncode != 0
    assert f"{path}: damaged record at byte {offset}" in stderr, stderr
    assert path.read_bytes() == bytes(damaged)  # nothing cut off


def test_a_stalled_apply_loop_is_reported_and_rebuilt_from_the_journal(make_cluster) -> None:
    cluster = make_cluster(start=False)
    cluster.start("n1")
    cluster.start("n2")
    leader = cluster.wait_leader(30, ["n1", "n2"])  # two of three elect a leader: n3 joins as a follower
    cluster.start("n3", env={"COORD_FAILPOINTS": "apply_stall_at=25"})
    assert cluster.wait_leader(30) == leader

    async def write_all() -> None:
        async with CoordinatorClient(cluster.url(leader)) as client:
            for i in range(60):
                await client.put(f"stall/{i:02d}", i)

    asyncio.run(write_all())
    commit = cluster.status(leader)["commit_index"]

    seen_unhealthy = wait_until(lambda: (s := cluster.status("n3")) and not s["healthy"] and s,
                                "the stalled node to report itself unhealthy", 20, interval_s=CLUSTER_POLL_S)
    assert "stalled" in seen_unhealthy["problem"]
    ready = fetch_json(cluster.url("n3") + "/readyz")
    assert ready is not None and ready["status"] in ("not ready", "ready")

    recovered = cluster.wait_caught_up("n3", commit, 30)
    assert recovered["healthy"] and recovered["problem"] is None
    stale = fetch_json(cluster.url("n3") + "/v1/kv?prefix=stall/&consistency=stale&limit=100")
    assert [item["value"] for item in stale["items"]] == list(range(60))
    with urllib.request.urlopen(cluster.url("n3") + "/metrics", timeout=2) as response:
        assert "coord_engine_recoveries_total 1.0" in response.read().decode()


def test_the_secret_stays_out_of_logs_status_and_metrics(make_cluster) -> None:
    cluster = make_cluster()
    secret = cluster.secret_file.read_text().strip()
    for node_id in cluster.members:
        with urllib.request.urlopen(cluster.url(node_id) + "/v1/status", timeout=2) as response:
            assert secret not in response.read().decode()
        with urllib.request.urlopen(cluster.url(node_id) + "/metrics", timeout=2) as response:
            assert secret not in response.read().decode()
    cluster.stop_all()
    for node_id in cluster.members:
        log = (cluster.dir / f"{node_id}.log").read_text()
        assert secret not in log
        # the development mode says on start what it allows
        assert "anonymous access is allowed" in log and "any agent may register as any type with any endpoint" in log
    assert oct(cluster.secret_file.stat().st_mode & 0o777) == "0o600"
    # a node's own files hold the cluster's data: the owner's only (the node sets umask 0077)
    for node_id in cluster.members:
        data = cluster.dir / node_id
        modes = {str(p.relative_to(data)): p.stat().st_mode & 0o777 for p in data.rglob("*")}
        assert "raft.journal" in modes and "raft.journal.meta" in modes
        assert all(mode == (0o700 if (data / name).is_dir() else 0o600) for name, mode in modes.items()), modes


def test_cluster_up_twice_reuses_the_running_cluster(tmp_path) -> None:
    from devcluster.cluster import free_base_port

    env = dict(os.environ, COORD_BASE_PORT=str(free_base_port()))
    directory = tmp_path / "dot-cluster"
    up = [str(ROOT / "scripts" / "cluster-up.sh"), "--dir", str(directory)]
    down = [str(ROOT / "scripts" / "cluster-down.sh"), "--dir", str(directory)]
    try:
        first = subprocess.run(up, capture_output=True, text=True, timeout=120, env=env)
        assert first.returncode == 0, first.stderr
        assert "leader:" in first.stdout and first.stdout.count("started") == 3
        pids = {p.name: p.read_text() for p in directory.glob("n*.pid")}
        second = subprocess.run(up, capture_output=True, text=True, timeout=120, env=env)
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stdout and "started" not in second.stdout
        assert {p.name: p.read_text() for p in directory.glob("n*.pid")} == pids
    finally:
        stopped = subprocess.run(down, capture_output=True, text=True, timeout=120, env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert list(directory.glob("n*.pid")) == []
