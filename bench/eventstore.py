"""What the event backbone costs the replicated state machine: the time to
apply one ``es.append`` of one event, in process (no network, no disk), with
no readers, with projections, and with stream processors too; and a bus
publish with and without a matching transform rule.

    .venv/bin/python -m bench.eventstore [--commands 20000] [--rounds 3] [--out docs/benchmarks.md]

Every replica applies every command, so this cost is paid three times per
write in a three-node cluster. The configurations are measured interleaved
(A, B, C, A, B, C... over the rounds, on fresh machines) and reported as the
median microseconds per command and the ratio to the bare append of the
same round. The loops are bounded by ``--commands``.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import parser
from bench.report import publish
from coordinator.state import StateMachine
from coordinator.types import Command

T0 = 1_800_000_000_000
PROJECTIONS = [
    {"source": {"category": "order"}, "fold": "count"},
    {"source": {"category": "order"}, "fold": "sum", "field": "amount", "group_by": "currency"},
    {"source": {"category": "order"}, "fold": "set", "field": "customer"},
    {"source": {"category": "order"}, "fold": "last", "types": ["Placed"]},
]
PROCESSORS = [
    {"source": {"category": "order"}, "window": {"kind": "tumbling", "size_s": 10}, "fold": "sum",
     "field": "amount", "group_by": "currency", "emit": "stats.orders"},
    {"source": {"category": "order"}, "group_by": "customer", "emit": "alerts.orders",
     "pattern": {"kind": "count", "event": "Placed", "count": 20, "within_s": 60}},  # tracked, never matched
]
RULE = 'when header.version == "1"\nrename payload.userId to payload.user_id\nset header.version = "2"'


def _machine(setup: list[tuple[str, dict[str, Any]]]) -> tuple[StateMachine, Callable[[str, dict[str, Any], int], Any]]:
    sm = StateMachine()
    index = [0]

    def apply(op: str, args: dict[str, Any], now_ms: int) -> Any:
        index[0] += 1
        result = sm.apply(index[0], Command(op=op, args=args, now_ms=now_ms))
        if result.error is not None:
            raise RuntimeError(f"{op}: {result.error}")
        return result.value

    for op, args in setup:
        apply(op, args, T0)
    return sm, apply


def run_appends(setup: list[tuple[str, dict[str, Any]]], commands: int) -> float:
    _, apply = _machine(setup)
    started = time.perf_counter()
    for i in range(commands):
        data = {"amount": i % 100, "currency": "EUR" if i % 3 else "USD", "customer": f"c{i % 500}"}
        apply("es.append", {"stream": f"order-{i % 1000}", "events": [{"type": "Placed", "data": data}]},
              T0 + i * 10)
    return (time.perf_counter() - started) / commands * 1e6


def run_publishes(setup: list[tuple[str, dict[str, Any]]], commands: int) -> float:
    _, apply = _machine(setup)
    started = time.perf_counter()
    for i in range(commands):
        message = {"id": f"m{i}", "type": "event", "source": "bench", "headers": {"version": "1"},
                   "payload": {"userId": i}}
        apply("bus.publish", {"topic": "users.created", "messages": [message]}, T0 + i * 10)
    return (time.perf_counter() - started) / commands * 1e6


CONFIGS: dict[str, tuple[Callable[..., float], list[tuple[str, dict[str, Any]]]]] = {
    "append, no readers": (run_appends, []),
    "append, 4 projections": (run_appends, [("projection.put", {"name": f"p{i}", "definition": d})
                                            for i, d in enumerate(PROJECTIONS)]),
    "append, 4 projections + 2 processors": (run_appends, [
        *(("projection.put", {"name": f"p{i}", "definition": d}) for i, d in enumerate(PROJECTIONS)),
        *(("processor.put", {"name": f"s{i}", "definition": d}) for i, d in enumerate(PROCESSORS))]),
    "publish, no transform": (run_publishes, []),
    "publish, 1 matching transform": (run_publishes, [("transform.put", {"name": "v2", "topic": "users.>",
                                                                         "rule": RULE})]),
}
BASELINE = {"append": "append, no readers", "publish": "publish, no transform"}


def main(argv: list[str] | None = None) -> int:
    cli = parser("eventstore", __doc__)
    cli.add_argument("--commands", type=int, default=20_000)
    cli.add_argument("--rounds", type=int, default=3)
    cli.add_argument("--out", type=Path, help="append (or replace) the event backbone section of this markdown file")
    args = cli.parse_args(argv)
    measured: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (run, setup) in CONFIGS.items():
            measured[name].append(run(setup, args.commands))
            print(f"{name:40s} {measured[name][-1]:8.1f} µs/command", flush=True)
    rows = ["| configuration | µs per command (median) | ratio to the bare command, per round |", "|---|---|---|"]
    for name, values in measured.items():
        base = measured[BASELINE[name.split(",")[0]]]
        ratios = ", ".join(f"{v / b:.2f}" for v, b in zip(values, base, strict=True))
        rows.append(f"| {name} | {statistics.median(values):.1f} | {ratios} |")
    body = (f"In-process cost of applying one command to the state machine (every replica applies every "
            f"command), {args.commands} commands per run, {args.rounds} interleaved rounds, CPython "
            f"{platform.python_version()}, `.venv/bin/python -m bench.eventstore`, "
            f"{time.strftime('%Y-%m-%d')}.\n\n" + "\n".join(rows) + "\n")
    publish(body, args.out, "\n## Event backbone: apply cost\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
