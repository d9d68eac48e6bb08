"""Consumers and deliveries: subscriptions, consumer groups and agents'
inboxes, the entries routed into them, and their life: ready, delivered
(pending an ack until a due time), delayed after a nack, acked, or dead.

A consumer's entries are ``ready`` (a heap, higher priority first, then
publish order; a keyed consumer keeps publish order, one in flight per key),
``pending`` or ``delayed``; a redelivery timer (``bus_timers.RedeliverTimer``)
brings a pending or delayed entry back, or to the dead letters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coordinator.commands import filters
from coordinator.commands.bus import BusNack, BusSubscribe, effective_guarantee
from coordinator.commands.topics import is_pattern, matches
from coordinator.state.base import ApplyContext, Rejected, invalid
from coordinator.state.bus_bindings import BINDING_PREFIX, Brokers
from coordinator.state.bus_deadletters import DeadLetters
from coordinator.state.bus_records import Body, BusLimits, Consumer, Entry, Subscription, backoff_ms
from coordinator.state.bus_retention import Retention
from coordinator.state.bus_timers import RedeliverTimer, Timers
from coordinator.state.projections import lookup, scalar_key

MAX_KEYS = 100_000  # ordering keys remembered per keyed consumer


class Consumers:
    def __init__(self, limits: BusLimits, retention: Retention, timers: Timers, dead_letters: DeadLetters,
                 brokers: Brokers) -> None:
        self.limits = limits
        self.retention = retention
        self.timers = timers
        self.dead_letters = dead_letters
        self.brokers = brokers
        self.topics = retention.topics
        self.bodies = retention.bodies
        self.consumers: dict[str, Consumer] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.exact: dict[str, dict[str, None]] = {}   # topic -> consumer keys subscribed to exactly it
        self.wildcard: dict[str, None] = {}           # consumer keys with a wildcard pattern

    def add(self, consumer: Consumer) -> None:
        """A consumer made or restored: routed to by its pattern (an inbox has none)."""
        self.consumers[consumer.key] = consumer
        if consumer.pattern is None:
            return
        if is_pattern(consumer.pattern):
            self.wildcard[consumer.key] = None
        else:
            self.exact.setdefault(consumer.pattern, {})[consumer.key] = None

    # -- timers -----------------------------------------------------------------------------

    def redeliver_live(self, timer: RedeliverTimer) -> bool:
        consumer = self.consumers.get(timer.consumer)
        entry = consumer.entries.get(timer.seq) \
            if consumer is not None and consumer.created_index == timer.created_index else None
        return entry is not None and entry.state in ("pending", "delayed") and entry.attempts == timer.attempts \
            and entry.due_ms == timer.due_ms

    def on_redeliver(self, ctx: ApplyContext, consumer_key: str, created_index: int, seq: int, attempts: int,
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
            self.dead_letters.add(ctx, consumer, entry, "ttl")
        elif entry.attempts >= self._max_attempts(consumer, body):
            self.dead_letters.add(ctx, consumer, entry, "max_attempts")
        else:
            consumer.push_ready(entry)

    def on_ttl(self, ctx: ApplyContext, topic: str, offset: int) -> int:
        """A held message's TTL ran out: its waiting entries go to the dead
        letters. The number of messages that expired (0: it is gone already)."""
        body = self.bodies.get((topic, offset))
        if body is None:
            return 0
        body.ttl_armed = False
        for consumer_key, seq in list(body.holders.items()):
            if consumer_key.startswith(BINDING_PREFIX):
                continue  # the broker got (or gets) the message with its ttl; it expires there
            consumer = self.consumers[consumer_key]
            entry = consumer.entries.get(seq)
            # A pending entry was delivered in time; its redelivery timer checks the TTL.
            if entry is not None and entry.state in ("ready", "delayed"):
                if entry.state == "ready":
                    consumer.ready_count -= 1  # its heap key goes stale
                self.dead_letters.add(ctx, consumer, entry, "ttl")
        return 1

    def matching(self, topic: str, message: dict[str, Any]) -> list[Consumer]:
        """The subscriptions and groups that take ``message`` on ``topic``
        (pattern and filter), in a deterministic order."""
        keys = list(self.exact.get(topic, ()))
        keys.extend(k for k in self.wildcard if matches(self.consumers[k].pattern or "", topic))
        consumers = [self.consumers[k] for k in keys]
        return [c for c in consumers if c.filter_tree is None or filters.evaluate(c.filter_tree, message)]

    def inbox(self, ctx: ApplyContext, agent: str) -> Consumer:
        key = "a:" + agent
        consumer = self.consumers.get(key)
        if consumer is None:
            consumer = self.consumers[key] = Consumer(key, None, None, "exactly-once", None, None, ctx.index)
        return consumer

    def enqueue(self, ctx: ApplyContext, consumer: Consumer, body: Body) -> None:
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
        self.retention.hold(body, consumer.key, seq)
        if len(consumer.entries) >= self.limits.queue_max:
            consumer.counters["overflowed"] += 1
            self.dead_letters.add(ctx, consumer, entry, "overflow", in_entries=False)
            return
        consumer.entries[seq] = entry
        consumer.push_ready(entry)

    def subscribe(self, ctx: ApplyContext, command: BusSubscribe, agent_exists: Any) -> dict[str, Any]:
        pattern, group, filter_text, tree = command.topic, command.group, command.filter, command.filter_tree
        guarantee, ack_timeout_ms, max_attempts = command.guarantee, command.ack_timeout_ms, command.max_attempts
        key_path, agent = command.key, command.agent
        if agent is not None and not agent_exists(agent):
            raise Rejected("not_found", f"agent: {agent!r} is not registered")
        start, start_value = self._check_start(command)
        if len(self.subscriptions) >= self.limits.subscriptions_max:
            raise Rejected("unavailable", f"too many subscriptions ({self.limits.subscriptions_max})")
        binding = self.brokers.bindings.get(pattern)
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
            self.enqueue(ctx, consumer, body)
            replayed += consumer.next_seq - before
        for body in found:
            self.retention.arm_ttl(body)
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
            self.retention.release(self.bodies[(entry.topic, entry.offset)], consumer.key)
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
                self.dead_letters.add(ctx, consumer, entry, "ttl")
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
                self.retention.release(body, consumer.key)
                continue
            timeout = consumer.ack_timeout_ms if consumer.ack_timeout_ms is not None else options["timeout"]
            entry.state = "pending"
            entry.member = member
            entry.due_ms = ctx.now_ms + timeout + backoff_ms(options["retry"], entry.attempts)
            consumer.pending_count += 1
            self.timers.redeliver(entry.due_ms, consumer.key, entry.seq, entry.attempts, consumer.created_index)
        for entry in waiting:  # back, in their order, for when their key is free
            consumer.push_ready(entry)
        return {"deliveries": out, "backlog": consumer.ready_count}

    def ack(self, ctx: ApplyContext, consumer: Consumer, delivery_ids: Sequence[str]) -> dict[str, Any]:
        seqs = consumer.seqs(delivery_ids)
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
            self.retention.release(self.bodies[(entry.topic, entry.offset)], consumer.key)
            acked.append(delivery_id)
        return {"acked": acked, "unknown": unknown}

    def nack(self, ctx: ApplyContext, consumer: Consumer, command: BusNack) -> dict[str, Any]:
        seqs = consumer.seqs(command.delivery_ids)
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
                self.dead_letters.add(ctx, consumer, entry, "rejected")
            elif entry.attempts >= self._max_attempts(consumer, body):
                self.dead_letters.add(ctx, consumer, entry, "max_attempts")
            else:
                delay = delay_ms if delay_ms is not None else \
                    backoff_ms(body.message["deliveryOptions"]["retry"], entry.attempts)
                if delay == 0:
                    consumer.push_ready(entry)
                else:
                    entry.state = "delayed"
                    entry.member = None
                    entry.due_ms = ctx.now_ms + delay
                    self.timers.redeliver(entry.due_ms, consumer.key, entry.seq, entry.attempts, consumer.created_index)
        return {"nacked": nacked, "unknown": unknown}


def message_key(message: dict[str, Any], path: str) -> str | None:
    """The ordering key of a message (a scalar's text), None when it has none."""
    return scalar_key(lookup(message, path))
