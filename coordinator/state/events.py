"""The replicated event sequence: agent.*, lock.* and system.* events.

Retention is bounded by count and by bytes (``approx_size`` of each event's
data: agents' metadata travels in them); ``first_seq`` says where the retained window
starts, so a watcher asking for older events learns they were compacted.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from coordinator.state.base import ApplyContext, approx_size
from coordinator.types import Event


class EventLog:
    def __init__(self, retained_max: int, bytes_max: int = 32 << 20) -> None:
        self.retained_max = retained_max
        self.bytes_max = bytes_max
        self.last_seq = 0
        self.bytes = 0
        self._events: deque[Event] = deque()
        self._sizes: deque[int] = deque()

    def _keep(self, event: Event) -> None:
        size = approx_size(event.data) + len(event.type) + 32
        self._events.append(event)
        self._sizes.append(size)
        self.bytes += size
        while len(self._events) > self.retained_max or (self.bytes > self.bytes_max and len(self._events) > 1):
            self._events.popleft()
            self.bytes -= self._sizes.popleft()

    def emit(self, ctx: ApplyContext, type_: str, data: dict[str, Any]) -> Event:
        self.last_seq += 1
        event = Event(seq=self.last_seq, type=type_, data=data, time_ms=ctx.now_ms, index=ctx.index)
        self._keep(event)
        ctx.events.append(event)
        return event

    @property
    def first_seq(self) -> int:
        """The oldest retained sequence number (``last_seq + 1`` when empty)."""
        return self._events[0].seq if self._events else self.last_seq + 1

    def since(self, seq: int, limit: int) -> list[Event]:
        """Retained events with ``event.seq >= seq``, oldest first."""
        if not self._events or seq > self.last_seq:
            return []
        start = max(0, seq - self._events[0].seq)
        out = []
        for i in range(start, len(self._events)):
            if len(out) >= limit:
                break
            out.append(self._events[i])
        return out

    def to_data(self) -> dict[str, Any]:
        return {
            "last_seq": self.last_seq,
            "events": [[e.seq, e.type, e.data, e.time_ms, e.index] for e in self._events],
        }

    @classmethod
    def from_data(cls, data: dict[str, Any], retained_max: int, bytes_max: int = 32 << 20) -> EventLog:
        log = cls(retained_max, bytes_max)
        log.last_seq = data["last_seq"]
        for s, t, d, tm, i in data["events"]:
            log._keep(Event(seq=s, type=t, data=d, time_ms=tm, index=i))
        return log
