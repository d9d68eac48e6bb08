"""The event store, the write side of CQRS (pure): streams of events, one
stream per aggregate, appended with optimistic concurrency.

A stream is named by its id (``order-17``). Its events have versions 0, 1,
2... in the order they were appended; an append names the version it
expects the stream to be at (``expected_version``: a version, ``-1`` or
``"no_stream"`` for a stream that does not exist yet, ``"exists"``, or
``"any"``), and is refused with ``conflict`` (409) when the stream moved on,
so two writers of one aggregate cannot both succeed from the same state.
An append of several events is atomic: all of them or none.

Every event also gets a global ``position`` (1, 2, 3... over the whole
store, in commit order) and the log index and committed time of its append.
Ordering: the events of one stream are in version order; the events of a
category (below) and of the whole store are in position order, which is the
order of the replicated log, the same on every replica.

Categories: the part of a stream id before its first ``-`` (``order`` for
``order-17``). A stream whose id has no ``-`` belongs to no category. A
category can be read and subscribed to as one sequence, and projections
(``coordinator.state.projections``) fold over it.

Idempotent appends: events may carry ids. An append that conflicts, but
whose events all carry ids equal to those of the events stored right after
the version it expected, is the retry of an append that succeeded: it
answers the original result (``duplicate: true``) and stores nothing.

Snapshots and truncation: a client that folds a long stream into a state
may store that state as the stream's snapshot at a version; with
``truncate`` the events up to that version are dropped (the snapshot stands
for them). Reads then start at the first retained version and return the
snapshot beside the events. The store is bounded (events, bytes, streams);
an append that would pass a bound is refused with ``unavailable`` (503) and
stores nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.commands.eventstore import (
    APPEND_MAX,
    EVENT_BYTES_MAX,
    SNAPSHOT_BYTES_MAX,
    EsAppend,
    EsDelete,
    EsSnapshot,
    NewEvent,
    category_of,
    check_append_count,
    check_event_size,
    check_snapshot_size,
)
from coordinator.errors import InvariantError
from coordinator.state.base import ApplyContext, Rejected, approx_size, charge, over_quota


@dataclass(frozen=True, slots=True)
class EventStoreLimits:
    """The store's bounds. The per-command ones can only be lower than the
    caps every command's parse checks (``coordinator.commands.eventstore``)."""

    events_max: int = 200_000  # retained events, all streams
    bytes_max: int = 256 << 20  # their data and metadata, by ``approx_size``
    streams_max: int = 100_000
    append_max: int = APPEND_MAX  # events in one append
    event_bytes_max: int = EVENT_BYTES_MAX  # one event's data + metadata
    snapshot_bytes_max: int = SNAPSHOT_BYTES_MAX

    def __post_init__(self) -> None:
        for name, cap in (("append_max", APPEND_MAX), ("event_bytes_max", EVENT_BYTES_MAX),
                          ("snapshot_bytes_max", SNAPSHOT_BYTES_MAX)):
            if getattr(self, name) > cap:
                raise InvariantError(f"EventStoreLimits.{name}: at most {cap}, the cap of every command's parse")


@dataclass(slots=True)
class StoredEvent:
    position: int
    stream: str
    version: int
    type: str
    data: Any
    metadata: dict[str, Any] | None
    event_id: str | None
    time_ms: int
    index: int
    size: int
    owner: str | None = None  # the principal that appended it (charged for its size)

    def describe(self) -> dict[str, Any]:
        return {"position": self.position, "stream": self.stream, "version": self.version, "type": self.type,
                "data": self.data, "metadata": self.metadata, "id": self.event_id, "time_ms": self.time_ms,
                "index": self.index}

    def to_data(self) -> list[Any]:
        return [self.position, self.stream, self.version, self.type, self.data, self.metadata, self.event_id,
                self.time_ms, self.index, self.size, self.owner]

    @classmethod
    def from_data(cls, data: list[Any]) -> StoredEvent:
        return cls(*data)  # rows written before owners were kept have none


@dataclass(slots=True)
class Stream:
    id: str
    events: list[StoredEvent] = field(default_factory=list)
    first_version: int = 0  # the version of events[0] (after a truncation: the snapshot's version + 1)
    version: int = -1  # the last version appended (-1: none yet)
    snapshot: dict[str, Any] | None = None  # {"version", "state", "time_ms", "index"}
    created_index: int = 0

    def describe(self) -> dict[str, Any]:
        return {"stream": self.id, "category": category_of(self.id), "version": self.version,
                "first_version": self.first_version, "retained": len(self.events),
                "snapshot_version": self.snapshot["version"] if self.snapshot else None}


@dataclass(slots=True)
class CategoryLog:
    """A category's retained events in position order, and the highest
    position dropped from it (a reader from at or below it has missed some)."""

    events: list[StoredEvent] = field(default_factory=list)
    dropped_through: int = 0


class EventStore:
    def __init__(self, limits: EventStoreLimits | None = None) -> None:
        self.limits = limits or EventStoreLimits()
        self.streams: dict[str, Stream] = {}
        self.categories: dict[str, CategoryLog] = {}
        self.position = 0  # the last position given
        self.events_count = 0
        self.bytes = 0
        self.owned: dict[str, int] = {}  # principal -> the size of the events it appended
        self.counters: dict[str, int] = {"appended": 0, "duplicates": 0, "truncated": 0, "deleted": 0}

    # -- commands ------------------------------------------------------------------------------

    def check_append(self, command: EsAppend) -> None:
        """Refuse an append over this store's own limits on one append (lower
        than the parse's caps when configured so); the API runs it too, before proposing."""
        if self.limits.append_max < APPEND_MAX:  # else the parse checked it
            check_append_count(len(command.events), self.limits.append_max)
        if self.limits.event_bytes_max < EVENT_BYTES_MAX:
            for i, event in enumerate(command.events):
                check_event_size(f"events[{i}]", event.size, self.limits.event_bytes_max)

    def append(self, ctx: ApplyContext, command: EsAppend, check_owner: Callable[[int], None] | None = None
               ) -> tuple[dict[str, Any], list[StoredEvent]]:
        """The result, and the events stored (none for a duplicate), charged
        to ``ctx.principal``; ``check_owner(size)`` may refuse them first."""
        self.check_append(command)
        stream_id, expected, events = command.stream, command.expected, command.events
        stream = self.streams.get(stream_id)
        current = stream.version if stream is not None else None
        if not _expected_matches(expected, current):
            duplicate = self._duplicate_of(stream, expected, events)
            if duplicate is not None:
                self.counters["duplicates"] += 1
                return duplicate, []
            at = "does not exist" if current is None else f"is at version {current}"
            raise Rejected("conflict", f"expected_version: stream {stream_id!r} {at}, expected {expected}")
        size = sum(e.size for e in events)
        if stream is None and len(self.streams) >= self.limits.streams_max:
            raise Rejected("unavailable", f"the event store holds {self.limits.streams_max} streams")
        if self.bytes + size > self.limits.bytes_max:
            raise over_quota("eventstore_bytes_max", f"the event store holds about {self.bytes} bytes (at most "
                                                     f"{self.limits.bytes_max}) and this adds {size}; truncate "
                                                     "streams below their snapshots or delete streams")
        if check_owner is not None:
            check_owner(size)
        if self.events_count + len(events) > self.limits.events_max:
            raise Rejected("unavailable", f"the event store is full ({self.events_count} events, about "
                                          f"{self.bytes} bytes); truncate streams below their snapshots or "
                                          "delete streams")
        if stream is None:
            stream = self.streams[stream_id] = Stream(stream_id, created_index=ctx.index)
        category = category_of(stream_id)
        log = None
        if category is not None:
            log = self.categories.get(category)
            if log is None:
                log = self.categories[category] = CategoryLog()
        stored = []
        for event in events:
            self.position += 1
            stream.version += 1
            item = StoredEvent(self.position, stream_id, stream.version, event.type, event.data, event.metadata,
                               event.id, ctx.now_ms, ctx.index, event.size, ctx.principal)
            charge(self.owned, ctx.principal, event.size)
            stream.events.append(item)
            if log is not None:
                log.events.append(item)
            stored.append(item)
        self.events_count += len(stored)
        self.bytes += size
        self.counters["appended"] += len(stored)
        return _append_result(stream_id, stored, ctx.index), stored

    def _duplicate_of(self, stream: Stream | None, expected: int | str, events: tuple[NewEvent, ...]) \
            -> dict[str, Any] | None:
        if expected == "no_stream":
            expected = -1
        if stream is None or not isinstance(expected, int) or any(e.id is None for e in events):
            return None
        start = expected + 1 - stream.first_version
        if start < 0 or start + len(events) > len(stream.events):
            return None
        stored = stream.events[start:start + len(events)]
        if [s.event_id for s in stored] != [e.id for e in events]:
            return None
        return {**_append_result(stream.id, stored, stored[-1].index), "duplicate": True}

    def snapshot(self, ctx: ApplyContext, command: EsSnapshot) -> dict[str, Any]:
        stream = self._stream(command.stream)
        version = command.version
        if self.limits.snapshot_bytes_max < SNAPSHOT_BYTES_MAX:
            check_snapshot_size(approx_size(command.state), self.limits.snapshot_bytes_max)
        if version > stream.version:
            raise Rejected("conflict", f"version: stream {stream.id!r} is at version {stream.version}, "
                                       f"a snapshot at {version} would cover events it does not have")
        if stream.snapshot is not None and version < stream.snapshot["version"]:
            raise Rejected("conflict", f"version: the stream has a snapshot at version "
                                       f"{stream.snapshot['version']} already")
        stream.snapshot = {"version": version, "state": command.state, "time_ms": ctx.now_ms, "index": ctx.index}
        dropped = self._truncate(stream, version + 1) if command.truncate else 0
        return {"stream": stream.id, "snapshot_version": version, "first_version": stream.first_version,
                "dropped": dropped}

    def delete(self, ctx: ApplyContext, command: EsDelete) -> dict[str, Any]:
        stream = self._stream(command.stream)
        expected = command.expected
        if not _expected_matches(expected, stream.version):
            raise Rejected("conflict", f"expected_version: stream {stream.id!r} is at version {stream.version}, "
                                       f"expected {expected}")
        dropped = self._truncate(stream, stream.version + 1)
        del self.streams[stream.id]
        self.counters["deleted"] += 1
        return {"stream": stream.id, "version": stream.version, "dropped": dropped}

    def _stream(self, stream_id: str) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise Rejected("not_found", f"stream {stream_id!r} does not exist")
        return stream

    def _truncate(self, stream: Stream, before_version: int) -> int:
        """Drop the stream's events with a version below ``before_version``."""
        count = max(0, min(before_version - stream.first_version, len(stream.events)))
        if count == 0:
            stream.first_version = max(stream.first_version, before_version)
            return 0
        gone = stream.events[:count]
        del stream.events[:count]
        stream.first_version = before_version
        self.events_count -= count
        self.bytes -= sum(e.size for e in gone)
        for event in gone:
            charge(self.owned, event.owner, -event.size)
        self.counters["truncated"] += count
        category = category_of(stream.id)
        if category is not None:
            log = self.categories[category]
            positions = {e.position for e in gone}
            log.events = [e for e in log.events if e.position not in positions]
            log.dropped_through = max(log.dropped_through, gone[-1].position)
        return count

    # -- reads ----------------------------------------------------------------------------------

    def read_stream(self, stream_id: str, from_version: int, limit: int, backward: bool = False) \
            -> dict[str, Any] | None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return None
        if backward:
            end = min(from_version, stream.version) - stream.first_version + 1
            start = max(0, end - limit)
            page = list(reversed(stream.events[start:max(0, end)]))
            next_version = page[-1].version - 1 if len(page) == limit and page[-1].version > stream.first_version \
                else None
        else:
            start = max(0, from_version - stream.first_version)
            page = stream.events[start:start + limit]
            next_version = page[-1].version + 1 if page and page[-1].version < stream.version else None
        return {**stream.describe(), "snapshot": stream.snapshot, "events": [e.describe() for e in page],
                "next_version": next_version}

    def read_category(self, category: str, from_position: int, limit: int) -> dict[str, Any]:
        log = self.categories.get(category)
        events = log.events if log is not None else []
        start = _first_at_or_after(events, from_position)
        page = events[start:start + limit]
        return {"category": category, "events": [e.describe() for e in page],
                "next_position": page[-1].position + 1 if page else max(from_position, 1),
                "head_position": self.position,
                "dropped_through": log.dropped_through if log is not None else 0}

    def category_since(self, category: str, from_position: int, limit: int) -> list[StoredEvent]:
        log = self.categories.get(category)
        if log is None:
            return []
        start = _first_at_or_after(log.events, from_position)
        return log.events[start:start + limit]

    def list_streams(self, category: str | None, after: str, limit: int) -> list[dict[str, Any]]:
        names = sorted(s for s in self.streams if s > after and (category is None or category_of(s) == category))
        return [self.streams[name].describe() for name in names[:limit]]

    def describe(self) -> dict[str, Any]:
        return {"streams": len(self.streams), "categories": len(self.categories), "events": self.events_count,
                "bytes": self.bytes, "position": self.position, "counters": dict(self.counters)}

    # -- snapshots of the state machine ---------------------------------------------------------

    def to_data(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "counters": self.counters,
            "streams": [[s.id, s.first_version, s.version, s.snapshot, s.created_index,
                         [e.to_data() for e in s.events]] for s in self.streams.values()],
            "dropped": {name: log.dropped_through for name, log in self.categories.items()},
        }

    @classmethod
    def from_data(cls, data: dict[str, Any], limits: EventStoreLimits | None = None) -> EventStore:
        store = cls(limits)
        store.position = data["position"]
        store.counters = dict(data["counters"])
        every: list[StoredEvent] = []
        for stream_id, first_version, version, snapshot, created_index, events in data["streams"]:
            stream = Stream(stream_id, [StoredEvent.from_data(e) for e in events], first_version, version, snapshot,
                            created_index)
            store.streams[stream_id] = stream
            every.extend(stream.events)
        every.sort(key=lambda e: e.position)
        for name, dropped in data["dropped"].items():
            store.categories[name] = CategoryLog(dropped_through=dropped)
        for event in every:
            category = category_of(event.stream)
            if category is not None:
                store.categories.setdefault(category, CategoryLog()).events.append(event)
        store.events_count = len(every)
        store.bytes = sum(e.size for e in every)
        for event in every:
            charge(store.owned, event.owner, event.size)
        return store


def _expected_matches(expected: int | str, current: int | None) -> bool:
    """``current``: the stream's version, None when it does not exist."""
    if expected == "any":
        return True
    if expected in ("no_stream", -1):
        return current is None or current == -1
    if expected == "exists":
        return current is not None
    return current == expected


def _append_result(stream: str, stored: list[StoredEvent], index: int) -> dict[str, Any]:
    return {"stream": stream, "first_version": stored[0].version, "version": stored[-1].version,
            "positions": [e.position for e in stored], "index": index}


def _first_at_or_after(events: list[StoredEvent], position: int) -> int:
    low, high = 0, len(events)
    while low < high:
        mid = (low + high) // 2
        if events[mid].position < position:
            low = mid + 1
        else:
            high = mid
    return low
