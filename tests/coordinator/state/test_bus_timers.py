"""The bus's timers: one named type per kind, kept in a snapshot as the row the bus always wrote."""

from __future__ import annotations

import pytest

from coordinator.errors import InvariantError
from coordinator.state.bus_timers import AgeTimer, RedeliverTimer, Timers, TtlTimer, timer_from_row


def test_each_kind_keeps_its_row() -> None:
    rows = [[5, 1, "redeliver", "s:sub-1", 7, 2, 3], [5, 2, "ttl", "orders", 9, 0, 0], [6, 3, "age", "orders", 0, 0, 0]]
    timers = [timer_from_row(row) for row in rows]
    assert timers == [RedeliverTimer(5, 1, "s:sub-1", 7, 2, 3), TtlTimer(5, 2, "orders", 9), AgeTimer(6, 3, "orders")]
    assert [t.to_row() for t in timers] == rows


def test_an_unknown_kind_is_an_invariant_error() -> None:
    with pytest.raises(InvariantError):
        timer_from_row([1, 1, "bogus", "k", 0, 0, 0])


def test_the_heap_orders_every_kind_by_due_time_then_number() -> None:
    timers = Timers()
    timers.age(30, "a")
    timers.ttl(10, "t", 1)
    timers.redeliver(10, "s:x", 1, 1, 1)
    assert timers.next_due_ms() == 10
    assert timers.pop_due(9) is None
    assert [timers.pop_due(100) for _ in range(3)] == [TtlTimer(10, 2, "t", 1), RedeliverTimer(10, 3, "s:x", 1, 1, 1),
                                                        AgeTimer(30, 1, "a")]
    assert timers.pop_due(100) is None and timers.next_due_ms() is None


def test_a_snapshot_restores_the_same_heap() -> None:
    timers = Timers()
    for due in (50, 20, 40, 10):
        timers.ttl(due, "t", due)
    restored = Timers()
    restored.restore(timers.to_data(), timers.seq)
    assert restored.to_data() == timers.to_data() and restored.seq == 4
    assert [restored.pop_due(100).due_ms for _ in range(4)] == [10, 20, 40, 50]  # type: ignore[union-attr]
