"""The bus's records: what the replicated state holds of topics, messages,
consumers, their entries, subscriptions and transport bindings, each with its
snapshot row (``to_data``/``from_data``: the snapshot's bytes depend on them).
Pure data and small invariants of one record; the parts of ``Bus`` change them.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.commands import filters
from coordinator.state.base import approx_size


@dataclass(frozen=True, slots=True)
class BusLimits:
    messages_max: int = 200_000         # bodies held in all (retained or held by a consumer)
    bytes_max: int = 256 << 20          # and their size (approx_size of each message)
    topics_max: int = 100_000
    consumers_max: int = 10_000         # subscriptions without group + groups + inboxes
    subscriptions_max: int = 50_000
    queue_max: int = 100_000            # entries of one consumer (ready + pending + delayed)
    dlq_max: int = 10_000               # dead letters of one consumer; the oldest go first
    retention_messages: int = 10_000    # default per topic
    retention_age_ms: int = 86_400_000  # default per topic
    dedupe_window_ms: int = 120_000     # exactly-once publisher dedupe by message id
    dedupe_max: int = 100_000
    timers_per_tick: int = 10_000
    acked_keys_max: int = 100_000       # per transport consumer: the dedupe window of processed keys


# -- records -------------------------------------------------------------------------

@dataclass(slots=True)
class Body:
    topic: str
    offset: int
    index: int                 # log index of the publish
    publish_ms: int
    message: dict[str, Any]
    expires_ms: int | None
    retained: bool
    ttl_armed: bool = False    # its TTL timer is in the heap (one per body)
    holders: dict[str, int] = field(default_factory=dict)  # consumer key -> entry seq
    size: int = 0              # approx_size of the message
    owner: str | None = None   # the principal that published it (charged for its size)

    def to_data(self) -> list[Any]:
        return [self.topic, self.offset, self.index, self.publish_ms, self.message, self.expires_ms, self.retained,
                self.ttl_armed, list(self.holders.items()), self.size, self.owner]

    @classmethod
    def from_data(cls, row: list[Any]) -> Body:
        """Rows written before sizes were counted end with the holders: their
        size is computed and their owner unknown."""
        if len(row) == 9:
            *head, holders = row
            return cls(*head, holders=dict((k, s) for k, s in holders), size=approx_size(row[4]))
        *head, holders, size, owner = row
        return cls(*head, holders=dict((k, s) for k, s in holders), size=size, owner=owner)


@dataclass(slots=True)
class Topic:
    name: str
    next_offset: int = 1
    log: dict[int, None] = field(default_factory=dict)  # retained offsets, oldest first
    max_messages: int | None = None
    max_age_ms: int | None = None
    published: int = 0
    age_timer_ms: int | None = None  # due time of the pending retention timer

    def to_data(self) -> list[Any]:
        return [self.name, self.next_offset, list(self.log), self.max_messages, self.max_age_ms, self.published,
                self.age_timer_ms]

    @classmethod
    def from_data(cls, row: list[Any]) -> Topic:
        name, next_offset, log, max_messages, max_age_ms, published, age_timer_ms = row
        return cls(name, next_offset, dict.fromkeys(log), max_messages, max_age_ms, published, age_timer_ms)


@dataclass(slots=True)
class Entry:
    """One message in one consumer."""

    seq: int
    topic: str
    offset: int
    priority: int
    attempts: int = 0
    state: str = "ready"  # ready | pending | delayed | dead
    member: str | None = None
    due_ms: int = 0
    reason: str | None = None  # why it is dead
    dead_ms: int = 0
    key: str | None = None  # a keyed consumer's ordering key of the message
    key_seq: int = 0  # its number among the messages of that key in this consumer (1, 2, 3...)

    def to_data(self) -> list[Any]:
        return [self.seq, self.topic, self.offset, self.priority, self.attempts, self.state, self.member,
                self.due_ms, self.reason, self.dead_ms, self.key, self.key_seq]

    @classmethod
    def from_data(cls, row: list[Any]) -> Entry:
        return cls(*row)


COUNTERS = ("enqueued", "delivered", "redelivered", "acked", "nacked", "dead_lettered", "dlq_dropped",
            "overflowed", "redriven")


@dataclass(slots=True)
class Consumer:
    key: str                 # "s:<subscription>" | "g:<group>" | "a:<agent>"
    pattern: str | None      # None for an inbox
    filter_text: str | None
    guarantee: str
    ack_timeout_ms: int | None   # None: each message's deliveryOptions.timeout
    max_attempts: int | None     # None: each message's deliveryOptions.retry.max_attempts
    created_index: int
    next_seq: int = 1
    entries: dict[int, Entry] = field(default_factory=dict)  # ready, pending and delayed
    dlq: dict[int, Entry] = field(default_factory=dict)      # oldest first
    members: dict[str, None] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    ready: list[tuple[int, int]] = field(default_factory=list)  # heap of (-priority, seq); stale keys skipped
    ready_count: int = 0
    pending_count: int = 0
    filter_tree: Any = None
    transport: str | None = None  # a bound topic's subscription: served by that broker, not by entries here
    acked_keys: dict[str, None] = field(default_factory=dict)  # transport consumers: keys acked, oldest first
    key_path: str | None = None  # ordering key (a dotted path into the message): one in flight per key, in order
    key_seqs: dict[str, int] = field(default_factory=dict)  # key -> the last key_seq given
    key_owner: dict[str, str] = field(default_factory=dict)  # key -> the member that took it (while it lives)
    key_inflight: dict[str, int] = field(default_factory=dict)  # key -> the seq last delivered (checked lazily)

    @property
    def kind(self) -> str:
        return {"s": "subscription", "g": "group", "a": "inbox"}[self.key[0]]

    @property
    def name(self) -> str:
        return self.key[2:]

    def delivery_id(self, seq: int) -> str:
        return f"{self.created_index}.{seq}"

    def seqs(self, delivery_ids: Sequence[str]) -> list[tuple[str, int | None]]:
        """Parsed delivery ids (``commands.bus.check_delivery_ids``), each once, with their seq here."""
        return [(d, self.seq_of(d)) for d in dict.fromkeys(delivery_ids)]

    def seq_of(self, delivery_id: Any) -> int | None:
        if not isinstance(delivery_id, str):
            return None
        created, _, seq = delivery_id.partition(".")
        if created != str(self.created_index) or not seq.isdigit() or len(seq) > 19:
            return None
        return int(seq)

    def push_ready(self, entry: Entry) -> None:
        entry.state = "ready"
        entry.member = None
        self.ready_count += 1
        heapq.heappush(self.ready, (self._rank(entry), entry.seq))
        if len(self.ready) > 2 * self.ready_count + 64:
            self.rebuild_ready()

    def _rank(self, entry: Entry) -> int:
        """Highest priority first; a keyed consumer keeps publish order (its keys' order matters more)."""
        return 0 if self.key_path is not None else -entry.priority

    def rebuild_ready(self) -> None:
        self.ready = sorted((self._rank(e), e.seq) for e in self.entries.values() if e.state == "ready")
        self.ready_count = len(self.ready)

    def key_blocked(self, key: str, member: str | None) -> bool:
        """A keyed message waits while another of its key is in flight (pending
        or delayed), or while its key belongs to another live member."""
        seq = self.key_inflight.get(key)
        if seq is not None:
            entry = self.entries.get(seq)
            if entry is not None and entry.state in ("pending", "delayed"):
                return True
            del self.key_inflight[key]
        owner = self.key_owner.get(key)
        return owner is not None and owner != member and owner in self.members and member is not None

    def pop_ready(self) -> Entry | None:
        while self.ready:
            _, seq = heapq.heappop(self.ready)
            entry = self.entries.get(seq)
            if entry is not None and entry.state == "ready":
                self.ready_count -= 1
                return entry
        return None

    def describe(self) -> dict[str, Any]:
        states = {"pending": self.pending_count,
                  "delayed": len(self.entries) - self.ready_count - self.pending_count}
        return {"kind": self.kind, "name": self.name, "topic": self.pattern, "filter": self.filter_text,
                "transport": self.transport,
                "guarantee": self.guarantee, "ack_timeout_ms": self.ack_timeout_ms,
                "max_attempts": self.max_attempts, "backlog": self.ready_count, **states, "dlq": len(self.dlq),
                "members": list(self.members), "key": self.key_path, **self.counters}

    def to_data(self) -> dict[str, Any]:
        return {"key": self.key, "pattern": self.pattern, "filter": self.filter_text, "guarantee": self.guarantee,
                "ack_timeout_ms": self.ack_timeout_ms, "max_attempts": self.max_attempts,
                "created_index": self.created_index, "next_seq": self.next_seq,
                "entries": [e.to_data() for e in self.entries.values()],
                "dlq": [e.to_data() for e in self.dlq.values()], "members": list(self.members),
                "counters": self.counters, "transport": self.transport, "acked_keys": list(self.acked_keys),
                "key_path": self.key_path, "key_seqs": self.key_seqs, "key_owner": self.key_owner,
                "key_inflight": self.key_inflight}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Consumer:
        consumer = cls(data["key"], data["pattern"], data["filter"], data["guarantee"], data["ack_timeout_ms"],
                       data["max_attempts"], data["created_index"], data["next_seq"])
        consumer.entries = {row[0]: Entry.from_data(row) for row in data["entries"]}
        consumer.dlq = {row[0]: Entry.from_data(row) for row in data["dlq"]}
        consumer.members = dict.fromkeys(data["members"])
        consumer.counters = dict(data["counters"])
        consumer.transport = data.get("transport")
        consumer.acked_keys = dict.fromkeys(data.get("acked_keys", ()))
        consumer.key_path = data.get("key_path")
        consumer.key_seqs = dict(data.get("key_seqs", {}))
        consumer.key_owner = dict(data.get("key_owner", {}))
        consumer.key_inflight = dict(data.get("key_inflight", {}))
        consumer.pending_count = sum(1 for e in consumer.entries.values() if e.state == "pending")
        consumer.filter_tree = filters.parse(consumer.filter_text) if consumer.filter_text else None
        consumer.rebuild_ready()
        return consumer


@dataclass(slots=True)
class Binding:
    """A topic whose messages a broker transport carries (issue 5). The leader
    publishes offsets after ``cursor`` to the broker and commits ``bus.cursor``
    once the broker holds them; until then each body is held by the binding
    (holder key ``b:<topic>``, never a consumer's).

    ``mode`` ``"direct"``: messages never enter the log (nodes publish them
    to the broker themselves), so ``cursor`` stays where the binding began.
    Its snapshot row has a sixth column only then: older rows load as log."""

    topic: str
    transport: str
    cursor: int            # the last offset the broker confirmed
    created_index: int
    backlog_max: int
    mode: str = "log"

    def to_data(self) -> list[Any]:
        row = [self.topic, self.transport, self.cursor, self.created_index, self.backlog_max]
        if self.mode != "log":
            row.append(self.mode)
        return row

    def describe(self, next_offset: int) -> dict[str, Any]:
        return {"topic": self.topic, "transport": self.transport, "mode": self.mode, "cursor": self.cursor,
                "backlog": next_offset - 1 - self.cursor, "backlog_max": self.backlog_max,
                "created_index": self.created_index}


@dataclass(slots=True)
class Subscription:
    id: str
    consumer: str  # consumer key
    agent: str | None
    created_ms: int

    def to_data(self) -> list[Any]:
        return [self.id, self.consumer, self.agent, self.created_ms]


def backoff_ms(retry: dict[str, Any], attempts: int) -> int:
    delay = retry["backoff_ms"] * retry["backoff_multiplier"] ** max(0, attempts - 1)
    return int(min(delay, retry["max_backoff_ms"]))
