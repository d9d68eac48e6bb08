"""Projections, the read side of CQRS (pure): declared folds over a
category of the event store or over bus events, kept up to date by every
replica as the log is applied.

A definition::

    {"source": {"category": "order"} | {"topic": "task.>"},
     "types": ["OrderPlaced", ...],          # category sources: event types to fold (default all)
     "fold": "count" | "sum" | "min" | "max" | "last" | "set",
     "field": "amount",                      # dotted path into the event's data
     "group_by": "status"}                   # optional dotted path: one result per value

A category projection folds the events appended to the streams of that
category (``data`` is the event's data). A topic projection folds bus
messages of type ``event`` published on topics matching the pattern, and
the cluster's own events (``agent.*``, ``lock.*``, ``system.*``, ``saga.*``)
whose type matches it (``data`` is the payload).

Folds: ``count`` counts the events; ``sum``, ``min``, ``max`` take the
number at ``field`` (events where it is missing or not a number are
``skipped``); ``last`` keeps the value at ``field`` (the whole data without
a field); ``set`` keeps the distinct scalar values at ``field``. With
``group_by`` each fold runs per value of that path (a string, number or
boolean; events without one are skipped); group keys and set members are
compared by their text (``"1"`` and ``1`` are one). Groups and set members
are bounded; what does not fit is counted in ``overflow``.

Consistency: every projection says the log ``index`` (and for categories
the store ``position``) of the last event it folded; a read after a read
barrier reflects every event committed before it. Creating or replacing a
projection, and ``rebuild``, fold what the source still retains (events
dropped by a stream truncation, bus messages past their topic's retention,
cluster events past the event log's window are gone): the result says
from which position or index it starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from coordinator.commands.topics import matches
from coordinator.state.base import Rejected

INT_LIMIT = 2**63 - 1  # a sum beyond it becomes a float (the codec carries 64-bit integers)


@dataclass(frozen=True, slots=True)
class ProjectionLimits:
    projections_max: int = 256
    groups_max: int = 10_000
    set_max: int = 10_000


@dataclass(frozen=True, slots=True)
class Folded:
    """One event as a projection sees it."""

    type: str  # the event type (category) or the topic (bus)
    data: Any
    time_ms: int
    index: int
    position: int = 0  # the store position (category sources)


_MISSING = object()


def lookup(data: Any, path: str | None) -> Any:
    """The value at a dotted path in ``data`` (the whole data for None), or ``_MISSING``."""
    if path is None:
        return data
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def scalar_key(value: Any) -> str | None:
    """The text a group key or set member is compared by; None when not a scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def step(fold: str, acc: Any, value: Any, limits: ProjectionLimits) -> tuple[Any, str | None]:
    """Fold one value into ``acc``: the new accumulator, and "skipped" or
    "overflow" when the value did not count."""
    if fold == "count":
        return acc + 1, None
    if value is _MISSING:
        return acc, "skipped"
    if fold == "last":
        return value, None
    if fold == "set":
        key = scalar_key(value)
        if key is None:
            return acc, "skipped"
        if key not in acc:
            if len(acc) >= limits.set_max:
                return acc, "overflow"
            acc[key] = value
        return acc, None
    if not _number(value):
        return acc, "skipped"
    if fold == "sum":
        total = acc + value
        if isinstance(total, int) and abs(total) > INT_LIMIT:
            total = float(total)
        return total, None
    if acc is None:
        return value, None
    return (min(acc, value) if fold == "min" else max(acc, value)), None


def initial(fold: str) -> Any:
    return {"count": 0, "sum": 0, "set": {}}.get(fold)


def render(fold: str, acc: Any) -> Any:
    if fold == "set":
        return [acc[k] for k in sorted(acc)]
    return acc


@dataclass(slots=True)
class Projection:
    name: str
    definition: dict[str, Any]
    created_index: int
    acc: Any = None  # the fold's accumulator; with group_by, {key: accumulator}
    events: int = 0
    skipped: int = 0
    overflow: int = 0
    position: int = 0
    index: int = 0
    time_ms: int | None = None
    rebuilt_index: int = 0
    from_position: int = 0  # where the last rebuild started (the oldest event the source still held)
    from_index: int = 0

    def reset(self) -> None:
        self.acc = {} if self.definition["group_by"] is not None else initial(self.definition["fold"])
        self.events = self.skipped = self.overflow = self.position = self.index = 0
        self.time_ms = None
        self.from_position = self.from_index = 0

    def wants(self, event_type: str) -> bool:
        types = self.definition["types"]
        return types is None or event_type in types

    def fold(self, event: Folded, limits: ProjectionLimits) -> None:
        definition = self.definition
        fold = definition["fold"]
        if self.events == 0 and self.skipped == 0 and self.overflow == 0:
            self.from_position, self.from_index = event.position, event.index
        self.position, self.index, self.time_ms = event.position or self.position, event.index, event.time_ms
        value = lookup(event.data, definition["field"])
        outcome: str | None
        if definition["group_by"] is None:
            self.acc, outcome = step(fold, self.acc, value, limits)
        else:
            key = scalar_key(lookup(event.data, definition["group_by"]))
            if key is None:
                outcome = "skipped"
            elif key not in self.acc and len(self.acc) >= limits.groups_max:
                outcome = "overflow"
            else:
                self.acc[key], outcome = step(fold, self.acc.get(key, initial(fold)), value, limits)
        if outcome == "skipped":
            self.skipped += 1
        elif outcome == "overflow":
            self.overflow += 1
        else:
            self.events += 1

    def value(self) -> Any:
        fold = self.definition["fold"]
        if self.definition["group_by"] is None:
            return render(fold, self.acc)
        return {key: render(fold, self.acc[key]) for key in sorted(self.acc)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.definition, "value": self.value(), "events": self.events,
                "skipped": self.skipped, "overflow": self.overflow, "position": self.position, "index": self.index,
                "time_ms": self.time_ms, "created_index": self.created_index, "rebuilt_index": self.rebuilt_index,
                "from_position": self.from_position, "from_index": self.from_index}

    def to_data(self) -> list[Any]:
        # a set's accumulator is a dict keyed by texts: the codec carries it as it is
        return [self.name, self.definition, self.created_index, self.acc, self.events, self.skipped, self.overflow,
                self.position, self.index, self.time_ms, self.rebuilt_index, self.from_position, self.from_index]

    @classmethod
    def from_data(cls, row: list[Any]) -> Projection:
        return cls(*row)


@dataclass(slots=True)
class Projections:
    limits: ProjectionLimits = field(default_factory=ProjectionLimits)
    items: dict[str, Projection] = field(default_factory=dict)

    def put(self, index: int, name: str, definition: dict[str, Any], source: Iterable[Folded]) -> dict[str, Any]:
        """Create or replace a projection (``definition``: normalized, as
        ``ProjectionPut`` has it) and fold what its source retains."""
        if name not in self.items and len(self.items) >= self.limits.projections_max:
            raise Rejected("unavailable", f"too many projections ({self.limits.projections_max})")
        existing = self.items.get(name)
        created = existing.created_index if existing is not None and existing.definition == definition else index
        projection = Projection(name, definition, created)
        self.items[name] = projection
        self._refold(projection, index, source)
        return projection.describe()

    def rebuild(self, index: int, name: str, source: Iterable[Folded]) -> dict[str, Any]:
        projection = self.get(name)
        self._refold(projection, index, source)
        return projection.describe()

    def _refold(self, projection: Projection, index: int, source: Iterable[Folded]) -> None:
        projection.reset()
        projection.rebuilt_index = index
        for event in source:
            if projection.wants(event.type):
                projection.fold(event, self.limits)

    def delete(self, name: str) -> dict[str, Any]:
        projection = self.get(name)
        del self.items[projection.name]
        return {"name": projection.name, "deleted": True}

    def get(self, name: str) -> Projection:
        projection = self.items.get(name)
        if projection is None:
            raise Rejected("not_found", f"projection {name!r} does not exist")
        return projection

    def feed_category(self, category: str, events: Iterable[Folded]) -> None:
        targets = [p for p in self.items.values() if p.definition["source"].get("category") == category]
        if not targets:
            return
        for event in events:
            for projection in targets:
                if projection.wants(event.type):
                    projection.fold(event, self.limits)

    def feed_topic(self, event: Folded) -> None:
        for projection in self.items.values():
            pattern = projection.definition["source"].get("topic")
            if pattern is not None and matches(pattern, event.type):
                projection.fold(event, self.limits)

    def has_topic_sources(self) -> bool:
        return any("topic" in p.definition["source"] for p in self.items.values())

    def to_data(self) -> list[Any]:
        return [p.to_data() for p in self.items.values()]

    @classmethod
    def from_data(cls, rows: list[Any], limits: ProjectionLimits | None = None) -> Projections:
        projections = cls(limits or ProjectionLimits())
        for row in rows:
            projection = Projection.from_data(row)
            projections.items[projection.name] = projection
        return projections
