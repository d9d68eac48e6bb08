"""Commands of locks and elections: ``lock.acquire``, ``lock.release``,
``lock.expire``. An election is the lock named ``election/<name>``
(``ELECTION_PREFIX``); its candidate is the lock's holder.

Whether a lock is free, held by another or still on the token an expiry
names is the state's to say, not the parse's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from coordinator.commands.base import MAX_TOKEN, MAX_TTL_MS, MIN_TTL_MS, DomainCommand, check_str, require_int

ELECTION_PREFIX = "election/"  # an election is the lock named ELECTION_PREFIX + its name
MAX_ELECTION_NAME_LEN = 200  # with the prefix, within a lock name's MAX_NAME_LEN


def check_name(value: Any) -> str:
    """A lock's name: 1 to 256 characters, no control characters. The API
    checks a path's name with it before reading the body, then parse again."""
    return check_str(value, "name")


def check_holder(value: Any, field: str = "holder") -> str:
    """A lock's holder (``field``: an election names it ``candidate``). The
    API checks the body's with it before it converts ``ttl_s``, then parse again."""
    return check_str(value, field)


def _holder(args: Mapping[str, Any]) -> str:
    return check_holder(args.get("holder"))


@dataclass(frozen=True, slots=True)
class LockAcquire(DomainCommand):
    """Grant lock ``name`` to ``holder`` (its fencing token: this command's
    log index), or refresh it for its holder with a new ``ttl_ms``."""

    op: ClassVar[str] = "lock.acquire"
    name: str
    holder: str
    ttl_ms: int

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(check_name(args.get("name")), _holder(args), require_int(args, "ttl_ms", MIN_TTL_MS, MAX_TTL_MS))

    def to_args(self) -> dict[str, Any]:
        return {"name": self.name, "holder": self.holder, "ttl_ms": self.ttl_ms}


@dataclass(frozen=True, slots=True)
class LockRelease(DomainCommand):
    """Release lock ``name``, held by ``holder``."""

    op: ClassVar[str] = "lock.release"
    name: str
    holder: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(check_name(args.get("name")), _holder(args))

    def to_args(self) -> dict[str, Any]:
        return {"name": self.name, "holder": self.holder}


@dataclass(frozen=True, slots=True)
class LockExpire(DomainCommand):
    """Proposed by the leader when a lock's lease ran out. Names the grant
    (``token``), so an expiry decided before a new grant cannot remove it."""

    op: ClassVar[str] = "lock.expire"
    name: str
    token: int

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(check_name(args.get("name")), require_int(args, "token", 0, MAX_TOKEN))

    def to_args(self) -> dict[str, Any]:
        return {"name": self.name, "token": self.token}
