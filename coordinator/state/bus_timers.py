"""The bus's timers: one heap of due times, fired only by ``bus.tick`` (the
leader proposes it, so one clock decides every timeout).

Each kind of timer is its own small frozen type. They are tuples whose first
two fields are the due time and a number unique to the timer (``Timers.seq``),
so the heap orders them by (due time, number) whatever their kind, and its pop
order is fixed by its contents on every replica.

A snapshot keeps each timer as the row the bus always wrote,
``[due_ms, n, kind, key, a, b, c]`` (``to_row``/``timer_from_row``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any, NamedTuple

from coordinator.errors import InvariantError

TIMER_COMPACT_EVERY = 4096


class RedeliverTimer(NamedTuple):
    """A pending or delayed entry's due time: back to ready, or dead, unless it
    was acked, nacked again or the consumer was made again since."""

    due_ms: int
    n: int
    consumer: str  # the consumer's key
    seq: int  # the entry
    attempts: int  # the attempts the entry had when the timer was set
    created_index: int  # the consumer's, so a consumer made again is not touched

    def to_row(self) -> list[Any]:
        return [self.due_ms, self.n, "redeliver", self.consumer, self.seq, self.attempts, self.created_index]


class TtlTimer(NamedTuple):
    """A held message's TTL: its waiting entries go to the dead letters."""

    due_ms: int
    n: int
    topic: str
    offset: int

    def to_row(self) -> list[Any]:
        return [self.due_ms, self.n, "ttl", self.topic, self.offset, 0, 0]


class AgeTimer(NamedTuple):
    """A topic's retention by age: trim what got too old (only the topic's
    current ``age_timer_ms`` counts; an older one is ignored)."""

    due_ms: int
    n: int
    topic: str

    def to_row(self) -> list[Any]:
        return [self.due_ms, self.n, "age", self.topic, 0, 0, 0]


Timer = RedeliverTimer | TtlTimer | AgeTimer


def timer_from_row(row: list[Any]) -> Timer:
    due_ms, n, kind, key, a, b, c = row
    if kind == "redeliver":
        return RedeliverTimer(due_ms, n, key, a, b, c)
    if kind == "ttl":
        return TtlTimer(due_ms, n, key, a)
    if kind == "age":
        return AgeTimer(due_ms, n, key)
    raise InvariantError(f"unknown bus timer {kind!r}")


class Timers:
    """The heap of due times. ``live`` (set by the bus) says whether a timer
    can still do anything; every ``TIMER_COMPACT_EVERY`` timers the dead ones
    are dropped. Triggered by ``seq``, which every replica shares, so every
    replica compacts at the same point."""

    def __init__(self) -> None:
        self.heap: list[Timer] = []
        self.seq = 0
        self.live: Callable[[Timer], bool] = lambda timer: True

    def __len__(self) -> int:
        return len(self.heap)

    def redeliver(self, due_ms: int, consumer: str, seq: int, attempts: int, created_index: int) -> None:
        self.seq += 1
        self._push(RedeliverTimer(due_ms, self.seq, consumer, seq, attempts, created_index))

    def ttl(self, due_ms: int, topic: str, offset: int) -> None:
        self.seq += 1
        self._push(TtlTimer(due_ms, self.seq, topic, offset))

    def age(self, due_ms: int, topic: str) -> None:
        self.seq += 1
        self._push(AgeTimer(due_ms, self.seq, topic))

    def _push(self, timer: Timer) -> None:
        heapq.heappush(self.heap, timer)
        if self.seq % TIMER_COMPACT_EVERY == 0:
            self.compact()

    def compact(self) -> None:
        live = [t for t in self.heap if self.live(t)]
        if len(live) < len(self.heap):
            heapq.heapify(live)
            self.heap = live

    def next_due_ms(self) -> int | None:
        return self.heap[0].due_ms if self.heap else None

    def pop_due(self, now_ms: int) -> Timer | None:
        """The next timer due at ``now_ms`` (None: none is)."""
        if self.heap and self.heap[0].due_ms <= now_ms:
            return heapq.heappop(self.heap)
        return None

    def to_data(self) -> list[list[Any]]:
        return [t.to_row() for t in sorted(self.heap)]

    def restore(self, rows: list[list[Any]], seq: int) -> None:
        """The heap as a snapshot kept it (rows in heap order are a heap)."""
        self.heap = [timer_from_row(row) for row in rows]
        self.seq = seq
