"""Benchmark a local three-node cluster (fsync on): one client's write and
read latency, 64 clients' write throughput, and leader failover time.

    .venv/bin/python scripts/bench_cluster.py [--seconds 5] [--failovers 5] [--out docs/benchmarks.md]

Every load loop is bounded by a count and a time. The load generator runs
in this one process; its CPU time is reported next to the numbers, so a
reader can tell when the generator (not the cluster) was the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import cpu_s, write_section  # noqa: E402
from bench.report import pct as quantile  # noqa: E402
from devcluster.cluster import LocalCluster  # noqa: E402

VALUE = "v" * 64
MAX_OPS_PER_CLIENT = 200_000


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of seconds, in milliseconds (nan when empty)."""
    return quantile(values, q) * 1000


async def _load(session: aiohttp.ClientSession, url: str, clients: int, seconds: float, kind: str) -> dict:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds

    async def client(c: int) -> None:
        nonlocal errors
        for i in range(MAX_OPS_PER_CLIENT):
            if time.monotonic() >= stop_at:
                return
            started = time.perf_counter()
            if kind == "write":
                request = session.put(f"{url}/v1/kv/bench/{c}/{i % 100}", json={"value": VALUE})
            else:
                request = session.get(f"{url}/v1/kv/bench/0/0")
            async with request as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - started)

    cpu = cpu_s()
    started = time.monotonic()
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.monotonic() - started
    return {"kind": kind, "clients": clients, "ops": len(latencies), "ops_s": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99), "errors": errors,
            "gen_cpu": (cpu_s() - cpu) / elapsed}


async def _failover(cluster: LocalCluster, session: aiohttp.ClientSession) -> float:
    """SIGKILL the leader; seconds until a write through a survivor succeeds."""
    leader = cluster.wait_leader(30)
    survivors = [n for n in cluster.members if n != leader]
    killed = time.monotonic()
    cluster.kill(leader)
    attempt = 0
    while time.monotonic() - killed < 60:
        attempt += 1
        url = cluster.url(survivors[attempt % len(survivors)])
        try:
            async with session.put(f"{url}/v1/kv/failover", json={"value": attempt},
                                   timeout=aiohttp.ClientTimeout(total=2)) as response:
                await response.read()
                if response.status == 200:
                    elapsed = time.monotonic() - killed
                    break
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.005)
    else:
        raise RuntimeError("no write succeeded within 60 s of the kill")
    cluster.start(leader)
    cluster.wait_leader(30)
    return elapsed


async def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="coord-bench-") as directory:
        cluster = LocalCluster(directory, base_port=args.base_port, durability="fsync")
        cluster.start_all()
        try:
            leader = cluster.wait_leader(30)
            url = cluster.url(leader)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                await _load(session, url, 4, 1.0, "write")  # warm-up
                rows = [await _load(session, url, 1, args.seconds, "write"),
                        await _load(session, url, 1, args.seconds, "read"),
                        await _load(session, url, 16, args.seconds, "write"),
                        await _load(session, url, 64, args.seconds, "write"),
                        await _load(session, url, 64, args.seconds, "read")]
                failovers = [await _failover(cluster, session) for _ in range(args.failovers)]
        finally:
            cluster.stop_all()
    lines = [
        "| workload | clients | ops/s | p50 ms | p99 ms | errors | generator CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        what = "write 64 B" if r["kind"] == "write" else "linearizable read"
        lines.append(f"| {what} | {r['clients']} | {r['ops_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                     f"| {r['errors']} | {r['gen_cpu'] * 100:.0f}% of a core |")
    lines.append("")
    lines.append(f"Leader SIGKILL → first successful write, {len(failovers)} tries: "
                 f"min {min(failovers):.2f} s, median {statistics.median(failovers):.2f} s, "
                 f"max {max(failovers):.2f} s.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--failovers", type=int, default=5)
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("COORD_BENCH_BASE_PORT", "27000")))
    parser.add_argument("--out", help="also write the table into this markdown file")
    args = parser.parse_args()
    table = asyncio.run(run(args))
    header = (f"Three nodes and the load generator on one machine ({os.cpu_count()} cores, "
              f"{platform.python_implementation()} {platform.python_version()}), durability fsync, "
              f"{args.seconds:.0f} s per row, `scripts/bench_cluster.py`, {time.strftime('%Y-%m-%d')}.\n\n")
    print(header + table)
    if args.out:
        write_section(Path(args.out), "\n## Foundation: one cluster, one generator\n", header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
