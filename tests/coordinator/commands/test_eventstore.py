"""The event store's commands: one parse for the API and for apply, naming
the field it refuses; the log keeps the keys of events and snapshots in the
order the client sent them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.eventstore import (
    APPEND_MAX,
    EVENT_BYTES_MAX,
    MAX_VERSION,
    SNAPSHOT_BYTES_MAX,
    EsAppend,
    EsDelete,
    EsSnapshot,
    NewEvent,
)
from coordinator.errors import InvariantError
from coordinator.state import Limits, StateMachine
from coordinator.state.eventstore import EventStoreLimits
from coordinator.types import Command
from tests.coordinator.commands.refusals import refused_alike
from tests.coordinator.commands.test_kv import json_values, names

objects = st.dictionaries(st.text(max_size=4), json_values, max_size=3)
expected_versions = st.none() | st.sampled_from(("any", "no_stream", "exists")) | st.integers(-1, MAX_VERSION)


@st.composite
def raw_events(draw: st.DrawFn) -> dict[str, Any]:
    """An event as a client may send it: any order of its keys, null optional fields given or left out."""
    fields: dict[str, Any] = {"type": draw(names), "data": draw(json_values)}
    if draw(st.booleans()):
        fields["metadata"] = draw(st.none() | objects)
    if draw(st.booleans()):
        fields["id"] = draw(st.none() | names)
    return dict(draw(st.permutations(list(fields.items()))))


@st.composite
def raw_snapshots(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {"version": draw(st.integers(0, MAX_VERSION)), "state": draw(json_values)}
    if draw(st.booleans()):
        fields["truncate"] = draw(st.booleans())
    return {"stream": draw(names), **dict(draw(st.permutations(list(fields.items()))))}


new_events = st.builds(NewEvent, names, json_values, st.none() | objects, st.none() | names)
es_commands = st.one_of(
    st.builds(EsAppend, names, st.lists(new_events, min_size=1, max_size=3).map(tuple), expected_versions),
    st.builds(EsSnapshot, names, st.integers(0, MAX_VERSION), json_values, st.none() | st.booleans()),
    st.builds(EsDelete, names, expected_versions),
)


@given(es_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    assert type(command).parse(command.to_args()) == command
    assert COMMANDS[command.op] is type(command)


@given(st.lists(raw_events(), min_size=1, max_size=3), raw_snapshots())
def test_to_args_gives_back_what_the_client_sent_in_its_order(events: list[dict[str, Any]],
                                                              snapshot: dict[str, Any]) -> None:
    """The API proposed the client's objects as they came: the log's bytes stay the same."""
    append = EsAppend.parse({"stream": "order-1", "events": events})
    assert [list(e.items()) for e in append.to_args()["events"]] == [list(e.items()) for e in events]
    assert EsAppend.parse(append.to_args()) == append
    parsed = EsSnapshot.parse(snapshot)
    assert list(parsed.to_args().items()) == list(snapshot.items())
    assert EsSnapshot.parse(parsed.to_args()) == parsed


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    """The dicts the API proposed before the command types."""
    event = {"type": "Placed", "data": {"n": 1}}
    assert list(EsAppend("order-1", (NewEvent("Placed", {"n": 1}),)).to_args().items()) == [
        ("stream", "order-1"), ("events", [event])]
    assert list(EsAppend("order-1", (NewEvent("Placed", {"n": 1}),), -1).to_args()) == ["stream", "events",
                                                                                        "expected_version"]
    assert list(NewEvent("A", 1, {"m": 1}, "e-1").to_args()) == ["type", "data", "metadata", "id"]
    assert list(NewEvent.parse({"id": None, "data": 1, "type": "A"}, "events[0]").to_args()) == ["id", "data", "type"]
    assert list(EsSnapshot("s-1", 2, {}).to_args()) == ["stream", "version", "state"]
    assert list(EsSnapshot.parse({"stream": "s-1", "truncate": False, "state": 1, "version": 0}).to_args()) == [
        "stream", "truncate", "state", "version"]
    assert EsDelete("s-1").to_args() == {"stream": "s-1"}
    assert EsDelete("s-1", "exists").to_args() == {"stream": "s-1", "expected_version": "exists"}


def test_the_size_of_an_event_counts_its_data_and_metadata() -> None:
    assert NewEvent("A", "xy").size == 4
    assert NewEvent("A", "xy", {}).size == 6
    assert NewEvent("A", "xy", keys=("type", "data")) == NewEvent("A", "xy")


def ok_event(**fields: Any) -> dict[str, Any]:
    return {"type": "A", "data": 1, **fields}


# (op, args, code, the refusal): the same words the state machine and the API used before the command types
BAD: list[tuple[str, dict[str, Any], str, str]] = [
    ("es.append", {"stream": "s-1", "events": [ok_event()], "x": 1}, "invalid",
     "x: unknown field (allowed: stream, expected_version, events)"),
    ("es.append", {"events": [ok_event()]}, "invalid", "stream: must be a string"),
    ("es.append", {"stream": "s" * 257, "events": [ok_event()]}, "invalid", "stream: must have 1 to 256 characters"),
    ("es.append", {"stream": "s-1", "expected_version": "latest", "events": [ok_event()]}, "invalid",
     "expected_version: must be a version (-1 for no stream) or one of any, no_stream, exists"),
    ("es.append", {"stream": "s-1", "expected_version": None, "events": [ok_event()]}, "invalid",
     "expected_version: must be an integer"),
    ("es.append", {"stream": "s-1", "expected_version": -2, "events": [ok_event()]}, "invalid",
     f"expected_version: must be between -1 and {MAX_VERSION}"),
    ("es.append", {"stream": "s-1"}, "invalid", f"events: must be a list of 1 to {APPEND_MAX} events"),
    ("es.append", {"stream": "s-1", "events": []}, "invalid", f"events: must be a list of 1 to {APPEND_MAX} events"),
    ("es.append", {"stream": "s-1", "events": [ok_event()] * (APPEND_MAX + 1)}, "invalid",
     f"events: must be a list of 1 to {APPEND_MAX} events"),
    ("es.append", {"stream": "s-1", "events": [ok_event(), 7]}, "invalid",
     "events[1]: must be an object with string keys"),
    ("es.append", {"stream": "s-1", "events": [ok_event(when=1)]}, "invalid",
     "events[0].when: unknown field (allowed: type, data, metadata, id)"),
    ("es.append", {"stream": "s-1", "events": [ok_event(), ok_event(type=7)]}, "invalid",
     "events[1].type: must be a string"),
    ("es.append", {"stream": "s-1", "events": [{"type": "A"}]}, "invalid",
     "events[0].data: is required (null is a value)"),
    ("es.append", {"stream": "s-1", "events": [ok_event(metadata=[1])]}, "invalid",
     "events[0].metadata: must be an object with string keys"),
    ("es.append", {"stream": "s-1", "events": [ok_event(id="")]}, "invalid",
     "events[0].id: must have 1 to 128 characters"),
    ("es.append", {"stream": "s-1", "events": [ok_event(data="x" * EVENT_BYTES_MAX), ok_event(type=7)]},
     "too_large", f"events[0].data: about {EVENT_BYTES_MAX + 2} bytes, more than event_bytes_max "
                  f"({EVENT_BYTES_MAX})"),
    ("es.snapshot", {"stream": "s-1", "version": 0, "state": {}, "at": 1}, "invalid",
     "at: unknown field (allowed: stream, version, state, truncate)"),
    ("es.snapshot", {"stream": "", "version": 0, "state": {}}, "invalid", "stream: must have 1 to 256 characters"),
    ("es.snapshot", {"stream": "s-1", "state": {}}, "invalid", "version: must be an integer"),
    ("es.snapshot", {"stream": "s-1", "version": -1, "state": {}}, "invalid",
     f"version: must be between 0 and {MAX_VERSION}"),
    ("es.snapshot", {"stream": "s-1", "version": 0}, "invalid", "state: is required"),
    ("es.snapshot", {"stream": "s-1", "version": 0, "state": "x" * SNAPSHOT_BYTES_MAX}, "invalid",
     f"state: is larger than {SNAPSHOT_BYTES_MAX} bytes"),
    ("es.snapshot", {"stream": "s-1", "version": 0, "state": {}, "truncate": None}, "invalid",
     "truncate: must be true or false"),
    ("es.snapshot", {"stream": "s-1", "version": 0, "state": {}, "truncate": 1}, "invalid",
     "truncate: must be true or false"),
    ("es.delete", {"stream": "s-1", "version": 1}, "invalid",
     "version: unknown field (allowed: stream, expected_version)"),
    ("es.delete", {"stream": 1}, "invalid", "stream: must be a string"),
    ("es.delete", {"stream": "s-1", "expected_version": "3"}, "invalid",
     "expected_version: must be a version (-1 for no stream) or one of any, no_stream, exists"),
]


@pytest.mark.parametrize(("op", "args", "code", "message"), BAD, ids=[f"{op} {m[:40]}" for op, _, _, m in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], code: str, message: str) -> None:
    setup = [("es.append", {"stream": "s-1", "events": [ok_event()]})]
    assert refused_alike(op, args, code=code, setup=setup) == message


def test_a_store_with_lower_limits_refuses_what_the_parse_lets_through() -> None:
    limits = EventStoreLimits(append_max=2, event_bytes_max=10, snapshot_bytes_max=10)
    sm = StateMachine(Limits(eventstore=limits))
    three = {"stream": "s-1", "events": [ok_event()] * 3}
    assert sm.apply(1, Command(op="es.append", args=three, now_ms=1)).error == (
        "invalid", "events: must be a list of 1 to 2 events")
    big = {"stream": "s-1", "events": [ok_event(), ok_event(data="x" * 9)]}
    assert sm.apply(2, Command(op="es.append", args=big, now_ms=1)).error == (
        "too_large", "events[1].data: about 11 bytes, more than event_bytes_max (10)")
    assert sm.apply(3, Command(op="es.append", args={"stream": "s-1", "events": [ok_event()]}, now_ms=1)).ok
    snapshot = {"stream": "s-1", "version": 0, "state": "x" * 9}
    assert sm.apply(4, Command(op="es.snapshot", args=snapshot, now_ms=1)).error == (
        "invalid", "state: is larger than 10 bytes")


def test_limits_above_the_parse_caps_are_refused() -> None:
    with pytest.raises(InvariantError, match="append_max: at most 100"):
        EventStoreLimits(append_max=APPEND_MAX + 1)
