"""The limits of one cluster, measured (issue 23, part 4): what the
replicated state costs per agent, topic, held message and key, up to the
default caps, and what a five-node cluster buys against three.

    .venv/bin/python -m bench.scale [--parts state,nodes] [--kinds agents,topics,messages,kv]
        [--steps 0.25,0.5,1] [--seconds 4] [--rounds 2] [--failovers 3] [--base-port 27800]
        [--out docs/benchmarks.md]

``state``: for each kind, in a fresh interpreter (so its memory is its own),
one ``Applier`` (the replica: decode, state machine, digest) applies
entries up to each step's share of the kind's default cap, and after each
step the row gives the process's resident memory over an empty replica
(after a garbage collection: what every replica holds), ``snapshot()``'s
bytes and time, and the time a fresh replica takes to ``restore`` it (a
follower catching up from a snapshot pays it). The entries:

- ``agents``: ``agent.register`` (type, a TTL, 2 metadata keys), cap
  ``agents_max``;
- ``topics``: one 256-byte message published to each of N topics (each
  topic retains it), cap ``topics_max``;
- ``messages``: 256-byte messages retained by 20 topics in batches of 50,
  cap ``messages_max`` (the bus's bodies, held or retained);
- ``kv``: 1 KiB values under distinct keys, up to ``kv_bytes_max``.

``nodes``: a three-node and a five-node cluster (fsync on, 127.0.0.1,
stopped by PID), measured in turn for ``--rounds`` rounds: 64 clients'
writes, 64 clients' linearizable reads, and leader SIGKILL → first write
through a survivor. The generator is ``bench.cluster``'s (one process).
Every loop is bounded by a count and a time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import aiohttp
import msgpack

from bench.cluster import _failover, kv_load
from bench.harness import add_base_port, interruptible, local_cluster, parser
from bench.report import machine, publish

KINDS = ("agents", "topics", "messages", "kv")
PAYLOAD = "p" * 256


def _message(i: int) -> dict[str, Any]:
    return {"id": f"m{i}", "type": "event", "source": "scale", "payload": PAYLOAD}
KV_VALUE = "v" * 1024
MESSAGE_TOPICS = 20
BATCH = 50


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _caps() -> dict[str, int]:
    from coordinator.state.bus_records import BusLimits
    from coordinator.state.machine import Limits
    limits, bus = Limits(), BusLimits()
    return {"agents": limits.agents_max, "topics": bus.topics_max, "messages": bus.messages_max,
            "kv": limits.kv_bytes_max // (len(KV_VALUE) + 16)}


def _entries(kind: str, start: int, stop: int) -> Any:
    """(op, args) of the entries that take ``kind`` from ``start`` to ``stop`` items."""
    if kind == "agents":
        for i in range(start, stop):
            yield "agent.register", {"id": f"agent-{i:06d}", "type": "worker", "ttl_ms": 30_000,
                                     "metadata": {"zone": f"z{i % 3}", "version": "1.4.2"}}
    elif kind == "topics":
        for i in range(start, stop):
            yield "bus.publish", {"topic": f"t.{i:06d}",
                                  "messages": [_message(i)]}
    elif kind == "messages":
        for first in range(start, stop, BATCH):
            n = min(BATCH, stop - first)
            yield "bus.publish", {"topic": f"m.{(first // BATCH) % MESSAGE_TOPICS}",
                                  "messages": [_message(first + j) for j in range(n)]}
    else:
        for i in range(start, stop):
            yield "kv.put", {"key": f"scale/{i:07d}", "value": KV_VALUE}


def state_worker(kind: str, steps: list[float]) -> list[dict[str, Any]]:
    """Run in a fresh interpreter: the rows of one kind."""
    from coordinator.codec import encode_command
    from coordinator.services.applier import Applier
    from coordinator.types import Command

    cap = _caps()[kind]
    applier = Applier()
    gc.collect()
    empty = _rss_bytes()
    rows: list[dict[str, Any]] = []
    index, done = 0, 0
    for step in steps:
        target = max(1, int(cap * step))
        blobs = []
        for op, args in _entries(kind, done, target):
            blobs.append(encode_command(Command(op=op, args=args, now_ms=1_800_000_000_000 + index,
                                                principal="admin")))
        started = time.process_time()
        for blob in blobs:
            index += 1
            error = msgpack.unpackb(applier.apply(index, blob)[1:])[3]  # encode_result: [v, index, value, error]
            if error is not None:
                raise SystemExit(f"{kind}: entry {index} was refused: {error!r:.300}")
        apply_s = time.process_time() - started
        added = target - done
        done = target
        del blobs
        gc.collect()
        held = _rss_bytes() - empty
        started = time.perf_counter()
        snapshot = applier.snapshot()
        snapshot_s = time.perf_counter() - started
        fresh = Applier()
        started = time.perf_counter()
        fresh.restore(snapshot)
        restore_s = time.perf_counter() - started
        check = _count(fresh, kind)
        del fresh
        gc.collect()
        rows.append({"kind": kind, "items": done, "cap": cap, "held_count": check, "rss_mb": held / 2**20,
                     "bytes_per_item": held / done, "snapshot_mb": len(snapshot) / 2**20,
                     "snapshot_s": snapshot_s, "restore_s": restore_s,
                     "apply_us": apply_s / max(1, added) * 1e6})
        del snapshot
    return rows


def _count(applier: Any, kind: str) -> int:
    """How many items the restored replica holds (the run refused nothing)."""
    machine = applier.machine
    if kind == "agents":
        return len(machine.registry.agents)
    if kind == "topics":
        return len(machine.bus.topics)
    if kind == "messages":
        return len(machine.bus.bodies)
    return len(machine.kv)


def run_state(args: argparse.Namespace) -> str:
    rows: list[dict[str, Any]] = []
    for kind in args.kinds:
        out = subprocess.run([sys.executable, "-m", "bench.scale", "--worker", kind, "--steps",
                              ",".join(map(str, args.steps))], capture_output=True, text=True, timeout=1800,
                             check=False)
        if out.returncode != 0:
            raise SystemExit(f"bench.scale worker {kind} failed:\n{out.stderr[-2000:]}")
        rows.extend(json.loads(out.stdout))
    lines = ["| kind | items (default cap) | held by the replica | replica memory MiB | bytes per item "
             "| snapshot MiB | snapshot s | restore s | apply CPU µs per item |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['items']:,} ({r['cap']:,}) | {r['held_count']:,} | {r['rss_mb']:.0f} "
                     f"| {r['bytes_per_item']:.0f} | {r['snapshot_mb']:.1f} | {r['snapshot_s']:.2f} "
                     f"| {r['restore_s']:.2f} | {r['apply_us']:.0f} |")
    return "\n".join(lines)


async def _nodes_round(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    with local_cluster(f"coord-scale{nodes}-", args.base_port, nodes=nodes) as cluster:
        leader = cluster.wait_leader(30)
        url = cluster.url(leader)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await kv_load(session, url, 4, 1.0, "write")  # warm-up
            write = await kv_load(session, url, 64, args.seconds, "write")
            read = await kv_load(session, url, 64, args.seconds, "read")
            failovers = [await _failover(cluster, session) for _ in range(args.failovers)]
    return {"nodes": nodes, "write": write, "read": read, "failover_s": statistics.median(failovers)}


def run_nodes(args: argparse.Namespace) -> str:
    rows = []
    for _ in range(args.rounds):
        for nodes in (3, 5):
            rows.append(asyncio.run(_nodes_round(nodes, args)))
    lines = ["| nodes | round | writes/s (64 clients) | write p99 ms | reads/s (64 clients) | read p99 ms "
             "| failover s (median) | tolerates |", "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {r['nodes']} | {i // 2 + 1} | {r['write']['ops_s']:.0f} | {r['write']['p99_ms']:.1f} "
                     f"| {r['read']['ops_s']:.0f} | {r['read']['p99_ms']:.1f} | {r['failover_s']:.2f} "
                     f"| {(r['nodes'] - 1) // 2} failed node(s) |")
    ratios = []
    for i in range(0, len(rows) - 1, 2):
        three, five = rows[i], rows[i + 1]
        ratios.append((five["write"]["ops_s"] / three["write"]["ops_s"],
                       five["read"]["ops_s"] / three["read"]["ops_s"]))
    lines.append("")
    lines.append("Five ÷ three, per round: writes " + ", ".join(f"{w:.2f}x" for w, _ in ratios)
                 + "; reads " + ", ".join(f"{r:.2f}x" for _, r in ratios) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cli = parser("scale", __doc__)
    cli.add_argument("--parts", default="state,nodes")
    cli.add_argument("--kinds", default=",".join(KINDS))
    cli.add_argument("--steps", default="0.25,0.5,1")
    cli.add_argument("--seconds", type=float, default=4.0)
    cli.add_argument("--rounds", type=int, default=2)
    cli.add_argument("--failovers", type=int, default=3)
    cli.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    add_base_port(cli, 27800)
    cli.add_argument("--out", help="also write the tables into this markdown file")
    args = cli.parse_args(argv)
    args.steps = [float(s) for s in args.steps.split(",")]
    if not all(0 < s <= 1 for s in args.steps) or args.steps != sorted(args.steps):
        cli.error("--steps: increasing shares of the cap, each in (0, 1]")
    if args.worker:
        print(json.dumps(state_worker(args.worker, args.steps)))
        return 0
    args.kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(args.kinds) - set(KINDS):
        cli.error(f"--kinds: unknown {', '.join(sorted(unknown))}")
    parts = args.parts.split(",")
    sections = []
    with interruptible("the nodes"):
        if "state" in parts:
            sections.append("One replica in process (no network, no disk), each kind in a fresh interpreter; "
                            "memory is resident memory over an empty replica after a garbage collection.\n\n"
                            + run_state(args))
        if "nodes" in parts:
            sections.append(f"Three against five nodes (fsync, one generator process, {args.seconds:.0f} s per "
                            f"cell, {args.failovers} failovers per cluster), measured in turn:\n\n"
                            + run_nodes(args))
    header = (f"`python -m bench.scale --parts {args.parts}`, {machine()}, {time.strftime('%Y-%m-%d')}.\n\n")
    publish(header + "\n\n".join(sections), args.out, "\n## Scale: what one cluster holds\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
