"""Every Protocol of the core. Implementations live elsewhere: engines in
``cluster/``, transports in ``transports/``, fakes in ``tests/``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from coordinator.types import Candidate, TransportDelivery, TransportEntry, TransportHealth


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

    def apply(self, index: int, blob: bytes) -> bytes:
        """Apply the committed entry at ``index``. Must not raise for bad bytes.

        Returns the entry's result as bytes: a function of the history alone,
        so every correct replica returns the same bytes for the same entry.
        Engines that compare results across replicas (PBFT signs them into
        its replies) use it; the others ignore it.

        Raises only when this replica can no longer apply correctly (a bug:
        the state may be half-applied; ``coordinator.errors.ReplicaHalted``
        from ``services.applier``). The engine must then stop: hand it no
        later entry, take no snapshot of it, and leave consensus (a replica
        with a broken state must not lead); a restart replays."""

    def snapshot(self) -> bytes:
        """The state after every entry applied so far, as bytes. Raises once
        ``apply`` or ``restore`` raised (the state is not fit to be kept)."""

    def restore(self, blob: bytes) -> None:
        """Replace the whole state with a snapshot. Raising means the same as
        for ``apply``: the engine stops driving this replica."""

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
class ConfirmsResults(Protocol):
    """An optional engine feature: ``done(None)`` means more than "committed".

    When ``confirms_results`` is true the engine calls ``done(None)`` only
    once enough replicas computed the same result as this node's replica
    (PBFT: f+1 matching signed replies, so at least one correct replica
    vouches for it), and ``done(Failure.UNKNOWN)`` when they disagree. A
    proposer on such an engine answers only after both ``done(None)`` and
    the local result, so a lying replica cannot make a caller accept a
    result the others did not compute."""

    confirms_results: bool


@runtime_checkable
class WithEventCounts(Protocol):
    """An optional engine feature: what the engine counted (PBFT: messages
    dropped by reason, frames, persisted writes, result mismatches...), by
    a stable snake_case name, for ``/metrics``. Cheap; loop thread."""

    def event_counts(self) -> dict[str, int]: ...


@runtime_checkable
class KnowsQuorumContact(Protocol):
    """An optional engine feature: how recently a quorum answered this leader.

    A leader cut off from its followers keeps believing it leads until its
    engine notices (pysyncobj: ``leader_fallback_s``), while the others may
    elect a new leader after ``quorum_lease_s``. Whatever the leader answers
    from memory alone (lease heartbeats) must therefore stop once a quorum
    has not answered within ``quorum_lease_s``.

    ``quorum_lease_s``: seconds after a quorum's last answer during which no
    other node can have become leader (Raft: the minimum election timeout;
    a follower that answered does not start an election sooner).

    ``quorum_contact_age_s()``: seconds since a quorum of the voting members
    (this node counted) last answered this node as leader, measured on the
    engine's monotonic clock; None when this node is not the leader. Cheap;
    loop thread."""

    quorum_lease_s: float

    def quorum_contact_age_s(self) -> float | None: ...


@runtime_checkable
class ConfirmsReads(Protocol):
    """An optional engine feature: linearizable reads without a log entry
    (ReadIndex, Raft thesis §6.4).

    ``read_index()`` returns an index at or above every entry committed
    before the call, and returns only once this node's FSM has been handed
    every entry up to it (so local state may be read at once, on the loop,
    before anything else is applied). On the leader it confirms with a
    round of heartbeats that a majority still follows it; a follower asks
    the leader for its index, then waits for its own replica. Concurrent
    calls share rounds. Loop thread.

    Raises ``coordinator.errors.ReadIndexRefused`` when it cannot answer
    that way now (no leader known, the leader has not committed an entry of
    its term, leadership changed meanwhile): the caller falls back to a log
    barrier. Raises ``Unavailable`` when no majority confirmed the leader
    in time: the read must fail."""

    async def read_index(self) -> int: ...


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


@runtime_checkable
class BusTransport(Protocol):
    """A broker that carries a bound topic's committed messages.

    One instance per node, used from the event loop only. The leader calls
    ``publish`` with entries in offset order from the topic's committed
    cursor; it may call it again with entries already published (after a
    leader change or a lost confirmation): a transport must not duplicate
    them where its broker can prevent it, and must say in ``guarantee``
    what it promises. Every call is bounded in time (``timeout_s`` of the
    transport) and raises ``coordinator.errors.Unavailable`` when the broker
    cannot be reached; nothing is lost then: the cursor does not move.
    """

    name: str
    guarantee: str  # "exactly-once" (the broker dedupes) or "at-least-once"

    async def start(self) -> None:
        """Connect. ``Unavailable`` when the broker cannot be reached."""

    async def close(self) -> None: ...

    async def bind(self, topic: str) -> None:
        """Create what the broker needs for ``topic`` (idempotent)."""

    async def unbind(self, topic: str) -> None:
        """Remove the topic's broker resources and their messages (idempotent)."""

    async def publish(self, entries: list[TransportEntry]) -> int:
        """Publish entries of one topic, in offset order; return once the
        broker holds them durably. Returns how many were new at the broker
        (re-sent ones it recognised are not counted)."""

    async def publish_direct(self, entries: list[TransportEntry]) -> int:
        """Direct mode: entries of one topic that never were in the log
        (``offset`` 0, ``dedupe_key`` set), from any node, concurrently with
        other nodes; return once the broker holds them durably. The broker
        orders them (its own sequence, not a topic offset). Returns how many
        were new: an entry whose ``key`` the broker still recognises (NATS
        duplicate window, the memory transport) is not stored again; brokers
        that cannot recognise keys (Redis, RabbitMQ, Kafka across producer
        sessions) store it again and count it. Deliveries of these entries
        carry ``key`` = the entry's key and ``offset`` = the broker's
        position where it has a number (else 0). ``Unavailable`` as
        ``publish``; some entries may then be stored (a retry with the same
        keys dedupes where the broker can)."""

    async def subscribe(self, topic: str, group: str) -> None:
        """Create a consumer group reading ``topic`` from its first message (idempotent)."""

    async def fetch(self, topic: str, group: str, consumer: str, max_n: int,
                    wait_s: float) -> list[TransportDelivery]:
        """Up to ``max_n`` deliveries for ``consumer`` of ``group``, waiting up
        to ``wait_s`` for the first. Unacked deliveries come back later
        (after the transport's ack timeout or the consumer's reconnection)."""

    async def ack(self, topic: str, group: str, delivery_ids: list[str]) -> None: ...

    async def nack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        """Give deliveries back for redelivery."""

    async def health(self) -> TransportHealth: ...

    async def lag(self, topic: str, group: str) -> int:
        """Messages of ``topic`` the group has not acked yet (best effort)."""


@runtime_checkable
class ReadsGroupsOnOneNode(Protocol):
    """A transport whose consumer group must be read through one node (Kafka:
    it reads a group's partition by hand, so two nodes reading one group
    would each deliver every record). In direct mode the API sends such a
    group's fetches, acks and nacks to one member, ranked by the consumer's
    key (``CoordinatorNode.ranked_members``); a node that sends them
    elsewhere calls ``release`` for the group first."""

    one_reader_per_group: bool

    async def release(self, topic: str, group: str) -> None:
        """Forget the group on this node (idempotent): what it handed out and
        was not acked comes again to whoever reads the group next."""


class LoadView(Protocol):
    """What a balancing strategy may know of the load a node observes."""

    def inflight(self, agent_id: str) -> int: ...

    def latency(self, agent_id: str) -> float | None:
        """The (decayed) latency estimate in seconds; None before the first sample."""


class Strategy(Protocol):
    """Picks one of ``candidates`` (non-empty, any order) for a request.

    ``key`` matters only to ``consistent_hash``. A strategy may keep state
    between picks; the caller keeps one instance per agent type.
    """

    name: str

    def pick(self, candidates: Sequence[Candidate], stats: LoadView, key: str | None) -> Candidate: ...
