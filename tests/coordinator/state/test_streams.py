"""Stream processors in the replicated state machine, on explicit timelines
of committed times: tumbling and sliding windows with allowed lateness,
count / sequence / absence patterns, the agent-health action, restore in
the middle of a window, and a hypothesis check of tumbling windows against
a plain computation over the same timeline."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.coordinator.state.test_bus import T0, Driver, msg

S = 1000  # ms
B = T0 - T0 % (3600 * S) + 3600 * S  # the timelines' zero: after the Driver's start, on a window boundary


def window_def(**overrides: Any) -> dict[str, Any]:
    return {"source": {"category": "order"}, "window": {"kind": "tumbling", "size_s": 10}, "fold": "sum",
            "field": "amount", "group_by": "cur", "emit": "stats.orders", **overrides}


def driver() -> Driver:
    """A Driver whose committed time starts a minute before ``B`` (committed
    time moves at most ``CLOCK_STEP_MAX_MS`` per entry, so not from ``T0``)."""
    d = Driver()
    d.now_ms = B - 60 * S
    return d


def at(d: Driver, t_ms: int, op: str, **args: Any) -> Any:
    """``op`` committed at ``B + t_ms``."""
    d.now_ms = B + t_ms
    return d.ok(op, **args)


def order(d: Driver, t_ms: int, amount: Any, cur: str = "EUR") -> None:
    at(d, t_ms, "es.append", stream="order-1", events=[{"type": "Placed", "data": {"amount": amount, "cur": cur}}])


def emitted(d: Driver, sub: str) -> list[dict[str, Any]]:
    """The payloads delivered, with times made relative to ``B``."""
    out = []
    for delivery in d.deliver(sub):
        payload = dict(delivery["message"]["payload"])
        if "window" in payload:
            payload["window"] = {k: v - B for k, v in payload["window"].items()}
        for key in ("first_ms", "last_ms", "then_ms", "deadline_ms"):
            if key in payload:
                payload[key] -= B
        out.append(payload)
    return out


def test_tumbling_windows_close_at_end_plus_lateness_and_a_clock_behind_is_never_late() -> None:
    d = driver()
    d.ok("processor.put", name="sums", definition=window_def(lateness_s=2))
    sub = d.sub("stats.orders")
    order(d, 1 * S, 5)
    order(d, 9 * S, 7, "USD")
    order(d, 11 * S, 1)   # the next window
    order(d, 8 * S, 2)    # a proposer's clock behind: committed at 11 s, in [10, 20)
    assert emitted(d, sub) == []
    at(d, 12 * S, "streams.tick")  # 10 s + 2 s lateness: [0, 10) closes, once per group
    first = emitted(d, sub)
    assert [(p["window"], p["group"], p["value"], p["events"]) for p in first] == [
        ({"start_ms": 0, "end_ms": 10 * S}, "EUR", 5, 1), ({"start_ms": 0, "end_ms": 10 * S}, "USD", 7, 1)]
    order(d, 5 * S, 100)  # [0, 10) is closed, but committed time never goes back: folded at 12 s
    at(d, 30 * S, "streams.tick")
    assert [(p["window"]["start_ms"], p["value"], p["events"]) for p in emitted(d, sub)] == [(10 * S, 103, 3)]
    counters = d.sm.streams.items["sums"].describe()
    assert (counters["events"], counters["late"], counters["emitted"]) == (5, 0, 3)


def test_any_command_closes_what_its_time_passed() -> None:
    d = driver()
    d.ok("processor.put", name="sums", definition=window_def())
    sub = d.sub("stats.orders")
    order(d, 1 * S, 5)
    at(d, 10 * S, "kv.put", key="unrelated", value=1)  # a committed time at the window's end closes it
    assert [p["value"] for p in emitted(d, sub)] == [5]


def test_sliding_windows_count_an_event_in_each_window_it_falls_in() -> None:
    d = driver()
    d.ok("processor.put", name="slide", definition=window_def(
        window={"kind": "sliding", "size_s": 10, "slide_s": 5}, fold="count", field=None, group_by=None))
    sub = d.sub("stats.orders")
    order(d, 7 * S, 1)   # in [0, 10) and [5, 15)
    order(d, 12 * S, 1)  # in [5, 15) and [10, 20)
    at(d, 40 * S, "streams.tick")
    assert [(p["window"]["start_ms"], p["value"]) for p in emitted(d, sub)] == [(0, 1), (5 * S, 2), (10 * S, 1)]


def task_failed(agent: str) -> dict[str, Any]:
    return msg(f"f-{agent}-{id(object())}", payload={"taskId": "t1", "agentId": agent, "error": "boom"})


def test_three_failures_within_a_minute_mark_the_agent_unhealthy() -> None:
    d = driver()
    for agent in ("a1", "a2"):
        d.ok("agent.register", id=agent, type="worker", ttl_ms=600_000)
    d.ok("processor.put", name="flaky", definition={
        "source": {"topic": "task.failed"}, "group_by": "agentId",
        "pattern": {"kind": "count", "event": "task.failed", "count": 3, "within_s": 60},
        "emit": "alerts.flaky", "action": {"agent_health": "unhealthy"}})
    alerts = d.sub("alerts.flaky")
    for t, agent in ((0, "a1"), (10, "a2"), (30, "a1"), (65, "a1"), (70, "a2"), (75, "a1")):
        d.now_ms = B + t * S
        d.publish("task.failed", task_failed(agent))
    # a1 at 0, 30, 65: 0 is more than 60 s before 65; then 30, 65, 75 are three within 60 s
    [alert] = emitted(d, alerts)
    assert (alert["group"], alert["count"], alert["first_ms"], alert["last_ms"]) == ("a1", 3, 30 * S, 75 * S)
    assert d.sm.registry.agents["a1"].health == "unhealthy" and d.sm.registry.agents["a2"].health != "unhealthy"
    changed = [e for e in d.sm.events.since(1, 1000) if e.type == "agent.health.changed"]
    assert [(e.data["agentId"], e.data["to"]) for e in changed] == [("a1", "unhealthy")]
    assert "flaky" in changed[0].data["reason"]


def test_sequence_within_a_time() -> None:
    d = driver()
    d.ok("processor.put", name="fast", definition={
        "source": {"category": "job"}, "group_by": "id", "emit": "alerts.fast",
        "pattern": {"kind": "sequence", "first": "Started", "then": "Done", "within_s": 10}})
    sub = d.sub("alerts.fast")

    def job(t: int, type_: str, job_id: str) -> None:
        at(d, t * S, "es.append", stream=f"job-{job_id}", events=[{"type": type_, "data": {"id": job_id}}])

    job(0, "Started", "x")
    job(5, "Done", "x")     # within 10 s: a match
    job(6, "Done", "x")     # its Started was used: no second match
    job(10, "Started", "y")
    job(25, "Done", "y")    # too late
    assert [(p["group"], p["first_ms"], p["then_ms"]) for p in emitted(d, sub)] == [("x", 0, 5 * S)]


def test_absence_is_emitted_when_the_deadline_passes() -> None:
    d = driver()
    d.ok("processor.put", name="unpaid", definition={
        "source": {"category": "order"}, "group_by": "id", "emit": "alerts.unpaid",
        "pattern": {"kind": "absence", "first": "Placed", "missing": "Paid", "within_s": 60}})
    sub = d.sub("alerts.unpaid")
    at(d, 0, "es.append", stream="order-1", events=[{"type": "Placed", "data": {"id": "1"}}])
    at(d, 1 * S, "es.append", stream="order-2", events=[{"type": "Placed", "data": {"id": "2"}}])
    at(d, 30 * S, "es.append", stream="order-2", events=[{"type": "Paid", "data": {"id": "2"}}])
    assert d.sm.streams.next_due_ms() == B + 60 * S
    at(d, 59 * S, "streams.tick")
    assert emitted(d, sub) == []
    copy = d.restore()  # a replica restored from a snapshot fires the same deadline
    assert copy.streams.next_due_ms() == B + 60 * S
    at(d, 60 * S, "streams.tick")
    assert [(p["group"], p["first_ms"], p["deadline_ms"]) for p in emitted(d, sub)] == [("1", 0, 60 * S)]
    d.same_everywhere()


def test_restored_in_the_middle_of_a_window_emits_the_same() -> None:
    d = driver()
    d.ok("processor.put", name="sums", definition=window_def())
    d.sub("stats.orders")
    order(d, 1 * S, 5)
    d.restore()
    order(d, 2 * S, 6)
    at(d, 20 * S, "streams.tick")
    d.same_everywhere()
    assert d.sm.streams.items["sums"].describe()["emitted"] == 1


def test_definitions_are_checked_and_errors_name_the_field() -> None:
    d = driver()
    cases = {
        "window": {"source": {"category": "o"}, "emit": "x"},
        "window.kind": window_def(window={"kind": "hopping", "size_s": 1}),
        "window.size_s": window_def(window={"kind": "tumbling", "size_s": 0}),
        "window.slide_s": window_def(window={"kind": "sliding", "size_s": 10, "slide_s": 3}),
        "emit": window_def(emit="agent.fake"),
        "field": window_def(fold="sum", field=None),
        "lateness_s": window_def(lateness_s=-1),
        "pattern.kind": {"source": {"category": "o"}, "emit": "x", "pattern": {"kind": "never", "within_s": 1}},
        "pattern.count": {"source": {"category": "o"}, "emit": "x",
                          "pattern": {"kind": "count", "event": "E", "count": 1, "within_s": 1}},
        "group_by": {"source": {"topic": "task.failed"}, "action": {"agent_health": "unhealthy"},
                     "pattern": {"kind": "count", "event": "task.failed", "count": 3, "within_s": 60}},
        "action.agent_health": {"source": {"category": "o"}, "group_by": "a", "action": {"agent_health": "sick"},
                                "pattern": {"kind": "count", "event": "E", "count": 3, "within_s": 60}},
    }
    for field, definition in cases.items():
        message = d.refused("invalid", "processor.put", name="p", definition=definition)
        assert message.startswith(f"{field}:"), (field, message)
    d.refused("not_found", "processor.delete", name="p")


# -- hypothesis: tumbling windows against a plain computation ------------------------------------

steps = st.lists(st.tuples(st.integers(-3000, 6000), st.sampled_from(["EUR", "USD"]), st.integers(0, 50)),
                 min_size=1, max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps, size_s=st.sampled_from([1, 2, 5]), lateness_s=st.sampled_from([0, 1, 3]))
def test_tumbling_windows_equal_a_plain_computation(steps, size_s, lateness_s) -> None:
    d = driver()
    d.ok("processor.put", name="w", definition=window_def(window={"kind": "tumbling", "size_s": size_s},
                                                          lateness_s=lateness_s))
    sub = d.sub("stats.orders")
    size, lateness = size_s * S, lateness_s * S
    t, clock = 100_000, d.now_ms - B
    expected: dict[tuple[int, str], list[int]] = {}
    for delta, cur, amount in steps:
        t = max(0, t + delta)  # proposers' clocks mostly grow, sometimes step back (a leader's clock behind)
        order(d, t, amount, cur)
        clock = max(clock, t)  # committed time: never back, so every event lands in an open window
        expected.setdefault((clock - clock % size, cur), []).append(amount)
    at(d, clock + 10 * size + lateness + 1, "streams.tick")
    got = {(p["window"]["start_ms"], p["group"]): (p["value"], p["events"]) for p in emitted(d, sub)}
    assert got == {k: (sum(v), len(v)) for k, v in expected.items()}
    d.restore()
    d.same_everywhere()


@pytest.mark.parametrize("kind", ["count", "absence"])
def test_redefining_a_processor_starts_it_empty(kind: str) -> None:
    d = driver()
    pattern = {"kind": kind, "within_s": 60, **({"event": "E", "count": 2} if kind == "count"
                                                  else {"first": "E", "missing": "F"})}
    definition = {"source": {"category": "o"}, "group_by": "g", "emit": "alerts.x", "pattern": pattern}
    d.ok("processor.put", name="p", definition=definition)
    at(d, 0, "es.append", stream="o-1", events=[{"type": "E", "data": {"g": "1"}}])
    d.ok("processor.put", name="p", definition=definition)
    assert d.sm.streams.items["p"].describe()["pending"] == 0 and d.sm.streams.next_due_ms() is None
