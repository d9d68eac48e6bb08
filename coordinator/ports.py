"""Every Protocol of the core. Implementations live elsewhere: engines in
``cluster/``, transports in ``transports/``, fakes in ``tests/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class Clock(Protocol):
    def now_ms(self) -> int:
        """Wall-clock milliseconds since the epoch (stamped into commands)."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary start; only differences mean anything."""


class Rng(Protocol):
    def token_hex(self, nbytes: int) -> str: ...


class ReplicatedFSM(Protocol):
    """What an engine drives. Every method is called on the event loop thread,
    in log order; the engine never calls two of them at once."""

    def apply(self, index: int, blob: bytes) -> None:
        """Apply the committed entry at ``index``. Must not raise for bad bytes."""

    def snapshot(self) -> bytes:
        """The state after every entry applied so far, as bytes."""

    def restore(self, blob: bytes) -> None:
        """Replace the whole state with a snapshot."""

    def reset(self) -> None:
        """Forget everything: the engine is about to replay its log from the start."""


class Failure:
    """Why a submitted entry did not commit.

    ``definite`` failures certainly never take effect (the entry was not
    appended, or was overwritten); the others may still commit later.
    """

    NO_LEADER = "no_leader"
    QUEUE_FULL = "queue_full"
    NOT_LEADER = "not_leader"
    DISCARDED = "discarded"
    DENIED = "denied"
    LEADER_CHANGED = "leader_changed"
    UNKNOWN = "unknown"

    DEFINITE = frozenset({NO_LEADER, QUEUE_FULL, NOT_LEADER, DISCARDED, DENIED})


@dataclass(frozen=True, slots=True)
class EngineStatus:
    node: str
    role: str  # "leader" | "follower" | "candidate" | "stopped"
    leader: str | None  # the leader's engine address, when known
    term: int
    commit_index: int
    applied_index: int  # what the engine has handed to the FSM
    members: tuple[str, ...]  # engine addresses, self included
    healthy: bool
    problem: str | None = None
    connected: tuple[str, ...] = ()


Done = Callable[[str | None], None]


@runtime_checkable
class ConsensusEngine(Protocol):
    """Replicates opaque bytes. Knows nothing of the domain.

    All methods are called from the event loop thread, and every callback
    the engine makes (``ReplicatedFSM`` methods, ``done``, role listeners)
    arrives on that same thread.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def submit(self, blob: bytes, done: Done) -> None:
        """Hand an entry to consensus. ``done(None)`` once it committed (it is
        applied through the FSM, possibly before or after ``done``), or
        ``done(reason)`` with a ``Failure`` code. Never blocks."""

    def status(self) -> EngineStatus: ...

    def on_role_change(self, listener: Callable[[str], None]) -> None:
        """``listener(role)`` after every change of this node's role."""

    async def add_member(self, address: str) -> None:
        """Add a voting member; raises ``Unavailable`` when refused."""

    async def remove_member(self, address: str) -> None: ...
