"""Retention: the bus's topics and the bodies of their messages, what each
topic keeps (by count and by age), who holds a body, and what goes first
when the bus is full.

A body lives while its topic retains it or while anyone holds it (a
consumer's entry, a binding waiting for its broker). Retained bodies that no
one holds are evictable: the oldest go first when a new message needs room.
"""

from __future__ import annotations

import heapq

from coordinator.commands.bus import REPLY_PREFIX
from coordinator.state.base import ApplyContext, charge
from coordinator.state.bus_records import Body, BusLimits, Topic
from coordinator.state.bus_timers import Timers


class Retention:
    def __init__(self, limits: BusLimits, timers: Timers, counters: dict[str, int]) -> None:
        self.limits = limits
        self.timers = timers
        self.counters = counters  # the bus's (``evicted``)
        self.topics: dict[str, Topic] = {}
        self.bodies: dict[tuple[str, int], Body] = {}
        self._evictable: list[tuple[int, str, int]] = []  # heap of (index, topic, offset); stale keys skipped
        self.evictable_count = 0
        self.bytes = 0  # the size of every body
        self.evictable_bytes = 0
        self.owned: dict[str, int] = {}  # principal -> the size of the bodies it published

    # -- bodies and their holders ------------------------------------------------------

    @staticmethod
    def is_evictable(body: Body) -> bool:
        return body.retained and not body.holders

    def keep(self, body: Body) -> None:
        self.bodies[(body.topic, body.offset)] = body
        self.bytes += body.size
        charge(self.owned, body.owner, body.size)

    def forget(self, body: Body) -> None:
        del self.bodies[(body.topic, body.offset)]
        self.bytes -= body.size
        charge(self.owned, body.owner, -body.size)

    def hold(self, body: Body, holder_key: str, seq: int) -> None:
        if self.is_evictable(body):
            self.evictable_count -= 1
            self.evictable_bytes -= body.size
        body.holders[holder_key] = seq

    def release(self, body: Body, holder_key: str) -> None:
        body.holders.pop(holder_key, None)
        if body.holders:
            return
        if body.retained:
            self.evictable_count += 1
            self.evictable_bytes += body.size
            heapq.heappush(self._evictable, (body.index, body.topic, body.offset))
            if len(self._evictable) > 2 * self.evictable_count + 1024:
                self._evictable = sorted((b.index, b.topic, b.offset) for b in self.bodies.values()
                                         if self.is_evictable(b))
        else:
            self.forget(body)

    def unretain(self, body: Body) -> None:
        """The topic no longer retains ``body`` (count, age, eviction)."""
        if not body.retained:
            return
        topic = self.topics[body.topic]
        topic.log.pop(body.offset, None)
        if self.is_evictable(body):
            self.evictable_count -= 1
            self.evictable_bytes -= body.size
        body.retained = False
        if not body.holders:
            self.forget(body)

    def evict_one(self) -> bool:
        while self._evictable:
            _, topic, offset = heapq.heappop(self._evictable)
            body = self.bodies.get((topic, offset))
            if body is not None and self.is_evictable(body):
                self.unretain(body)
                self.counters["evicted"] += 1
                return True
        return False

    def room_for(self, count: int, size: int = 0) -> bool:
        """Whether ``count`` more messages of ``size`` bytes in all fit,
        counting what eviction (retained, unheld bodies) would free."""
        return (len(self.bodies) - self.evictable_count + count <= self.limits.messages_max
                and self.bytes - self.evictable_bytes + size <= self.limits.bytes_max)

    def make_room(self, size: int) -> None:
        """Evict until one more body of ``size`` bytes fits, or nothing is evictable."""
        while ((len(self.bodies) >= self.limits.messages_max or self.bytes + size > self.limits.bytes_max)
               and self.evict_one()):
            pass

    def arm_ttl(self, body: Body) -> None:
        if body.expires_ms is not None and body.holders and not body.ttl_armed:
            body.ttl_armed = True
            self.timers.ttl(body.expires_ms, body.topic, body.offset)

    def retain(self, ctx: ApplyContext, topic: Topic, body: Body, retain: bool) -> None:
        """After a body was stored and routed: the topic retains it (``retain``
        and the topic keeps any), else it goes unless someone holds it."""
        if retain and self.max_messages(topic) > 0:
            body.retained = True
            topic.log[body.offset] = None
            if not body.holders:
                self.evictable_count += 1
                self.evictable_bytes += body.size
                heapq.heappush(self._evictable, (body.index, body.topic, body.offset))
            self.trim_count(topic)
            if topic.age_timer_ms is None and topic.log:
                self.trim_age(ctx, topic)
        elif not body.holders:
            self.forget(body)

    def restore_evictable(self) -> None:
        """After a restore: the evictable heap rebuilt from the bodies."""
        self._evictable = sorted((b.index, b.topic, b.offset) for b in self.bodies.values() if self.is_evictable(b))
        self.evictable_count = len(self._evictable)
        self.evictable_bytes = sum(self.bodies[(t, o)].size for _, t, o in self._evictable)

    # -- topics' retention ----------------------------------------------------------------

    def max_age(self, topic: Topic) -> int:
        return topic.max_age_ms if topic.max_age_ms is not None else self.limits.retention_age_ms

    def max_messages(self, topic: Topic) -> int:
        if topic.max_messages is not None:
            return topic.max_messages
        return 0 if topic.name.startswith(REPLY_PREFIX) else self.limits.retention_messages

    def trim_count(self, topic: Topic) -> None:
        limit = self.max_messages(topic)
        while len(topic.log) > limit:
            self.unretain(self.bodies[(topic.name, next(iter(topic.log)))])

    def trim_age(self, ctx: ApplyContext, topic: Topic) -> None:
        max_age = self.max_age(topic)
        while topic.log:
            body = self.bodies[(topic.name, next(iter(topic.log)))]
            if body.publish_ms + max_age > ctx.now_ms:
                if topic.age_timer_ms is None:
                    topic.age_timer_ms = body.publish_ms + max_age
                    self.timers.age(topic.age_timer_ms, topic.name)
                return
            self.unretain(body)

    def on_age(self, ctx: ApplyContext, name: str, due: int) -> None:
        topic = self.topics.get(name)
        if topic is None or topic.age_timer_ms != due:
            return
        topic.age_timer_ms = None
        self.trim_age(ctx, topic)

    def age_timer_live(self, name: str, due: int) -> bool:
        topic = self.topics.get(name)
        return topic is not None and topic.age_timer_ms == due

    def describe_topic(self, topic: Topic) -> dict[str, object]:
        first = next(iter(topic.log), None)
        return {"topic": topic.name, "next_offset": topic.next_offset, "first_offset": first,
                "retained": len(topic.log), "published": topic.published,
                "max_messages": self.max_messages(topic), "max_age_ms": self.max_age(topic)}
