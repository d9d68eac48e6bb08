"""This project side by side with etcd: same machine, same load, one table.

    python -m bench.compare [--seconds 5] [--rounds 3] [--concurrency 1,16,64,256]
                            [--failovers 5] [--out docs/benchmarks.md] [--chart docs/bench-etcd.png]

(``scripts/bench.sh`` installs etcd if it is missing and runs this.)

Starts a three-member etcd cluster and this project's three-node Raft
cluster on 127.0.0.1, both fsyncing before they acknowledge, and drives both
with the same generator (``bench.load``, separate processes so the
generator's CPU is measured and never shares a loop with this one): 64-byte
writes and linearizable reads at each concurrency, clients spread
round-robin over the three members, the leader's last (so one client goes
through a follower on both systems). The machine's speed drifts, so every
cell is measured A, B, A, B... over ``--rounds`` rounds (which system goes
first alternates), and the report gives the ratio of each pair with its
spread, not one run of each. At 64 clients and more the load comes from two
generator processes (each is one Python process, one core at most; its
client costs about 0.04-0.1 ms of CPU per request, ``python -m bench.gen_ab``).
Failover: SIGKILL the leader, time until a write through a survivor
succeeds, restart, ``--failovers`` times for each system, interleaved.

Every cell also reports the CPU the system's three server processes spent
per operation (all members together, from /proc) and the Raft term changes
during the cell (leader changes under load). ``--steady-s N`` adds a steady
write load at 64 clients for N seconds on each system and counts its
leader changes (the goal: none in 10 minutes).

Every process it starts is stopped by PID at the end, also on Ctrl-C or
SIGTERM. Exit status 0 when every cell ran (errors are reported, not fatal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import harness
from bench.etcd import EtcdCluster, b64, post_json
from bench.load import VALUE, run_generators
from bench.report import machine, pct, processes_cpu_s, write_section
from devcluster.cluster import LocalCluster, fetch_json, free_base_port
from devcluster.progress import Steps

SYSTEMS = ("etcd", "coord")
LABEL = {"etcd": "etcd", "coord": "this project"}
MARKER = "\n## Side by side with etcd\n"
GENERATOR_PROCS_FROM = 64  # clients at which the load is split over two generator processes
WARMUP_S = 1.0


def generator_procs(clients: int) -> int:
    return 2 if clients >= GENERATOR_PROCS_FROM else 1


class Systems:
    """Both clusters, started once for the whole run."""

    def __init__(self, directory: Path) -> None:
        etcd_base = free_base_port(3)
        coord_base = free_base_port(3)
        while abs(coord_base - etcd_base) < 200:
            coord_base = free_base_port(3)
        self.etcd = EtcdCluster(directory / "etcd", etcd_base)
        self.coord = LocalCluster(directory / "coord", base_port=coord_base, nodes=3, durability="fsync")

    def start(self) -> None:
        self.etcd.start_all()
        self.coord.start_all()
        self.etcd.wait_leader(30)
        self.coord.wait_leader(30)

    def stop(self) -> None:
        self.etcd.stop_all()
        self.coord.stop_all()

    def urls(self, system: str) -> list[str]:
        """The members' client URLs, the leader's last: one client goes
        through a follower on both systems, whichever member leads."""
        if system == "etcd":
            leader = self.etcd.wait_leader(30)
            return [self.etcd.client_url(n) for n in sorted(self.etcd.names, key=lambda n: n == leader)]
        leader = self.coord.wait_leader(30)
        return [self.coord.url(n) for n in sorted(self.coord.members, key=lambda n: n == leader)]

    def server_cpu_s(self, system: str) -> float:
        """CPU seconds the system's member processes spent so far, all together."""
        if system == "etcd":
            return processes_cpu_s(self.etcd.pids())
        return processes_cpu_s(self.coord.pid(n) for n in self.coord.members)

    def term(self, system: str) -> int:
        """The system's current Raft term, the highest any member reports."""
        if system == "etcd":
            return self.etcd.term()
        terms = [int(s["term"]) for n in self.coord.members if (s := fetch_json(self.coord.url(n) + "/v1/status", 2.0))]
        return max(terms, default=0)


# -- throughput cells ------------------------------------------------------------------------------


def run_cell(systems: Systems, system: str, kind: str, clients: int, seconds: float) -> dict[str, Any]:
    """One cell: ``clients`` over the generator processes, merged."""
    procs = generator_procs(clients)
    urls = systems.urls(system)  # asks the members who leads: before the cell's CPU is counted
    term_before, cpu_before = systems.term(system), systems.server_cpu_s(system)
    merged = run_generators(system, urls, clients, procs, seconds, kind)
    server_cpu = systems.server_cpu_s(system) - cpu_before
    term_changes = max(0, systems.term(system) - term_before)
    latencies = [v / 1000 for v in merged["latencies_us"]]
    elapsed = merged["elapsed_s"]
    return {"system": system, "kind": kind, "clients": clients, "ops_s": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99), "errors": merged["errors"],
            "gen_cpu": merged["cpu_s"] / elapsed, "procs": procs,
            "server_ms_per_op": server_cpu * 1000 / len(latencies) if latencies else float("nan"),
            "term_changes": term_changes}


def seed_coord(url: str) -> None:
    """Put the key reads get on this project's cluster at ``url``."""
    request = urllib.request.Request(f"{url}/v1/kv/bench/0/0", data=json.dumps({"value": VALUE}).encode(),
                                     method="PUT", headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5):
        pass


def seed(systems: Systems) -> None:
    """The key reads get, on both systems, and a warm-up of both."""
    post_json(systems.etcd.urls[0] + "/v3/kv/put", {"key": b64("bench/0/0"), "value": b64(VALUE)}, timeout=5)
    seed_coord(systems.urls("coord")[0])
    for system in SYSTEMS:
        run_cell(systems, system, "write", 16, WARMUP_S)


# -- failover ------------------------------------------------------------------------------------


async def _first_write(urls: list[str], write: Callable[[aiohttp.ClientSession, str, int], Any],
                       deadline_s: float, every_s: float = 0.02, attempt_timeout_s: float = 2.0) -> float:
    """Seconds until a write through any of ``urls`` succeeds. A new attempt
    starts on every URL each ``every_s`` without waiting for the earlier ones
    (a write held by a member until a new leader exists counts when it
    succeeds), so the result is not rounded up to a client timeout."""
    started = time.monotonic()
    first: list[float] = []
    done = asyncio.Event()

    async def attempt(session: aiohttp.ClientSession, url: str, i: int) -> None:
        try:
            async with write(session, url, i) as response:
                await response.read()
                if response.status == 200 and not done.is_set():
                    first.append(time.monotonic() - started)
                    done.set()
        except (aiohttp.ClientError, TimeoutError):
            pass

    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=attempt_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        i = 0
        while not done.is_set() and time.monotonic() - started < deadline_s:
            for url in urls:
                i += 1
                task = asyncio.create_task(attempt(session, url, i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            try:
                await asyncio.wait_for(done.wait(), every_s)
            except TimeoutError:
                pass
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not first:
        raise RuntimeError(f"no write succeeded within {deadline_s}s of the kill")
    return first[0]


def failover(systems: Systems, system: str) -> float:
    """SIGKILL the leader; seconds until a write through a survivor succeeds; restart it."""
    if system == "etcd":
        leader = systems.etcd.wait_leader(30)
        survivors = [systems.etcd.client_url(n) for n in systems.etcd.names if n != leader]
        systems.etcd.kill(leader)

        def write(session: aiohttp.ClientSession, url: str, i: int) -> Any:
            return session.post(f"{url}/v3/kv/put", json={"key": b64("failover"), "value": b64(str(i))})

        elapsed = asyncio.run(_first_write(survivors, write, 60))
        systems.etcd.start(leader)
        systems.etcd.wait_leader(30)
        systems.etcd.wait_healthy(leader)
        return elapsed
    leader = systems.coord.wait_leader(30)
    survivors = [systems.coord.url(n) for n in systems.coord.members if n != leader]
    systems.coord.kill(leader)

    def write_coord(session: aiohttp.ClientSession, url: str, i: int) -> Any:
        return session.put(f"{url}/v1/kv/failover", json={"value": i})

    elapsed = asyncio.run(_first_write(survivors, write_coord, 60))
    systems.coord.start(leader)
    new_leader = systems.coord.wait_leader(30)
    status = fetch_json(systems.coord.url(new_leader) + "/v1/status", 2.0)
    systems.coord.wait_caught_up(leader, status["commit_index"] if status else 0, 30)
    return elapsed


# -- the run ---------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, systems: Systems) -> dict[str, Any]:
    cells: dict[tuple[str, int], list[dict[str, dict[str, Any]]]] = {}
    steps = Steps("compare cells", args.rounds * len(args.kinds) * len(args.concurrency) * len(SYSTEMS))
    for r in range(args.rounds):
        for kind in args.kinds:
            for clients in args.concurrency:
                order = SYSTEMS if (r + len(cells)) % 2 == 0 else SYSTEMS[::-1]
                pair = {}
                for system in order:
                    pair[system] = run_cell(systems, system, kind, clients, args.seconds)
                    cell = pair[system]
                    steps.step(f"round {r + 1} {system} {kind} c={clients}")
                    print(f"round {r + 1} {system:5s} {kind:5s} c={clients:<4d} {cell['ops_s']:7.0f} ops/s  "
                          f"p50 {cell['p50_ms']:6.2f} ms  p99 {cell['p99_ms']:7.2f} ms  errors "
                          f"{sum(cell['errors'].values())}  generator CPU {cell['gen_cpu'] * 100:.0f}% "
                          f"({cell['procs']} proc)  server CPU {cell['server_ms_per_op']:.2f} ms/op  "
                          f"term changes {cell['term_changes']}", flush=True)
                cells.setdefault((kind, clients), []).append(pair)
    steps.close()
    steady: dict[str, dict[str, Any]] = {}
    for system in (SYSTEMS if args.steady_s else ()):
        steady[system] = run_cell(systems, system, "write", 64, args.steady_s)
        print(f"steady {system}: {steady[system]['ops_s']:.0f} writes/s for {args.steady_s:g} s, "
              f"term changes {steady[system]['term_changes']}", flush=True)
    failovers: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    for i in range(args.failovers):
        for system in (SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]):
            failovers[system].append(failover(systems, system))
            print(f"failover {i + 1} {system}: {failovers[system][-1]:.2f} s", flush=True)
    return {"cells": cells, "failovers": failovers, "steady": steady}


def report(measured: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "| workload | clients | etcd ops/s | etcd p50 ms | etcd p99 ms | ours ops/s | ours p50 ms | ours p99 ms "
        "| errors etcd / ours | ours ÷ etcd ops/s per round (median) | p99 ours ÷ etcd (median) "
        "| generator CPU etcd / ours | server CPU ms/op etcd / ours (ratio) | term changes etcd / ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kind, clients), pairs in measured["cells"].items():
        def med(system: str, field: str, pairs: list[dict[str, dict[str, Any]]] = pairs) -> float:
            return statistics.median(p[system][field] for p in pairs)

        ratios = [p["coord"]["ops_s"] / p["etcd"]["ops_s"] if p["etcd"]["ops_s"] else float("nan") for p in pairs]
        p99 = [p["coord"]["p99_ms"] / p["etcd"]["p99_ms"] if p["etcd"]["p99_ms"] else float("nan") for p in pairs]
        errors = {s: sum(sum(p[s]["errors"].values()) for p in pairs) for s in SYSTEMS}
        what = "write 64 B" if kind == "write" else "linearizable read"
        procs = generator_procs(clients)
        lines.append(
            f"| {what} | {clients} | {med('etcd', 'ops_s'):.0f} | {med('etcd', 'p50_ms'):.2f} "
            f"| {med('etcd', 'p99_ms'):.2f} | {med('coord', 'ops_s'):.0f} | {med('coord', 'p50_ms'):.2f} "
            f"| {med('coord', 'p99_ms'):.2f} | {errors['etcd']} / {errors['coord']} "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} ({statistics.median(ratios):.2f}) "
            f"| {statistics.median(p99):.2f} "
            f"| {med('etcd', 'gen_cpu') * 100:.0f}% / {med('coord', 'gen_cpu') * 100:.0f}%"
            f"{f' ({procs} procs)' if procs > 1 else ''} "
            f"| {med('etcd', 'server_ms_per_op'):.2f} / {med('coord', 'server_ms_per_op'):.2f} "
            f"({_ratio(med('coord', 'server_ms_per_op'), med('etcd', 'server_ms_per_op')):.2f}) "
            f"| {sum(p['etcd']['term_changes'] for p in pairs)} / {sum(p['coord']['term_changes'] for p in pairs)} |")
    lines.append("")
    for system in SYSTEMS:
        values = measured["failovers"][system]
        if values:
            lines.append(f"- Leader SIGKILL → first successful write, {LABEL[system]}, {len(values)} tries: "
                         f"min {min(values):.2f} s, median {statistics.median(values):.2f} s, "
                         f"max {max(values):.2f} s.")
    for system, cell in measured.get("steady", {}).items():
        lines.append(f"- Steady writes, 64 clients, {LABEL[system]}: {cell['ops_s']:.0f} ops/s for "
                     f"{args.steady_s:g} s, {cell['term_changes']} leader changes (term changes), server CPU "
                     f"{cell['server_ms_per_op']:.2f} ms per write.")
    errors: Counter[str] = Counter()
    for pairs in measured["cells"].values():
        for p in pairs:
            for system in SYSTEMS:
                errors.update({f"{system} {k}": v for k, v in p[system]["errors"].items()})
    if errors:
        lines.append("- Errors by kind: " + ", ".join(f"{k} x{v}" for k, v in errors.most_common()) + ".")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def chart(measured: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({kind for kind, _ in measured["cells"]}, reverse=True)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        for system, marker in (("etcd", "s"), ("coord", "o")):
            xs, ys, lo, hi = [], [], [], []
            for (k, clients), pairs in sorted(measured["cells"].items(), key=lambda item: item[0][1]):
                if k != kind:
                    continue
                values = [p[system]["ops_s"] for p in pairs]
                xs.append(clients)
                ys.append(statistics.median(values))
                lo.append(ys[-1] - min(values))
                hi.append(max(values) - ys[-1])
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, capsize=3, label=LABEL[system])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("ops/s (median, bars: min-max over rounds)")
        ax.set_title("64-byte writes" if kind == "write" else "linearizable reads")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser("compare", __doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per cell (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="A/B pairs per cell (default 3)")
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--kinds", default="write,read")
    parser.add_argument("--failovers", type=int, default=5)
    parser.add_argument("--steady-s", type=float, default=0.0,
                        help="a steady 64-client write load this long on each system, counting leader changes")
    parser.add_argument("--out", help="write the section into this markdown file (docs/benchmarks.md)")
    parser.add_argument("--chart", help="write the throughput chart (PNG) here")
    args = parser.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
        args.kinds = [k.strip() for k in args.kinds.split(",")]
    except ValueError:
        parser.error("--concurrency: comma-separated integers")
    if not all(1 <= c <= 1024 for c in args.concurrency) or not set(args.kinds) <= {"write", "read"}:
        parser.error("--concurrency 1..1024 each, --kinds write and/or read")
    if not (0 < args.seconds <= 120 and 1 <= args.rounds <= 20 and 0 <= args.failovers <= 20
            and 0 <= args.steady_s <= 3600):
        parser.error("--seconds up to 120, --rounds 1..20, --failovers 0..20, --steady-s up to 3600")
    with harness.interruptible("both clusters"), tempfile.TemporaryDirectory(prefix="coord-vs-etcd-") as directory:
        systems = Systems(Path(directory))
        try:
            systems.start()
            seed(systems)
            measured = measure(args, systems)
        finally:
            systems.stop()
    version = subprocess.run([systems.etcd.binary, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    title = (f"etcd ({version.replace('etcd Version: ', '')}, 3 members) and this project (3 nodes, Raft), fsync on, "
             f"{os.cpu_count()} cores, {args.seconds:g} s per cell, {args.rounds} rounds, "
             f"{time.strftime('%Y-%m-%d')}")
    header = (f"Three etcd members ({version.replace('etcd Version: ', 'etcd ')}, Debian's etcd-server, v3 JSON "
              f"gateway: POST /v3/kv/put and /v3/kv/range) and this project's three Raft nodes (PUT/GET "
              f"/v1/kv/{{key}}), both fsyncing before they acknowledge, both running during the whole "
              f"measurement, with the load generator on one machine ({machine()}). 64-byte values; clients "
              f"round-robin over the three members, the leader last (one client talks to a follower on both); "
              f"every cell {args.seconds:g} s after a {WARMUP_S:g} s "
              f"warm-up, measured A, B, A, B over {args.rounds} rounds (which system goes first alternates); "
              f"from {GENERATOR_PROCS_FROM} clients on, two generator processes. Medians over the rounds; "
              f"`python -m bench.compare` (`scripts/bench.sh`), {time.strftime('%Y-%m-%d')}.\n\n")
    table = report(measured, args)
    print()
    print(header + table)
    if args.chart:
        chart(measured, Path(args.chart), title)
        where = os.path.relpath(args.chart, Path(args.out).parent) if args.out else args.chart
        table += f"\n\n![throughput against concurrency]({where})"
    if args.out:
        write_section(Path(args.out), MARKER, header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
