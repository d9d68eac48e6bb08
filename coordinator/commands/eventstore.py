"""Commands of the event store: ``es.append``, ``es.snapshot``, ``es.delete``
(``coordinator.state.eventstore`` says what they do).

The parse checks the shape of a command and the caps every store has
(``APPEND_MAX`` events in one append, ``EVENT_BYTES_MAX`` per event,
``SNAPSHOT_BYTES_MAX`` per snapshot); a store's ``EventStoreLimits`` may
set lower ones, which its handler checks, with whether the stream exists
and is at the version expected.

The log carries an append's events and a snapshot's fields with their keys
in the order the client sent them (the API proposed the request's objects
as they came): the commands keep that order (``keys``) so that ``to_args``
gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from coordinator.commands.base import (
    MAX_TOKEN,
    DomainCommand,
    approx_size,
    check_int,
    check_known,
    check_object,
    check_str,
    invalid,
    too_large,
)

MAX_STREAM_ID_LEN = 256
MAX_EVENT_TYPE_LEN = 256
MAX_EVENT_ID_LEN = 128
MAX_VERSION = 2**62
MAX_POSITION = MAX_TOKEN  # positions over the whole store: int64
EXPECTED_WORDS = ("any", "no_stream", "exists")
EVENT_FIELDS = ("type", "data", "metadata", "id")  # tuples: error texts must be the same on every replica
APPEND_FIELDS = ("stream", "expected_version", "events")
SNAPSHOT_FIELDS = ("stream", "version", "state", "truncate")
DELETE_FIELDS = ("stream", "expected_version")
# The caps of one command; a store's limits (EventStoreLimits) may be lower, not higher.
APPEND_MAX = 100  # events in one append
EVENT_BYTES_MAX = 256 << 10  # one event's data + metadata, by approx_size
SNAPSHOT_BYTES_MAX = 1 << 20  # one snapshot's state


def category_of(stream: str) -> str | None:
    """The part of a stream id before its first ``-``; None without one."""
    head, dash, _ = stream.partition("-")
    return head if dash and head else None


def check_category(value: str, field: str) -> str:
    """A category's name (checked as a string by the caller) has no ``-``."""
    if "-" in value:
        raise invalid(field, "must not contain '-' (a category is the stream id before its first '-')")
    return value


def check_stream_id(value: Any, field: str = "stream") -> str:
    return check_str(value, field, MAX_STREAM_ID_LEN)


def check_expected(value: Any, field: str = "expected_version") -> int | str:
    """A version (``-1``: no stream) or one of ``EXPECTED_WORDS``."""
    if isinstance(value, str):
        if value not in EXPECTED_WORDS:
            raise invalid(field, f"must be a version (-1 for no stream) or one of {', '.join(EXPECTED_WORDS)}")
        return value
    return check_int(value, field, -1, MAX_VERSION)


def check_append_count(count: int | None, append_max: int) -> None:
    """Refuse an append of ``count`` events (None: not a list) unless 1 to ``append_max``."""
    if count is None or not 1 <= count <= append_max:
        raise invalid("events", f"must be a list of 1 to {append_max} events")


def check_event_size(where: str, size: int, event_bytes_max: int) -> None:
    """Refuse an event (``where``: ``events[i]``) whose data and metadata pass ``event_bytes_max``."""
    if size > event_bytes_max:
        raise too_large(f"{where}.data", size, "event_bytes_max", event_bytes_max)


def check_snapshot_size(size: int, snapshot_bytes_max: int) -> None:
    if size > snapshot_bytes_max:
        raise invalid("state", f"is larger than {snapshot_bytes_max} bytes")


def _in_order(values: dict[str, Any], keys: tuple[str, ...] | None) -> dict[str, Any]:
    return values if keys is None else {key: values[key] for key in keys}


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One event of an append: its ``type``, ``data`` (any JSON value, null
    too), optional ``metadata`` (an object) and ``id`` (for idempotent retries)."""

    type: str
    data: Any
    metadata: dict[str, Any] | None = None
    id: str | None = None
    # The keys the client sent, in its order; None when they are type, data and
    # the optional fields that are not null, in that order ("metadata": null is a key too).
    keys: tuple[str, ...] | None = None
    size: int = field(init=False, compare=False, repr=False)  # data + metadata, by approx_size

    def __post_init__(self) -> None:
        if self.keys is not None and self.keys == tuple(self._values(usual=True)):
            object.__setattr__(self, "keys", None)
        metadata_size = approx_size(self.metadata) if self.metadata is not None else 0
        object.__setattr__(self, "size", approx_size(self.data) + metadata_size)

    @classmethod
    def parse(cls, raw: Any, where: str) -> NewEvent:
        """``where``: how refusals name the event (``events[2]``)."""
        event = check_object(raw, where)
        check_known(event, where, EVENT_FIELDS)
        type_ = check_str(event.get("type"), f"{where}.type", MAX_EVENT_TYPE_LEN)
        if "data" not in event:
            raise invalid(f"{where}.data", "is required (null is a value)")
        metadata = event.get("metadata")
        if metadata is not None:
            check_object(metadata, f"{where}.metadata")
        event_id = event.get("id")
        if event_id is not None:
            check_str(event_id, f"{where}.id", MAX_EVENT_ID_LEN)
        parsed = cls(type_, event["data"], metadata, event_id, tuple(event))
        check_event_size(where, parsed.size, EVENT_BYTES_MAX)
        return parsed

    def _values(self, *, usual: bool = False) -> dict[str, Any]:
        """The fields in the usual order; with ``keys``, the null ones they name too."""
        named = () if usual or self.keys is None else self.keys
        values: dict[str, Any] = {"type": self.type, "data": self.data}
        if self.metadata is not None or "metadata" in named:
            values["metadata"] = self.metadata
        if self.id is not None or "id" in named:
            values["id"] = self.id
        return values

    def to_args(self) -> dict[str, Any]:
        return _in_order(self._values(), self.keys)


@dataclass(frozen=True, slots=True)
class EsAppend(DomainCommand):
    """Append ``events`` to ``stream``, atomically, if the stream is at
    ``expected_version`` (None: left out, which is ``"any"``)."""

    op: ClassVar[str] = "es.append"
    stream: str
    events: tuple[NewEvent, ...]
    expected_version: int | str | None = None

    @property
    def expected(self) -> int | str:
        return "any" if self.expected_version is None else self.expected_version

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        check_known(args, "", APPEND_FIELDS)
        stream = check_stream_id(args.get("stream"))
        expected = None
        if "expected_version" in args:  # null too: "any" is leaving it out
            expected = check_expected(args["expected_version"])
        raw = args.get("events")
        check_append_count(len(raw) if isinstance(raw, list) else None, APPEND_MAX)
        return cls(stream, tuple(NewEvent.parse(item, f"events[{i}]") for i, item in enumerate(raw)), expected)

    def to_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"stream": self.stream, "events": [event.to_args() for event in self.events]}
        if self.expected_version is not None:
            args["expected_version"] = self.expected_version
        return args


@dataclass(frozen=True, slots=True)
class EsSnapshot(DomainCommand):
    """Store ``state`` as ``stream``'s snapshot at ``version``; with
    ``truncate`` (None: left out, which is false) drop the events up to it."""

    op: ClassVar[str] = "es.snapshot"
    stream: str
    version: int
    state: Any
    truncate: bool | None = None
    keys: tuple[str, ...] | None = None  # as NewEvent.keys: the order the client sent the fields in

    def __post_init__(self) -> None:
        if self.keys is not None and self.keys == tuple(self._values()):
            object.__setattr__(self, "keys", None)

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        check_known(args, "", SNAPSHOT_FIELDS)
        stream = check_stream_id(args.get("stream"))
        version = check_int(args.get("version"), "version", 0, MAX_VERSION)
        if "state" not in args:
            raise invalid("state", "is required")
        check_snapshot_size(approx_size(args["state"]), SNAPSHOT_BYTES_MAX)
        truncate = None
        if "truncate" in args:
            truncate = args["truncate"]
            if not isinstance(truncate, bool):
                raise invalid("truncate", "must be true or false")
        return cls(stream, version, args["state"], truncate, tuple(args))

    def _values(self) -> dict[str, Any]:
        values = {"stream": self.stream, "version": self.version, "state": self.state}
        if self.truncate is not None:
            values["truncate"] = self.truncate
        return values

    def to_args(self) -> dict[str, Any]:
        return _in_order(self._values(), self.keys)


@dataclass(frozen=True, slots=True)
class EsDelete(DomainCommand):
    """Delete ``stream`` and its events if it is at ``expected_version`` (None: left out, ``"any"``)."""

    op: ClassVar[str] = "es.delete"
    stream: str
    expected_version: int | str | None = None

    @property
    def expected(self) -> int | str:
        return "any" if self.expected_version is None else self.expected_version

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        check_known(args, "", DELETE_FIELDS)
        stream = check_stream_id(args.get("stream"))
        expected = check_expected(args["expected_version"]) if "expected_version" in args else None
        return cls(stream, expected)

    def to_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"stream": self.stream}
        if self.expected_version is not None:
            args["expected_version"] = self.expected_version
        return args
