"""The bus as a service: publish, subscribe, fetch (long-poll), ack, request/reply,
and routing at-most-once messages on the leader.

Who does what:

- Persistent messages, subscriptions, acks, nacks and dead-letter actions are
  commands; any node proposes them.
- Fetches are served by the leader: it proposes ``bus.deliver`` (so one clock
  stamps delivery due times) and holds long-polls in memory. A follower's HTTP
  layer forwards fetches, streams and requests to the leader.
- Messages that are not persistent (at-most-once) never enter the log: the
  leader routes them into in-memory queues and hands each out once. A leader
  change loses them, as at-most-once allows.
- When the leader is active (caught up) and when its term ends is
  ``services.duties.LeaderDuties``'s to say; it also fires the bus's timers.

Loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, TypeVar

from coordinator.commands.base import DomainCommand, Rejected, invalid
from coordinator.commands.bus import (
    MAX_FETCH,
    REPLY_PREFIX,
    BusAck,
    BusDeliver,
    BusNack,
    BusPublish,
    BusTransportAck,
    check_destinations,
    check_publication,
    check_publishable,
    effective_guarantee,
)
from coordinator.commands.messages import in_batch
from coordinator.errors import CoordinatorError, InvalidInput, NotFound, RequestTimeout, Unavailable
from coordinator.ports import BusTransport, Clock, Rng
from coordinator.services.applier import Applier
from coordinator.services.duties import LeaderDuties
from coordinator.services.proposals import Proposer, raise_for, state_error
from coordinator.types import Command, RequestKey, Result

log = logging.getLogger(__name__)
C = TypeVar("C", bound=DomainCommand)

VOLATILE_QUEUE_MAX = 10_000
TRANSPORT_KEYS_MAX = 100_000
WAKE_OPS = frozenset({"bus.publish", "bus.tick", "bus.nack", "bus.dlq.redrive", "bus.subscribe",
                      "bus.unsubscribe", "bus.group.delete"})


class NotLeader(CoordinatorError):
    """This node cannot serve the call; the HTTP layer forwards it to the leader."""

    code = "not_leader"


class _Volatile:
    """The leader's in-memory queues of at-most-once messages, per consumer."""

    def __init__(self) -> None:
        self.queues: dict[str, deque[dict[str, Any]]] = {}
        self.dropped = 0
        self.expired = 0
        self.routed = 0
        self._seq = 0

    def put(self, consumer_key: str, delivery: dict[str, Any]) -> None:
        queue = self.queues.setdefault(consumer_key, deque())
        if len(queue) >= VOLATILE_QUEUE_MAX:
            queue.popleft()
            self.dropped += 1
        self._seq += 1
        queue.append({**delivery, "delivery_id": f"v.{self._seq}"})
        self.routed += 1

    def take(self, consumer_key: str, max_n: int, now_ms: int) -> list[dict[str, Any]]:
        """Up to ``max_n``, highest priority first; expired ones (TTL) are dropped."""
        queue = self.queues.get(consumer_key)
        if not queue:
            return []
        live = [d for d in queue if d["expires_ms"] is None or d["expires_ms"] > now_ms]
        self.expired += len(queue) - len(live)
        ordered = sorted(live, key=lambda d: -d["message"]["priority"])  # stable: publish order within a priority
        out, rest = ordered[:max_n], ordered[max_n:]
        self.queues[consumer_key] = deque(rest)
        return out

    def clear(self) -> None:
        self.dropped += sum(len(q) for q in self.queues.values())
        self.queues.clear()


class BusService:
    def __init__(self, applier: Applier, proposer: Proposer, duties: LeaderDuties, clock: Clock, rng: Rng, *,
                 node_id: str) -> None:
        self.applier = applier
        self.proposer = proposer
        self.duties = duties
        self.clock = clock
        self.rng = rng
        self.node_id = node_id
        self.closing = False  # the node is shutting down: waits end at once
        self.volatile = _Volatile()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._replies: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self.transports: dict[str, BusTransport] = {}  # set by the node: the transports configured here
        self._transport_groups: dict[tuple[str, str, int], None] = {}  # groups made at the broker this term
        self._transport_keys: dict[str, tuple[str, str]] = {}  # broker delivery id -> (consumer key, message key)
        applier.on_apply(self._on_apply)
        applier.on_reset(self._wake_all)
        duties.on_change(self._on_leadership)

    @property
    def active(self) -> bool:
        """This node leads and has caught up: it serves fetches and at-most-once messages."""
        return self.duties.active

    # -- leadership ---------------------------------------------------------------------

    def _on_leadership(self, active: bool) -> None:
        if not active:
            self._transport_groups.clear()
            self._transport_keys.clear()  # unacked broker deliveries come back after their ack timeout
            self.volatile.clear()
        self._wake_all()

    def close(self) -> None:
        """Shutting down: every waiting fetch answers now (with what it has)."""
        self.closing = True
        self._wake_all()

    async def stop(self) -> None:
        self.close()
        self._on_leadership(False)
        for future in self._replies.values():
            future.cancel()

    # -- what the log applied -------------------------------------------------------------

    def _on_apply(self, command: Command, result: Result) -> None:
        if not result.ok:
            return
        if command.op == "bus.publish":
            self._match_replies(command.args.get("topic"), command.args.get("messages") or [])
        if command.op in WAKE_OPS or result.events or self.applier.machine.streams.items:
            self._wake_ready()  # stream processors may have published derived events during any command

    def _wake_ready(self) -> None:
        consumers = self.applier.machine.bus.consumers
        for key in [k for k in self._waiters if (c := consumers.get(k)) is None or c.ready_count > 0]:
            for future in self._waiters.pop(key):
                if not future.done():
                    future.set_result(None)

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    def _match_replies(self, topic: Any, messages: list[Any]) -> None:
        if not self._replies:
            return
        for message in messages:
            if not isinstance(message, dict):
                continue
            future = self._replies.get((topic, message.get("correlationId")))
            if future is not None and not future.done():
                future.set_result(message)

    # -- publishing -----------------------------------------------------------------------

    def prepare(self, topic: str, raw: list[Any]) -> list[dict[str, Any]]:
        """A publish request's messages, checked once before ``publish``
        (``commands.bus.check_publication``): defaults filled in (type event,
        source anonymous, an id of this node's choosing, the timestamp of
        this node's clock), normalised, valid on ``topic``."""

        def with_defaults(i: int, item: Any) -> Any:
            if not isinstance(item, dict):
                return item
            item = {"type": "event", "source": "anonymous", **item}
            if "id" not in item:
                options = item.get("deliveryOptions")
                if isinstance(options, dict) and options.get("guarantee") == "exactly-once":
                    raise invalid("id", "exactly-once messages need an id of the publisher's choosing "
                                        "(it is the dedupe key)")
                item["id"] = f"msg-{self.rng.token_hex(8)}"
            return item

        try:
            return check_publication(topic, raw, self.clock.now_ms(), with_defaults)
        except Rejected as exc:
            raise state_error(exc.code, exc.message) from None

    def needs_leader(self, messages: list[dict[str, Any]]) -> bool:
        return any(not m["deliveryOptions"]["persistent"] for m in messages)

    async def publish(self, topic: str, messages: list[dict[str, Any]], request: RequestKey | None = None
                      ) -> dict[str, Any]:
        """Publish messages that ``prepare`` checked. Persistent ones are one
        ``BusPublish``; the others are routed by this node, which must be the
        leader (else ``NotLeader``: the HTTP layer forwards). Refused before
        either when a destination is not a registered agent."""
        agents = self.applier.machine.registry.agents
        for i, message in enumerate(messages):
            if message["destination"]:
                try:
                    check_destinations(message, agents.__contains__)
                except Rejected as exc:
                    raise state_error(exc.code, in_batch(i, len(messages), exc.message)) from None
        volatile = [m for m in messages if not m["deliveryOptions"]["persistent"]]
        persistent = [m for m in messages if m["deliveryOptions"]["persistent"]]
        if volatile and not self.active:
            raise NotLeader("at-most-once messages are routed by the leader")
        answers: dict[int, dict[str, Any]] = {}
        if persistent:
            command = BusPublish(topic, persistent)
            result = raise_for(await self.proposer.propose(command.op, command.to_args(), request))
            for message, answer in zip(persistent, result["messages"], strict=True):
                answers[id(message)] = answer
        for message in volatile:
            answers[id(message)] = self._publish_volatile(topic, message, agents.__contains__)
        return {"topic": topic, "messages": [answers[id(m)] for m in messages]}

    def _publish_volatile(self, topic: str, message: dict[str, Any], agent_exists: Any) -> dict[str, Any]:
        """Transform and route one at-most-once message. A transform that fails
        drops it (at-most-once messages have no dead letters) and says why."""
        outcome = self.applier.machine.transforms.apply(topic, message)
        answer: dict[str, Any] = {"id": message["id"], "offset": None, "routed": 0}
        failure = outcome.failure
        if failure is None and outcome.topic != topic:
            try:
                check_publishable(outcome.topic, outcome.message, agent_exists)
            except Rejected as exc:
                failure = f"routed to {outcome.topic!r}, where it is not valid: {exc.message}"
        if failure is not None:
            answer["transform_failed"] = failure
            return answer
        if outcome.topic != topic:
            answer["topic"] = outcome.topic
        answer["routed"] = self._route_volatile(outcome.topic, outcome.message)
        return answer

    def _route_volatile(self, topic: str, message: dict[str, Any]) -> int:
        bus = self.applier.machine.bus
        if message["destination"]:
            keys = ["a:" + agent for agent in message["destination"]]
        else:
            keys = [c.key for c in bus.matching(topic, message)]
        ttl = message["ttl"]
        delivery = {"attempt": 1, "topic": topic, "offset": None, "guarantee": "at-most-once", "message": message,
                    "expires_ms": None if ttl is None else self.clock.now_ms() + ttl}
        for key in keys:
            self.volatile.put(key, delivery)
        self._match_replies(topic, [message])
        for key in keys:
            for future in self._waiters.pop(key, []):
                if not future.done():
                    future.set_result(None)
        return len(keys)

    # -- fetching -------------------------------------------------------------------------------

    def consumer_key(self, selector: dict[str, str]) -> str:
        bus = self.applier.machine.bus
        if "agent" in selector:
            return "a:" + selector["agent"]
        sub = bus.subscriptions.get(selector["sub"])
        if sub is None:
            raise NotFound(f"subscription {selector['sub']!r} does not exist")
        return sub.consumer

    async def fetch(self, selector: dict[str, str], max_n: int, wait_s: float) -> dict[str, Any]:
        """Up to ``max_n`` deliveries, waiting up to ``wait_s`` for the first.
        Leader only (``NotLeader`` otherwise)."""
        if not 1 <= max_n <= MAX_FETCH:
            raise InvalidInput(f"max: must be between 1 and {MAX_FETCH}", field="max")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s  # a wait of this request, in the loop's time (not the injected clock)
        while True:
            if not self.active:
                raise NotLeader("fetches are served by the leader")
            key = self.consumer_key(selector)
            bus = self.applier.machine.bus
            consumer = bus.consumers.get(key)
            agents = self.applier.machine.registry.agents
            if consumer is None and "agent" in selector and selector["agent"] not in agents:
                raise NotFound(f"agent {selector['agent']!r} is not registered")
            if consumer is not None and consumer.transport is not None:
                return await self._fetch_transport(consumer, selector.get("sub", ""), max_n, deadline)
            deliveries = self.volatile.take(key, max_n, self.clock.now_ms())
            if consumer is not None and consumer.ready_count > 0 and len(deliveries) < max_n:
                result = await self._propose(_parsed(BusDeliver, {**selector, "max": max_n - len(deliveries)}))
                deliveries.extend(result["deliveries"])
            remaining = deadline - loop.time()
            if deliveries or remaining <= 0 or self.closing:
                current = self.applier.machine.bus.consumers.get(key)
                return {"messages": [_render(d) for d in deliveries],
                        "backlog": current.ready_count if current else 0}
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, []).append(future)
            try:
                async with asyncio.timeout(remaining):
                    await future
            except TimeoutError:
                pass
            finally:
                waiting = self._waiters.get(key)
                if waiting and future in waiting:
                    waiting.remove(future)
                    if not waiting:
                        del self._waiters[key]

    # -- subscriptions served by a broker transport ------------------------------------------------

    def _transport_of(self, consumer: Any) -> BusTransport:
        transport = self.transports.get(consumer.transport)
        if transport is None:
            raise Unavailable(f"transport {consumer.transport!r} is not configured on the leader", retry_after_s=1.0)
        return transport

    async def _fetch_transport(self, consumer: Any, sub_id: str, max_n: int, deadline: float) -> dict[str, Any]:
        """Deliveries from the broker; a message whose key this consumer already
        acked (a re-send RabbitMQ cannot recognise, a redelivery after a lost
        broker ack) is acked at the broker and not handed out again."""
        transport = self._transport_of(consumer)
        topic, group = consumer.pattern, consumer.name
        loop = asyncio.get_running_loop()
        if (topic, group, consumer.created_index) not in self._transport_groups:
            await transport.bind(topic)  # idempotent; the driver may not have published anything yet
            await transport.subscribe(topic, group)
            self._transport_groups[(topic, group, consumer.created_index)] = None
        while True:
            remaining = max(0.0, deadline - loop.time())
            got = await transport.fetch(topic, group, sub_id or group, max_n, 0.0 if self.closing else remaining)
            seen = [d for d in got if d.key in consumer.acked_keys]
            if seen:
                await transport.ack(topic, group, [d.delivery_id for d in seen])
            fresh = [d for d in got if d.key not in consumer.acked_keys]
            at_most_once = consumer.guarantee == "at-most-once"
            if at_most_once and fresh:
                await transport.ack(topic, group, [d.delivery_id for d in fresh])
            for d in fresh:
                if not at_most_once:
                    self._transport_keys[d.delivery_id] = (consumer.key, d.key)
            while len(self._transport_keys) > TRANSPORT_KEYS_MAX:
                self._transport_keys.pop(next(iter(self._transport_keys)))
            if fresh or deadline - loop.time() <= 0 or self.closing:
                return {"messages": [_render({"delivery_id": d.delivery_id, "attempt": 2 if d.redelivered else 1,
                                              "topic": d.topic, "offset": d.offset,
                                              "guarantee": effective_guarantee(
                                                  consumer.guarantee, d.message.get("deliveryOptions", {}).get(
                                                      "guarantee", "at-least-once")),
                                              "message": d.message}) for d in fresh],
                        "backlog": None}

    async def ack(self, selector: dict[str, str], delivery_ids: list[Any], request: RequestKey | None = None
                  ) -> dict[str, Any]:
        """Ack deliveries. A transport consumer's acks are served by the leader
        (it knows which message each broker delivery id carries): the keys are
        committed first, then acked at the broker."""
        consumer = self.applier.machine.bus.consumers.get(self.consumer_key(selector))
        if consumer is None or consumer.transport is None:
            return await self._propose(_parsed(BusAck, {**selector, "delivery_ids": delivery_ids}), request)
        if not self.active:
            raise NotLeader("acks of a transport subscription are served by the leader")
        known = [d for d in delivery_ids if isinstance(d, str) and self._transport_keys.get(d, ("",))[0]
                 == consumer.key]
        unknown = [d for d in delivery_ids if d not in known]
        if known:
            keys = [self._transport_keys[d][1] for d in known]
            await self._propose(_parsed(BusTransportAck, {**selector, "keys": keys}), request)
            await self._transport_of(consumer).ack(consumer.pattern, consumer.name, known)
            for d in known:
                self._transport_keys.pop(d, None)
        return {"acked": known, "unknown": unknown}

    async def nack(self, selector: dict[str, str], args: dict[str, Any], request: RequestKey | None = None
                   ) -> dict[str, Any]:
        consumer = self.applier.machine.bus.consumers.get(self.consumer_key(selector))
        if consumer is None or consumer.transport is None:
            return await self._propose(_parsed(BusNack, {**selector, **args}), request)
        if not self.active:
            raise NotLeader("nacks of a transport subscription are served by the leader")
        ids = args.get("delivery_ids") or []
        known = [d for d in ids if isinstance(d, str) and self._transport_keys.get(d, ("",))[0] == consumer.key]
        if known:
            await self._transport_of(consumer).nack(consumer.pattern, consumer.name, known)
            for d in known:
                self._transport_keys.pop(d, None)
        return {"nacked": known, "unknown": [d for d in ids if d not in known]}

    async def _propose(self, command: DomainCommand, request: RequestKey | None = None) -> Any:
        return raise_for(await self.proposer.propose(command.op, command.to_args(), request))

    # -- request / reply --------------------------------------------------------------------------

    async def request(self, topic: str, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Publish a request and wait for the response whose ``correlationId``
        is the request's id on its ``replyTo`` topic. Leader only."""
        if not self.active:
            raise NotLeader("requests are served by the leader")
        key = (message["replyTo"], message["id"])
        if key in self._replies:
            raise InvalidInput(f"id: a request with id {message['id']!r} is already waiting", field="id")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[key] = future
        try:
            published = await self.publish(topic, [message])
            if published["messages"][0].get("routed") == 0:
                raise Unavailable(f"no responders: no subscription on {topic!r} took the request",
                                  retry_after_s=1.0)
            try:
                async with asyncio.timeout(timeout_s):
                    response = await future
            except TimeoutError:
                raise RequestTimeout(f"no response to request {message['id']!r} on {topic!r} within "
                                     f"{timeout_s:g} s (replies are expected on {message['replyTo']!r})") from None
        finally:
            self._replies.pop(key, None)
        return {"request": {"id": message["id"], "topic": topic, "offset": published["messages"][0]["offset"]},
                "response": response}

    def reply_topic(self) -> str:
        return f"{REPLY_PREFIX}{self.node_id}"

    # -- status ---------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        bus = self.applier.machine.bus
        return {"topics": len(bus.topics), "consumers": len(bus.consumers), "subscriptions": len(bus.subscriptions),
                "messages_held": len(bus.bodies), "timers": len(bus.timers), "active": self.active,
                "volatile_routed": self.volatile.routed, "volatile_dropped": self.volatile.dropped,
                "volatile_expired": self.volatile.expired,
                **bus.counters}


def _parsed(command_type: type[C], args: dict[str, Any]) -> C:
    """``command_type.parse(args)``; its refusal is the caller's error (400 naming the field)."""
    try:
        return command_type.parse(args)
    except Rejected as exc:
        raise state_error(exc.code, exc.message) from None


def _render(delivery: dict[str, Any]) -> dict[str, Any]:
    """A delivery as fetches show it: ``offset`` is the message's place in its
    topic (the log's order), ``seq`` its place in this consumer (absent for
    at-most-once messages the leader routed without the log), and ``key`` and
    ``key_seq`` its ordering key in a keyed consumer."""
    out = {"delivery_id": delivery["delivery_id"], "attempt": delivery["attempt"],
           "redelivered": delivery["attempt"] > 1, "topic": delivery["topic"], "offset": delivery["offset"],
           "guarantee": delivery["guarantee"], "message": delivery["message"]}
    for name in ("seq", "key", "key_seq"):
        if name in delivery:
            out[name] = delivery[name]
    return out


