"""Locks and elections with fencing tokens.

A grant's fencing token is the log index of the command that granted it, so
tokens only grow, on every replica alike. A lock's TTL is a lease kept by the
leader in memory (like an agent's); only its expiry is committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Lock:
    name: str
    holder: str
    token: int
    ttl_ms: int
    acquired_ms: int

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "holder": self.holder,
            "fencing_token": self.token,
            "ttl_s": self.ttl_ms / 1000,
            "acquired_ms": self.acquired_ms,
        }


class Locks:
    """``locks`` by name, and an index by holder (a holder's heartbeat renews
    its locks: at 100,000 agents a scan of every lock per heartbeat was the
    leader's work). Change them only through ``grant`` and ``remove``."""

    def __init__(self) -> None:
        self.locks: dict[str, Lock] = {}
        self._by_holder: dict[str, dict[str, None]] = {}  # holder -> names, in grant order

    def grant(self, lock: Lock) -> None:
        """Add ``lock`` (its name must be free)."""
        self.locks[lock.name] = lock
        self._by_holder.setdefault(lock.holder, {})[lock.name] = None

    def remove(self, name: str) -> Lock:
        lock = self.locks.pop(name)
        names = self._by_holder[lock.holder]
        del names[name]
        if not names:
            del self._by_holder[lock.holder]
        return lock

    def held_by(self, holder: str) -> list[Lock]:
        """The holder's locks in the order they were granted (the order of ``locks``)."""
        return [self.locks[name] for name in self._by_holder.get(holder, ())]

    def to_data(self) -> list[Any]:
        return [[lk.name, lk.holder, lk.token, lk.ttl_ms, lk.acquired_ms] for lk in self.locks.values()]

    @classmethod
    def from_data(cls, rows: list[Any]) -> Locks:
        locks = cls()
        for row in rows:
            locks.grant(Lock(*row))
        return locks
