"""What a backup costs (issue 24, operations): ``coordinator snapshot save``
from a follower of a three-node cluster (fsync on, 127.0.0.1) holding
``--keys`` keys of ``--value-bytes`` each, and ``snapshot restore`` of a new
three-node cluster from the file.

    .venv/bin/python -m bench.backup [--keys 20000] [--value-bytes 1000] [--rounds 3]
        [--base-port 26400] [--out docs/benchmarks.md]

Reported per round: the file's size, the save's wall time (the command, a
fresh interpreter included), how long the serving node's event loop was
held taking the state (``coord_backup_snapshot_last_seconds``), the worst
latency of stale reads sent to that node back to back during the save
(against the same reads' p50 before it: the stall a client sees), and for
the restore, the three ``snapshot restore`` commands and the new cluster's
time to an agreed leader and its first write. The load is bounded by
``--keys`` and ``--load-seconds``; every wait by a deadline.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import add_base_port, interruptible, local_cluster, parser
from bench.report import machine, pct, publish
from devcluster.cluster import LocalCluster, free_base_port

MARKER = "\n## Backup and restore\n"


def _cli(*args: str) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "coordinator.cli", *args, "--json"], capture_output=True,
                          text=True, timeout=600, check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"coordinator {' '.join(args)} failed: {done.stderr.strip()}")
    return time.perf_counter() - started, json.loads(done.stdout)


async def _load(url: str, keys: int, value_bytes: int, seconds: float) -> int:
    value = "v" * value_bytes
    written = 0
    stop_at = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def writer(start: int) -> None:
            nonlocal written
            for i in range(start, keys, 32):
                if time.monotonic() >= stop_at:
                    return
                async with session.put(f"{url}/v1/kv/backup/{i:08d}", json={"value": value}) as response:
                    await response.read()
                    if response.status == 200:
                        written += 1
        await asyncio.gather(*(writer(c) for c in range(32)))
    return written


async def _reads_during(url: str, task: asyncio.Future[Any], limit_s: float) -> list[float]:
    """Stale reads of one key back to back until ``task`` is done (or ``limit_s``)."""
    latencies: list[float] = []
    stop_at = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as session:
        while not task.done() and time.monotonic() < stop_at:
            started = time.perf_counter()
            async with session.get(f"{url}/v1/kv/backup/00000000?consistency=stale") as response:
                await response.read()
            latencies.append(time.perf_counter() - started)
    return latencies


def _metric(url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


async def _round(args: Any, directory: Path) -> dict[str, Any]:
    with local_cluster("coord-backup-", args.base_port) as cluster:
        leader = cluster.wait_leader(30)
        follower = next(n for n in cluster.members if n != leader)
        written = await _load(cluster.url(leader), args.keys, args.value_bytes, args.load_seconds)
        serving = cluster.url(follower)
        before = await _reads_during(serving, asyncio.get_running_loop().create_future(), 1.0)
        directory.mkdir(parents=True, exist_ok=True)
        snap = directory / "backup.snap"
        save = asyncio.ensure_future(asyncio.to_thread(_cli, "snapshot", "save", str(snap), "--endpoint", serving))
        during = await _reads_during(serving, save, 600)
        save_s, saved = await save
        held_s = _metric(serving, "coord_backup_snapshot_last_seconds")
    new = LocalCluster(directory / "restored", base_port=free_base_port(), durability="fsync")
    try:
        restore_s = 0.0
        for node_id in new.members:
            spec = new.specs[node_id]
            peers = [f"--peer={new.specs[p].peer_arg()}" for p in new.members if p != node_id]
            took, _ = _cli("snapshot", "restore", str(snap), "--data-dir", str(new.dir / node_id), "--node-id",
                           node_id, "--http", spec.http, "--raft", spec.raft, *peers)
            restore_s += took
        started = time.perf_counter()
        new.start_all()
        new_leader = new.wait_leader(60)
        async with aiohttp.ClientSession() as session, \
                session.put(f"{new.url(new_leader)}/v1/kv/after", json={"value": 1}) as response:
            await response.read()
            if response.status != 200:
                raise SystemExit(f"the restored cluster refused a write: {response.status}")
        first_write_s = time.perf_counter() - started
    finally:
        new.stop_all()
    return {"keys": written, "size_mb": saved["size_bytes"] / 2**20, "save_s": save_s, "held_s": held_s,
            "read_p50_ms": pct(before, 0.5) * 1000, "read_max_during_ms": max(during, default=float("nan")) * 1000,
            "reads_during": len(during), "restore_s": restore_s, "first_write_s": first_write_s}


def main(argv: list[str] | None = None) -> None:
    p = parser("backup", __doc__)
    p.add_argument("--keys", type=int, default=20_000)
    p.add_argument("--value-bytes", type=int, default=1000)
    p.add_argument("--load-seconds", type=float, default=180.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="write the section into this markdown file")
    add_base_port(p, 26400)
    args = p.parse_args(argv)
    rows = []
    with interruptible("the benchmark's clusters"), tempfile.TemporaryDirectory(prefix="coord-backup-") as tmp:
        for i in range(args.rounds):
            rows.append(asyncio.run(_round(args, Path(tmp) / f"r{i}")))
    lines = [f"`python -m bench.backup --keys {args.keys} --value-bytes "
             f"{args.value_bytes} --rounds {args.rounds}`, {time.strftime('%Y-%m-%d')}, {machine()}: a three-node "
             "cluster (fsync), `snapshot save` from a follower, `snapshot restore` of a new three-node cluster.\n",
             "| keys | file MiB | save s (command) | loop held s | stale read p50 ms before / max during | "
             "3 restores s | restored: start to first write s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['keys']:,} | {r['size_mb']:.1f} | {r['save_s']:.2f} | {r['held_s']:.3f} | "
                     f"{r['read_p50_ms']:.1f} / {r['read_max_during_ms']:.0f} ({r['reads_during']} reads) | "
                     f"{r['restore_s']:.1f} | {r['first_write_s']:.1f} |")
    publish("\n".join(lines), args.out, MARKER)


if __name__ == "__main__":
    main()
