"""Commands of stream processors: ``processor.put``, ``processor.delete``,
``streams.tick`` (``coordinator.state.streams`` says what a processor does),
and the checks of a processor's definition.

The log carries a definition as the client sent it (the API proposed it so
before the command types); the parse keeps it so for ``to_args`` and gives
the normalized form the state keeps (``spec``). Whether a processor exists,
and room for another, are the state's to say.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from coordinator.commands.agents import HEALTH_STATES
from coordinator.commands.base import (
    ArglessCommand,
    DomainCommand,
    NamedCommand,
    check_int,
    check_known,
    check_number,
    check_object,
    check_resource_name,
    check_str,
    invalid,
)
from coordinator.commands.projections import check_fold, check_path, normalize_source
from coordinator.commands.topics import check_pattern, check_topic

DEFINITION_FIELDS = ("source", "types", "group_by", "window", "pattern", "fold", "field", "lateness_s", "emit",
                     "action")
WINDOW_KINDS = ("tumbling", "sliding")
PATTERN_KINDS = ("sequence", "count", "absence")
RESERVED = ("agent.", "lock.", "system.")
MAX_SPAN_S = 7 * 86_400.0
MAX_LATENESS_S = 3600.0
MAX_WINDOWS_PER_EVENT = 100  # size_s / slide_s
MAX_NAME_LEN = 128


def check_name(value: Any) -> str:
    """A processor's name (one URL path segment). The API checks a path's
    name with it before reading the body, then parse again."""
    return check_resource_name(value, "name", MAX_NAME_LEN)


def normalize_processor(raw: Any) -> dict[str, Any]:
    """A checked definition in the form the state keeps (times in ms,
    defaults filled in), or ``Rejected`` naming the field."""
    definition = check_object(raw, "definition")
    check_known(definition, "", DEFINITION_FIELDS)
    source, types = normalize_source(definition)
    group_by = definition.get("group_by")
    if group_by is not None:
        check_path(group_by, "group_by")
    emit = definition.get("emit")
    if emit is not None:
        check_topic(emit, "emit")
        if emit.startswith(RESERVED):
            raise invalid("emit", f"{emit!r} is reserved for the cluster's own events")
    out: dict[str, Any] = {"source": source, "types": types, "group_by": group_by, "emit": emit}
    if ("window" in definition) == ("pattern" in definition):
        raise invalid("window", "give a window or a pattern (one of them)")
    if "window" in definition:
        out["window"] = _window(definition["window"])
        out["fold"], out["field"] = check_fold(definition)
        lateness = definition.get("lateness_s", 0)
        out["lateness_ms"] = round(check_number(lateness, "lateness_s", 0, MAX_LATENESS_S) * 1000)
        if definition.get("action") is not None:
            raise invalid("action", "applies to patterns")
        if emit is None:
            raise invalid("emit", "a window emits its results on a topic: name it")
    else:
        for name in ("fold", "field", "lateness_s"):
            if name in definition:
                raise invalid(name, "applies to windows")
        out["pattern"] = _pattern(definition["pattern"], "topic" in source)
        action = definition.get("action")
        if action is not None:
            action = check_object(action, "action")
            check_known(action, "action", ("agent_health",))
            if action.get("agent_health") not in HEALTH_STATES:
                raise invalid("action.agent_health", f"must be one of {', '.join(HEALTH_STATES)}")
            if group_by is None:
                raise invalid("group_by", "the agent_health action names the agent by the group_by value")
            action = {"agent_health": action["agent_health"]}
        out["action"] = action
        if emit is None and action is None:
            raise invalid("emit", "a pattern emits on a topic, acts, or both: give emit or action")
    return out


def _ms(value: Any, name: str) -> int:
    ms = round(check_number(value, name, 0.001, MAX_SPAN_S) * 1000)
    if ms < 1:
        raise invalid(name, "must be at least 0.001 s")
    return ms


def _window(raw: Any) -> dict[str, Any]:
    window = check_object(raw, "window")
    check_known(window, "window", ("kind", "size_s", "slide_s"))
    kind = window.get("kind")
    if kind not in WINDOW_KINDS:
        raise invalid("window.kind", f"must be one of {', '.join(WINDOW_KINDS)}")
    size = _ms(window.get("size_s"), "window.size_s")
    slide = size
    if kind == "sliding":
        slide = _ms(window.get("slide_s"), "window.slide_s")
        if size % slide or size // slide > MAX_WINDOWS_PER_EVENT:
            raise invalid("window.slide_s", f"size_s must be a multiple of slide_s, at most {MAX_WINDOWS_PER_EVENT} "
                                            "times it")
    elif "slide_s" in window:
        raise invalid("window.slide_s", "applies to sliding windows")
    return {"kind": kind, "size_ms": size, "slide_ms": slide}


def _pattern(raw: Any, topic_source: bool) -> dict[str, Any]:
    pattern = check_object(raw, "pattern")
    kind = pattern.get("kind")
    names = {"sequence": ("first", "then"), "count": ("event",), "absence": ("first", "missing")}.get(kind)
    if names is None:
        raise invalid("pattern.kind", f"must be one of {', '.join(PATTERN_KINDS)}")
    allowed = ("kind", "within_s", *names, *(("count",) if kind == "count" else ()))
    check_known(pattern, "pattern", allowed)
    out: dict[str, Any] = {"kind": kind, "within_ms": _ms(pattern.get("within_s"), "pattern.within_s")}
    for name in names:
        value = pattern.get(name)
        out[name] = check_pattern(value, f"pattern.{name}") if topic_source else check_str(value, f"pattern.{name}")
    if kind == "count":
        out["count"] = check_int(pattern.get("count"), "pattern.count", 2, 1000)
    return out



@dataclass(frozen=True, slots=True)
class ProcessorPut(DomainCommand):
    """Create or replace processor ``name`` (a new definition starts empty).
    ``definition`` is what the client sent, ``spec`` its normalized form
    (``normalize_processor``), which the state keeps."""

    op: ClassVar[str] = "processor.put"
    name: str
    definition: dict[str, Any]
    spec: dict[str, Any]

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        name = check_name(args.get("name"))
        definition = check_object(args.get("definition"), "definition")
        return cls(name, definition, normalize_processor(definition))

    def to_args(self) -> dict[str, Any]:
        return {"name": self.name, "definition": self.definition}


@dataclass(frozen=True, slots=True)
class ProcessorDelete(NamedCommand):
    """Delete processor ``name``."""

    op: ClassVar[str] = "processor.delete"
    check_name = staticmethod(check_name)


@dataclass(frozen=True, slots=True)
class StreamsTick(ArglessCommand):
    """Proposed by the leader when a window or a pattern's deadline is due by
    its clock: the command's committed time closes them. Its args are not
    read (the handler never read them)."""

    op: ClassVar[str] = "streams.tick"
