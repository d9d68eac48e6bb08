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
    def __init__(self) -> None:
        self.locks: dict[str, Lock] = {}

    def held_by(self, holder: str) -> list[Lock]:
        return [lock for lock in self.locks.values() if lock.holder == holder]

    def to_data(self) -> list[Any]:
        return [[lk.name, lk.holder, lk.token, lk.ttl_ms, lk.acquired_ms] for lk in self.locks.values()]

    @classmethod
    def from_data(cls, rows: list[Any]) -> Locks:
        locks = cls()
        for row in rows:
            lock = Lock(*row)
            locks.locks[lock.name] = lock
        return locks
