"""Benchmark the two consensus engines side by side: Raft (three nodes, the
default) and PBFT (four nodes, f = 1, ``--engine pbft``), 64-byte kv writes
at 1 and 16 clients and linearizable reads at 16 clients.

    .venv/bin/python -m bench.engines [--seconds 5] [--rounds 3] [--out docs/benchmarks.md]

The machine is shared and noisy, so the engines are measured in the same run,
interleaved: each round starts a fresh cluster of each engine in turn (which
goes first alternates per round), warms it up for 1 s and runs every cell for
``--seconds`` against the leader's URL (PBFT's primary reports itself as
leader), then stops it. The report gives each cell's median over the rounds
and the PBFT / Raft throughput ratio per round, which is what to compare.

Both run with durability fsync: Raft fsyncs its log before it acknowledges,
PBFT persists each replica's view, prepared certificates and checkpoints
(group-committed) before it sends the messages that reflect them.

The load loops are ``bench.cluster.kv_load`` (bounded by a count and a time);
every request here is bounded by a timeout too. The nodes are started by
``bench.harness.local_cluster`` on a free port range and stopped by PID, also on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from typing import Any

import aiohttp

from bench.cluster import kv_load
from bench.harness import interruptible, local_cluster, parser
from bench.report import machine, publish

ENGINES = {"raft": 3, "pbft": 4}  # engine -> nodes
CELLS = (("write", 1), ("write", 16), ("read", 16))  # (kind, clients), in the order they run
WARMUP_S = 1.0
WARMUP_CLIENTS = 4
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)
LEADER_WAIT_S = 30.0
BODY_SAMPLE = 160  # characters of an error body kept as an example
MARKER = "\n## Engines: Raft and PBFT side by side\n"


class _TallySession:
    """Hands ``kv_load`` the session's ``put``/``get``, tallying non-200 answers
    by status with a sample body. The body comes from ``response.read()``,
    which ``kv_load`` has already called, so it is cached, not read twice."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self.statuses: Counter[int] = Counter()
        self.samples: dict[int, str] = {}

    def put(self, url: str, **kwargs: Any) -> _Tallied:
        return _Tallied(self._session.put(url, **kwargs), self)

    def get(self, url: str, **kwargs: Any) -> _Tallied:
        return _Tallied(self._session.get(url, **kwargs), self)

    def take(self) -> tuple[Counter[int], dict[int, str]]:
        statuses, samples = self.statuses, self.samples
        self.statuses, self.samples = Counter(), {}
        return statuses, samples


class _Tallied:
    def __init__(self, request: Any, tally: _TallySession) -> None:
        self._request = request
        self._tally = tally
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        self._response = await self._request.__aenter__()
        return self._response

    async def __aexit__(self, *exc: object) -> None:
        response = self._response
        if response is not None and response.status != 200:
            self._tally.statuses[response.status] += 1
            if response.status not in self._tally.samples:
                try:
                    body = (await response.read()).decode(errors="replace")
                except (aiohttp.ClientError, TimeoutError) as error:
                    body = f"<body unreadable: {type(error).__name__}>"
                self._tally.samples[response.status] = " ".join(body.split())[:BODY_SAMPLE]
        await self._request.__aexit__(*exc)


async def _measure(url: str, seconds: float) -> dict[str, dict]:
    """Warm up, then every cell of ``CELLS`` against ``url``."""
    cells: dict[str, dict] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=REQUEST_TIMEOUT) as session:
        tally = _TallySession(session)
        # Warm-up writes: connection pools, the engine's first entries, and key bench/0/0 the reads ask for.
        warm = await kv_load(tally, url, WARMUP_CLIENTS, WARMUP_S, "write")  # type: ignore[arg-type]
        warm_statuses, warm_samples = tally.take()
        if warm["ops"] == 0:
            raise RuntimeError(f"warm-up: no write succeeded ({dict(warm_statuses)}, e.g. {warm_samples})")
        for kind, clients in CELLS:
            cell = await kv_load(tally, url, clients, seconds, kind)  # type: ignore[arg-type]
            cell["statuses"], cell["samples"] = tally.take()
            cells[f"{kind}/{clients}"] = cell
    return cells


def _run_engine(engine: str, seconds: float) -> dict[str, dict]:
    with local_cluster(f"coord-bench-{engine}-", 0, nodes=ENGINES[engine], engine=engine) as cluster:
        leader = cluster.wait_leader(LEADER_WAIT_S)
        return asyncio.run(_measure(cluster.url(leader), seconds))


def _progress(r: int, engine: str, cells: dict[str, dict]) -> None:
    for key, c in cells.items():
        errors = ""
        if c["statuses"]:
            errors = " | " + "; ".join(f"HTTP {status} x{count}: {c['samples'].get(status, '')}"
                                       for status, count in c["statuses"].most_common())
        print(f"round {r} {engine} {key}: {c['ops_s']:.0f} ops/s, p50 {c['p50_ms']:.2f} ms, "
              f"p99 {c['p99_ms']:.2f} ms, errors {c['errors']}, generator CPU {c['gen_cpu'] * 100:.0f}%{errors}",
              file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> list[dict[str, dict[str, dict]]]:
    rounds: list[dict[str, dict[str, dict]]] = []
    for r in range(args.rounds):
        order = ("raft", "pbft") if r % 2 == 0 else ("pbft", "raft")  # neither always goes first
        results: dict[str, dict[str, dict]] = {}
        for engine in order:
            results[engine] = _run_engine(engine, args.seconds)
            _progress(r + 1, engine, results[engine])
        rounds.append(results)
    return rounds


def _report(rounds: list[dict[str, dict[str, dict]]]) -> str:
    def med(engine: str, key: str, field: str) -> float:
        return statistics.median(rnd[engine][key][field] for rnd in rounds)

    lines = [
        "| workload | clients | Raft ops/s | Raft p50 ms | Raft p99 ms | PBFT ops/s | PBFT p50 ms | PBFT p99 ms "
        "| errors Raft / PBFT | PBFT / Raft ops/s per round (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, clients in CELLS:
        key = f"{kind}/{clients}"
        what = "write 64 B" if kind == "write" else "linearizable read"
        ratios = [rnd["pbft"][key]["ops_s"] / rnd["raft"][key]["ops_s"] if rnd["raft"][key]["ops_s"]
                  else float("nan") for rnd in rounds]
        errors = {e: sum(rnd[e][key]["errors"] for rnd in rounds) for e in ENGINES}
        lines.append(
            f"| {what} | {clients} | {med('raft', key, 'ops_s'):.0f} | {med('raft', key, 'p50_ms'):.2f} "
            f"| {med('raft', key, 'p99_ms'):.2f} | {med('pbft', key, 'ops_s'):.0f} "
            f"| {med('pbft', key, 'p50_ms'):.2f} | {med('pbft', key, 'p99_ms'):.2f} "
            f"| {errors['raft']} / {errors['pbft']} "
            f"| {', '.join(f'{x:.2f}' for x in ratios)} ({statistics.median(ratios):.2f}) |")
    lines += ["", "Medians over the rounds; errors summed over them. Generator CPU (this process, share of one "
                  "core, median): " + "; ".join(
                      f"{kind} {clients}: Raft {med('raft', f'{kind}/{clients}', 'gen_cpu') * 100:.0f}%, "
                      f"PBFT {med('pbft', f'{kind}/{clients}', 'gen_cpu') * 100:.0f}%" for kind, clients in CELLS)
              + "."]
    for engine in ENGINES:
        statuses: Counter[int] = Counter()
        samples: dict[int, str] = {}
        for rnd in rounds:
            for cell in rnd[engine].values():
                statuses.update(cell["statuses"])
                for status, body in cell["samples"].items():
                    samples.setdefault(status, body)
        if statuses:
            listed = "; ".join(f"HTTP {status} x{count} (e.g. `{samples.get(status, '')}`)"
                               for status, count in statuses.most_common())
            lines.append(f"\n{engine.upper()} errors by status: {listed}.")
    lines += ["", READING]
    return "\n".join(lines)


READING = """What the ratios say:

- PBFT does three signed phases (pre-prepare, prepare, commit) among four
  processes where Raft does one round trip among three; every PBFT message
  is Ed25519-signed and checked with PyNaCl (about ten verifications per
  sequence number on each replica, plus the client's request and the f+1
  replies the submitting node checks). On two shared cores that CPU is the
  limit: PBFT's load generator sits mostly idle.
- The primary batches: at most two sequence numbers in flight, up to 16
  requests per pre-prepare, which is why 16 clients get about 3x one client.
- Linearizable reads go through the protocol in both engines (a barrier
  entry shared by concurrent reads); PBFT also confirms each result with
  f+1 matching replies before it answers.
- Both persist before acknowledging (Raft its log, PBFT each replica's view,
  prepared certificates and checkpoints). MACs instead of signatures (the
  paper's main optimisation) and a read-only fast path are not done."""


def main(argv: list[str] | None = None) -> int:
    cli = parser("engines", __doc__)
    cli.add_argument("--seconds", type=float, default=5.0, help="per cell, after a 1 s warm-up")
    cli.add_argument("--rounds", type=int, default=3, help="each round runs both engines, order alternating")
    cli.add_argument("--out", help="append (or replace) the engines section of this markdown file")
    args = cli.parse_args(argv)
    if args.seconds <= 0 or args.rounds < 1:
        cli.error("--seconds and --rounds must be positive")
    if args.seconds > 600 or args.rounds > 20:
        cli.error("--seconds at most 600, --rounds at most 20")
    with interruptible("the nodes"):  # through _run_engine's local_cluster
        table = _report(run(args))
    header = (f"Raft (three nodes) and PBFT (four nodes, f = 1, every message Ed25519-signed, results confirmed by "
              f"f+1 replicas), both with durability fsync, with the load generator on one machine ({machine()}), "
              f"64-byte values, every request to the leader (PBFT: the primary), "
              f"{args.seconds:g} s per cell after a {WARMUP_S:g} s warm-up, a fresh cluster per engine and round, "
              f"engines interleaved (order alternating per round), {args.rounds} round{'s' * (args.rounds != 1)}, "
              f"`python -m bench.engines`, {time.strftime('%Y-%m-%d')}.\n\n")
    publish(header + table, args.out, MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
