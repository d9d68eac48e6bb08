"""Benchmark a local three-node cluster (fsync on): one client's write and
read latency, 64 clients' write throughput, and leader failover time.

    .venv/bin/python -m bench.cluster [--seconds 5] [--failovers 5] [--base-port 27000] [--out docs/benchmarks.md]

Every load loop is bounded by a count and a time. The load generator runs
in this one process; its CPU time is reported next to the numbers, so a
reader can tell when the generator (not the cluster) was the bottleneck.
The nodes are stopped by PID at the end, also on Ctrl-C or SIGTERM.
``kv_load`` is that generator (aiohttp, one process), also used by
``bench.engines``; ``bench.load`` is the leaner multi-process one that
``bench.compare`` and ``bench.ab`` use.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import aiohttp

from bench.harness import add_base_port, interruptible, local_cluster, parser
from bench.report import cpu_s, machine, pct_ms, publish
from devcluster.cluster import LocalCluster

VALUE = "v" * 64
MAX_OPS_PER_CLIENT = 200_000


async def kv_load(session: aiohttp.ClientSession, url: str, clients: int, seconds: float, kind: str) -> dict:
    """``clients`` closed-loop clients on the loop writing 64-byte values to
    ``bench/{c}/{i % 100}`` (``kind`` write) or reading ``bench/0/0`` (read)
    at ``url`` for ``seconds``: operations per second, p50 and p99 in ms,
    non-200 answers, and this process's CPU as a share of one core."""
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
            "p50_ms": pct_ms(latencies, 0.5), "p99_ms": pct_ms(latencies, 0.99), "errors": errors,
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
    with local_cluster("coord-bench-", args.base_port) as cluster:
        leader = cluster.wait_leader(30)
        url = cluster.url(leader)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await kv_load(session, url, 4, 1.0, "write")  # warm-up
            rows = [await kv_load(session, url, 1, args.seconds, "write"),
                    await kv_load(session, url, 1, args.seconds, "read"),
                    await kv_load(session, url, 16, args.seconds, "write"),
                    await kv_load(session, url, 64, args.seconds, "write"),
                    await kv_load(session, url, 64, args.seconds, "read")]
            failovers = [await _failover(cluster, session) for _ in range(args.failovers)]
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


def main(argv: list[str] | None = None) -> int:
    cli = parser("cluster", __doc__)
    cli.add_argument("--seconds", type=float, default=5.0)
    cli.add_argument("--failovers", type=int, default=5)
    add_base_port(cli, 27000)
    cli.add_argument("--out", help="also write the table into this markdown file")
    args = cli.parse_args(argv)
    with interruptible("the nodes"):
        table = asyncio.run(run(args))
    header = (f"Three nodes and the load generator on one machine ({machine()}), durability fsync, "
              f"{args.seconds:.0f} s per row, `python -m bench.cluster`, {time.strftime('%Y-%m-%d')}.\n\n")
    publish(header + table, args.out, "\n## Foundation: one cluster, one generator\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
