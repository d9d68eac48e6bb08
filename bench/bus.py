"""Benchmark the bus on a local three-node cluster (fsync on): publish → deliver
throughput and latency of 256-byte at-least-once messages, unbatched (one
message per request) and batched (``{"messages": [...]}`` per request),
interleaved A, B, A, B... so the ratio is measured side by side.

    .venv/bin/python -m bench.bus [--seconds 8] [--rounds 3] [--publishers 16] [--batch 50] [--base-port 27200]
        [--out docs/benchmarks.md] [--transports redis,nats,rabbitmq,kafka] [--modes log,direct]

Publishers and consumers run in this process (asyncio + aiohttp) against the
leader. Consumers are a group of four subscriptions fetching up to 200 with a
1 s long-poll and acking each batch in one request. Latency is from the
publisher's send to the consumer's receipt (one process, one clock). Every
loop is bounded by a count and a time; the generator's CPU is reported.
The nodes are stopped by PID at the end, also on Ctrl-C or SIGTERM.
``--transports`` runs the batched load on the embedded log and on each named
broker (running on 127.0.0.1 at its default port: ``scripts/brokers-up.sh``)
instead, interleaved per round. ``--modes log,direct`` measures each broker in
each binding mode (``transports/design.md``) side by side with the embedded
bus, publishers spread over the three nodes; consumers of a direct topic are
spread too (each node serves them from the broker; over Kafka, the nodes send
a group's fetches and acks to the one member that reads it); the others'
consumers talk to the leader, which serves them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import aiohttp

from bench.harness import add_base_port, interruptible, local_cluster, parser
from bench.report import cpu_s, machine, pct_ms, processes_cpu_s, publish
from devcluster.progress import Steps

MAX_REQUESTS_PER_PUBLISHER = 100_000
DRAIN_S = 15.0
CONSUMERS = 4
FETCH_MAX = 200


def _message(n: int) -> dict:
    message = {"id": f"m{n}", "payload": {"t": time.perf_counter(), "pad": ""}}
    size = len(json.dumps(message["payload"]))
    message["payload"]["pad"] = "x" * max(0, 256 - size)
    return message


async def _round(session: aiohttp.ClientSession, url: str, tag: str, batch: int, publishers: int,
                 seconds: float, transport: str | None = None, *, mode: str = "log",
                 nodes: list[str] | None = None, pids: list[int | None] | None = None) -> dict:
    """One measured row. ``nodes``: spread the publishers over these URLs
    (else all on ``url``, the leader); a direct topic's consumers too.
    ``pids``: the nodes' processes, whose CPU over the row is reported."""
    topic = f"bench.{tag}"
    if transport is not None:
        binding: dict = {"transport": transport, "backlog_max": 1_000_000}
        if mode != "log":
            binding["mode"] = mode
        async with session.put(f"{url}/v1/topics/{topic}/binding", json=binding) as r:
            if r.status != 200:
                raise RuntimeError(f"binding {topic} to {transport}: {r.status} {await r.text()}")
    subs = []
    for _ in range(CONSUMERS):
        async with session.post(f"{url}/v1/subscriptions", json={"topic": topic, "group": f"g-{tag}"}) as r:
            subs.append((await r.json())["id"])
    publish_urls = nodes or [url]
    consume_urls = [url]
    if mode == "direct" and nodes:
        consume_urls = nodes
        await _visible(session, consume_urls, subs)
    published = 0
    publish_latency: list[float] = []
    delivered: dict[str, float] = {}
    errors = 0
    stop_at = time.monotonic() + seconds
    publishing_done = asyncio.Event()

    async def publisher(p: int) -> None:
        nonlocal published, errors
        for i in range(MAX_REQUESTS_PER_PUBLISHER):
            if time.monotonic() >= stop_at:
                return
            base = (p * MAX_REQUESTS_PER_PUBLISHER + i) * batch
            body = _message(base) if batch == 1 else {"messages": [_message(base + k) for k in range(batch)]}
            started = time.perf_counter()
            async with session.post(f"{publish_urls[p % len(publish_urls)]}/v1/topics/{topic}/messages",
                                    json=body) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    continue
            publish_latency.append(time.perf_counter() - started)
            published += batch

    async def consumer(sub: str, url: str) -> None:
        nonlocal errors
        deadline = stop_at + DRAIN_S
        while time.monotonic() < deadline:
            if publishing_done.is_set() and len(delivered) >= published:
                return
            async with session.get(f"{url}/v1/subscriptions/{sub}/messages",
                                   params={"max": FETCH_MAX, "wait_s": 1}) as r:
                body = await r.json()
                if r.status != 200:
                    errors += 1
                    continue
            now = time.perf_counter()
            ids = []
            for d in body["messages"]:
                delivered.setdefault(d["message"]["id"], now - d["message"]["payload"]["t"])
                ids.append(d["delivery_id"])
            if ids:
                async with session.post(f"{url}/v1/subscriptions/{sub}/ack", json={"delivery_ids": ids}) as r:
                    await r.read()
                    errors += r.status != 200

    cpu = cpu_s()
    node_cpu = processes_cpu_s(pids or [])
    started = time.monotonic()
    consumers = [asyncio.create_task(consumer(s, consume_urls[i % len(consume_urls)])) for i, s in enumerate(subs)]
    await asyncio.gather(*(publisher(p) for p in range(publishers)))
    publishing_done.set()
    await asyncio.gather(*consumers)
    elapsed = time.monotonic() - started
    node_cpu = processes_cpu_s(pids or []) - node_cpu
    for sub in subs:
        async with session.delete(f"{url}/v1/subscriptions/{sub}") as r:
            await r.read()
    if transport is not None:  # the leader removes the topic at the broker too
        async with session.delete(f"{url}/v1/topics/{topic}/binding", json={"drop_backlog": True}) as r:
            await r.read()
    latencies = list(delivered.values())
    return {"tag": tag, "batch": batch, "publishers": publishers, "published": published, "mode": mode,
            "delivered": len(delivered), "msgs_s": len(delivered) / elapsed,
            "publish_p50_ms": pct_ms(publish_latency, 0.5), "p50_ms": pct_ms(latencies, 0.5),
            "p99_ms": pct_ms(latencies, 0.99), "errors": errors, "gen_cpu": (cpu_s() - cpu) / elapsed,
            "node_cpu_us": node_cpu / max(1, len(delivered)) * 1e6}


async def _visible(session: aiohttp.ClientSession, urls: list[str], subs: list[str]) -> None:
    """Wait (bounded) until every node in ``urls`` applied the subscriptions:
    a node serves a direct topic's subscription from its own replica."""
    deadline = time.monotonic() + 10
    for url in urls:
        for sub in subs:
            while time.monotonic() < deadline:
                async with session.get(f"{url}/v1/subscriptions/{sub}", params={"consistency": "stale"}) as r:
                    await r.read()
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)


TRANSPORT_URLS = {"redis": "redis://127.0.0.1:6379/0", "nats": "nats://127.0.0.1:4222",
                  "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/", "kafka": "kafka://127.0.0.1:9092"}


async def run_modes(args: argparse.Namespace) -> str:
    """Embedded, then every broker in every mode, interleaved per round, the
    publishers spread over the three nodes; ratios against the embedded bus
    of the same round."""
    names = [n for n in args.transports.split(",") if n]
    modes = [m for m in args.modes.split(",") if m]
    extra: list[str] = ["--transport-namespace", f"bench{os.getpid()}"]
    for name in names:
        extra += ["--transport", f"{name}={TRANSPORT_URLS[name]}"]
    cells = [("embedded", None, "log")] + [(f"{n} {m}", n, m) for n in names for m in modes]
    rows: dict[str, list[dict]] = {label: [] for label, _, _ in cells}
    with local_cluster("coord-bench-bus-", args.base_port, extra_args=tuple(extra)) as cluster:
        leader = cluster.wait_leader(30)
        url = cluster.url(leader)
        nodes = [cluster.url(n) for n in cluster.members]
        pids = [cluster.pid(n) for n in cluster.members]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await _round(session, url, "warmup", 10, 4, 2.0, nodes=nodes)
            with Steps("bus cells", args.rounds * len(cells)) as steps:
                for r in range(args.rounds):
                    for label, transport, mode in cells:
                        tag = f"{label.replace(' ', '-')}{r}"
                        rows[label].append(await _round(session, url, tag, args.batch, args.publishers,
                                                        args.seconds, transport, mode=mode, nodes=nodes,
                                                        pids=pids))
                        steps.step(f"{label}, round {r + 1}: {rows[label][-1]['msgs_s']:.0f} msgs/s")
    lines = ["| bus | round | delivered msgs/s | publish→deliver p50 ms | p99 ms | publish request p50 ms "
             "| undelivered after 15 s drain | errors | generator CPU | nodes' CPU µs per message "
             "| vs embedded (same round) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, results in rows.items():
        for r, row in enumerate(results):
            ratio = row["msgs_s"] / rows["embedded"][r]["msgs_s"]
            lines.append(f"| {label} | {r + 1} | {row['msgs_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
                         f"| {row['publish_p50_ms']:.1f} | {row['published'] - row['delivered']} | {row['errors']} "
                         f"| {row['gen_cpu'] * 100:.0f}% | {row['node_cpu_us']:.0f} | {ratio:.2f}x |")
    lines.append("")
    for label, _, _ in cells[1:]:
        ratios = [rows[label][r]["msgs_s"] / rows["embedded"][r]["msgs_s"] for r in range(args.rounds)]
        lines.append(f"- {label} / embedded, per round: {', '.join(f'{x:.2f}x' for x in ratios)} "
                     f"(median {statistics.median(ratios):.2f}x)")
    lines += ["", DIRECT_NOTES]
    return "\n".join(lines)


DIRECT_NOTES = """Each row binds a fresh topic (log mode: messages committed first, the leader
copies them to the broker; direct mode: the node that takes a publish sends
it to the broker and answers once the broker confirmed, no log entry per
message or ack), then 16 publishers (spread over the three nodes) and a group
of four consumers run for the row's seconds, and the consumers drain what is
left. Delivered msgs/s counts every message delivered over that whole time;
the nodes' CPU is the three node processes' user and system time over the
row divided by the messages delivered (brokers and generator not counted).
The embedded bus and log mode are served by the leader (a follower forwards
fetches and acks to it); a direct topic's consumers fetch from the node they
talk to, spread over the three (over Kafka that node forwards a group's
fetches and acks to the one member that reads the group's partition).
Nodes, brokers, the load generator and whatever else runs on the machine
share its two cores, so rows move with that load: compare within a round."""


async def run_transports(args: argparse.Namespace) -> str:
    """The same batched load on the embedded log and on each broker, interleaved per round."""
    names = [n for n in args.transports.split(",") if n]
    extra: list[str] = ["--transport-namespace", f"bench{os.getpid()}"]
    for name in names:
        extra += ["--transport", f"{name}={TRANSPORT_URLS[name]}"]
    rows: dict[str, list[dict]] = {name: [] for name in ["embedded", *names]}
    with local_cluster("coord-bench-bus-", args.base_port, extra_args=tuple(extra)) as cluster:
        url = cluster.url(cluster.wait_leader(30))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await _round(session, url, "warmup", 10, 4, 2.0)
            with Steps("bus cells", args.rounds * len(rows)) as steps:
                for r in range(args.rounds):
                    for name in rows:
                        transport = None if name == "embedded" else name
                        rows[name].append(await _round(session, url, f"{name}{r}", args.batch, args.publishers,
                                                       args.seconds, transport))
                        steps.step(f"{name}, round {r + 1}: {rows[name][-1]['msgs_s']:.0f} msgs/s")
    lines = ["| transport | round | delivered msgs/s | publish→deliver p50 ms | p99 ms "
             "| undelivered after 15 s drain | errors | vs embedded (same round) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, results in rows.items():
        for r, row in enumerate(results):
            ratio = row["msgs_s"] / rows["embedded"][r]["msgs_s"]
            lines.append(f"| {name} | {r + 1} | {row['msgs_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
                         f"| {row['published'] - row['delivered']} | {row['errors']} | {ratio:.2f}x |")
    lines.append("")
    for name in names:
        ratios = [rows[name][r]["msgs_s"] / rows["embedded"][r]["msgs_s"] for r in range(args.rounds)]
        lines.append(f"- {name} / embedded, per round: {', '.join(f'{x:.2f}x' for x in ratios)} "
                     f"(median {statistics.median(ratios):.2f}x)")
    lines += ["", TRANSPORT_NOTES]
    return "\n".join(lines)


TRANSPORT_NOTES = """A bound topic's messages are committed to the log first; the leader then
publishes them to the broker (500 per call) and commits the cursor; fetches
through the cluster read the broker (served by the leader) and acks commit
the message keys before acking at the broker. So a broker adds work on top
of the log instead of replacing it: the ratio shows the price of carrying a
topic through a broker, with the broker on the same two cores."""


def _row(label: str, mode: str, row: dict) -> str:
    return (f"| {label} | {mode} | {row['publishers']} x {row['batch']} | {row['msgs_s']:.0f} "
            f"| {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['publish_p50_ms']:.2f} "
            f"| {row['published'] - row['delivered']} | {row['errors']} | {row['gen_cpu'] * 100:.0f}% of a core |")


async def run(args: argparse.Namespace) -> str:
    with local_cluster("coord-bench-bus-", args.base_port) as cluster:
        url = cluster.url(cluster.wait_leader(30))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await _round(session, url, "warmup", 10, 4, 2.0)
            light = await _round(session, url, "light", 1, 1, args.seconds)
            pairs = []
            with Steps("bus rounds", args.rounds) as steps:
                for r in range(args.rounds):
                    unbatched = await _round(session, url, f"u{r}", 1, args.publishers, args.seconds)
                    batched = await _round(session, url, f"b{r}", args.batch, args.publishers, args.seconds)
                    pairs.append((unbatched, batched))
                    steps.step(f"round {r + 1}: unbatched {unbatched['msgs_s']:.0f}, batched "
                               f"{batched['msgs_s']:.0f} msgs/s")
    lines = [
        "| round | mode | publishers x batch | delivered msgs/s | publish→deliver p50 ms | p99 ms "
        "| publish request p50 ms | lost | errors | generator CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    lines.append(_row("light", "unbatched", light))
    for r, (unbatched, batched) in enumerate(pairs):
        ratios.append(batched["msgs_s"] / unbatched["msgs_s"])
        lines.append(_row(str(r + 1), "unbatched", unbatched))
        lines.append(_row(str(r + 1), "batched", batched))
    lines.append("")
    lines.append(f"Batched / unbatched delivered throughput, per round: "
                 f"{', '.join(f'{x:.1f}x' for x in ratios)} (median {statistics.median(ratios):.1f}x).")
    lines += ["", NOTES]
    return "\n".join(lines)


NOTES = """What the numbers say, and what they do not:

- Every message costs three kinds of log entries: its publish (shared by a
  batch), the leader's `bus.deliver` (shared by a fetch of up to 200) and
  the ack (shared likewise). Unbatched, each publish is its own fsynced entry
  and the publishers are the bottleneck; batched, the four consumers are.
- Batched rows run the publishers open-loop faster than the consumers drain,
  so their publish→deliver latency is mostly time spent queued (it grows
  with the row's length); read it as "the backlog drains at this rate", and
  read the light row (one publisher, one message per request, no backlog)
  for the latency of one message through the cluster: publish commit, long-
  poll wake-up, deliver commit, HTTP.
- Three node processes, their fsyncs and the generator share two cores."""


def main(argv: list[str] | None = None) -> int:
    cli = parser("bus", __doc__)
    cli.add_argument("--seconds", type=float, default=8.0)
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--publishers", type=int, default=16)
    cli.add_argument("--batch", type=int, default=50)
    add_base_port(cli, 27200)
    cli.add_argument("--out", help="append (or replace) the bus section of this markdown file")
    cli.add_argument("--transports", default="",
                     help="compare the embedded log with these brokers instead (e.g. redis,nats,rabbitmq)")
    cli.add_argument("--modes", default="",
                     help="with --transports: measure each broker in these binding modes (log,direct), "
                          "publishers spread over the nodes")
    args = cli.parse_args(argv)
    unknown = set(args.transports.split(",")) - set(TRANSPORT_URLS) - {""}
    if unknown or set(args.modes.split(",")) - {"log", "direct", ""}:
        cli.error(f"--transports takes {','.join(TRANSPORT_URLS)}; --modes takes log,direct")
    if args.transports and args.modes:
        with interruptible("the nodes"):
            table = asyncio.run(run_modes(args))
        header = (f"Three nodes, the load generator and the brokers on one machine ({machine()}), durability "
                  f"fsync, {args.seconds:.0f} s per row, {args.rounds} rounds interleaved, {args.publishers} "
                  f"publishers x {args.batch} 256-byte messages per request spread over the three nodes, a group "
                  f"of {CONSUMERS} consumers, `python -m bench.bus --transports {args.transports} --modes "
                  f"{args.modes} --seconds {args.seconds:g} --rounds {args.rounds}`, "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n")
        publish(header + table, args.out, "\n## Bus transports: direct mode\n")
        return 0
    if args.transports:
        with interruptible("the nodes"):
            table = asyncio.run(run_transports(args))
        header = (f"Three nodes, the load generator and the brokers on one machine ({os.cpu_count()} cores), "
                  f"durability fsync, {args.seconds:.0f} s per row, {args.publishers} publishers x {args.batch} "
                  f"256-byte messages per request, a group of {CONSUMERS} consumers, `python -m bench.bus "
                  f"--transports {args.transports}`, {time.strftime('%Y-%m-%d')}.\n\n")
        publish(header + table, args.out, "\n## Bus transports: publish → deliver\n")
        return 0
    with interruptible("the nodes"):
        table = asyncio.run(run(args))
    header = (f"Three nodes and the load generator on one machine ({machine()}), durability fsync, "
              f"{args.seconds:.0f} s per row, 256-byte payloads, at-least-once, a group of {CONSUMERS} "
              f"consumers fetching ≤ {FETCH_MAX} with 1 s long-polls and acking per fetch, "
              f"`python -m bench.bus`, {time.strftime('%Y-%m-%d')}.\n\n")
    publish(header + table, args.out, "\n## Bus: publish → deliver\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
