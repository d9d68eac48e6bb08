"""Plain data of the core: commands, results and effects.

Everything here is immutable and made only of msgpack-friendly values
(None, bool, int, float, str, bytes, list, dict), so the codec can turn it
into bytes and back without any custom hooks.

``build_command``, ``build_result`` and ``build_kv_change`` make the three
records every replica creates for every applied entry, at a fraction of the
frozen ``__init__``'s cost (see ``_unsealed``); what they return is an
ordinary, frozen instance of its class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

COMMAND_VERSION = 1

JSON = Any  # a value that json and msgpack both carry


@dataclass(frozen=True, slots=True)
class Command:
    """One entry of the replicated log.

    ``now_ms`` is the proposer's wall clock (the only time the state machine
    ever sees). ``request_id`` makes retries idempotent: the state machine
    answers a repeated id with the first result. ``proposal_id`` lets the
    proposing node match the applied entry with its waiting caller.
    ``request_id`` is scoped by whoever gave it (``RequestKey``) and
    ``request_digest`` fingerprints what was asked under it, so one id reused
    for a different request is refused instead of answered with the first
    request's result.
    """

    op: str
    args: dict[str, Any]
    now_ms: int
    request_id: str | None = None
    proposal_id: str | None = None
    version: int = COMMAND_VERSION
    request_digest: str | None = None
    principal: str | None = None  # who asked (``RequestKey.principal``): bytes it stores are charged to it


@dataclass(frozen=True, slots=True)
class RequestKey:
    """Who made a request, and its idempotency key as the log keeps it.

    ``principal`` is ``admin``, ``anonymous``, ``agent:<id>`` or ``cluster``
    (the nodes' own proposals). ``id`` is the caller's own request id
    prefixed with its principal (``agent:alice/…``), so no caller can claim
    or answer another's; ``digest`` fingerprints the request (method, path
    and body, or op and args) made under it. Both are None for a request
    that gave no id."""

    principal: str
    id: str | None = None
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """An entry of the replicated event sequence (agent.*, lock.*, system.*)."""

    seq: int
    type: str
    data: dict[str, Any]
    time_ms: int
    index: int


@dataclass(frozen=True, slots=True)
class KvChange:
    """One change of the key/value store, kept for watches."""

    revision: int
    key: str
    kind: str  # "put" | "delete"
    value: JSON
    index: int


@dataclass(frozen=True, slots=True)
class Result:
    """What applying one command produced.

    ``error`` is ``None`` on success, else ``(code, message)`` with a code of
    ``coordinator.errors`` (``invalid``, ``conflict``, ``not_found``, ...).
    Errors are results, not exceptions: a rejected command is still a log
    entry and must leave every replica in the same state (unchanged).
    """

    index: int
    value: Any = None
    error: tuple[str, str] | None = None
    events: tuple[Event, ...] = field(default=())
    changes: tuple[KvChange, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class TransportEntry:
    """One committed message handed to a broker transport.

    ``offset`` is the message's offset in its topic (it grows by one per
    message) and ``index`` the log index of its publish; together with
    ``message["id"]`` they make republishing idempotent. ``key`` is
    ``"{topic}:{offset}"``, the id a broker deduplicates on.

    A direct-mode entry (``BusTransport.publish_direct``) never was in the
    log: ``offset`` and ``index`` are 0 and ``dedupe_key`` is the key the
    publishing node chose (from the caller's request id or message id).
    """

    topic: str
    offset: int
    index: int
    message: dict[str, Any]
    dedupe_key: str | None = None

    @property
    def key(self) -> str:
        return self.dedupe_key if self.dedupe_key is not None else f"{self.topic}:{self.offset}"


@dataclass(frozen=True, slots=True)
class TransportDelivery:
    """A message a transport's consumer group received from its broker.

    ``delivery_id`` is the broker's handle for ack and nack; ``key`` is the
    entry's ``TransportEntry.key`` (the service deduplicates on it where the
    broker cannot); ``redelivered`` when the broker says so. ``message_json``,
    when a transport sets it, is the JSON text (UTF-8) that ``message`` was
    parsed from, a JSON object exactly as the broker holds it: a response may
    copy it instead of encoding ``message`` again. Empty when there is none.
    """

    delivery_id: str
    topic: str
    offset: int
    key: str
    message: dict[str, Any]
    redelivered: bool = False
    message_json: bytes = b""


@dataclass(frozen=True, slots=True)
class TransportHealth:
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Candidate:
    """An agent that may serve a load-balanced request: its id and the weight
    from its registration (an integer >= 1)."""

    id: str
    weight: int


# -- the apply path's constructors ------------------------------------------------------

def _unsealed(cls: type) -> type:
    """A plain class with the slots of the frozen dataclass ``cls``.

    A frozen dataclass's ``__init__`` stores each field with
    ``object.__setattr__``, several times the cost of an attribute store;
    every replica builds a ``Command``, a ``Result`` and a ``KvChange`` per
    entry, so that is a fifth of what applying a kv.put costs. The builders
    below fill an instance of this twin with plain stores, then turn it
    into ``cls`` by assigning ``__class__``, which CPython allows between
    classes of the same layout (same base, same slots, in order). From then
    on it is a ``cls`` like any other: frozen, equal and hashing the same.
    ``tests/coordinator/test_types.py`` holds each builder to its class."""
    twin = type(f"_Unsealed{cls.__name__}", (), {"__slots__": cls.__slots__})  # type: ignore[attr-defined]
    probe = object.__new__(twin)
    probe.__class__ = cls  # a layout CPython refuses fails here, at import, not in a replica's apply
    return twin


_UnsealedCommand: Any = _unsealed(Command)
_UnsealedResult: Any = _unsealed(Result)
_UnsealedKvChange: Any = _unsealed(KvChange)
_new = object.__new__


def build_command(op: str, args: dict[str, Any], now_ms: int, request_id: str | None, proposal_id: str | None,
                  version: int, request_digest: str | None, principal: str | None) -> Command:
    """``Command(...)`` with every field given, in field order."""
    command = _new(_UnsealedCommand)
    command.op = op
    command.args = args
    command.now_ms = now_ms
    command.request_id = request_id
    command.proposal_id = proposal_id
    command.version = version
    command.request_digest = request_digest
    command.principal = principal
    command.__class__ = Command
    return command  # type: ignore[no-any-return]


def build_result(index: int, value: Any, error: tuple[str, str] | None, events: tuple[Event, ...],
                 changes: tuple[KvChange, ...]) -> Result:
    """``Result(...)`` with every field given, in field order."""
    result = _new(_UnsealedResult)
    result.index = index
    result.value = value
    result.error = error
    result.events = events
    result.changes = changes
    result.__class__ = Result
    return result  # type: ignore[no-any-return]


def build_kv_change(revision: int, key: str, kind: str, value: JSON, index: int) -> KvChange:
    """``KvChange(...)`` with every field given, in field order."""
    change = _new(_UnsealedKvChange)
    change.revision = revision
    change.key = key
    change.kind = kind
    change.value = value
    change.index = index
    change.__class__ = KvChange
    return change  # type: ignore[no-any-return]
