"""``python -m chaos.check --model cas-register HISTORY.jsonl [--timeout 60]``

Checks a chaos history (the JSON-lines format of DESIGN.md, see
``chaos.history``) for linearizability and prints a short human summary
followed, as its LAST line, by one JSON object::

    {"valid": true|false|null,
     "verdict": "linearizable"|"not linearizable"|"unknown"|"error",
     "operations": {"ok": n, "fail": n, "info": n} | null,
     "keys": n | null,
     "anomaly": {...} | null,
     "reason": str | null,       # unknown: "timeout" or "memory limit"; error: what went wrong
     "elapsed_s": float,
     "per_key": [{"key", "verdict", "operations", ...}]}

Exit status: 0 linearizable, 1 not linearizable, 2 error (unreadable file,
malformed history, unknown model, bad arguments) or unknown (the search ran
out of time or memory); ``verdict`` and ``reason`` tell which. ``operations`` and
``keys`` are null only when the file could not be read at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from chaos.checker import Result, check
from chaos.history import HistoryError, Operation, counts, pair, read_jsonl
from chaos.models import MODELS, model_named

EXIT_LINEARIZABLE = 0
EXIT_NOT_LINEARIZABLE = 1
EXIT_ERROR = 2
PROBLEMS_SHOWN = 20


class _Parser(argparse.ArgumentParser):
    """Bad arguments also end with the JSON line, so callers parse one format."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        _emit(_error_verdict(f"bad arguments: {message}"))
        raise SystemExit(EXIT_ERROR)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m chaos.check", description=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cas-register", help=f"one of: {', '.join(sorted(MODELS))}")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="give up with verdict unknown after this long (default 60)")
    parser.add_argument("history", metavar="HISTORY.jsonl")
    return parser


def _emit(verdict: dict[str, Any]) -> None:
    print(json.dumps(verdict, separators=(",", ":")), flush=True)


def _error_verdict(reason: str, operations: Sequence[Operation] | None = None, keys: int | None = None
                   ) -> dict[str, Any]:
    return {"valid": None, "verdict": "error", "operations": None if operations is None else counts(operations),
            "keys": keys, "anomaly": None, "reason": reason}


def _fmt_time(ns: int, origin: int) -> str:
    delta = ns - origin
    return f"+{delta / 1e9:.3f}s" if abs(delta) >= 1_000_000 else f"+{delta}ns"


def _describe_anomaly(result: Result, origin: int) -> list[str]:
    anomaly = result.anomaly
    if anomaly is None:
        return []
    lines = [f"  {anomaly.explanation()}", "  operations around it (invoke .. completion):"]
    for op in anomaly.window:
        mark = "  <-- cannot be linearized" if op.index == anomaly.op.index else ""
        end = "never" if op.complete_time is None else _fmt_time(op.complete_time, origin)
        lines.append(f"    {_fmt_time(op.invoke_time, origin):>12} .. {end:>12}  {anomaly.texts[op.index]}{mark}")
    if anomaly.linearized:
        lines.append("  the end of one order that fits everything before it:")
        for op in anomaly.linearized:
            lines.append(f"    {anomaly.texts[op.index]}")
    return lines


def run(argv: Sequence[str] | None = None) -> int:
    """The CLI: print the summary and the JSON line, return the exit status."""
    args = _parser().parse_args(argv)
    try:
        model = model_named(args.model)
    except KeyError:
        print(f"unknown model {args.model!r}; known: {', '.join(sorted(MODELS))}")
        _emit(_error_verdict(f"unknown model {args.model!r}"))
        return EXIT_ERROR
    if not args.timeout > 0:
        _emit(_error_verdict(f"--timeout must be positive, got {args.timeout}"))
        return EXIT_ERROR
    try:
        history = read_jsonl(args.history)
    except (OSError, HistoryError) as exc:
        message = str(exc) if isinstance(exc, HistoryError) else f"cannot read {args.history}: {exc.strerror or exc}"
        print(f"error: {message}")
        _emit(_error_verdict(message))
        return EXIT_ERROR
    operations, problems = pair(history.events)
    keys = len({event.key for event in history.events})
    if problems:
        print(f"malformed history {args.history}: {len(problems)} problem(s)")
        for problem in problems[:PROBLEMS_SHOWN]:
            print(f"  {problem}")
        if len(problems) > PROBLEMS_SHOWN:
            print(f"  ... and {len(problems) - PROBLEMS_SHOWN} more")
        _emit(_error_verdict(f"malformed history: {problems[0]}" + (
            f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""), operations, keys))
        return EXIT_ERROR

    result = check(model, operations, args.timeout)
    origin = min((event.time for event in history.events), default=0)
    tally = counts(operations)
    starts = sum(1 for event in history.nemesis if event.phase == "start")
    print(f"history {args.history}: {len(operations)} operations (ok {tally['ok']}, fail {tally['fail']}, "
          f"unknown {tally['info']}) on {keys} key(s), {starts} nemesis fault(s)")
    for key in result.keys:
        if key.reason == "skipped":
            print(f"key {key.key}: not checked, the verdict is already decided")
            continue
        label = {"ok": "linearizable", "illegal": "NOT LINEARIZABLE", "unknown": "unknown"}[key.verdict]
        why = f" ({key.reason})" if key.reason else ""
        print(f"key {key.key}: {label}{why}: {key.operations} operations checked "
              f"({key.unknown_operations} unknown), {key.visited} search states, {key.elapsed_s:.3f}s")
        if key.anomaly is not None:
            for line in _describe_anomaly(result, origin):
                print(line)
    verdict = {"ok": "linearizable", "illegal": "not linearizable", "unknown": "unknown"}[result.verdict]
    print(f"verdict: {verdict} (checked in {result.elapsed_s:.3f}s)")
    anomaly = result.anomaly
    _emit({"valid": {"ok": True, "illegal": False, "unknown": None}[result.verdict], "verdict": verdict,
           "operations": tally, "keys": keys, "anomaly": None if anomaly is None else anomaly.to_json(),
           "reason": result.reason if result.verdict == "unknown" else None, "elapsed_s": round(result.elapsed_s, 6),
           "per_key": [key.to_json() for key in result.keys]})
    return {"ok": EXIT_LINEARIZABLE, "illegal": EXIT_NOT_LINEARIZABLE, "unknown": EXIT_ERROR}[result.verdict]


def main() -> None:
    raise SystemExit(run())


if __name__ == "__main__":
    main()
