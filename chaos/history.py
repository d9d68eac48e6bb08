"""Chaos histories: the JSON-lines format of DESIGN.md, read, written and paired.

A history file holds one JSON object per line. Three kinds of line:

- an **operation event** (``type`` is ``invoke``, ``ok``, ``fail`` or ``info``)::

      {"process": int, "type": "invoke"|"ok"|"fail"|"info", "f": "read"|"write"|"cas",
       "key": str, "value": <json>, "time": <ns>, "matched": bool}

  ``matched`` appears only on the ``ok`` of a ``cas`` (false: the HTTP 409).
  A read's invoke has ``value: null`` (or no ``value``); its ``ok`` carries the
  value read (``null`` for a missing key). A write's and a cas's completion may
  repeat the invoke's value or carry ``null``; the invoke's value is the one
  that counts, and a different non-null value is a problem. Other fields (for
  example ``"error"``) are allowed and ignored.
- a **nemesis event**, which the checker never sees::

      {"type": "nemesis", "name": str, "phase": "start"|"end", "time": <ns>, ...}

  Any other fields (``"wall"``, ``"nodes"``, ``"error"``) are kept in
  ``NemesisEvent.extra``.
- a **note**: any other line without ``process`` (run metadata, a corpus
  comment). Notes are kept apart, unparsed, and never checked.

A line with an operation ``type`` but no ``process`` is an error rather than a
note: dropping an operation silently could hide an anomaly.

Reading (``read_jsonl``) checks the shape of each line (JSON, field types) and
raises ``HistoryError`` naming the first bad line. Pairing (``pair``) checks the
meaning of the operation events (known ``type`` and ``f``, one outstanding
invoke per process, completions that match an invoke) and returns every
problem it finds, so a user sees all of them at once. Both are pure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

EventType = Literal["invoke", "ok", "fail", "info"]
Function = Literal["read", "write", "cas"]
Status = Literal["ok", "fail", "info"]

EVENT_TYPES = ("invoke", "ok", "fail", "info")
COMPLETIONS = ("ok", "fail", "info")
FUNCTIONS = ("read", "write", "cas")
NEMESIS_PHASES = ("start", "end")


class HistoryError(ValueError):
    """A history that cannot be read: not JSON lines, or a line of the wrong shape."""


@dataclass(frozen=True, slots=True)
class Event:
    """One operation event, as written in the history.

    ``line`` is the 1-based line of the file it came from (``None`` when the
    event was built in code); it only serves error messages.
    """

    process: int
    type: str  # EventType; kept as str so that pair() can report an unknown type
    f: str  # Function
    key: str
    value: Any
    time: int  # ns
    matched: bool | None = None  # only on a cas ok
    line: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"process": self.process, "type": self.type, "f": self.f, "key": self.key,
                               "value": self.value, "time": self.time}
        if self.matched is not None:
            out["matched"] = self.matched
        return out


@dataclass(frozen=True, slots=True)
class NemesisEvent:
    """The start or end of a fault. ``extra`` holds the line's other fields."""

    name: str
    phase: str  # start | end
    time: int  # ns
    extra: dict[str, Any] = field(default_factory=dict)
    line: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": "nemesis", "name": self.name, "phase": self.phase, "time": self.time, **self.extra}


@dataclass(frozen=True, slots=True)
class History:
    """What ``read_jsonl`` found, each kind in file order."""

    events: list[Event]
    nemesis: list[NemesisEvent]
    notes: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Operation:
    """An invoke paired with its completion.

    ``status`` is ``ok`` (it took effect, with what it returned), ``fail`` (it
    certainly took no effect) or ``info`` (unknown: an ``info`` completion or
    none at all; ``complete_time`` is then the info's time, or ``None``).

    ``value`` is, for a read, the value read (``None`` unless ``ok``); for a
    write, the value written; for a cas, ``[old, new]``. ``matched`` is set only
    on an ``ok`` cas. ``index`` numbers operations in invoke order.
    """

    index: int
    process: int
    f: str
    key: str
    value: Any
    status: Status
    invoke_time: int
    complete_time: int | None
    matched: bool | None = None
    invoke_line: int | None = field(default=None, compare=False)
    complete_line: int | None = field(default=None, compare=False)

    @property
    def unknown(self) -> bool:
        return self.status == "info"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"process": self.process, "f": self.f, "key": self.key, "value": self.value,
                               "status": self.status, "invoke_time": self.invoke_time,
                               "complete_time": self.complete_time}
        if self.matched is not None:
            out["matched"] = self.matched
        if self.invoke_line is not None:
            out["line"] = self.invoke_line
        return out


# -- reading and writing ----------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_line(text: str, line: int) -> Event | NemesisEvent | dict[str, Any]:
    """Parse one line of a history. Raises ``HistoryError`` naming ``line``."""
    try:
        record = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise HistoryError(f"line {line}: not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise HistoryError(f"line {line}: expected a JSON object, got {type(record).__name__}")
    kind = record.get("type")
    if kind == "nemesis":
        return _parse_nemesis(record, line)
    if "process" not in record:
        if kind in EVENT_TYPES:
            raise HistoryError(f"line {line}: {kind} event without a process")
        return record
    return _parse_event(record, line)


def _parse_nemesis(record: dict[str, Any], line: int) -> NemesisEvent:
    name, phase, at = record.get("name"), record.get("phase"), record.get("time")
    if not isinstance(name, str):
        raise HistoryError(f"line {line}: nemesis event needs a string name")
    if phase not in NEMESIS_PHASES:
        raise HistoryError(f"line {line}: nemesis phase must be start or end, got {phase!r}")
    if not _is_int(at):
        raise HistoryError(f"line {line}: nemesis time must be an integer (ns), got {at!r}")
    extra = {k: v for k, v in record.items() if k not in ("type", "name", "phase", "time")}
    return NemesisEvent(name=name, phase=phase, time=at, extra=extra, line=line)


def _parse_event(record: dict[str, Any], line: int) -> Event:
    for name in ("type", "f", "key", "time"):
        if name not in record:
            raise HistoryError(f"line {line}: operation event without {name!r}")
    process, kind, f, key, at = (record[k] for k in ("process", "type", "f", "key", "time"))
    if not _is_int(process):
        raise HistoryError(f"line {line}: process must be an integer, got {process!r}")
    if not isinstance(kind, str) or not isinstance(f, str):
        raise HistoryError(f"line {line}: type and f must be strings")
    if not isinstance(key, str):
        raise HistoryError(f"line {line}: key must be a string, got {key!r}")
    if not _is_int(at):
        raise HistoryError(f"line {line}: time must be an integer (ns), got {at!r}")
    matched = record.get("matched")
    if matched is not None and not isinstance(matched, bool):
        raise HistoryError(f"line {line}: matched must be true or false, got {matched!r}")
    return Event(process=process, type=kind, f=f, key=key, value=record.get("value"), time=at,
                 matched=matched, line=line)


def read_jsonl(path: str | Path) -> History:
    """Read a history file. Blank lines are skipped.

    Raises ``OSError`` if the file cannot be read (``UnicodeDecodeError`` is
    turned into ``HistoryError``) and ``HistoryError`` on the first line of
    the wrong shape.
    """
    events: list[Event] = []
    nemesis: list[NemesisEvent] = []
    notes: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                parsed = parse_line(text, number)
                if isinstance(parsed, Event):
                    events.append(parsed)
                elif isinstance(parsed, NemesisEvent):
                    nemesis.append(parsed)
                else:
                    notes.append(parsed)
    except UnicodeDecodeError as exc:
        raise HistoryError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return History(events=events, nemesis=nemesis, notes=notes)


def dump_line(record: Event | NemesisEvent | dict[str, Any]) -> str:
    """One history line (with its newline) for an event, a nemesis event or a note."""
    body = record if isinstance(record, dict) else record.to_json()
    return json.dumps(body, separators=(",", ":"), allow_nan=False) + "\n"


def write_jsonl(path: str | Path, events: Iterable[Event | NemesisEvent | dict[str, Any]]) -> None:
    """Write events (in the given order) as a history file that ``read_jsonl`` reads back."""
    with open(path, "w", encoding="utf-8") as f:
        for record in events:
            f.write(dump_line(record))


# -- pairing ----------------------------------------------------------------------------------------


def _where(event: Event, position: int) -> str:
    return f"line {event.line}" if event.line is not None else f"event {position}"


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, 1 is 1.0, objects ignore key order."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def pair(events: Sequence[Event]) -> tuple[list[Operation], list[str]]:
    """Pair each invoke with the next event of the same process.

    Returns the operations in invoke order and the problems found, each
    naming its line. Any problem makes the history malformed (the CLI exits
    2); the operations returned are then incomplete and must not be checked.
    Problems: an unknown ``type`` or ``f``; a second invoke while the process
    still has one outstanding; a completion with no outstanding invoke; a
    completion whose ``f`` or ``key`` differs from its invoke's, or whose time
    is before it; a cas whose value is not ``[old, new]``; a cas ``ok`` without
    ``matched``; a write or cas completion that carries a different value.

    An invoke that is never completed is not a problem: its outcome is unknown.
    """
    paired: list[tuple[int, Event, Event | None]] = []  # (invoke position, invoke, completion)
    problems: list[str] = []
    outstanding: dict[int, tuple[int, Event]] = {}  # process -> (position, invoke)
    for position, event in enumerate(events, start=1):
        where = _where(event, position)
        if event.type not in EVENT_TYPES:
            problems.append(f"{where}: unknown type {event.type!r} (expected one of {', '.join(EVENT_TYPES)})")
            continue
        if event.f not in FUNCTIONS:
            problems.append(f"{where}: unknown f {event.f!r} (expected one of {', '.join(FUNCTIONS)})")
            continue
        if event.type == "invoke":
            if event.process in outstanding:
                earlier_position, earlier = outstanding[event.process]
                problems.append(f"{where}: process {event.process} invokes {event.f} while its {earlier.f} "
                                f"({_where(earlier, earlier_position)}) is still outstanding")
                continue
            if event.f == "cas" and not (isinstance(event.value, list) and len(event.value) == 2):
                problems.append(f"{where}: cas value must be [old, new], got {json.dumps(event.value)}")
                continue
            outstanding[event.process] = (position, event)
            continue
        started = outstanding.pop(event.process, None)
        if started is None:
            problems.append(f"{where}: {event.type} of process {event.process} without an outstanding invoke")
            continue
        invoke_position, invoke = started
        problem = _completion_problem(invoke, event, _where(invoke, invoke_position))
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        paired.append((invoke_position, invoke, event))
    paired.extend((position, invoke, None) for position, invoke in outstanding.values())
    paired.sort(key=lambda item: item[0])
    return [_operation(index, invoke, done) for index, (_, invoke, done) in enumerate(paired)], problems


def _completion_problem(invoke: Event, done: Event, invoke_where: str) -> str | None:
    if done.f != invoke.f or done.key != invoke.key:
        return (f"{done.type} {done.f} {done.key!r} of process {done.process} does not match its invoke "
                f"({invoke.f} {invoke.key!r}, {invoke_where})")
    if done.time < invoke.time:
        return f"{done.type} at time {done.time} is before its invoke at {invoke.time} ({invoke_where})"
    if done.type == "ok" and done.f == "cas" and done.matched is None:
        return "cas ok without matched (true: applied, false: the current value was not old)"
    if done.f in ("write", "cas") and done.value is not None and not _json_equal(done.value, invoke.value):
        return (f"{done.f} completion value {json.dumps(done.value)} differs from its invoke's "
                f"{json.dumps(invoke.value)} ({invoke_where})")
    return None


def _operation(index: int, invoke: Event, done: Event | None) -> Operation:
    status: Status = "info" if done is None else done.type  # type: ignore[assignment]
    ok = done is not None and done.type == "ok"
    value = invoke.value if invoke.f != "read" else done.value if ok else None  # type: ignore[union-attr]
    matched = done.matched if ok and invoke.f == "cas" else None  # type: ignore[union-attr]
    return Operation(index=index, process=invoke.process, f=invoke.f, key=invoke.key, value=value, status=status,
                     invoke_time=invoke.time, complete_time=None if done is None else done.time, matched=matched,
                     invoke_line=invoke.line, complete_line=None if done is None else done.line)


def counts(operations: Iterable[Operation]) -> dict[str, int]:
    """Operations by status: ``{"ok": n, "fail": n, "info": n}`` (info includes no completion)."""
    out = {"ok": 0, "fail": 0, "info": 0}
    for op in operations:
        out[op.status] += 1
    return out
