"""Reading, writing and pairing chaos histories (chaos/history.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chaos.history import Event, HistoryError, NemesisEvent, Operation, counts, pair, read_jsonl, write_jsonl


def ev(process: int, kind: str, f: str, value: object = None, at: int = 0, *, key: str = "x",
       matched: bool | None = None) -> Event:
    return Event(process=process, type=kind, f=f, key=key, value=value, time=at, matched=matched)


def lines(tmp_path: Path, *records: object, raw: str = "") -> Path:
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + raw, encoding="utf-8")
    return path


# -- reading and writing ------------------------------------------------------------------------------


def test_read_keeps_operations_nemesis_events_and_notes_apart(tmp_path: Path) -> None:
    path = lines(
        tmp_path,
        {"run": "r1", "seed": 7},
        {"type": "nemesis", "name": "partition", "phase": "start", "time": 5, "wall": 1.5, "nodes": ["n1"]},
        {"process": 0, "type": "invoke", "f": "cas", "key": "k", "value": [0, 1], "time": 10, "error": None},
        {"process": 0, "type": "ok", "f": "cas", "key": "k", "value": [0, 1], "time": 20, "matched": False},
        {"type": "nemesis", "name": "partition", "phase": "end", "time": 30},
        {"type": "progress", "ok": 1},
        raw="\n   \n",
    )
    history = read_jsonl(path)
    assert history.events == [
        Event(0, "invoke", "cas", "k", [0, 1], 10),
        Event(0, "ok", "cas", "k", [0, 1], 20, matched=False),
    ]
    assert [e.line for e in history.events] == [3, 4]
    assert history.nemesis == [
        NemesisEvent("partition", "start", 5, {"wall": 1.5, "nodes": ["n1"]}),
        NemesisEvent("partition", "end", 30, {}),
    ]
    assert history.notes == [{"run": "r1", "seed": 7}, {"type": "progress", "ok": 1}]


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    records = [
        NemesisEvent("kill", "start", 1, {"nodes": ["n2"]}),
        ev(3, "invoke", "read", None, 2),
        ev(3, "ok", "read", {"a": [1, "é"]}, 9),
        ev(4, "invoke", "cas", [None, True], 3),
        ev(4, "ok", "cas", [None, True], 8, matched=True),
        NemesisEvent("kill", "end", 10),
    ]
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [*records, {"note": "kept"}])
    history = read_jsonl(path)
    assert history.events == [r for r in records if isinstance(r, Event)]
    assert history.nemesis == [r for r in records if isinstance(r, NemesisEvent)]
    assert history.notes == [{"note": "kept"}]
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[1])
    assert first == {"process": 3, "type": "invoke", "f": "read", "key": "x", "value": None, "time": 2}


@pytest.mark.parametrize(("line", "message"), [
    ('{"process": 0, "type": "invoke"', "line 2: not JSON"),
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"process": 0, "type": "invoke", "f": "read", "key": "x", "value": NaN, "time": 1}', "line 2: not JSON"),
    ('{"process": true, "type": "invoke", "f": "read", "key": "x", "time": 1}', "line 2: process must be an integer"),
    ('{"process": 0, "type": "invoke", "f": "read", "key": 5, "time": 1}', "line 2: key must be a string"),
    ('{"process": 0, "type": "invoke", "f": "read", "key": "x", "time": 1.5}', "line 2: time must be an integer"),
    ('{"process": 0, "type": "invoke", "f": "read", "key": "x"}', "line 2: operation event without 'time'"),
    ('{"process": 0, "type": "ok", "f": "cas", "key": "x", "time": 1, "matched": 1}', "line 2: matched must be"),
    ('{"type": "ok", "f": "read", "key": "x", "time": 1}', "line 2: ok event without a process"),
    ('{"type": "nemesis", "name": "kill", "phase": "begin", "time": 1}', "line 2: nemesis phase must be start or end"),
    ('{"type": "nemesis", "phase": "start", "time": 1}', "line 2: nemesis event needs a string name"),
    ('{"type": "nemesis", "name": "kill", "phase": "end"}', "line 2: nemesis time must be an integer"),
])
def test_read_names_the_line_of_a_malformed_event(tmp_path: Path, line: str, message: str) -> None:
    path = lines(tmp_path, {"process": 0, "type": "invoke", "f": "read", "key": "x", "value": None, "time": 0},
                 raw=line + "\n")
    with pytest.raises(HistoryError) as raised:
        read_jsonl(path)
    assert message in str(raised.value)


def test_read_rejects_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b'{"note": "\xff\xfe"}\n')
    with pytest.raises(HistoryError, match="not UTF-8"):
        read_jsonl(path)


# -- pairing --------------------------------------------------------------------------------------------


def test_pair_builds_operations_in_invoke_order() -> None:
    events = [
        ev(0, "invoke", "write", 1, 0),
        ev(1, "invoke", "read", None, 1),
        ev(1, "ok", "read", 1, 5),
        ev(0, "info", "write", 1, 6),
        ev(0, "invoke", "cas", [1, 2], 7),  # a process may go on after an info
        ev(2, "invoke", "read", None, 8),
        ev(2, "fail", "read", None, 9),
        ev(0, "ok", "cas", [1, 2], 10, matched=True),
        ev(3, "invoke", "write", 4, 11),  # never completed: unknown
    ]
    operations, problems = pair(events)
    assert problems == []
    assert operations == [
        Operation(0, 0, "write", "x", 1, "info", 0, 6),
        Operation(1, 1, "read", "x", 1, "ok", 1, 5),
        Operation(2, 0, "cas", "x", [1, 2], "ok", 7, 10, matched=True),
        Operation(3, 2, "read", "x", None, "fail", 8, 9),
        Operation(4, 3, "write", "x", 4, "info", 11, None),
    ]
    assert counts(operations) == {"ok": 2, "fail": 1, "info": 2}
    assert [op.unknown for op in operations] == [True, False, False, False, True]


def test_a_completion_may_carry_null_instead_of_the_written_value() -> None:
    operations, problems = pair([ev(0, "invoke", "write", 3, 0), ev(0, "info", "write", None, 1)])
    assert problems == []
    assert operations[0].value == 3


def test_pair_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    path = lines(
        tmp_path,
        {"process": 0, "type": "ok", "f": "read", "key": "x", "value": 1, "time": 0},
        {"process": 1, "type": "invoke", "f": "write", "key": "x", "value": 1, "time": 1},
        {"process": 1, "type": "invoke", "f": "write", "key": "x", "value": 2, "time": 2},
        {"process": 1, "type": "ok", "f": "read", "key": "x", "value": 1, "time": 3},
        {"process": 2, "type": "invoke", "f": "cas", "key": "x", "value": [1], "time": 4},
        {"process": 3, "type": "invoke", "f": "cas", "key": "x", "value": [1, 2], "time": 5},
        {"process": 3, "type": "ok", "f": "cas", "key": "x", "value": [1, 2], "time": 6},
        {"process": 4, "type": "invoke", "f": "write", "key": "x", "value": 1, "time": 7},
        {"process": 4, "type": "ok", "f": "write", "key": "x", "value": 9, "time": 8},
        {"process": 5, "type": "invoke", "f": "write", "key": "x", "value": 1, "time": 9},
        {"process": 5, "type": "ok", "f": "write", "key": "x", "value": 1, "time": 2},
        {"process": 6, "type": "crash", "f": "write", "key": "x", "time": 10},
        {"process": 6, "type": "invoke", "f": "append", "key": "x", "time": 11},
    )
    operations, problems = pair(read_jsonl(path).events)
    assert problems == [
        "line 1: ok of process 0 without an outstanding invoke",
        "line 3: process 1 invokes write while its write (line 2) is still outstanding",
        "line 4: ok read 'x' of process 1 does not match its invoke (write 'x', line 2)",
        "line 5: cas value must be [old, new], got [1]",
        "line 7: cas ok without matched (true: applied, false: the current value was not old)",
        "line 9: write completion value 9 differs from its invoke's 1 (line 8)",
        "line 11: ok at time 2 is before its invoke at 9 (line 10)",
        "line 12: unknown type 'crash' (expected one of invoke, ok, fail, info)",
        "line 13: unknown f 'append' (expected one of read, write, cas)",
    ]
    assert operations == []


def test_events_built_in_code_are_named_by_position() -> None:
    _, problems = pair([ev(0, "invoke", "read", None, 0), ev(0, "invoke", "read", None, 1)])
    assert problems == ["event 2: process 0 invokes read while its read (event 1) is still outstanding"]
