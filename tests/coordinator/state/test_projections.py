"""Projections in the replicated state machine.

The hypothesis test is the contract: after any sequence of appends (and
truncations) the projection the cluster maintains equals a straightforward
fold, written here independently, over the same events; a rebuild and a
restored replica give the same. The other tests pin topic sources (bus
events and the cluster's own events), validation and bounds.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.codec import decode_snapshot, encode_snapshot
from coordinator.state import Limits, StateMachine
from coordinator.state.projections import ProjectionLimits
from tests.coordinator.state.test_bus import Driver

# -- the reference: a plain fold over the events, written from the module docstring -------------


def _text(value: Any) -> str | None:
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return None


def _at(data: Any, path: str | None) -> tuple[bool, Any]:
    if path is None:
        return True, data
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return False, None
        data = data[part]
    return True, data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def reference(definition: dict[str, Any], events: list[tuple[str, Any]]) -> Any:
    """``events``: (type, data) in commit order, already of the projection's source."""
    types = definition.get("types")
    fold, path, group_by = definition["fold"], definition.get("field"), definition.get("group_by")
    groups: dict[str | None, list[Any]] = {}
    for type_, data in events:
        if types is not None and type_ not in types:
            continue
        key = None
        if group_by is not None:
            found, raw = _at(data, group_by)
            key = _text(raw) if found else None
            if key is None:
                continue
        found, value = _at(data, path)
        groups.setdefault(key, []).append((found, value))

    def one(items: list[tuple[bool, Any]]) -> Any:
        if fold == "count":
            return len(items)
        present = [v for found, v in items if found]
        if fold == "last":
            return present[-1] if present else None
        if fold == "set":
            members: dict[str, Any] = {}
            for v in present:
                if _text(v) is not None:
                    members.setdefault(_text(v), v)
            return [members[k] for k in sorted(members)]
        numbers = [v for v in present if _is_number(v)]
        if fold == "sum":
            total: Any = 0
            for v in numbers:
                total = total + v
            return total
        if not numbers:
            return None
        return min(numbers) if fold == "min" else max(numbers)

    if group_by is None:
        return one(groups.get(None, []))
    return {k: one(groups[k]) for k in sorted(groups) if groups[k] or fold == "count"}


# -- hypothesis ----------------------------------------------------------------------------------

scalars = st.one_of(st.integers(-1000, 1000), st.floats(-1e6, 1e6, allow_nan=False), st.booleans(),
                    st.sampled_from(["red", "blue", "1", "", "true"]), st.none())
datas = st.one_of(
    st.fixed_dictionaries({}, optional={"amount": scalars, "status": scalars,
                                        "nested": st.fixed_dictionaries({}, optional={"v": scalars}),
                                        "list": st.lists(scalars, max_size=2)}),
    scalars,
)
appends = st.lists(st.tuples(st.sampled_from(["order-1", "order-2", "user-1", "order"]),
                             st.lists(st.tuples(st.sampled_from(["Placed", "Paid", "Shipped"]), datas),
                                      min_size=1, max_size=3)), max_size=25)
definitions = st.builds(
    lambda fold, path, group_by, types: {k: v for k, v in {
        "source": {"category": "order"}, "fold": fold, "field": path, "group_by": group_by, "types": types,
    }.items() if v is not None},
    st.sampled_from(["count", "sum", "min", "max", "last", "set"]),
    st.sampled_from([None, "amount", "status", "nested.v", "list"]),
    st.sampled_from([None, "status", "nested.v", "amount"]),
    st.one_of(st.none(), st.lists(st.sampled_from(["Placed", "Paid", "Shipped"]), min_size=1, max_size=2)),
).filter(lambda d: d.get("field") is not None or d["fold"] in ("count", "last"))


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-9,
                                                                                                abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b and type(a) is type(b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=appends, after=appends, definition=definitions, truncate_at=st.integers(0, 3))
def test_a_projection_equals_a_plain_fold_of_its_events(before, after, definition, truncate_at) -> None:
    d = Driver()
    folded: list[tuple[str, Any]] = []
    last_index = [0]  # the log index of the last append the projection must have looked at
    types = definition.get("types")

    def append_all(batch: list[tuple[str, list[tuple[str, Any]]]]) -> None:
        for stream, events in batch:
            d.ok("es.append", stream=stream, events=[{"type": t, "data": data} for t, data in events])
            if stream.startswith("order-"):
                folded.extend(events)
                if any(types is None or t in types for t, _ in events):
                    last_index[0] = d.index

    append_all(before)  # before the projection exists: it folds them when created
    created = d.ok("projection.put", name="p", definition=definition)
    assert _close(created["value"], reference(definition, folded)), (created["value"], folded)
    append_all(after)
    live = d.sm.projections.items["p"].describe()
    assert _close(live["value"], reference(definition, folded)), (live["value"], folded)
    assert live["index"] == last_index[0]  # the position it reflects
    copy = d.restore()
    assert _close(copy.projections.items["p"].describe()["value"], live["value"])
    rebuilt = d.ok("projection.rebuild", name="p")
    assert _close(rebuilt["value"], live["value"])
    # a truncation drops events from the store, not from the projection; a rebuild then folds what is left
    if "order-1" in d.sm.store.streams and d.sm.store.streams["order-1"].version >= truncate_at:
        d.ok("es.snapshot", stream="order-1", version=truncate_at, state={}, truncate=True)
        assert _close(d.sm.projections.items["p"].describe()["value"], live["value"])
        left = [(e.type, e.data) for e in d.sm.store.category_since("order", 0, 10_000)]
        assert _close(d.ok("projection.rebuild", name="p")["value"], reference(definition, left))
    d.same_everywhere()


# -- topic sources ---------------------------------------------------------------------------


_ids = iter(range(1, 1_000_000))


def _event(payload: Any, type_: str = "event") -> dict[str, Any]:
    return {"id": f"m{next(_ids)}", "type": type_, "source": "test", "payload": payload}


def test_topic_projection_folds_bus_events_and_the_clusters_own() -> None:
    d = Driver()
    d.ok("projection.put", name="tasks", definition={"source": {"topic": "job.*"}, "fold": "count",
                                                     "group_by": "agent"})
    d.ok("projection.put", name="agents", definition={"source": {"topic": "agent.>"}, "fold": "set",
                                                      "field": "agentType"})
    d.ok("bus.publish", topic="job.failed", messages=[_event({"agent": "a1"}), _event({"agent": "a2"}),
                                                          _event({"agent": "a1"}, "command")])
    d.ok("bus.publish", topic="job.done.late", messages=[_event({"agent": "a1"})])  # * is one token
    d.ok("agent.register", id="w1", type="worker", ttl_ms=30_000)
    d.ok("agent.register", id="p1", type="planner", ttl_ms=30_000)
    tasks = d.sm.projections.items["tasks"].describe()
    assert tasks["value"] == {"a1": 1, "a2": 1} and tasks["events"] == 2
    assert d.sm.projections.items["agents"].describe()["value"] == ["planner", "worker"]
    # exactly-once duplicates are not folded twice
    once = {**_event({"agent": "a3"}), "id": "m-1", "deliveryOptions": {"guarantee": "exactly-once"}}
    d.ok("bus.publish", topic="job.failed", messages=[once])
    d.ok("bus.publish", topic="job.failed", messages=[once])
    assert d.sm.projections.items["tasks"].describe()["value"] == {"a1": 1, "a2": 1, "a3": 1}
    d.restore()
    d.ok("agent.register", id="r1", type="reviewer", ttl_ms=30_000)
    d.same_everywhere()


def test_topic_rebuild_folds_what_the_topics_and_the_event_log_retain() -> None:
    d = Driver()
    d.ok("bus.topic.configure", topic="job.failed", max_messages=2)
    for agent in ("a1", "a2", "a3"):
        d.ok("bus.publish", topic="job.failed", messages=[_event({"agent": agent})])
    d.ok("agent.register", id="w1", type="worker", ttl_ms=30_000)
    made = d.ok("projection.put", name="p", definition={"source": {"topic": ">"}, "fold": "last",
                                                        "field": "agent"})
    # a1 is past the topic's retention; agent.spawned has no "agent" field
    assert made["events"] == 2 and made["value"] == "a3" and made["skipped"] == 1
    made = d.ok("projection.put", name="q", definition={"source": {"topic": "agent.spawned"}, "fold": "count"})
    assert made["value"] == 1


def test_definitions_are_checked_and_errors_name_the_field() -> None:
    d = Driver()
    cases = {
        "source": {"fold": "count"},
        "source.category": {"source": {"category": "a-b"}, "fold": "count"},
        "source.topic": {"source": {"topic": "a..b"}, "fold": "count"},
        "fold": {"source": {"category": "a"}, "fold": "median"},
        "field": {"source": {"category": "a"}, "fold": "sum"},
        "group_by": {"source": {"category": "a"}, "fold": "count", "group_by": "a..b"},
        "types": {"source": {"topic": "a"}, "fold": "count", "types": ["X"]},
        "bogus": {"source": {"category": "a"}, "fold": "count", "bogus": 1},
    }
    for field, definition in cases.items():
        message = d.refused("invalid", "projection.put", name="p", definition=definition)
        assert message.startswith(f"{field}:"), (field, message)
    d.refused("invalid", "projection.put", name="a/b", definition={"source": {"category": "a"}, "fold": "count"})
    d.refused("not_found", "projection.rebuild", name="nope")
    d.refused("not_found", "projection.delete", name="nope")


def test_bounds_are_counted_as_overflow() -> None:
    d = Driver()
    d.machines[0] = StateMachine(Limits(projections=ProjectionLimits(projections_max=2, groups_max=2, set_max=2)))
    d.ok("projection.put", name="g", definition={"source": {"category": "e"}, "fold": "count", "group_by": "k"})
    d.ok("projection.put", name="s", definition={"source": {"category": "e"}, "fold": "set", "field": "k"})
    d.refused("unavailable", "projection.put", name="third", definition={"source": {"category": "e"}, "fold": "count"})
    d.ok("es.append", stream="e-1", events=[{"type": "T", "data": {"k": k}} for k in ("a", "b", "c", "a")])
    g, s = d.sm.projections.items["g"].describe(), d.sm.projections.items["s"].describe()
    assert g["value"] == {"a": 2, "b": 1} and g["overflow"] == 1
    assert s["value"] == ["a", "b"] and s["overflow"] == 1
    assert d.ok("projection.delete", name="g") == {"name": "g", "deleted": True}
    d.ok("projection.put", name="third", definition={"source": {"category": "e"}, "fold": "count"})


def test_a_sum_past_64_bits_becomes_a_float_and_still_snapshots() -> None:
    d = Driver()
    d.ok("projection.put", name="big", definition={"source": {"category": "n"}, "fold": "sum", "field": "v"})
    d.ok("es.append", stream="n-1", events=[{"type": "T", "data": {"v": 2**62}}] * 3)
    value = d.sm.projections.items["big"].describe()["value"]
    assert isinstance(value, float) and value == pytest.approx(3 * 2**62)
    assert decode_snapshot(encode_snapshot(d.sm.snapshot_data()))["projections"]


def test_replacing_a_definition_refolds_and_position_is_reported() -> None:
    d = Driver()
    d.ok("es.append", stream="o-1", events=[{"type": "A", "data": {"x": 1}}, {"type": "B", "data": {"x": 2}}])
    first = d.ok("projection.put", name="p", definition={"source": {"category": "o"}, "fold": "sum", "field": "x"})
    assert (first["value"], first["position"], first["from_position"], first["index"]) == (3, 2, 1, 1)
    second = d.ok("projection.put", name="p", definition={"source": {"category": "o"}, "fold": "sum", "field": "x",
                                                          "types": ["B"]})
    assert (second["value"], second["position"], second["created_index"]) == (2, 2, 3)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datas=st.lists(json_values, min_size=1, max_size=8), definition=definitions)
def test_any_json_folds_without_error_and_snapshots(datas, definition) -> None:
    """Whatever the events hold, a projection folds them (or skips them) and
    the state still encodes: the state machine never fails on event data."""
    d = Driver()
    d.ok("projection.put", name="p", definition=definition)
    d.ok("es.append", stream="order-1", events=[{"type": "Placed", "data": data} for data in datas])
    described = d.sm.projections.items["p"].describe()
    assert described["events"] + described["skipped"] + described["overflow"] == (
        len(datas) if definition.get("types") is None or "Placed" in definition["types"] else 0)
    d.restore()
    d.same_everywhere()
