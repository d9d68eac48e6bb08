"""Commands of the cluster itself: ``noop``, ``barrier``, ``member.register``,
``member.remove`` and ``system.report``.

``noop`` and ``barrier`` carry nothing (their args are ignored, as they
always were); a barrier's answer is the log index it was applied at. The
member table maps a node id to its Raft and HTTP addresses; whether an
address is ``host:port`` is the API's to check (the parse keeps what the log
always accepted). ``system.report`` is what the leader observed about the
cluster (``SYSTEM_EVENTS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from coordinator.commands.base import ArglessCommand, DomainCommand, check_str, invalid, require_dict, require_str

MAX_NODE_ID_LEN = 64
MAX_ADDRESS_LEN = 256  # a member's Raft or HTTP address
SYSTEM_EVENTS = ("system.failure", "system.recovered", "system.leader.elected")


def check_node_id(value: Any) -> str:
    """A member's id (``id``): 1 to 64 characters, no control characters."""
    return check_str(value, "id", MAX_NODE_ID_LEN)


def check_address(value: Any, field: str) -> str:
    """A member's ``raft`` or ``http`` address as the log takes it: 1 to 256
    characters, no control characters (``host:port`` is the API's rule)."""
    return check_str(value, field, MAX_ADDRESS_LEN)


@dataclass(frozen=True, slots=True)
class Noop(ArglessCommand):
    """Nothing: an entry that only moves the log (and committed time) on."""

    op: ClassVar[str] = "noop"


@dataclass(frozen=True, slots=True)
class Barrier(ArglessCommand):
    """A read barrier: once applied, the replica holds every entry committed
    before it. Its value is its own log index."""

    op: ClassVar[str] = "barrier"


@dataclass(frozen=True, slots=True)
class MemberRegister(DomainCommand):
    """Map member ``id`` to its addresses (added, or changed when they differ)."""

    op: ClassVar[str] = "member.register"
    id: str
    raft: str
    http: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(check_node_id(args.get("id")), check_address(args.get("raft"), "raft"),
                   check_address(args.get("http"), "http"))

    def to_args(self) -> dict[str, Any]:
        return {"id": self.id, "raft": self.raft, "http": self.http}


@dataclass(frozen=True, slots=True)
class MemberRemove(DomainCommand):
    """Drop member ``id`` from the table (refused by the state when unknown)."""

    op: ClassVar[str] = "member.remove"
    id: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(check_node_id(args.get("id")))

    def to_args(self) -> dict[str, Any]:
        return {"id": self.id}


@dataclass(frozen=True, slots=True)
class SystemReport(DomainCommand):
    """What the leader observed (a member unreachable or back, its own
    election), committed as the cluster event ``type`` with ``data``."""

    op: ClassVar[str] = "system.report"
    type: str
    data: dict[str, Any]

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        type_ = require_str(args, "type", 64)
        if type_ not in SYSTEM_EVENTS:
            raise invalid("type", f"must be one of {', '.join(SYSTEM_EVENTS)}")
        return cls(type_, require_dict(args, "data"))

    def to_args(self) -> dict[str, Any]:
        return {"type": self.type, "data": self.data}
