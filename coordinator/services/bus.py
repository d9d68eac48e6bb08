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
- Topics bound in ``direct`` mode (``transports/design.md``): any node
  publishes their messages straight to the broker, and serves fetches, acks
  and nacks of their subscriptions straight from it, reading the binding
  and the subscription from its own replica. No log entry per message or
  ack; ``bus.transport.checkpoint`` reports progress about once a second.

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
    BusTransportCheckpoint,
    check_destinations,
    check_publication,
    check_publishable,
    effective_guarantee,
)
from coordinator.commands.messages import in_batch
from coordinator.errors import Conflict, CoordinatorError, InvalidInput, NotFound, RequestTimeout, Unavailable
from coordinator.ports import BusTransport, Clock, ReadsGroupsOnOneNode, Rng
from coordinator.services.applier import Applier
from coordinator.services.duties import LeaderDuties
from coordinator.services.proposals import Proposer, raise_for, state_error
from coordinator.types import Command, RequestKey, Result, TransportEntry

log = logging.getLogger(__name__)
C = TypeVar("C", bound=DomainCommand)

VOLATILE_QUEUE_MAX = 10_000
TRANSPORT_KEYS_MAX = 100_000
# A fetch result may carry, under this key, each message's JSON text as the broker
# holds it (``TransportDelivery.message_json``; b"" where there is none), for a
# response to copy instead of encoding the message again. Not part of the result's
# JSON: a caller that renders the result drops it (``render_fetched``).
MESSAGE_JSON = "message_json"
CHECKPOINT_S = 1.0  # a direct consumer's acks are reported at most this often (and only when some came)
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
        # direct mode, on every node (not tied to leadership):
        self._direct_bound: dict[tuple[str, int], None] = {}  # (topic, binding index) made at the broker here
        self._direct_groups: dict[tuple[str, str, int], None] = {}  # groups made at the broker from here
        self._direct_keys: dict[str, tuple[str, int]] = {}  # broker delivery id -> (consumer key, broker position)
        self._direct_acked: dict[str, tuple[dict[str, str], int, int | None]] = {}  # consumer -> (selector, n, pos)
        self.direct_published = 0  # messages this node published to brokers in direct mode
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

    def needs_leader(self, topic: str, messages: list[dict[str, Any]]) -> bool:
        if self.direct_binding(topic) is not None:
            return False  # every node publishes a direct topic's messages itself
        return any(not m["deliveryOptions"]["persistent"] for m in messages)

    def direct_binding(self, topic: str) -> Any:
        """The topic's binding in this replica when it is in direct mode, else None."""
        binding = self.applier.machine.bus.bindings.get(topic)
        return binding if binding is not None and binding.mode == "direct" else None

    async def publish(self, topic: str, messages: list[dict[str, Any]], request: RequestKey | None = None
                      ) -> dict[str, Any]:
        """Publish messages that ``prepare`` checked. Persistent ones are one
        ``BusPublish``; the others are routed by this node, which must be the
        leader (else ``NotLeader``: the HTTP layer forwards). Refused before
        either when a destination is not a registered agent."""
        binding = self.direct_binding(topic)
        if binding is not None:
            return await self._publish_direct(binding, messages, request)
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
            try:
                result = raise_for(await self.proposer.propose(command.op, command.to_args(), request))
            except Conflict:
                # The topic was bound in direct mode after this replica last looked: the
                # refusal was applied here too, so the replica now knows the binding.
                binding = self.direct_binding(topic)
                if binding is None:
                    raise
                return await self._publish_direct(binding, messages, request)
            for message, answer in zip(persistent, result["messages"], strict=True):
                answers[id(message)] = answer
        for message in volatile:
            answers[id(message)] = self._publish_volatile(topic, message, agents.__contains__)
        return {"topic": topic, "messages": [answers[id(m)] for m in messages]}

    async def _publish_direct(self, binding: Any, messages: list[dict[str, Any]], request: RequestKey | None
                              ) -> dict[str, Any]:
        """Send a direct topic's messages (checked by ``prepare``) to its
        broker from this node, and answer once the broker holds them
        durably. Nothing enters the log. Each message's broker key is the
        caller's request id and its place in the batch when a request id was
        given (so a retry of the request carries the same keys), else the
        topic and the message id; brokers that dedupe (NATS) drop a key they
        hold. ``Unavailable`` (503) when the broker fails or the transport is
        not configured here: the caller retries; part of the batch may be at
        the broker then (see ``transports/design.md``)."""
        topic = binding.topic
        for i, message in enumerate(messages):
            refusal = None
            if message["destination"]:
                refusal = (f"destination: {topic!r} is direct: its messages go to the {binding.transport} "
                           "broker, not to agents' inboxes")
            elif message["deliveryOptions"]["guarantee"] == "exactly-once":
                refusal = (f"deliveryOptions.guarantee: {topic!r} is direct: at-least-once at most "
                           "(exactly-once needs the log: bind it in log mode)")
            if refusal is not None:
                text = in_batch(i, len(messages), refusal)
                raise InvalidInput(text, field=text.partition(":")[0])
        transport = self.transports.get(binding.transport)
        if transport is None:
            raise Unavailable(f"transport {binding.transport!r} is not configured on this node ({self.node_id})",
                              retry_after_s=1.0)
        made = (topic, binding.created_index)
        if made not in self._direct_bound:
            await transport.bind(topic)  # idempotent; the leader's driver makes it too
            self._direct_bound[made] = None
        if request is not None and request.id is not None:
            keys = [f"r/{request.id}/{i}" for i in range(len(messages))]
        else:
            keys = [f"m/{topic}/{m['id']}" for m in messages]
        try:
            await transport.publish_direct([TransportEntry(topic, 0, 0, m, k) for m, k in zip(messages, keys,
                                                                                             strict=True)])
        except CoordinatorError:
            self._direct_bound.pop(made, None)  # bind again first: the broker may have lost the topic
            raise
        self.direct_published += len(messages)
        return {"topic": topic, "messages": [{"id": m["id"], "offset": None, "direct": True} for m in messages]}

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
        Leader only (``NotLeader`` otherwise), but for a direct topic's
        consumer, served by this node from the broker; its result may carry
        the messages' JSON text under ``MESSAGE_JSON`` (``render_fetched``)."""
        if not 1 <= max_n <= MAX_FETCH:
            raise InvalidInput(f"max: must be between 1 and {MAX_FETCH}", field="max")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s  # a wait of this request, in the loop's time (not the injected clock)
        direct = self._direct_consumer(selector)
        if direct is not None:
            return await self._fetch_transport(direct, selector.get("sub", ""), max_n, deadline, direct=True)
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

    def _transport_of(self, consumer: Any, where: str = "the leader") -> BusTransport:
        transport = self.transports.get(consumer.transport)
        if transport is None:
            raise Unavailable(f"transport {consumer.transport!r} is not configured on {where}", retry_after_s=1.0)
        return transport

    def _direct_consumer(self, selector: dict[str, str]) -> Any:
        """The consumer a selector names when it reads a direct topic from its
        broker (served by this node), else None."""
        if "sub" not in selector:
            return None
        bus = self.applier.machine.bus
        sub = bus.subscriptions.get(selector["sub"])
        consumer = bus.consumers.get(sub.consumer) if sub is not None else None
        if consumer is None or consumer.transport is None:
            return None
        binding = self.direct_binding(consumer.pattern)
        return consumer if binding is not None and binding.transport == consumer.transport else None

    def one_reader_group(self, selector: dict[str, str]) -> str | None:
        """The consumer's key when the selector names a direct consumer whose
        transport serves a group from one node only (``one_reader_per_group``:
        Kafka reads the group's partition by hand), else None. Such a group's
        fetches, acks and nacks go to one member (the API ranks the members
        by this key, ``CoordinatorNode.ranked_members``), so the group is read
        once and its delivery ids are that member's, whichever node a
        consumer talks to."""
        consumer = self._direct_consumer(selector)
        if consumer is None:
            return None
        transport = self.transports.get(consumer.transport)
        one = isinstance(transport, ReadsGroupsOnOneNode) and transport.one_reader_per_group
        return consumer.key if one else None

    async def release_group(self, selector: dict[str, str]) -> None:
        """Another member serves this one-reader group now: drop what this
        node read of it (``transport.release``); what it handed out and was
        not acked comes again to whoever reads the group, from its committed
        offset."""
        consumer = self._direct_consumer(selector)
        transport = self.transports.get(consumer.transport) if consumer is not None else None
        if consumer is not None and isinstance(transport, ReadsGroupsOnOneNode):
            await transport.release(consumer.pattern, consumer.name)

    async def _fetch_transport(self, consumer: Any, sub_id: str, max_n: int, deadline: float, *,
                               direct: bool = False) -> dict[str, Any]:
        """Deliveries from the broker; a message whose key this consumer already
        acked (a re-send RabbitMQ cannot recognise, a redelivery after a lost
        broker ack) is acked at the broker and not handed out again. Direct
        mode: served by this node, whoever leads; nothing is committed
        (at-least-once: what is not acked comes back from the broker)."""
        transport = self._transport_of(consumer, f"this node ({self.node_id})" if direct else "the leader")
        topic, group = consumer.pattern, consumer.name
        loop = asyncio.get_running_loop()
        groups = self._direct_groups if direct else self._transport_groups
        if (topic, group, consumer.created_index) not in groups:
            await transport.bind(topic)  # idempotent; the driver may not have published anything yet
            await transport.subscribe(topic, group)
            groups[(topic, group, consumer.created_index)] = None
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
            if direct:
                if at_most_once and fresh:
                    self._count_direct_acks(consumer, sub_id, len(fresh), fresh[-1].offset)
                for d in fresh if not at_most_once else ():
                    self._direct_keys[d.delivery_id] = (consumer.key, d.offset)
                while len(self._direct_keys) > TRANSPORT_KEYS_MAX:
                    self._direct_keys.pop(next(iter(self._direct_keys)))
            else:
                for d in fresh:
                    if not at_most_once:
                        self._transport_keys[d.delivery_id] = (consumer.key, d.key)
                while len(self._transport_keys) > TRANSPORT_KEYS_MAX:
                    self._transport_keys.pop(next(iter(self._transport_keys)))
            if fresh or deadline - loop.time() <= 0 or self.closing:
                result: dict[str, Any] = {
                    "messages": [_render({"delivery_id": d.delivery_id, "attempt": 2 if d.redelivered else 1,
                                          "topic": d.topic, "offset": (d.offset or None) if direct else d.offset,
                                          "guarantee": _direct_guarantee(self._guarantee(consumer, d))
                                          if direct else self._guarantee(consumer, d),
                                          "message": d.message}) for d in fresh],
                    "backlog": None}
                if any(d.message_json for d in fresh):
                    result[MESSAGE_JSON] = [d.message_json for d in fresh]
                return result

    @staticmethod
    def _guarantee(consumer: Any, delivery: Any) -> str:
        return effective_guarantee(consumer.guarantee, delivery.message.get("deliveryOptions", {}).get(
            "guarantee", "at-least-once"))

    def _count_direct_acks(self, consumer: Any, sub_id: str, n: int, position: int | None) -> None:
        _, acked, top = self._direct_acked.get(consumer.key, ({}, 0, None))
        if position:
            top = max(top or 0, position)
        self._direct_acked[consumer.key] = ({"sub": sub_id}, acked + n, top)

    async def run_checkpoints(self) -> None:
        """Every ``CHECKPOINT_S``: commit what each direct consumer acked
        through this node since the last report (``bus.transport.checkpoint``),
        for status and other nodes. Only progress: a lost report changes
        nothing a consumer gets (the broker's group is the cursor); a failed
        one is added to the next."""
        while True:
            await asyncio.sleep(CHECKPOINT_S)
            try:
                await self.checkpoint_once()
            except Exception:  # a bug here must not end the reports for good
                log.exception("direct-mode checkpoints failed")

    async def checkpoint_once(self) -> None:
        reports, self._direct_acked = self._direct_acked, {}
        for key, (selector, acked, position) in reports.items():
            if key not in self.applier.machine.bus.consumers:
                continue  # unsubscribed meanwhile
            command = BusTransportCheckpoint(selector["sub"], None, acked, position)
            try:
                raise_for(await self.proposer.propose(command.op, command.to_args()))
            except CoordinatorError as exc:
                if exc.code in ("not_found", "invalid"):
                    continue
                _, later, top = self._direct_acked.get(key, (selector, 0, None))
                self._direct_acked[key] = (selector, acked + later, max(position or 0, top or 0) or None)

    async def ack(self, selector: dict[str, str], delivery_ids: list[Any], request: RequestKey | None = None
                  ) -> dict[str, Any]:
        """Ack deliveries. A transport consumer's acks are served by the leader
        (it knows which message each broker delivery id carries): the keys are
        committed first, then acked at the broker."""
        direct = self._direct_consumer(selector)
        if direct is not None:
            known = [d for d in delivery_ids if isinstance(d, str) and self._direct_keys.get(d, ("",))[0]
                     == direct.key]
            if known:
                await self._transport_of(direct, "this node").ack(direct.pattern, direct.name, known)
                top = max(self._direct_keys.pop(d, ("", 0))[1] for d in known)
                self._count_direct_acks(direct, selector["sub"], len(known), top)
            taken = set(known)
            return {"acked": known, "unknown": [d for d in delivery_ids if not (isinstance(d, str) and d in taken)]}
        consumer = self.applier.machine.bus.consumers.get(self.consumer_key(selector))
        if consumer is None or consumer.transport is None:
            return await self._propose(_parsed(BusAck, {**selector, "delivery_ids": delivery_ids}), request)
        if not self.active:
            raise NotLeader("acks of a transport subscription are served by the leader")
        known = [d for d in delivery_ids if isinstance(d, str) and self._transport_keys.get(d, ("",))[0]
                 == consumer.key]
        taken = set(known)
        unknown = [d for d in delivery_ids if not (isinstance(d, str) and d in taken)]
        if known:
            keys = [self._transport_keys[d][1] for d in known]
            await self._propose(_parsed(BusTransportAck, {**selector, "keys": keys}), request)
            await self._transport_of(consumer).ack(consumer.pattern, consumer.name, known)
            for d in known:
                self._transport_keys.pop(d, None)
        return {"acked": known, "unknown": unknown}

    async def nack(self, selector: dict[str, str], args: dict[str, Any], request: RequestKey | None = None
                   ) -> dict[str, Any]:
        direct = self._direct_consumer(selector)
        if direct is not None:
            ids = args.get("delivery_ids") or []
            known = [d for d in ids if isinstance(d, str) and self._direct_keys.get(d, ("",))[0] == direct.key]
            if known:
                await self._transport_of(direct, "this node").nack(direct.pattern, direct.name, known)
                for d in known:
                    self._direct_keys.pop(d, None)
            taken = set(known)
            return {"nacked": known, "unknown": [d for d in ids if not (isinstance(d, str) and d in taken)]}
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
        binding = self.direct_binding(topic)
        if binding is not None:
            raise Conflict(f"topic {topic!r} is direct: its messages go to the {binding.transport} broker, and "
                           "request/reply matches responses in the log (bind it in log mode)")
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
                "volatile_expired": self.volatile.expired, "direct_published": self.direct_published,
                **bus.counters}


def _parsed(command_type: type[C], args: dict[str, Any]) -> C:
    """``command_type.parse(args)``; its refusal is the caller's error (400 naming the field)."""
    try:
        return command_type.parse(args)
    except Rejected as exc:
        raise state_error(exc.code, exc.message) from None


def _direct_guarantee(guarantee: str) -> str:
    """Direct mode delivers at-least-once at most: nothing dedupes at consumption."""
    return "at-least-once" if guarantee == "exactly-once" else guarantee


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


