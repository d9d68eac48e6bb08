"""Stream processing over committed events (pure): windowed aggregation and
complex event patterns, emitting derived events.

A processor reads a source like a projection does (a category of the event
store, or bus events on a topic pattern and the cluster's own events) and
has either a ``window`` or a ``pattern``::

    {"source": {"topic": "task.failed"}, "group_by": "agentId",
     "window": {"kind": "tumbling", "size_s": 60}, "lateness_s": 5,
     "fold": "count", "emit": "stats.failures"}

    {"source": {"topic": "task.*"}, "group_by": "agentId",
     "pattern": {"kind": "count", "event": "task.failed", "count": 3, "within_s": 60},
     "emit": "alerts.flaky", "action": {"agent_health": "unhealthy"}}

Time is the committed time of each event (the ``now_ms`` of the command
that carried it), and a window closes or a pattern's deadline passes when a
committed command's time reaches it (the leader proposes ``streams.tick``
when one is due and nothing else is committed). Every replica therefore
computes the same windows and matches, and a leader change changes nothing:
a result is emitted once, by the command whose time closed its window.

Windows: ``tumbling`` (``size_s``) or ``sliding`` (``size_s`` every
``slide_s``; ``size_s`` a multiple of ``slide_s``), over ``[start, end)``
aligned to the epoch, one per ``group_by`` value, folded like projections
(count, sum, min, max, last, set). A window closes at ``end + lateness_s``:
an event stamped earlier than the latest time seen (a new leader's clock
behind the old one's) still lands in its window until then; after that it
is ``late`` and counted, not folded. A closed window emits one event:
``{"processor", "window": {"start_ms", "end_ms"}, "group", "value", "events"}``.

Patterns, per ``group_by`` value (NAME is an event type for a category
source, a topic pattern for a topic source):

- ``sequence``: ``first`` followed by ``then`` within ``within_s`` (each
  ``first`` matches at most once, the oldest first);
- ``count``: ``count`` occurrences of ``event`` within ``within_s`` (the
  window restarts after a match);
- ``absence``: ``first`` not followed by ``missing`` within ``within_s``
  (emitted when the deadline passes).

A match emits ``{"processor", "pattern", "group", ...times}``. Derived events
are bus messages of type ``event`` on the ``emit`` topic (source
``coordinator.streams``); they feed projections but not processors, so
processors cannot loop. ``action: {"agent_health": STATE}`` also sets the
health of the agent whose id is the group value, through the registry (the
real ``agent.health.changed`` event follows).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from coordinator.commands.streams import ProcessorDelete, ProcessorPut
from coordinator.commands.topics import matches
from coordinator.state.base import Rejected
from coordinator.state.projections import Folded, ProjectionLimits, initial, lookup, render, scalar_key, step

NO_GROUP = ""  # the key of "no group_by" (group keys are "=" + the value's text)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    processors_max: int = 128
    open_max: int = 10_000  # open windows, or pending first events, per processor
    pending_per_group_max: int = 1000


@dataclass(frozen=True, slots=True)
class Emission:
    """What the machine must do for a processor: publish ``payload`` on
    ``topic`` (when given) and set an agent's health (when ``health``)."""

    processor: str
    topic: str | None
    payload: dict[str, Any]
    agent: str | None = None
    health: str | None = None


def _group(data: Any, group_by: str | None) -> str | None:
    """The group key of an event ("" without group_by), or None when it has no usable value."""
    if group_by is None:
        return NO_GROUP
    key = scalar_key(lookup(data, group_by))
    return None if key is None else "=" + key


def _shown(group: str) -> str | None:
    return None if group == NO_GROUP else group[1:]


@dataclass(slots=True)
class Processor:
    name: str
    definition: dict[str, Any]
    created_index: int
    windows: dict[str, list[Any]] = field(default_factory=dict)  # "start|group" -> [start, group, acc, events]
    pending: dict[str, list[int]] = field(default_factory=dict)  # group -> times of first events, oldest first
    clock_ms: int = 0  # the latest committed time this processor has seen
    counters: dict[str, int] = field(default_factory=lambda: {"events": 0, "late": 0, "skipped": 0, "overflow": 0,
                                                              "emitted": 0, "dropped": 0})

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.definition, "created_index": self.created_index,
                "open_windows": len(self.windows), "pending": sum(len(v) for v in self.pending.values()),
                "clock_ms": self.clock_ms, **self.counters}

    def to_data(self) -> list[Any]:
        return [self.name, self.definition, self.created_index, self.windows, self.pending, self.clock_ms,
                self.counters]

    @classmethod
    def from_data(cls, row: list[Any]) -> Processor:
        name, definition, created_index, windows, pending, clock_ms, counters = row
        return cls(name, definition, created_index, {k: list(v) for k, v in windows.items()},
                   {k: list(v) for k, v in pending.items()}, clock_ms, dict(counters))

    def name_matches(self, name: str, event_type: str) -> bool:
        if "topic" in self.definition["source"]:
            return matches(name, event_type)
        return name == event_type


class Streams:
    def __init__(self, limits: StreamLimits | None = None) -> None:
        self.limits = limits or StreamLimits()
        self.items: dict[str, Processor] = {}
        # (due_ms, processor, created_index, kind, key, first_ms): stale entries are skipped when popped
        self._timers: list[tuple[int, str, int, str, str, int]] = []

    # -- definitions -----------------------------------------------------------------------

    def put(self, index: int, command: ProcessorPut) -> dict[str, Any]:
        name = command.name
        if name not in self.items and len(self.items) >= self.limits.processors_max:
            raise Rejected("unavailable", f"too many stream processors ({self.limits.processors_max})")
        self.items[name] = Processor(name, command.spec, index)  # a new definition starts empty
        return self.items[name].describe()

    def delete(self, command: ProcessorDelete) -> dict[str, Any]:
        name = command.name
        if self.items.pop(name, None) is None:
            raise Rejected("not_found", f"stream processor {name!r} does not exist")
        return {"name": name, "deleted": True}

    # -- events ------------------------------------------------------------------------------

    def feed(self, source_kind: str, source_name: str, event: Folded) -> list[Emission]:
        """One committed event of a category (``source_kind`` "category") or a topic."""
        out: list[Emission] = []
        for processor in self.items.values():
            source = processor.definition["source"]
            if source_kind == "category":
                if source.get("category") != source_name:
                    continue
                types = processor.definition["types"]
                if types is not None and event.type not in types:
                    continue
            elif "topic" not in source or not matches(source["topic"], event.type):
                continue
            if "window" in processor.definition:
                self._window_event(processor, event)
            else:
                out += self._pattern_event(processor, event)
        return out

    def _window_event(self, processor: Processor, event: Folded) -> None:
        definition = processor.definition
        window = definition["window"]
        group = _group(event.data, definition["group_by"])
        if group is None:
            processor.counters["skipped"] += 1
            return
        size, slide, lateness = window["size_ms"], window["slide_ms"], definition["lateness_ms"]
        t = event.time_ms
        last_start = t - t % slide
        starts = range(last_start - size + slide, last_start + 1, slide)
        folded_any = False
        counted = "late"  # what the event was, when it was folded into no window
        for start in starts:
            if start + size <= t:
                continue
            if start + size + lateness <= processor.clock_ms:
                continue  # that window has closed: late for it
            key = f"{start}|{group}"
            state = processor.windows.get(key)
            if state is None:
                if len(processor.windows) >= self.limits.open_max:
                    counted = "overflow"
                    continue
                state = processor.windows[key] = [start, group, initial(definition["fold"]), 0]
                heapq.heappush(self._timers, (start + size + lateness, processor.name, processor.created_index,
                                              "window", key, start))
            state[2], outcome = step(definition["fold"], state[2], lookup(event.data, definition["field"]),
                                     _FOLD_LIMITS)
            if outcome is None:
                state[3] += 1
                folded_any = True
            else:
                counted = outcome
        processor.counters["events" if folded_any else counted] += 1
        processor.clock_ms = max(processor.clock_ms, t)

    def _pattern_event(self, processor: Processor, event: Folded) -> list[Emission]:
        definition = processor.definition
        pattern = definition["pattern"]
        kind, within = pattern["kind"], pattern["within_ms"]
        t = event.time_ms
        processor.clock_ms = max(processor.clock_ms, t)
        group = _group(event.data, definition["group_by"])
        if group is None:
            processor.counters["skipped"] += 1
            return []
        first = pattern.get("first") or pattern.get("event")
        is_first = processor.name_matches(first, event.type)
        second = pattern.get("then") or pattern.get("missing")
        is_second = second is not None and processor.name_matches(second, event.type)
        if not is_first and not is_second:
            return []
        processor.counters["events"] += 1
        times = processor.pending.get(group, [])
        while times and times[0] + within < t and kind != "absence":
            times.pop(0)  # too old to match any more
        out: list[Emission] = []
        if is_second and times:
            if kind == "sequence":
                first_ms = times.pop(0)
                out.append(self._match(processor, group, {"first_ms": first_ms, "then_ms": t}))
            elif kind == "absence":
                times.clear()  # the missing event came: no alert for these
        if is_first:
            if len(times) >= self.limits.pending_per_group_max or (
                    group not in processor.pending and self._pending_total(processor) >= self.limits.open_max):
                processor.counters["overflow"] += 1
            else:
                times.append(t)
                if kind == "absence":
                    heapq.heappush(self._timers, (t + within, processor.name, processor.created_index, "absence",
                                                  group, t))
                if kind == "count" and len(times) >= pattern["count"]:
                    out.append(self._match(processor, group, {"count": len(times), "first_ms": times[0],
                                                              "last_ms": t}))
                    times.clear()
        if times:
            processor.pending[group] = times
        else:
            processor.pending.pop(group, None)
        return out

    @staticmethod
    def _pending_total(processor: Processor) -> int:
        return sum(len(v) for v in processor.pending.values())

    def _match(self, processor: Processor, group: str, detail: dict[str, Any]) -> Emission:
        definition = processor.definition
        processor.counters["emitted"] += 1
        payload = {"processor": processor.name, "pattern": definition["pattern"]["kind"], "group": _shown(group),
                   **detail}
        action = definition.get("action")
        return Emission(processor.name, definition["emit"], payload,
                        agent=_shown(group) if action else None, health=action["agent_health"] if action else None)

    # -- time -------------------------------------------------------------------------------

    def next_due_ms(self) -> int | None:
        while self._timers and not self._live(self._timers[0]):
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def _live(self, timer: tuple[int, str, int, str, str, int]) -> bool:
        _due, name, created, kind, key, first_ms = timer
        processor = self.items.get(name)
        if processor is None or processor.created_index != created:
            return False
        if kind == "window":
            return key in processor.windows
        return first_ms in processor.pending.get(key, ())

    def advance(self, now_ms: int) -> list[Emission]:
        """Close the windows and pass the deadlines due at ``now_ms`` (a committed time)."""
        out: list[Emission] = []
        for processor in self.items.values():
            processor.clock_ms = max(processor.clock_ms, now_ms)
        while self._timers and self._timers[0][0] <= now_ms:
            timer = heapq.heappop(self._timers)
            if not self._live(timer):
                continue
            due, name, _created, kind, key, first_ms = timer
            processor = self.items[name]
            if kind == "window":
                start, group, acc, events = processor.windows.pop(key)
                size = processor.definition["window"]["size_ms"]
                processor.counters["emitted"] += 1
                out.append(Emission(name, processor.definition["emit"], {
                    "processor": name, "window": {"start_ms": start, "end_ms": start + size}, "group": _shown(group),
                    "value": render(processor.definition["fold"], acc), "events": events}))
            else:
                times = processor.pending[key]
                times.remove(first_ms)
                if not times:
                    del processor.pending[key]
                out.append(self._match(processor, key, {"first_ms": first_ms, "deadline_ms": due}))
        return out

    # -- snapshots ------------------------------------------------------------------------------

    def to_data(self) -> list[Any]:
        return [p.to_data() for p in self.items.values()]

    @classmethod
    def from_data(cls, rows: list[Any], limits: StreamLimits | None = None) -> Streams:
        streams = cls(limits)
        for row in rows:
            processor = Processor.from_data(row)
            streams.items[processor.name] = processor
            if "window" in processor.definition:
                window, lateness = processor.definition["window"], processor.definition["lateness_ms"]
                for key, (start, _group, _acc, _events) in processor.windows.items():
                    streams._timers.append((start + window["size_ms"] + lateness, processor.name,
                                            processor.created_index, "window", key, start))
            elif processor.definition["pattern"]["kind"] == "absence":
                within = processor.definition["pattern"]["within_ms"]
                for group, times in processor.pending.items():
                    for t in times:
                        streams._timers.append((t + within, processor.name, processor.created_index, "absence",
                                                group, t))
        heapq.heapify(streams._timers)
        return streams


_FOLD_LIMITS = ProjectionLimits()
