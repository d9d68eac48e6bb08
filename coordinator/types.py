"""Plain data of the core: commands, results and effects.

Everything here is immutable and made only of msgpack-friendly values
(None, bool, int, float, str, bytes, list, dict), so the codec can turn it
into bytes and back without any custom hooks.
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
    """

    topic: str
    offset: int
    index: int
    message: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.topic}:{self.offset}"


@dataclass(frozen=True, slots=True)
class TransportDelivery:
    """A message a transport's consumer group received from its broker.

    ``delivery_id`` is the broker's handle for ack and nack; ``key`` is the
    entry's ``TransportEntry.key`` (the service deduplicates on it where the
    broker cannot); ``redelivered`` when the broker says so.
    """

    delivery_id: str
    topic: str
    offset: int
    key: str
    message: dict[str, Any]
    redelivered: bool = False


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
