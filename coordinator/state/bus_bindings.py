"""Transport bindings and broker cursors (issue 5): topics whose messages a
broker carries, the cluster-wide broker URLs, and what each transport
consumer already processed.

The leader publishes a bound topic's offsets after its ``cursor`` to the
broker and commits ``bus.cursor`` once the broker holds them; until then each
body is held by the binding (holder key ``b:<topic>``, never a consumer's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coordinator.commands.bus import DEFAULT_BACKLOG, BusBind, BusCursor, BusTransportConfigure, BusUnbind
from coordinator.state.base import ApplyContext, Rejected, invalid
from coordinator.state.bus_records import Binding, Body, BusLimits, Consumer, Topic
from coordinator.state.bus_retention import Retention

BINDING_PREFIX = "b:"  # holder key of a transport binding (consumer keys are s:, g:, a:)
MAX_TRANSPORTS = 64


class Brokers:
    def __init__(self, limits: BusLimits, retention: Retention) -> None:
        self.limits = limits
        self.retention = retention
        self.topics = retention.topics
        self.bodies = retention.bodies
        self.bindings: dict[str, Binding] = {}
        self.transport_urls: dict[str, str] = {}  # cluster-wide broker URLs (may hold credentials: never shown)

    def check_backlog(self, topic: str, adding: int) -> None:
        """Refuse ``adding`` more messages on a bound topic whose broker has not
        confirmed ``backlog_max`` of them yet (nothing to check when unbound)."""
        binding = self.bindings.get(topic)
        if binding is None:
            return
        if binding.mode == "direct":
            raise Rejected("conflict", f"topic {topic!r} is direct: its messages go to the {binding.transport} "
                                       "broker from the node that takes them, never through the log")
        waiting = self.topics[topic].next_offset - 1 - binding.cursor
        if waiting + adding > binding.backlog_max:
            raise Rejected("unavailable", f"{waiting} messages of {topic!r} wait for the {binding.transport} "
                                          f"transport (at most {binding.backlog_max}); retry when it drains")

    def hold(self, body: Body) -> None:
        """A bound topic's new body waits for its broker."""
        self.retention.hold(body, BINDING_PREFIX + body.topic, body.offset)

    def bind(self, ctx: ApplyContext, command: BusBind) -> dict[str, Any]:
        """Messages published on ``topic`` from now on go to a broker transport
        (the ones before stay where they are). Idempotent for the same transport."""
        name, transport = command.topic, command.transport
        mode = command.mode or "log"
        backlog_max = DEFAULT_BACKLOG if command.backlog_max is None else command.backlog_max
        binding = self.bindings.get(name)
        if binding is not None:
            if binding.transport != transport:
                raise Rejected("conflict", f"topic {name!r} is bound to {binding.transport!r}; unbind it first")
            if binding.mode != mode:
                raise Rejected("conflict", f"topic {name!r} is bound in {binding.mode} mode; unbind it first")
            binding.backlog_max = backlog_max
            return binding.describe(self.topics[name].next_offset)
        topic = self.topics.get(name)
        if topic is None:
            if len(self.topics) >= self.limits.topics_max:
                raise Rejected("unavailable", f"too many topics ({self.limits.topics_max})")
            topic = self.topics[name] = Topic(name)
        binding = self.bindings[name] = Binding(name, transport, topic.next_offset - 1, ctx.index, backlog_max,
                                                 mode)
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
                self.retention.release(body, key)
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

    def transport_checkpoint(self, ctx: ApplyContext, consumer: Consumer, acked: int,
                             position: int | None) -> dict[str, Any]:
        """A node's report of a direct-mode consumer's acks at the broker
        (progress only: the broker's group is the cursor)."""
        if consumer.transport is None:
            raise invalid("sub", "this subscription is not served by a transport")
        consumer.counters["acked"] += acked
        if position is not None:
            consumer.counters["position"] = max(consumer.counters.get("position", 0), position)
        return {"acked": consumer.counters["acked"]}

    def configure_transport(self, ctx: ApplyContext, command: BusTransportConfigure) -> dict[str, Any]:
        """Set (``url``) or remove (``url`` null) the cluster-wide URL of a broker
        transport. Answers without the URL: it may hold a password."""
        name, url = command.name, command.url
        if url is None:
            if name not in self.transport_urls:
                raise Rejected("not_found", f"transport {name!r} has no cluster-wide URL")
            del self.transport_urls[name]
            return {"name": name, "configured": False}
        if name not in self.transport_urls and len(self.transport_urls) >= MAX_TRANSPORTS:
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
