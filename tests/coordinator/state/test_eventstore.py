"""The event store in the replicated state machine: optimistic concurrency,
atomic appends, idempotent retries, categories, snapshots with truncation,
bounds, and restore from a snapshot.

Every command goes through ``StateMachine.apply`` (the bus tests' ``Driver``,
which checks that a refused command leaves the encoded state byte for byte
as it was and that restored copies answer the same).
"""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.state import Limits, StateMachine
from coordinator.state.eventstore import EventStoreLimits, approx_size, category_of
from tests.coordinator.state.test_bus import Driver


def ev(type_: str = "Placed", data: Any = None, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "data": {"n": 1} if data is None else data, **fields}


def driver(**limits: Any) -> Driver:
    d = Driver()
    if limits:
        d.machines[0] = StateMachine(Limits(eventstore=EventStoreLimits(**limits)))
    return d


def test_append_gives_versions_per_stream_and_positions_over_the_store() -> None:
    d = driver()
    first = d.ok("es.append", stream="order-1", expected_version="no_stream", events=[ev(), ev("Paid")])
    assert first == {"stream": "order-1", "first_version": 0, "version": 1, "positions": [1, 2], "index": 1}
    other = d.ok("es.append", stream="user-9", events=[ev("Joined")])
    assert (other["version"], other["positions"]) == (0, [3])
    again = d.ok("es.append", stream="order-1", expected_version=1, events=[ev("Shipped")])
    assert (again["first_version"], again["version"], again["positions"]) == (2, 2, [4])
    page = d.sm.store.read_stream("order-1", 0, 10)
    assert [(e["version"], e["type"], e["position"]) for e in page["events"]] == [(0, "Placed", 1), (1, "Paid", 2),
                                                                                  (2, "Shipped", 4)]
    assert page["version"] == 2 and page["next_version"] is None and page["snapshot"] is None
    assert all(e["time_ms"] == d.now_ms for e in page["events"])


@pytest.mark.parametrize(("expected", "ok_when_new", "ok_when_at_1"), [
    ("any", True, True), ("no_stream", True, False), (-1, True, False), ("exists", False, True),
    (1, False, True), (0, False, False),
])
def test_expected_version(expected: Any, ok_when_new: bool, ok_when_at_1: bool) -> None:
    d = driver()
    if ok_when_new:
        d.ok("es.append", stream="fresh-1", expected_version=expected, events=[ev()])
    else:
        message = d.refused("conflict", "es.append", stream="fresh-1", expected_version=expected, events=[ev()])
        assert "does not exist" in message and message.startswith("expected_version:")
    d.ok("es.append", stream="busy-1", events=[ev(), ev()])
    if ok_when_at_1:
        d.ok("es.append", stream="busy-1", expected_version=expected, events=[ev()])
    else:
        message = d.refused("conflict", "es.append", stream="busy-1", expected_version=expected, events=[ev()])
        assert "is at version 1" in message


def test_two_writers_from_the_same_version_one_wins() -> None:
    d = driver()
    d.ok("es.append", stream="acct-1", events=[ev("Opened")])
    d.ok("es.append", stream="acct-1", expected_version=0, events=[ev("Deposited")])
    d.refused("conflict", "es.append", stream="acct-1", expected_version=0, events=[ev("Withdrawn")])
    assert [e["type"] for e in d.sm.store.read_stream("acct-1", 0, 10)["events"]] == ["Opened", "Deposited"]


def test_an_append_is_all_or_nothing_and_errors_name_the_event() -> None:
    d = driver()
    d.ok("es.append", stream="order-1", events=[ev()])
    bad = [ev(), ev(), {"type": "", "data": 1}]
    assert d.refused("invalid", "es.append", stream="order-1", events=bad).startswith("events[2].type:")
    assert d.refused("invalid", "es.append", stream="order-1", events=[{"type": "X"}]).startswith("events[0].data:")
    assert d.refused("invalid", "es.append", stream="order-1",
                     events=[{"type": "X", "data": 1, "bogus": 2}]).startswith("events[0].bogus:")
    assert d.refused("invalid", "es.append", stream="order-1", events=[]).startswith("events:")
    assert d.refused("invalid", "es.append", stream="order-1", events=[ev()],
                     expected_version="latest").startswith("expected_version:")
    assert d.refused("invalid", "es.append", stream="a\nb", events=[ev()]).startswith("stream:")
    assert d.refused("invalid", "es.append", stream="order-1", events=[ev(metadata=[1])]).startswith(
        "events[0].metadata:")
    assert d.sm.store.streams["order-1"].version == 0 and d.sm.store.position == 1


def test_a_retried_append_with_event_ids_is_answered_not_stored_twice() -> None:
    d = driver()
    original = d.ok("es.append", stream="cart-1", expected_version="no_stream",
                    events=[ev("Added", id="e-1"), ev("Added", id="e-2")])
    d.ok("es.append", stream="cart-1", expected_version=1, events=[ev("Removed", id="e-3")])
    retry = d.ok("es.append", stream="cart-1", expected_version="no_stream",
                 events=[ev("Added", id="e-1"), ev("Added", id="e-2")])
    assert retry == {**original, "duplicate": True}
    assert d.sm.store.streams["cart-1"].version == 2 and d.sm.store.counters["duplicates"] == 1
    # same expected version, other ids (or no ids): a real conflict
    d.refused("conflict", "es.append", stream="cart-1", expected_version="no_stream",
              events=[ev("Added", id="e-1"), ev("Added", id="other")])
    d.refused("conflict", "es.append", stream="cart-1", expected_version=-1, events=[ev("Added"), ev("Added")])


def test_categories_are_the_id_before_the_first_dash() -> None:
    assert category_of("order-17") == "order" and category_of("order-eu-17") == "order"
    assert category_of("order") is None and category_of("-17") is None
    d = driver()
    d.ok("es.append", stream="order-1", events=[ev("A")])
    d.ok("es.append", stream="user-1", events=[ev("B")])
    d.ok("es.append", stream="order-2", events=[ev("C"), ev("D")])
    d.ok("es.append", stream="order", events=[ev("E")])  # no dash: in no category
    page = d.sm.store.read_category("order", 0, 10)
    assert [(e["stream"], e["type"], e["position"]) for e in page["events"]] == [
        ("order-1", "A", 1), ("order-2", "C", 3), ("order-2", "D", 4)]
    assert page["next_position"] == 5 and page["head_position"] == 5
    second = d.sm.store.read_category("order", 3, 1)
    assert [e["type"] for e in second["events"]] == ["C"] and second["next_position"] == 4
    assert [s["stream"] for s in d.sm.store.list_streams("order", "", 10)] == ["order-1", "order-2"]
    assert [s["stream"] for s in d.sm.store.list_streams(None, "order-1", 2)] == ["order-2", "user-1"]


def test_snapshot_with_truncation_drops_the_covered_events() -> None:
    d = driver()
    d.ok("es.append", stream="order-1", events=[ev("E", {"i": i}) for i in range(5)])
    d.ok("es.append", stream="order-2", events=[ev("F")])
    assert d.refused("conflict", "es.snapshot", stream="order-1", version=5, state={}).startswith("version:")
    kept = d.ok("es.snapshot", stream="order-1", version=1, state={"total": 1})
    assert kept == {"stream": "order-1", "snapshot_version": 1, "first_version": 0, "dropped": 0}
    result = d.ok("es.snapshot", stream="order-1", version=2, state={"total": 3}, truncate=True)
    assert result == {"stream": "order-1", "snapshot_version": 2, "first_version": 3, "dropped": 3}
    d.refused("conflict", "es.snapshot", stream="order-1", version=1, state={})  # older than the one it has
    page = d.sm.store.read_stream("order-1", 0, 10)
    assert page["first_version"] == 3 and [e["version"] for e in page["events"]] == [3, 4]
    assert page["snapshot"]["state"] == {"total": 3} and page["snapshot"]["version"] == 2
    category = d.sm.store.read_category("order", 0, 10)
    assert [e["position"] for e in category["events"]] == [4, 5, 6] and category["dropped_through"] == 3
    assert d.sm.store.events_count == 3
    d.ok("es.append", stream="order-1", expected_version=4, events=[ev("G")])  # versions go on
    d.refused("not_found", "es.snapshot", stream="order-9", version=0, state={})
    d.refused("invalid", "es.snapshot", stream="order-1", version=0)


def test_delete_with_expected_version() -> None:
    d = driver()
    d.ok("es.append", stream="order-1", events=[ev(), ev()])
    d.refused("conflict", "es.delete", stream="order-1", expected_version=0)
    assert d.ok("es.delete", stream="order-1", expected_version=1) == {"stream": "order-1", "version": 1,
                                                                       "dropped": 2}
    assert d.sm.store.read_stream("order-1", 0, 10) is None and d.sm.store.events_count == 0
    d.refused("not_found", "es.delete", stream="order-1")
    assert d.ok("es.append", stream="order-1", expected_version="no_stream", events=[ev()])["version"] == 0


def test_bounds_refuse_and_store_nothing() -> None:
    d = driver(events_max=4, bytes_max=10_000, streams_max=2, append_max=3, event_bytes_max=200)
    d.ok("es.append", stream="a-1", events=[ev(), ev()])
    assert d.refused("invalid", "es.append", stream="a-1", events=[ev()] * 4).startswith("events:")
    too_big = d.refused("too_large", "es.append", stream="a-1", events=[ev("X", "y" * 300)])
    assert too_big.startswith("events[0].data:") and "event_bytes_max" in too_big
    d.ok("es.append", stream="a-2", events=[ev()])
    assert "streams" in d.refused("unavailable", "es.append", stream="a-3", events=[ev()])
    assert "full" in d.refused("unavailable", "es.append", stream="a-1", events=[ev(), ev()])
    d.ok("es.snapshot", stream="a-1", version=1, state={}, truncate=True)  # truncation makes room
    d.ok("es.append", stream="a-1", events=[ev(), ev()])
    assert d.sm.store.events_count == 3


def test_bytes_bound() -> None:
    d = driver(bytes_max=1000, event_bytes_max=600)
    d.ok("es.append", stream="a-1", events=[ev("X", "y" * 500)])
    refused = d.refused("quota", "es.append", stream="a-1", events=[ev("X", "y" * 500)])
    assert refused.startswith("eventstore_bytes_max:")
    assert d.sm.store.bytes == approx_size("y" * 500)


def test_backward_reads_page_down_to_the_first_retained_version() -> None:
    d = driver()
    d.ok("es.append", stream="log-1", events=[ev("E", i) for i in range(5)])
    page = d.sm.store.read_stream("log-1", 2**62, 2, backward=True)
    assert [e["version"] for e in page["events"]] == [4, 3] and page["next_version"] == 2
    page = d.sm.store.read_stream("log-1", 2, 5, backward=True)
    assert [e["version"] for e in page["events"]] == [2, 1, 0] and page["next_version"] is None


def test_restored_replicas_answer_the_same() -> None:
    d = driver()
    d.ok("es.append", stream="order-1", events=[ev("A", id="1"), ev("B")])
    d.ok("es.append", stream="order-2", events=[ev("C")])
    d.ok("es.snapshot", stream="order-1", version=0, state={"s": 1}, truncate=True)
    copy = d.restore()
    assert copy.store.read_category("order", 0, 10) == d.sm.store.read_category("order", 0, 10)
    d.ok("es.append", stream="order-1", expected_version=1, events=[ev("D")])
    d.refused("conflict", "es.append", stream="order-1", expected_version=1, events=[ev("D")])
    d.ok("es.delete", stream="order-2")
    d.same_everywhere()
    assert copy.store.describe() == d.sm.store.describe()
