"""The message bus inside the replicated state: pure and deterministic.

``Bus`` is the facade the state machine calls; each part has one job:
``bus_retention`` (topics, bodies, what they keep and evict), ``bus_timers``
(the heap of due times, one type per kind of timer), ``bus_consumers``
(subscriptions, groups, inboxes, deliveries, acks), ``bus_deadletters`` and
``bus_bindings`` (broker transports and their cursors). Records and their
snapshot rows are in ``bus_records``. The facade publishes (routing a message
touches every part), fires timers and writes and restores the snapshot.

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

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

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
from coordinator.state.base import ApplyContext, Rejected, approx_size, over_quota
from coordinator.state.bus_bindings import BINDING_PREFIX, Brokers
from coordinator.state.bus_consumers import MAX_KEYS, Consumers, message_key
from coordinator.state.bus_deadletters import DeadLetters
from coordinator.state.bus_records import (
    COUNTERS,
    Binding,
    Body,
    BusLimits,
    Consumer,
    Entry,
    Subscription,
    Topic,
)
from coordinator.state.bus_retention import Retention
from coordinator.state.bus_timers import TIMER_COMPACT_EVERY, AgeTimer, RedeliverTimer, Timer, Timers, TtlTimer
from coordinator.types import Event


class Bus:
    """The facade: what the state machine, the services and the read views
    call. The parts share the dicts they are given (``topics``, ``bodies``,
    ``consumers``...): none of them replaces one."""

    def __init__(self, limits: BusLimits | None = None) -> None:
        self.limits = limits or BusLimits()
        self.counters = {"published": 0, "duplicates": 0, "expired": 0, "evicted": 0, "events_dropped": 0,
                         "transform_failed": 0}
        self.dedupe: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()  # (topic,id)->(offset,ms)
        self.schedule = Timers()
        self.retention = Retention(self.limits, self.schedule, self.counters)
        self.dlq = DeadLetters(self.limits, self.retention)
        self.brokers = Brokers(self.limits, self.retention)
        self.delivery = Consumers(self.limits, self.retention, self.schedule, self.dlq, self.brokers)
        self.schedule.live = self._timer_live
        self.topics = self.retention.topics
        self.bodies = self.retention.bodies
        self.owned = self.retention.owned
        self.consumers = self.delivery.consumers
        self.subscriptions = self.delivery.subscriptions
        self.bindings = self.brokers.bindings
        self.transport_urls = self.brokers.transport_urls

    @property
    def bytes(self) -> int:
        """The size of every body."""
        return self.retention.bytes

    @property
    def evictable_count(self) -> int:
        return self.retention.evictable_count

    @property
    def timers(self) -> list[Timer]:
        """The heap of due timers (read only: ``schedule`` changes it)."""
        return self.schedule.heap

    def room_for(self, count: int, size: int = 0) -> bool:
        return self.retention.room_for(count, size)

    # -- timers ---------------------------------------------------------------------------

    def _timer_live(self, timer: Timer) -> bool:
        """Whether ``timer`` can still do anything (else compaction drops it)."""
        if isinstance(timer, RedeliverTimer):
            return self.delivery.redeliver_live(timer)
        if isinstance(timer, TtlTimer):
            body = self.bodies.get((timer.topic, timer.offset))
            return body is not None and body.ttl_armed
        return self.retention.age_timer_live(timer.topic, timer.due_ms)

    def next_due_ms(self) -> int | None:
        """When the leader should next propose ``bus.tick`` (None: nothing waits)."""
        return self.schedule.next_due_ms()

    def tick(self, ctx: ApplyContext) -> dict[str, Any]:
        fired = 0
        while fired < self.limits.timers_per_tick:
            timer = self.schedule.pop_due(ctx.now_ms)
            if timer is None:
                break
            fired += 1
            if isinstance(timer, RedeliverTimer):
                self.delivery.on_redeliver(ctx, timer.consumer, timer.created_index, timer.seq, timer.attempts,
                                           timer.due_ms)
            elif isinstance(timer, TtlTimer):
                self.counters["expired"] += self.delivery.on_ttl(ctx, timer.topic, timer.offset)
            else:
                self.retention.on_age(ctx, timer.topic, timer.due_ms)
        return {"fired": fired, "next_due_ms": self.next_due_ms()}

    # -- topics ---------------------------------------------------------------------------

    def configure_topic(self, ctx: ApplyContext, command: BusTopicConfigure) -> dict[str, Any]:
        name, max_messages, max_age_ms = command.topic, command.max_messages, command.max_age_ms
        topic = self.topics.get(name)
        if topic is None:
            if len(self.topics) >= self.limits.topics_max:
                raise Rejected("unavailable", f"too many topics ({self.limits.topics_max})")
            topic = self.topics[name] = Topic(name)
        if max_age_ms != topic.max_age_ms:
            topic.age_timer_ms = None  # the armed timer was for the old age; on_age ignores it from now on
        topic.max_messages = max_messages
        topic.max_age_ms = max_age_ms
        self.retention.trim_count(topic)
        self.retention.trim_age(ctx, topic)
        return self.describe_topic(topic)

    def describe_topic(self, topic: Topic) -> dict[str, Any]:
        return self.retention.describe_topic(topic)

    # -- publishing -------------------------------------------------------------------------

    def check_publish(self, topic: str, messages: Sequence[dict[str, Any]], agent_exists: Any) -> list[int]:
        """Check a parsed publish (``BusPublish``) against the bus before
        anything changes: registered destinations, the number of topics, a
        bound topic's backlog, the room left. Returns each message's size
        (``approx_size``), for ``publish`` to store without counting again."""
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
        if topic in self.bindings:
            self.brokers.check_backlog(topic, len(messages))
        retention = self.retention
        if not retention.room_for(len(messages)):
            raise Rejected("unavailable", f"the bus holds {self.limits.messages_max} messages; "
                                          "consumers must ack (or topics retain less) before more are accepted")
        sizes = [approx_size(m) for m in messages]
        size = sum(sizes)
        if not retention.room_for(len(messages), size):
            raise over_quota("bus_bytes_max", f"the bus holds about {retention.bytes} bytes of messages "
                                              f"(at most {self.limits.bytes_max}) and this adds {size}; consumers "
                                              "must ack (or topics retain less) before more are accepted")
        return sizes

    def check_routes(self, topic_name: str, targets: list[str]) -> None:
        """Refuse a publish whose transforms route to topics the bus cannot take
        (too many topics, a bound topic's backlog full), before anything changes."""
        new = {t for t in targets if t not in self.topics and t != topic_name}
        if new and len(self.topics) + len(new) + (topic_name not in self.topics) > self.limits.topics_max:
            raise Rejected("unavailable", f"too many topics ({self.limits.topics_max})")
        for target in dict.fromkeys(t for t in targets if t != topic_name):
            self.brokers.check_backlog(target, targets.count(target))

    def publish(self, ctx: ApplyContext, topic_name: str, messages: Sequence[dict[str, Any]],
                outcomes: list[Any] | None = None, sizes: list[int] | None = None) -> dict[str, Any]:
        """Store and route ``messages`` published on ``topic_name``. With
        ``outcomes`` (``coordinator.state.transforms.Outcome``, one a message)
        each is stored as its transforms made it, on the topic they routed it
        to, or dead-lettered with the reason when they failed. ``sizes``
        (``check_publish``'s) are the messages' sizes as published."""
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
                                         dead_reason=failure,
                                         size=sizes[i] if sizes is not None and stored is message else None)
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
               dead_reason: str | None = None, owner: str | None = None, size: int | None = None) -> tuple[int, int]:
        """Store and route one message of ``size`` (None: counted here): its
        offset and how many consumers took it (with ``dead_reason``, straight
        into their dead-letter queues)."""
        offset = topic.next_offset
        topic.next_offset += 1
        topic.published += 1
        self.counters["published"] += 1
        ttl = message["ttl"]
        if size is None:
            size = approx_size(message)
        retention, delivery, limits = self.retention, self.delivery, self.limits
        if len(self.bodies) >= limits.messages_max or retention.bytes + size > limits.bytes_max:
            retention.make_room(size)  # the hot path calls it only when the bus is full
        body = Body(topic.name, offset, ctx.index, ctx.now_ms, message,
                    None if ttl is None else ctx.now_ms + ttl, retained=False, size=size, owner=owner)
        retention.keep(body)
        binding = self.bindings.get(topic.name)
        if message["destination"]:
            for agent in dict.fromkeys(message["destination"]):
                delivery.enqueue(ctx, delivery.inbox(ctx, agent), body)
        elif binding is None:
            for consumer in delivery.matching(topic.name, message):
                delivery.enqueue(ctx, consumer, body)
        if dead_reason is not None:
            for key, seq in list(body.holders.items()):
                consumer = self.consumers[key]
                entry = consumer.entries.get(seq)
                if entry is not None:
                    self.dlq.add(ctx, consumer, entry, dead_reason)
        routed = len(body.holders)
        if binding is not None and not message["destination"] and dead_reason is None:
            self.brokers.hold(body)  # until the broker confirms it
        # A DLQ that keeps nothing (dlq_max=0) may have released the body while it was routed.
        if (topic.name, offset) not in self.bodies:
            retention.keep(body)
        retention.arm_ttl(body)
        retention.retain(ctx, topic, body, retain)
        return offset, routed

    def matching(self, topic: str, message: dict[str, Any]) -> list[Consumer]:
        return self.delivery.matching(topic, message)

    def publish_events(self, ctx: ApplyContext, events: list[Event]) -> None:
        """The cluster's own events (agent.*, lock.*, system.*) as bus messages on
        topics named by their type. Delivered to live subscriptions only: they
        are not retained for replay (``/v1/events`` keeps their history)."""
        for event in events:
            message = _event_message(event)
            topic = self.topics.get(event.type)
            if not self.delivery.matching(event.type, message) \
                    and (topic is None or self.retention.max_messages(topic) == 0):
                continue
            if not self.retention.room_for(1, approx_size(message)):
                self.counters["events_dropped"] += 1
                continue
            if topic is None:
                topic = self.topics[event.type] = Topic(event.type, max_messages=0)
            self._store(ctx, topic, message, retain=True)

    # -- transport bindings (issue 5) ---------------------------------------------------------

    def bind(self, ctx: ApplyContext, command: BusBind) -> dict[str, Any]:
        return self.brokers.bind(ctx, command)

    def unbind(self, ctx: ApplyContext, command: BusUnbind) -> dict[str, Any]:
        return self.brokers.unbind(ctx, command)

    def advance_cursor(self, ctx: ApplyContext, command: BusCursor) -> dict[str, Any]:
        return self.brokers.advance_cursor(ctx, command)

    def transport_acked(self, ctx: ApplyContext, consumer: Consumer, keys: Sequence[str]) -> dict[str, Any]:
        return self.brokers.transport_acked(ctx, consumer, keys)

    def configure_transport(self, ctx: ApplyContext, command: BusTransportConfigure) -> dict[str, Any]:
        return self.brokers.configure_transport(ctx, command)

    def unsent(self, topic: str, limit: int) -> list[Body]:
        return self.brokers.unsent(topic, limit)

    # -- consumers, deliveries and dead letters ----------------------------------------------

    def subscribe(self, ctx: ApplyContext, command: BusSubscribe, agent_exists: Any) -> dict[str, Any]:
        return self.delivery.subscribe(ctx, command, agent_exists)

    def unsubscribe(self, ctx: ApplyContext, sub_id: str) -> dict[str, Any]:
        return self.delivery.unsubscribe(ctx, sub_id)

    def delete_group(self, ctx: ApplyContext, group: str) -> dict[str, Any]:
        return self.delivery.delete_group(ctx, group)

    def drop_agent(self, agent: str) -> None:
        self.delivery.drop_agent(agent)

    def consumer_of(self, sub_id: str | None, agent: str | None = None) -> Consumer:
        return self.delivery.consumer_of(sub_id, agent)

    def deliver(self, ctx: ApplyContext, consumer: Consumer, member: str | None, max_n: int) -> dict[str, Any]:
        return self.delivery.deliver(ctx, consumer, member, max_n)

    def ack(self, ctx: ApplyContext, consumer: Consumer, delivery_ids: Sequence[str]) -> dict[str, Any]:
        return self.delivery.ack(ctx, consumer, delivery_ids)

    def nack(self, ctx: ApplyContext, consumer: Consumer, command: BusNack) -> dict[str, Any]:
        return self.delivery.nack(ctx, consumer, command)

    def dead_letters(self, consumer: Consumer, limit: int) -> list[dict[str, Any]]:
        return self.dlq.list(consumer, limit)

    def redrive(self, ctx: ApplyContext, consumer: Consumer, delivery_ids: Sequence[str] | None) -> dict[str, Any]:
        return self.dlq.redrive(ctx, consumer, delivery_ids)

    def purge(self, ctx: ApplyContext, consumer: Consumer, delivery_ids: Sequence[str] | None) -> dict[str, Any]:
        return self.dlq.purge(ctx, consumer, delivery_ids)

    # -- snapshots ----------------------------------------------------------------------------

    def to_data(self) -> dict[str, Any]:
        return {
            "topics": [t.to_data() for t in self.topics.values()],
            "bodies": [b.to_data() for b in self.bodies.values()],
            "consumers": [c.to_data() for c in self.consumers.values()],
            "subscriptions": [s.to_data() for s in self.subscriptions.values()],
            "bindings": [b.to_data() for b in self.bindings.values()],
            "transport_urls": self.transport_urls,
            "timers": self.schedule.to_data(),
            "timer_seq": self.schedule.seq,
            "dedupe": [[t, i, o, ms] for (t, i), (o, ms) in self.dedupe.items()],
            "counters": self.counters,
        }

    @classmethod
    def from_data(cls, data: dict[str, Any], limits: BusLimits | None = None) -> Bus:
        bus = cls(limits)
        bus.topics.update((row[0], Topic.from_data(row)) for row in data["topics"])
        for row in data["bodies"]:
            bus.retention.keep(Body.from_data(row))
        for row in data["consumers"]:
            bus.delivery.add(Consumer.from_data(row))
        bus.subscriptions.update((row[0], Subscription(*row)) for row in data["subscriptions"])
        bus.bindings.update((row[0], Binding(*row)) for row in data.get("bindings", []))
        bus.transport_urls.update(data.get("transport_urls", {}))
        bus.schedule.restore(data["timers"], data["timer_seq"])
        bus.dedupe = OrderedDict(((t, i), (o, ms)) for t, i, o, ms in data["dedupe"])
        bus.counters.clear()
        bus.counters.update(data["counters"])
        bus.retention.restore_evictable()
        return bus


_EVENT_OPTIONS = normalize({"id": "x", "type": "event", "source": "x"}, 0)["deliveryOptions"]


def _event_message(event: Event) -> dict[str, Any]:
    return {"id": f"event-{event.seq}", "type": "event", "source": "coordinator", "destination": [],
            "timestamp": event.time_ms, "correlationId": None, "replyTo": None, "priority": 5, "ttl": None,
            "headers": {"seq": str(event.seq), "index": str(event.index)}, "payload": event.data,
            "deliveryOptions": _EVENT_OPTIONS}


__all__ = [
    "BINDING_PREFIX",
    "COUNTERS",
    "DEFAULT_BACKLOG",
    "MAX_ACK_IDS",
    "MAX_BACKLOG",
    "MAX_BATCH",
    "MAX_DELAY_MS",
    "MAX_FETCH",
    "MAX_KEYS",
    "MAX_OFFSET",
    "REPLY_PREFIX",
    "RESERVED_PREFIXES",
    "START_KINDS",
    "TASK_STATUSES",
    "TIMER_COMPACT_EVERY",
    "AgeTimer",
    "Bus",
    "BusLimits",
    "Consumer",
    "Entry",
    "RedeliverTimer",
    "Subscription",
    "TtlTimer",
    "check_key_path",
    "check_publishable",
    "check_publishable_topic",
    "effective_guarantee",
    "message_key",
]
