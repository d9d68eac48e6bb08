"""The message bus inside the replicated state: pure and deterministic.

Shapes (see ``design.md`` next to this file for the state diagram):

- A **topic** keeps a log of retained offsets for replay (by count and age).
- A **body** is one stored message, shared by every consumer that holds it;
  it lives while its topic retains it or while any consumer holds it.
- A **consumer** is what messages are routed into: one subscription, one
  consumer group (its members compete for its messages) or one agent's inbox.
  Its entries are ``ready`` (a heap, higher priority first, then publish
  order), ``pending`` (delivered, waiting for an ack until a due time) or
  ``delayed`` (nacked, waiting for a backoff). Dead letters keep their reason.
- **Timers** (redelivery, message TTL, retention by age) sit in one heap of
  due times. Only ``bus.tick`` fires them, and only the leader proposes it
  (DESIGN rule 1): one clock decides every timeout. ``bus.deliver`` is also
  proposed by the leader alone (fetches are served there), so a delivery's
  due time is stamped by the same clock.

Determinism: iteration is over insertion-ordered dicts, never sets of
strings (their order depends on the process's hash seed). Heaps are keyed by
unique tuples, so their pop order is fixed by their contents; that is why
heaps are rebuilt from entries on restore instead of being stored.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.commands import filters
from coordinator.commands.bus import (  # the pure checks and limits; re-exported for the state's callers
    DEFAULT_BACKLOG,
    MAX_ACK_IDS,
    MAX_BACKLOG,
    MAX_BATCH,
    MAX_DELAY_MS,
    MAX_FETCH,
    MAX_OFFSET,
    REPLY_PREFIX,
    RESERVED_PREFIXES,
    START_KINDS,
    TASK_STATUSES,
    BusBind,
    BusCursor,
    BusNack,
    BusSubscribe,
    BusTopicConfigure,
    BusTransportConfigure,
    BusUnbind,
    check_destinations,
    check_key_path,
    check_publishable,
    check_publishable_topic,
    effective_guarantee,
)
from coordinator.commands.messages import in_batch, normalize
from coordinator.commands.topics import is_pattern, matches
from coordinator.errors import InvariantError
from coordinator.state.base import ApplyContext, Rejected, approx_size, charge, invalid, over_quota
from coordinator.state.projections import lookup, scalar_key
from coordinator.types import Event

BINDING_PREFIX = "b:"  # holder key of a transport binding (consumer keys are s:, g:, a:)
MAX_KEYS = 100_000  # ordering keys remembered per keyed consumer
TIMER_COMPACT_EVERY = 4096


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
    (holder key ``b:<topic>``, never a consumer's)."""

    topic: str
    transport: str
    cursor: int            # the last offset the broker confirmed
    created_index: int
    backlog_max: int

    def to_data(self) -> list[Any]:
        return [self.topic, self.transport, self.cursor, self.created_index, self.backlog_max]

    def describe(self, next_offset: int) -> dict[str, Any]:
        return {"topic": self.topic, "transport": self.transport, "cursor": self.cursor,
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


# -- the bus ----------------------------------------------------------------------------

def _backoff_ms(retry: dict[str, Any], attempts: int) -> int:
    delay = retry["backoff_ms"] * retry["backoff_multiplier"] ** max(0, attempts - 1)
    return int(min(delay, retry["max_backoff_ms"]))


class Bus:
    def __init__(self, limits: BusLimits | None = None) -> None:
        self.limits = limits or BusLimits()
        self.topics: dict[str, Topic] = {}
        self.bodies: dict[tuple[str, int], Body] = {}
        self.consumers: dict[str, Consumer] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.bindings: dict[str, Binding] = {}
        self.transport_urls: dict[str, str] = {}  # cluster-wide broker URLs (may hold credentials: never shown)
        self.exact: dict[str, dict[str, None]] = {}   # topic -> consumer keys subscribed to exactly it
        self.wildcard: dict[str, None] = {}           # consumer keys with a wildcard pattern
        self.timers: list[tuple[int, int, str, str, int, int, int]] = []  # (due, n, kind, key, a, b, c)
        self.timer_seq = 0
        self.dedupe: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()  # (topic,id)->(offset,ms)
        self.counters = {"published": 0, "duplicates": 0, "expired": 0, "evicted": 0, "events_dropped": 0,
                         "transform_failed": 0}
        self._evictable: list[tuple[int, str, int]] = []  # heap of (index, topic, offset); stale keys skipped
        self.evictable_count = 0
        self.bytes = 0  # the size of every body
        self.evictable_bytes = 0
        self.owned: dict[str, int] = {}  # principal -> the size of the bodies it published

    # -- bodies and their lifetime -----------------------------------------------------

    def _is_evictable(self, body: Body) -> bool:
        return body.retained and not body.holders

    def _keep(self, body: Body) -> None:
        self.bodies[(body.topic, body.offset)] = body
        self.bytes += body.size
        charge(self.owned, body.owner, body.size)

    def _forget(self, body: Body) -> None:
        del self.bodies[(body.topic, body.offset)]
        self.bytes -= body.size
        charge(self.owned, body.owner, -body.size)

    def _hold(self, body: Body, consumer_key: str, seq: int) -> None:
        if self._is_evictable(body):
            self.evictable_count -= 1
            self.evictable_bytes -= body.size
        body.holders[consumer_key] = seq

    def _release(self, body: Body, consumer_key: str) -> None:
        body.holders.pop(consumer_key, None)
        if body.holders:
            return
        if body.retained:
            self.evictable_count += 1
            self.evictable_bytes += body.size
            heapq.heappush(self._evictable, (body.index, body.topic, body.offset))
            if len(self._evictable) > 2 * self.evictable_count + 1024:
                self._evictable = sorted((b.index, b.topic, b.offset) for b in self.bodies.values()
                                         if self._is_evictable(b))
        else:
            self._forget(body)

    def _unretain(self, body: Body) -> None:
        """The topic no longer retains ``body`` (count, age, eviction)."""
        if not body.retained:
            return
        topic = self.topics[body.topic]
        topic.log.pop(body.offset, None)
        if self._is_evictable(body):
            self.evictable_count -= 1
            self.evictable_bytes -= body.size
        body.retained = False
        if not body.holders:
            self._forget(body)

    def _evict_one(self) -> bool:
        while self._evictable:
            _, topic, offset = heapq.heappop(self._evictable)
            body = self.bodies.get((topic, offset))
            if body is not None and self._is_evictable(body):
                self._unretain(body)
                self.counters["evicted"] += 1
                return True
        return False

    def room_for(self, count: int, size: int = 0) -> bool:
        """Whether ``count`` more messages of ``size`` bytes in all fit,
        counting what eviction (retained, unheld bodies) would free."""
        return (len(self.bodies) - self.evictable_count + count <= self.limits.messages_max
                and self.bytes - self.evictable_bytes + size <= self.limits.bytes_max)

    # -- timers ---------------------------------------------------------------------------

    def _timer(self, due_ms: int, kind: str, key: str, a: int, b: int = 0, c: int = 0) -> None:
        self.timer_seq += 1
        heapq.heappush(self.timers, (due_ms, self.timer_seq, kind, key, a, b, c))
        if self.timer_seq % TIMER_COMPACT_EVERY == 0:
            self._compact_timers()

    def _compact_timers(self) -> None:
        """Drop timers that can no longer do anything (their delivery was acked,
        their body is gone). Triggered by ``timer_seq``, which every replica
        shares, so every replica compacts at the same point."""
        live = [t for t in self.timers if self._timer_live(t)]
        if len(live) < len(self.timers):
            heapq.heapify(live)
            self.timers = live

    def _timer_live(self, timer: tuple[int, int, str, str, int, int, int]) -> bool:
        due, _, kind, key, a, b, c = timer
        if kind == "redeliver":
            consumer = self.consumers.get(key)
            entry = consumer.entries.get(a) if consumer is not None and consumer.created_index == c else None
            return entry is not None and entry.state in ("pending", "delayed") and entry.attempts == b \
                and entry.due_ms == due
        if kind == "ttl":
            body = self.bodies.get((key, a))
            return body is not None and body.ttl_armed
        topic = self.topics.get(key)
        return topic is not None and topic.age_timer_ms == due

    def _arm_ttl(self, body: Body) -> None:
        if body.expires_ms is not None and body.holders and not body.ttl_armed:
            body.ttl_armed = True
            self._timer(body.expires_ms, "ttl", body.topic, body.offset)

    def next_due_ms(self) -> int | None:
        """When the leader should next propose ``bus.tick`` (None: nothing waits)."""
        return self.timers[0][0] if self.timers else None

    def tick(self, ctx: ApplyContext) -> dict[str, Any]:
        fired = 0
        while self.timers and self.timers[0][0] <= ctx.now_ms and fired < self.limits.timers_per_tick:
            due, _, kind, key, a, b, c = heapq.heappop(self.timers)
            fired += 1
            if kind == "redeliver":
                self._on_redeliver(ctx, key, c, a, b, due)
            elif kind == "ttl":
                self._on_ttl(ctx, key, a)
            elif kind == "age":
                self._on_age(ctx, key, due)
            else:
                raise InvariantError(f"unknown bus timer {kind!r}")
        return {"fired": fired, "next_due_ms": self.next_due_ms()}

    def _on_redeliver(self, ctx: ApplyContext, consumer_key: str, created_index: int, seq: int, attempts: int,
                      due: int) -> None:
        consumer = self.consumers.get(consumer_key)
        if consumer is None or consumer.created_index != created_index:
            return  # the consumer was dropped (and perhaps made again under the same name)
        entry = consumer.entries.get(seq)
        if entry is None or entry.state not in ("pending", "delayed") \
                or entry.attempts != attempts or entry.due_ms != due:
            return  # acked, nacked again, or dead since
        if entry.state == "pending":
            consumer.pending_count -= 1
        body = self.bodies[(entry.topic, entry.offset)]
        if body.expires_ms is not None and body.expires_ms <= ctx.now_ms:
            self._dead_letter(ctx, consumer, entry, "ttl")
        elif entry.attempts >= self._max_attempts(consumer, body):
            self._dead_letter(ctx, consumer, entry, "max_attempts")
        else:
            consumer.push_ready(entry)

    def _on_ttl(self, ctx: ApplyContext, topic: str, offset: int) -> None:
        body = self.bodies.get((topic, offset))
        if body is None:
            return
        body.ttl_armed = False
        self.counters["expired"] += 1
        for consumer_key, seq in list(body.holders.items()):
            if consumer_key.startswith(BINDING_PREFIX):
                continue  # the broker got (or gets) the message with its ttl; it expires there
            consumer = self.consumers[consumer_key]
            entry = consumer.entries.get(seq)
            # A pending entry was delivered in time; its redelivery timer checks the TTL.
            if entry is not None and entry.state in ("ready", "delayed"):
                if entry.state == "ready":
                    consumer.ready_count -= 1  # its heap key goes stale
                self._dead_letter(ctx, consumer, entry, "ttl")

    def _on_age(self, ctx: ApplyContext, name: str, due: int) -> None:
        topic = self.topics.get(name)
        if topic is None or topic.age_timer_ms != due:
            return
        topic.age_timer_ms = None
        self._trim_age(ctx, topic)

    def _trim_age(self, ctx: ApplyContext, topic: Topic) -> None:
        max_age = self._max_age(topic)
        while topic.log:
            body = self.bodies[(topic.name, next(iter(topic.log)))]
            if body.publish_ms + max_age > ctx.now_ms:
                if topic.age_timer_ms is None:
                    topic.age_timer_ms = body.publish_ms + max_age
                    self._timer(topic.age_timer_ms, "age", topic.name, 0)
                return
            self._unretain(body)

    def _max_age(self, topic: Topic) -> int:
        return topic.max_age_ms if topic.max_age_ms is not None else self.limits.retention_age_ms

    def _max_messages(self, topic: Topic) -> int:
        if topic.max_messages is not None:
            return topic.max_messages
        return 0 if topic.name.startswith(REPLY_PREFIX) else self.limits.retention_messages

    # -- topics ---------------------------------------------------------------------------

    def configure_topic(self, ctx: ApplyContext, command: BusTopicConfigure) -> dict[str, Any]:
        name, max_messages, max_age_ms = command.topic, command.max_messages, command.max_age_ms
        topic = self.topics.get(name)
        if topic is None:
            if len(self.topics) >= self.limits.topics_max:
                raise Rejected("unavailable", f"too many topics ({self.limits.topics_max})")
            topic = self.topics[name] = Topic(name)
        if max_age_ms != topic.max_age_ms:
            topic.age_timer_ms = None  # the armed timer was for the old age; _on_age ignores it from now on
        topic.max_messages = max_messages
        topic.max_age_ms = max_age_ms
        self._trim_count(topic)
        self._trim_age(ctx, topic)
        return self.describe_topic(topic)

    def describe_topic(self, topic: Topic) -> dict[str, Any]:
        first = next(iter(topic.log), None)
        return {"topic": topic.name, "next_offset": topic.next_offset, "first_offset": first,
                "retained": len(topic.log), "published": topic.published,
                "max_messages": self._max_messages(topic), "max_age_ms": self._max_age(topic)}

    def _trim_count(self, topic: Topic) -> None:
        limit = self._max_messages(topic)
        while len(topic.log) > limit:
            self._unretain(self.bodies[(topic.name, next(iter(topic.log)))])

    # -- publishing -------------------------------------------------------------------------

    def check_publish(self, topic: str, messages: Sequence[dict[str, Any]], agent_exists: Any) -> int:
        """Check a parsed publish (``BusPublish``) against the bus before
        anything changes: registered destinations, the number of topics, a
        bound topic's backlog, the room left. Returns the messages' size in all."""
        for message in messages:
            if message["destination"]:  # the slow path: check each, naming its place in the batch
                for i, m in enumerate(messages):
                    try:
                        check_destinations(m, agent_exists)
                    except Rejected as exc:
                        raise Rejected(exc.code, in_batch(i, len(messages), exc.message)) from None
                break
        if topic not in self.topics and len(self.topics) >= self.limits.topics_max:
            raise Rejected("unavailable", f"too many topics ({self.limits.topics_max})")
        binding = self.bindings.get(topic)
        if binding is not None:
            waiting = self.topics[topic].next_offset - 1 - binding.cursor
            if waiting + len(messages) > binding.backlog_max:
                raise Rejected("unavailable", f"{waiting} messages of {topic!r} wait for the {binding.transport} "
                                              f"transport (at most {binding.backlog_max}); retry when it drains")
        if not self.room_for(len(messages)):
            raise Rejected("unavailable", f"the bus holds {self.limits.messages_max} messages; "
                                          "consumers must ack (or topics retain less) before more are accepted")
        size = sum(approx_size(m) for m in messages)
        if not self.room_for(len(messages), size):
            raise over_quota("bus_bytes_max", f"the bus holds about {self.bytes} bytes of messages "
                                              f"(at most {self.limits.bytes_max}) and this adds {size}; consumers "
                                              "must ack (or topics retain less) before more are accepted")
        return size

    def check_routes(self, topic_name: str, targets: list[str]) -> None:
        """Refuse a publish whose transforms route to topics the bus cannot take
        (too many topics, a bound topic's backlog full), before anything changes."""
        new = {t for t in targets if t not in self.topics and t != topic_name}
        if new and len(self.topics) + len(new) + (topic_name not in self.topics) > self.limits.topics_max:
            raise Rejected("unavailable", f"too many topics ({self.limits.topics_max})")
        for target in dict.fromkeys(t for t in targets if t != topic_name):
            binding = self.bindings.get(target)
            if binding is None:
                continue
            waiting = self.topics[target].next_offset - 1 - binding.cursor
            if waiting + targets.count(target) > binding.backlog_max:
                raise Rejected("unavailable", f"{waiting} messages of {target!r} wait for the {binding.transport} "
                                              f"transport (at most {binding.backlog_max}); retry when it drains")

    def publish(self, ctx: ApplyContext, topic_name: str, messages: Sequence[dict[str, Any]],
                outcomes: list[Any] | None = None) -> dict[str, Any]:
        """Store and route ``messages`` published on ``topic_name``. With
        ``outcomes`` (``coordinator.state.transforms.Outcome``, one a message)
        each is stored as its transforms made it, on the topic they routed it
        to, or dead-lettered with the reason when they failed."""
        if topic_name not in self.topics:
            self.topics[topic_name] = Topic(topic_name)
        self._prune_dedupe(ctx.now_ms)
        out = []
        for i, message in enumerate(messages):
            exactly_once = message["deliveryOptions"]["guarantee"] == "exactly-once"
            if exactly_once and (topic_name, message["id"]) in self.dedupe:
                offset, _ = self.dedupe[(topic_name, message["id"])]
                self.counters["duplicates"] += 1
                out.append({"id": message["id"], "offset": offset, "duplicate": True})
                continue
            outcome = outcomes[i] if outcomes is not None else None
            target_name = outcome.topic if outcome is not None else topic_name
            stored = outcome.message if outcome is not None else message
            failure = outcome.failure if outcome is not None else None
            target = self.topics.get(target_name)
            if target is None:
                target = self.topics[target_name] = Topic(target_name)
            offset, routed = self._store(ctx, target, stored, owner=ctx.principal,
                                         retain=not message["destination"] and failure is None,
                                         dead_reason=failure)
            if exactly_once:
                self.dedupe[(topic_name, message["id"])] = (offset, ctx.now_ms)
                if len(self.dedupe) > self.limits.dedupe_max:
                    self.dedupe.popitem(last=False)
            item: dict[str, Any] = {"id": message["id"], "offset": offset, "routed": routed}
            if target_name != topic_name:
                item["topic"] = target_name
            if failure is not None:
                item["transform_failed"] = failure
                self.counters["transform_failed"] = self.counters.get("transform_failed", 0) + 1
            out.append(item)
        return {"topic": topic_name, "index": ctx.index, "messages": out}

    def _prune_dedupe(self, now_ms: int) -> None:
        horizon = now_ms - self.limits.dedupe_window_ms
        while self.dedupe and next(iter(self.dedupe.values()))[1] < horizon:
            self.dedupe.popitem(last=False)

    def _store(self, ctx: ApplyContext, topic: Topic, message: dict[str, Any], *, retain: bool,
               dead_reason: str | None = None, owner: str | None = None) -> tuple[int, int]:
        """Store and route one message: its offset and how many consumers took
        it (with ``dead_reason``, straight into their dead-letter queues)."""
        offset = topic.next_offset
        topic.next_offset += 1
        topic.published += 1
        self.counters["published"] += 1
        ttl = message["ttl"]
        size = approx_size(message)
        while ((len(self.bodies) >= self.limits.messages_max or self.bytes + size > self.limits.bytes_max)
               and self._evict_one()):
            pass
        body = Body(topic.name, offset, ctx.index, ctx.now_ms, message,
                    None if ttl is None else ctx.now_ms + ttl, retained=False, size=size, owner=owner)
        self._keep(body)
        binding = self.bindings.get(topic.name)
        if message["destination"]:
            for agent in dict.fromkeys(message["destination"]):
                self._enqueue(ctx, self._inbox(ctx, agent), body)
        elif binding is None:
            for consumer in self.matching(topic.name, message):
                self._enqueue(ctx, consumer, body)
        if dead_reason is not None:
            for key, seq in list(body.holders.items()):
                consumer = self.consumers[key]
                entry = consumer.entries.get(seq)
                if entry is not None:
                    self._dead_letter(ctx, consumer, entry, dead_reason)
        routed = len(body.holders)
        if binding is not None and not message["destination"] and dead_reason is None:
            self._hold(body, BINDING_PREFIX + topic.name, offset)  # until the broker confirms it
        # A DLQ that keeps nothing (dlq_max=0) may have released the body while it was routed.
        if (topic.name, offset) not in self.bodies:
            self._keep(body)
        self._arm_ttl(body)
        if retain and self._max_messages(topic) > 0:
            body.retained = True
            topic.log[offset] = None
            if not body.holders:
                self.evictable_count += 1
                self.evictable_bytes += body.size
                heapq.heappush(self._evictable, (body.index, body.topic, body.offset))
            self._trim_count(topic)
            if topic.age_timer_ms is None and topic.log:
                self._trim_age(ctx, topic)
        elif not body.holders:
            self._forget(body)
        return offset, routed

    def matching(self, topic: str, message: dict[str, Any]) -> list[Consumer]:
        """The subscriptions and groups that take ``message`` on ``topic``
        (pattern and filter), in a deterministic order."""
        keys = list(self.exact.get(topic, ()))
        keys.extend(k for k in self.wildcard if matches(self.consumers[k].pattern or "", topic))
        consumers = [self.consumers[k] for k in keys]
        return [c for c in consumers if c.filter_tree is None or filters.evaluate(c.filter_tree, message)]

    def _inbox(self, ctx: ApplyContext, agent: str) -> Consumer:
        key = "a:" + agent
        consumer = self.consumers.get(key)
        if consumer is None:
            consumer = self.consumers[key] = Consumer(key, None, None, "exactly-once", None, None, ctx.index)
        return consumer

    def _enqueue(self, ctx: ApplyContext, consumer: Consumer, body: Body) -> None:
        if body.expires_ms is not None and body.expires_ms <= ctx.now_ms:
            return
        if consumer.key in body.holders:
            return  # at most one entry per message in a consumer
        seq = consumer.next_seq
        consumer.next_seq += 1
        consumer.counters["enqueued"] += 1
        entry = Entry(seq, body.topic, body.offset, body.message["priority"])
        if consumer.key_path is not None:
            entry.key = message_key(body.message, consumer.key_path)
            if entry.key is not None:
                self._count_key(consumer, entry)
        self._hold(body, consumer.key, seq)
        if len(consumer.entries) >= self.limits.queue_max:
            consumer.counters["overflowed"] += 1
            self._dead_letter(ctx, consumer, entry, "overflow", in_entries=False)
            return
        consumer.entries[seq] = entry
        consumer.push_ready(entry)

    def publish_events(self, ctx: ApplyContext, events: list[Event]) -> None:
        """The cluster's own events (agent.*, lock.*, system.*) as bus messages on
        topics named by their type. Delivered to live subscriptions only: they
        are not retained for replay (``/v1/events`` keeps their history)."""
        for event in events:
            message = _event_message(event)
            topic = self.topics.get(event.type)
            if not self.matching(event.type, message) and (topic is None or self._max_messages(topic) == 0):
                continue
            if not self.room_for(1, approx_size(message)):
                self.counters["events_dropped"] += 1
                continue
            if topic is None:
                topic = self.topics[event.type] = Topic(event.type, max_messages=0)
            self._store(ctx, topic, message, retain=True)

    # -- transport bindings (issue 5) ---------------------------------------------------------

    def bind(self, ctx: ApplyContext, command: BusBind) -> dict[str, Any]:
        """Messages published on ``topic`` from now on go to a broker transport
        (the ones before stay where they are). Idempotent for the same transport."""
        name, transport = command.topic, command.transport
        backlog_max = DEFAULT_BACKLOG if command.backlog_max is None else command.backlog_max
        binding = self.bindings.get(name)
        if binding is not None:
            if binding.transport != transport:
                raise Rejected("conflict", f"topic {name!r} is bound to {binding.transport!r}; unbind it first")
            binding.backlog_max = backlog_max
            return binding.describe(self.topics[name].next_offset)
        topic = self.topics.get(name)
        if topic is None:
            if len(self.topics) >= self.limits.topics_max:
                raise Rejected("unavailable", f"too many topics ({self.limits.topics_max})")
            topic = self.topics[name] = Topic(name)
        binding = self.bindings[name] = Binding(name, transport, topic.next_offset - 1, ctx.index, backlog_max)
        return binding.describe(topic.next_offset)

    def unbind(self, ctx: ApplyContext, command: BusUnbind) -> dict[str, Any]:
        """Stop sending ``topic`` to its broker. Refused while messages still wait
        for the broker, unless ``drop_backlog`` (they are then dropped)."""
        name, drop = command.topic, bool(command.drop_backlog)
        binding = self.bindings.get(name)
        if binding is None:
            raise Rejected("not_found", f"topic {name!r} is not bound to a transport")
        topic = self.topics[name]
        waiting = topic.next_offset - 1 - binding.cursor
        if waiting and not drop:
            raise Rejected("conflict", f"{waiting} messages of {name!r} still wait for {binding.transport!r}; "
                                       "wait for it to drain or unbind with drop_backlog")
        self._advance(binding, topic.next_offset - 1)
        del self.bindings[name]
        return {"topic": name, "transport": binding.transport, "dropped": waiting}

    def advance_cursor(self, ctx: ApplyContext, command: BusCursor) -> dict[str, Any]:
        """The broker holds the topic's messages up to ``offset`` (proposed by the
        leader after the broker confirmed). Idempotent; never moves back."""
        name, offset = command.topic, command.offset
        binding = self.bindings.get(name)
        if binding is None:
            raise Rejected("not_found", f"topic {name!r} is not bound to a transport")
        if command.created_index is not None and command.created_index != binding.created_index:
            raise Rejected("conflict", f"the binding of {name!r} was made again since")
        last = self.topics[name].next_offset - 1
        if offset > last:
            raise invalid("offset", f"{name!r} has no offset {offset} yet (last {last})")
        moved = self._advance(binding, offset)
        return {**binding.describe(last + 1), "moved": moved}

    def _advance(self, binding: Binding, offset: int) -> int:
        moved = 0
        key = BINDING_PREFIX + binding.topic
        for o in range(binding.cursor + 1, offset + 1):
            body = self.bodies.get((binding.topic, o))
            if body is not None and key in body.holders:
                self._release(body, key)
            moved += 1
        binding.cursor = max(binding.cursor, offset)
        return moved

    def transport_acked(self, ctx: ApplyContext, consumer: Consumer, keys: Sequence[str]) -> dict[str, Any]:
        """Keys a transport consumer processed (committed before the broker ack,
        so a message the broker hands out again is recognised and not delivered)."""
        if consumer.transport is None:
            raise invalid("sub", "this subscription is not served by a transport")
        new = [k for k in dict.fromkeys(keys) if k not in consumer.acked_keys]
        for key in new:
            consumer.acked_keys[key] = None
        while len(consumer.acked_keys) > self.limits.acked_keys_max:
            consumer.acked_keys.pop(next(iter(consumer.acked_keys)))
        consumer.counters["acked"] += len(new)
        return {"new": len(new)}

    def configure_transport(self, ctx: ApplyContext, command: BusTransportConfigure) -> dict[str, Any]:
        """Set (``url``) or remove (``url`` null) the cluster-wide URL of a broker
        transport. Answers without the URL: it may hold a password."""
        name, url = command.name, command.url
        if url is None:
            if name not in self.transport_urls:
                raise Rejected("not_found", f"transport {name!r} has no cluster-wide URL")
            del self.transport_urls[name]
            return {"name": name, "configured": False}
        if name not in self.transport_urls and len(self.transport_urls) >= 64:
            raise Rejected("unavailable", "at most 64 transports")
        self.transport_urls[name] = url
        return {"name": name, "configured": True}

    def unsent(self, topic: str, limit: int) -> list[Body]:
        """Bodies of a bound topic after its cursor, in offset order (for the leader's driver)."""
        binding = self.bindings.get(topic)
        if binding is None:
            return []
        out = []
        last = self.topics[topic].next_offset - 1
        for o in range(binding.cursor + 1, min(last, binding.cursor + limit) + 1):
            body = self.bodies.get((topic, o))
            if body is not None and BINDING_PREFIX + topic in body.holders:
                out.append(body)
        return out

    # -- consumers and subscriptions --------------------------------------------------------

    def subscribe(self, ctx: ApplyContext, command: BusSubscribe, agent_exists: Any) -> dict[str, Any]:
        pattern, group, filter_text, tree = command.topic, command.group, command.filter, command.filter_tree
        guarantee, ack_timeout_ms, max_attempts = command.guarantee, command.ack_timeout_ms, command.max_attempts
        key_path, agent = command.key, command.agent
        if agent is not None and not agent_exists(agent):
            raise Rejected("not_found", f"agent: {agent!r} is not registered")
        start, start_value = self._check_start(command)
        if len(self.subscriptions) >= self.limits.subscriptions_max:
            raise Rejected("unavailable", f"too many subscriptions ({self.limits.subscriptions_max})")
        binding = self.bindings.get(pattern)
        if binding is not None and filter_text is not None:
            raise invalid("filter", f"{pattern!r} is carried by the {binding.transport} transport, which does not "
                                    "filter; subscribe without a filter")
        sub_id = f"sub-{ctx.index}"
        key = "g:" + group if group is not None else "s:" + sub_id
        consumer = self.consumers.get(key)
        if consumer is not None:
            settings = (consumer.pattern, consumer.filter_text, consumer.guarantee, consumer.ack_timeout_ms,
                        consumer.max_attempts, consumer.key_path)
            if settings != (pattern, filter_text, guarantee, ack_timeout_ms, max_attempts, key_path) \
                    or consumer.transport != (binding.transport if binding else None):
                raise Rejected("conflict", f"group {group!r} exists with another topic, filter, guarantee, "
                                           "ack timeout, max attempts or key")
            replayed = 0
        else:
            if len(self.consumers) >= self.limits.consumers_max:
                raise Rejected("unavailable", f"too many consumers ({self.limits.consumers_max})")
            if binding is not None and key_path is not None:
                raise invalid("key", f"{pattern!r} is carried by the {binding.transport} transport; its order is "
                                     "the broker's")
            consumer = Consumer(key, pattern, filter_text, guarantee, ack_timeout_ms, max_attempts, ctx.index,
                                filter_tree=tree, transport=binding.transport if binding else None,
                                key_path=key_path)
            self.consumers[key] = consumer
            if is_pattern(pattern):
                self.wildcard[key] = None
            else:
                self.exact.setdefault(pattern, {})[key] = None
            # A broker's group reads the bound topic from its first message itself.
            replayed = 0 if binding else self._replay(ctx, consumer, start, start_value)
        consumer.members[sub_id] = None
        self.subscriptions[sub_id] = Subscription(sub_id, key, agent, ctx.now_ms)
        return {"id": sub_id, "group": group, "replayed": replayed, "consumer": consumer.describe()}

    def _check_start(self, command: BusSubscribe) -> tuple[str, int]:
        """Where a subscription starts; an offset its topic no longer retains is refused."""
        start, pattern = command.start, command.topic
        value = command.start_value or 0
        if start == "offset":
            value = max(value, 1)  # offsets start at 1
            topic = self.topics.get(pattern)
            first = next(iter(topic.log), None) if topic else None
            if topic is not None and value < topic.next_offset and (first is None or value < first):
                raise Rejected("compacted", f"start_offset: offset {value} of {pattern!r} is no longer retained; "
                                            f"the oldest retained is {first if first is not None else 'none'}")
        return start, value

    def _replay(self, ctx: ApplyContext, consumer: Consumer, start: str, value: int) -> int:
        if start == "new":
            return 0
        found: list[Body] = []
        for name, topic in self.topics.items():
            if not matches(consumer.pattern or "", name):
                continue
            for offset in topic.log:
                body = self.bodies[(name, offset)]
                if start == "offset" and offset < value:
                    continue
                if start == "time" and body.publish_ms < value:
                    continue
                if consumer.filter_tree is None or filters.evaluate(consumer.filter_tree, body.message):
                    found.append(body)
        found.sort(key=lambda b: (b.index, b.topic, b.offset))
        replayed = 0
        for body in found:
            if len(consumer.entries) >= self.limits.queue_max:
                break
            before = consumer.next_seq
            self._enqueue(ctx, consumer, body)
            replayed += consumer.next_seq - before
        for body in found:
            self._arm_ttl(body)
        return replayed

    def unsubscribe(self, ctx: ApplyContext, sub_id: str) -> dict[str, Any]:
        sub = self.subscriptions.pop(sub_id, None)
        if sub is None:
            raise Rejected("not_found", f"subscription {sub_id!r} does not exist")
        consumer = self.consumers[sub.consumer]
        consumer.members.pop(sub_id, None)
        dropped = 0
        if consumer.kind == "subscription":
            dropped = self._drop_consumer(consumer)
        return {"id": sub_id, "dropped": dropped}

    def delete_group(self, ctx: ApplyContext, group: str) -> dict[str, Any]:
        consumer = self.consumers.get("g:" + group)
        if consumer is None:
            raise Rejected("not_found", f"group {group!r} does not exist")
        for sub_id in consumer.members:
            self.subscriptions.pop(sub_id, None)
        return {"group": group, "dropped": self._drop_consumer(consumer)}

    def drop_agent(self, agent: str) -> None:
        """An agent left: its inbox and the subscriptions it owned go with it."""
        for sub in [s for s in self.subscriptions.values() if s.agent == agent]:
            del self.subscriptions[sub.id]
            consumer = self.consumers[sub.consumer]
            consumer.members.pop(sub.id, None)
            if consumer.kind == "subscription":
                self._drop_consumer(consumer)
        inbox = self.consumers.get("a:" + agent)
        if inbox is not None:
            self._drop_consumer(inbox)

    def _drop_consumer(self, consumer: Consumer) -> int:
        del self.consumers[consumer.key]
        self.wildcard.pop(consumer.key, None)
        if consumer.pattern is not None and consumer.pattern in self.exact:
            self.exact[consumer.pattern].pop(consumer.key, None)
            if not self.exact[consumer.pattern]:
                del self.exact[consumer.pattern]
        dropped = 0
        for entry in (*consumer.entries.values(), *consumer.dlq.values()):
            self._release(self.bodies[(entry.topic, entry.offset)], consumer.key)
            dropped += 1
        return dropped

    def consumer_of(self, sub_id: str | None, agent: str | None = None) -> Consumer:
        """The consumer a command names: ``sub`` (a subscription id) or ``agent`` (its inbox)."""
        if agent is not None:
            consumer = self.consumers.get("a:" + agent)
            if consumer is None:
                raise Rejected("not_found", f"agent {agent!r} has no inbox (nothing was sent to it)")
            return consumer
        sub = self.subscriptions.get(sub_id)  # type: ignore[arg-type]
        if sub is None:
            raise Rejected("not_found", f"subscription {sub_id!r} does not exist")
        return self.consumers[sub.consumer]

    # -- delivery ------------------------------------------------------------------------------

    def _max_attempts(self, consumer: Consumer, body: Body) -> int:
        if consumer.max_attempts is not None:
            return consumer.max_attempts
        return body.message["deliveryOptions"]["retry"]["max_attempts"]

    def _count_key(self, consumer: Consumer, entry: Entry) -> None:
        assert entry.key is not None
        if entry.key not in consumer.key_seqs and len(consumer.key_seqs) >= MAX_KEYS:
            self._forget_keys(consumer)
        entry.key_seq = consumer.key_seqs.get(entry.key, 0) + 1
        consumer.key_seqs[entry.key] = entry.key_seq

    @staticmethod
    def _forget_keys(consumer: Consumer) -> None:
        """At ``MAX_KEYS`` keys, forget the keys no entry holds (their numbering restarts at 1)."""
        held = {e.key for e in (*consumer.entries.values(), *consumer.dlq.values())}
        consumer.key_seqs = {k: v for k, v in consumer.key_seqs.items() if k in held}
        consumer.key_owner = {k: v for k, v in consumer.key_owner.items() if k in held}
        consumer.key_inflight = {k: v for k, v in consumer.key_inflight.items() if k in held}

    def deliver(self, ctx: ApplyContext, consumer: Consumer, member: str | None, max_n: int) -> dict[str, Any]:
        """Hand out up to ``max_n`` ready messages, highest priority first (a
        keyed consumer: in publish order, at most one in flight per key, each
        key to one member while it lives)."""
        out = []
        waiting: list[Entry] = []
        while len(out) < max_n:
            entry = consumer.pop_ready()
            if entry is None:
                break
            if entry.key is not None and consumer.key_blocked(entry.key, member):
                waiting.append(entry)
                continue
            body = self.bodies[(entry.topic, entry.offset)]
            if body.expires_ms is not None and body.expires_ms <= ctx.now_ms:
                self._dead_letter(ctx, consumer, entry, "ttl")
                continue
            entry.attempts += 1
            consumer.counters["delivered"] += 1
            if entry.attempts > 1:
                consumer.counters["redelivered"] += 1
            options = body.message["deliveryOptions"]
            guarantee = effective_guarantee(consumer.guarantee, options["guarantee"])
            delivery = {"delivery_id": consumer.delivery_id(entry.seq), "seq": entry.seq, "attempt": entry.attempts,
                        "topic": entry.topic, "offset": entry.offset, "guarantee": guarantee,
                        "message": body.message}
            if entry.key is not None:
                delivery.update(key=entry.key, key_seq=entry.key_seq)
                if member is not None:
                    consumer.key_owner[entry.key] = member
                consumer.key_inflight[entry.key] = entry.seq
            out.append(delivery)
            if guarantee == "at-most-once":
                del consumer.entries[entry.seq]
                self._release(body, consumer.key)
                continue
            timeout = consumer.ack_timeout_ms if consumer.ack_timeout_ms is not None else options["timeout"]
            entry.state = "pending"
            entry.member = member
            entry.due_ms = ctx.now_ms + timeout + _backoff_ms(options["retry"], entry.attempts)
            consumer.pending_count += 1
            self._timer(entry.due_ms, "redeliver", consumer.key, entry.seq, entry.attempts, consumer.created_index)
        for entry in waiting:  # back, in their order, for when their key is free
            consumer.push_ready(entry)
        return {"deliveries": out, "backlog": consumer.ready_count}

    def ack(self, ctx: ApplyContext, consumer: Consumer, delivery_ids: Sequence[str]) -> dict[str, Any]:
        seqs = self._seqs(consumer, delivery_ids)
        acked, unknown = [], []
        for delivery_id, seq in seqs:
            entry = consumer.entries.pop(seq, None) if seq is not None else None
            if entry is None and seq is not None:
                entry = consumer.dlq.pop(seq, None)  # processed after all: it leaves the DLQ
            if entry is None:
                unknown.append(delivery_id)
                continue
            if entry.state == "ready":
                consumer.ready_count -= 1
            elif entry.state == "pending":
                consumer.pending_count -= 1
            consumer.counters["acked"] += 1
            self._release(self.bodies[(entry.topic, entry.offset)], consumer.key)
            acked.append(delivery_id)
        return {"acked": acked, "unknown": unknown}

    def nack(self, ctx: ApplyContext, consumer: Consumer, command: BusNack) -> dict[str, Any]:
        seqs = self._seqs(consumer, command.delivery_ids)
        delay_ms, dead = command.delay_ms, bool(command.dead_letter)
        nacked, unknown = [], []
        for delivery_id, seq in seqs:
            entry = consumer.entries.get(seq) if seq is not None else None
            if entry is None or entry.state != "pending":
                unknown.append(delivery_id)
                continue
            consumer.pending_count -= 1
            consumer.counters["nacked"] += 1
            nacked.append(delivery_id)
            body = self.bodies[(entry.topic, entry.offset)]
            if dead:
                self._dead_letter(ctx, consumer, entry, "rejected")
            elif entry.attempts >= self._max_attempts(consumer, body):
                self._dead_letter(ctx, consumer, entry, "max_attempts")
            else:
                delay = delay_ms if delay_ms is not None else \
                    _backoff_ms(body.message["deliveryOptions"]["retry"], entry.attempts)
                if delay == 0:
                    consumer.push_ready(entry)
                else:
                    entry.state = "delayed"
                    entry.member = None
                    entry.due_ms = ctx.now_ms + delay
                    self._timer(entry.due_ms, "redeliver", consumer.key, entry.seq, entry.attempts,
                                consumer.created_index)
        return {"nacked": nacked, "unknown": unknown}

    @staticmethod
    def _seqs(consumer: Consumer, delivery_ids: Sequence[str]) -> list[tuple[str, int | None]]:
        """The parsed ids (``commands.bus.check_delivery_ids``), each once, with their seq here."""
        return [(d, consumer.seq_of(d)) for d in dict.fromkeys(delivery_ids)]

    # -- dead letters -------------------------------------------------------------------------

    def _dead_letter(self, ctx: ApplyContext, consumer: Consumer, entry: Entry, reason: str, *,
                     in_entries: bool = True) -> None:
        if in_entries:
            consumer.entries.pop(entry.seq, None)
        entry.state = "dead"
        entry.member = None
        entry.reason = reason
        entry.dead_ms = ctx.now_ms
        consumer.dlq[entry.seq] = entry
        consumer.counters["dead_lettered"] += 1
        while len(consumer.dlq) > self.limits.dlq_max:
            oldest = consumer.dlq.pop(next(iter(consumer.dlq)))
            consumer.counters["dlq_dropped"] += 1
            self._release(self.bodies[(oldest.topic, oldest.offset)], consumer.key)

    def dead_letters(self, consumer: Consumer, limit: int) -> list[dict[str, Any]]:
        out = []
        for entry in consumer.dlq.values():
            if len(out) >= limit:
                break
            out.append({"delivery_id": consumer.delivery_id(entry.seq), "reason": entry.reason,
                        "attempts": entry.attempts, "dead_ms": entry.dead_ms, "topic": entry.topic,
                        "offset": entry.offset, "message": self.bodies[(entry.topic, entry.offset)].message})
        return out

    def redrive(self, ctx: ApplyContext, consumer: Consumer, delivery_ids: Sequence[str] | None) -> dict[str, Any]:
        """Dead letters back to the ready queue with fresh attempts (all when
        ``delivery_ids`` is None). They keep their delivery ids."""
        chosen = self._dead(consumer, delivery_ids)
        room = self.limits.queue_max - len(consumer.entries)
        if len(chosen) > room:
            raise Rejected("unavailable", f"the queue has room for {max(room, 0)} more messages")
        for entry in chosen:
            del consumer.dlq[entry.seq]
            entry.attempts = 0
            entry.reason = None
            consumer.entries[entry.seq] = entry
            consumer.push_ready(entry)
            consumer.counters["redriven"] += 1
        return {"redriven": [consumer.delivery_id(e.seq) for e in chosen]}

    def purge(self, ctx: ApplyContext, consumer: Consumer, delivery_ids: Sequence[str] | None) -> dict[str, Any]:
        chosen = self._dead(consumer, delivery_ids)
        for entry in chosen:
            del consumer.dlq[entry.seq]
            self._release(self.bodies[(entry.topic, entry.offset)], consumer.key)
        return {"purged": len(chosen)}

    def _dead(self, consumer: Consumer, delivery_ids: Sequence[str] | None) -> list[Entry]:
        if delivery_ids is None:
            return list(consumer.dlq.values())
        chosen = []
        for delivery_id, seq in self._seqs(consumer, delivery_ids):
            entry = consumer.dlq.get(seq) if seq is not None else None
            if entry is None:
                raise Rejected("not_found", f"delivery {delivery_id!r} is not a dead letter of this consumer")
            chosen.append(entry)
        return chosen

    # -- snapshots ----------------------------------------------------------------------------

    def to_data(self) -> dict[str, Any]:
        return {
            "topics": [t.to_data() for t in self.topics.values()],
            "bodies": [b.to_data() for b in self.bodies.values()],
            "consumers": [c.to_data() for c in self.consumers.values()],
            "subscriptions": [s.to_data() for s in self.subscriptions.values()],
            "bindings": [b.to_data() for b in self.bindings.values()],
            "transport_urls": self.transport_urls,
            "timers": [list(t) for t in sorted(self.timers)],
            "timer_seq": self.timer_seq,
            "dedupe": [[t, i, o, ms] for (t, i), (o, ms) in self.dedupe.items()],
            "counters": self.counters,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any], limits: BusLimits | None = None) -> Bus:
        bus = cls(limits)
        bus.topics = {row[0]: Topic.from_data(row) for row in data["topics"]}
        for row in data["bodies"]:
            bus._keep(Body.from_data(row))
        for row in data["consumers"]:
            consumer = Consumer.from_data(row)
            bus.consumers[consumer.key] = consumer
            if consumer.pattern is None:
                continue
            if is_pattern(consumer.pattern):
                bus.wildcard[consumer.key] = None
            else:
                bus.exact.setdefault(consumer.pattern, {})[consumer.key] = None
        bus.subscriptions = {row[0]: Subscription(*row) for row in data["subscriptions"]}
        bus.bindings = {row[0]: Binding(*row) for row in data.get("bindings", [])}
        bus.transport_urls = dict(data.get("transport_urls", {}))
        bus.timers = [tuple(t) for t in data["timers"]]  # type: ignore[misc]
        bus.timer_seq = data["timer_seq"]
        bus.dedupe = OrderedDict(((t, i), (o, ms)) for t, i, o, ms in data["dedupe"])
        bus.counters = dict(data["counters"])
        bus._evictable = sorted((b.index, b.topic, b.offset) for b in bus.bodies.values() if bus._is_evictable(b))
        bus.evictable_count = len(bus._evictable)
        bus.evictable_bytes = sum(bus.bodies[(t, o)].size for _, t, o in bus._evictable)
        return bus


_EVENT_OPTIONS = normalize({"id": "x", "type": "event", "source": "x"}, 0)["deliveryOptions"]


def _event_message(event: Event) -> dict[str, Any]:
    return {"id": f"event-{event.seq}", "type": "event", "source": "coordinator", "destination": [],
            "timestamp": event.time_ms, "correlationId": None, "replyTo": None, "priority": 5, "ttl": None,
            "headers": {"seq": str(event.seq), "index": str(event.index)}, "payload": event.data,
            "deliveryOptions": _EVENT_OPTIONS}


def message_key(message: dict[str, Any], path: str) -> str | None:
    """The ordering key of a message (a scalar's text), None when it has none."""
    return scalar_key(lookup(message, path))


__all__ = [
    "DEFAULT_BACKLOG", "MAX_ACK_IDS", "MAX_BACKLOG", "MAX_BATCH", "MAX_DELAY_MS", "MAX_FETCH", "MAX_OFFSET",
    "REPLY_PREFIX", "RESERVED_PREFIXES", "START_KINDS", "TASK_STATUSES", "Bus", "BusLimits", "Consumer",
    "check_key_path", "check_publishable", "check_publishable_topic", "effective_guarantee", "message_key",
]
