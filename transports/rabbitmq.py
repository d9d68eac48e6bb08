"""``RabbitMQTransport``: the bus on RabbitMQ, through aio-pika.

Resources, all named under ``{namespace}/`` so clusters and tests that share
a broker never collide:

- ``{ns}/bus``: one durable direct exchange per namespace; a topic's routing
  key is the topic. It is auto-delete, so it goes with the last unbound topic.
- ``{ns}/log/{topic}``: a durable stream (``x-queue-type=stream``) bound to
  the topic: the topic's log, every message since ``bind``. Nobody consumes
  it but a new group's backfill (below).
- ``{ns}/group/{topic}/{group}``: one durable classic queue per consumer
  group, bound to the topic, so every group gets every message and the
  competing consumers of a group share its queue.
- ``{ns}/groups/{topic}``: the topic's registry of its groups (one message
  per group), because AMQP cannot list queues and ``unbind`` must find them.
- ``{ns}/filling/{topic}/{group}``: exists while a group's backfill has not
  finished, so an interrupted ``subscribe`` is redone, not taken as done.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from pamqp.commands import Basic

from coordinator.errors import Unavailable
from coordinator.redact import redact_url, scrub
from coordinator.types import TransportDelivery, TransportEntry, TransportHealth

log = logging.getLogger(__name__)

T = TypeVar("T")

# What aio-pika itself counts as "the broker is not there", plus our own timeouts.
_BROKER_ERRORS = (*CONNECTION_EXCEPTIONS, TimeoutError)
_NAME_MAX_BYTES = 255  # AMQP short string: queue and exchange names
_PUBLISH_WINDOW = 256  # publishes awaiting their confirms at once on one channel
_BACKFILL_PREFETCH = 512  # stream credit of a backfill; >= _PUBLISH_WINDOW, or it would stall
# Messages the broker pushes to a group's consumer ahead of fetches (unacked:
# the buffered and the handed-out ones together). Enough for a few full fetches
# in flight, few enough that an instance holds little away from the others.
_PREFETCH = 256
# A group with no fetch for this long gives its prefetched messages back, so a
# deposed leader or an idle instance does not sit on them. Longer than the
# pause of a consumer between two fetches, short against a leader change.
_IDLE_S = 2.0
_GIVEN_BACK_MAX = 4 * _PREFETCH  # message ids remembered as given back unseen, per group
_POLL_MIN_S = 0.01  # a waiting fetch rechecks its group (closed channel, lost consumer) with backoff
_POLL_MAX_S = 0.2
_MARKER = "x-coord-marker"
_TOPIC = "coord-topic"
_OFFSET = "coord-offset"
_INDEX = "coord-index"


@dataclass
class _Pending:
    message: AbstractIncomingMessage
    due: float  # loop time after which it goes back to the queue


@dataclass
class _Group:
    """This instance's consumer of one group: a channel of its own, since
    delivery tags (our delivery ids' handles) are valid on their channel only.

    A message is in ``buffer`` (pushed, not handed out) or in ``pending``
    (handed out, unacked), never both; the broker counts both as unacked on
    ``channel``, and requeues both if the channel dies."""

    queue_name: str
    channel: AbstractChannel
    queue: AbstractQueue
    pending: dict[str, _Pending] = field(default_factory=dict)  # delivery id -> unacked delivery
    buffer: deque[AbstractIncomingMessage] = field(default_factory=deque)  # bounded by _PREFETCH
    consumer_tag: str | None = None  # None: not consuming (not fetched yet, or given back)
    busy_until: float = 0.0  # loop time of the latest fetch's last check (or its next one, while it waits)
    given_back: dict[str, None] = field(default_factory=dict)  # ids given back unseen, oldest first
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # starting vs cancelling the consumer
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # set on push, publish and give-back


class RabbitMQTransport:
    """The bus on RabbitMQ: at-least-once, deduplicated by key in the service.

    Guarantees. ``publish`` returns once the broker confirmed every message
    (a channel with publisher confirms), and messages are persistent in
    durable queues and a durable stream, so a confirmed message survives a
    broker restart. RabbitMQ cannot recognise a message it already has: a
    re-publish after a leader change or a lost confirm is stored again, so
    ``guarantee`` is ``"at-least-once"``, ``publish`` counts every entry as
    new, and consumers may see a key twice. Every message carries its entry
    key as ``message_id``; the service removes duplicates by that key.

    Groups. Each consumer group is a durable queue bound to the topic, so
    every group gets every message, and the consumers of one group compete
    for its queue. The first ``fetch`` of a group on an instance starts a
    push consumer (``basic.consume``) on the group's channel, with a prefetch
    of ``_PREFETCH``: the broker pushes up to that many unacked messages into
    a local buffer, and ``fetch`` hands them out from there without a round
    trip. No message is handed to two consumers while it is unacked. So that
    an idle instance (a deposed leader, say) does not hold its buffer away
    from the others, a group with no fetch for ``_IDLE_S`` cancels its
    consumer and gives the buffered messages back to the queue; the next
    ``fetch`` starts a new consumer. RabbitMQ flags those given-back messages
    redelivered; this instance remembers which ones it gave back unseen and
    reports them not redelivered when it hands them out (another instance
    cannot know, and reports the broker's flag). A queue only receives what
    is routed after it exists, so a new group is backfilled from the topic's
    stream, which keeps every message: ``subscribe`` binds the group queue,
    writes a marker into the stream, and copies the stream from its first
    message up to the marker into the group queue. A group therefore reads
    from the topic's first message, whenever it was created. A publish
    racing with a group's creation may reach the group twice (and out of
    order); the marker makes sure it is not lost.

    Redelivery. ``nack`` rejects with requeue, and RabbitMQ hands the message
    out again flagged ``redelivered``. RabbitMQ itself only takes back unacked
    messages when their channel closes, so the ack timeout is ours: each
    delivery's time is kept, and a sweeper (and every ``fetch``) rejects with
    requeue those unacked for ``ack_timeout_s``. Delivery ids are valid for
    ``ack``/``nack`` on the instance that fetched them, until it loses its
    connection (then the broker requeues everything unacked, buffered or
    handed out; acking an unknown id is a no-op, and the message comes back).

    Lag is the group queue's ready messages plus this instance's buffered and
    unacked deliveries: exact when one instance consumes the group, and
    missing what other instances hold otherwise. Unsubscribed groups report
    0: AMQP cannot count a stream's messages.

    Costs. Backfilling a new group copies the whole topic, and the stream
    grows until ``unbind``: topics are meant to be bounded by the service's
    own retention. Every bound topic costs a stream, a registry queue and a
    queue per group. An instance holds up to ``_PREFETCH`` messages of each
    group it fetches from (buffered or handed out and unacked); with that
    many handed out and unacked, its fetches wait for acks or ack timeouts.

    Loop: every method is a coroutine of the event loop that called
    ``start``. Every broker await is bounded by ``timeout_s``, and failures
    raise ``Unavailable``. A timeout or a lost connection drops the
    connection (and with it this instance's unacked deliveries, which the
    broker requeues); the next call reconnects. ``start`` uses a plain
    connect, not ``connect_robust``, so a broker that is not there fails fast.
    """

    name = "rabbitmq"
    guarantee = "at-least-once"

    def __init__(self, url: str = "amqp://guest:guest@127.0.0.1:5672/", *, namespace: str = "coord",
                 timeout_s: float = 5.0, ack_timeout_s: float = 30.0) -> None:
        self.url = url
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.ack_timeout_s = ack_timeout_s
        self._shown_url = redact_url(url)
        self._conn: AbstractConnection | None = None
        self._ch: AbstractChannel | None = None  # publisher confirms; declares, binds, deletes
        self._exchange: AbstractExchange | None = None
        self._groups: dict[tuple[str, str], _Group] = {}
        self._topic_locks: dict[str, asyncio.Lock] = {}
        self._connect_lock = asyncio.Lock()
        self._group_lock = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None
        self._seq = 0
        self._closed = False
        self._last_error = "not started"

    def __repr__(self) -> str:
        return f"RabbitMQTransport({self._shown_url!r}, namespace={self.namespace!r})"

    # -- names ------------------------------------------------------------

    def _name(self, *parts: str) -> str:
        """A resource name under the namespace; hashed when too long for AMQP."""
        name = "/".join((self.namespace, *parts))
        if len(name.encode()) <= _NAME_MAX_BYTES:
            return name
        digest = hashlib.sha256(name.encode()).hexdigest()[:24]
        return f"{name.encode()[:_NAME_MAX_BYTES - 26].decode(errors='ignore')}~{digest}"

    def _exchange_name(self) -> str:
        return self._name("bus")

    def _log_name(self, topic: str) -> str:
        return self._name("log", topic)

    def _registry_name(self, topic: str) -> str:
        return self._name("groups", topic)

    def _group_name(self, topic: str, group: str) -> str:
        return self._name("group", topic, group)

    def _filling_name(self, topic: str, group: str) -> str:
        return self._name("filling", topic, group)

    # -- connection -------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return scrub(text, self.url)

    async def _io(self, awaitable: Awaitable[T]) -> T:
        async with asyncio.timeout(self.timeout_s):
            return await awaitable

    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        """Turn broker failures into ``Unavailable`` (with no password in it).

        A timeout or a lost connection drops the connection, since its state
        is unknown; a channel that failed (a queue or the exchange was deleted,
        say) is dropped alone, and reopened when next needed."""
        try:
            yield
        except _BROKER_ERRORS as exc:
            reason = self._scrub(f"{type(exc).__name__}: {exc}")
            self._last_error = f"{what} failed: {reason}"
            if isinstance(exc, TimeoutError) or not self._conn_alive():
                await self._drop_connection()
            else:
                await self._prune_groups()
            raise Unavailable(f"rabbitmq at {self._shown_url}: {what} failed: {reason}",
                              retry_after_s=1.0) from None

    def _conn_alive(self) -> bool:
        # aio-pika's plain Connection.is_closed turns True only on our own
        # close(); a close by the broker or a lost socket clears ``connected``.
        return self._conn is not None and not self._conn.is_closed and self._conn.connected.is_set()

    def _alive(self) -> bool:
        return self._conn_alive() and self._ch is not None and not self._ch.is_closed

    async def _connected(self) -> AbstractChannel:
        """The shared channel, connecting first if needed."""
        if self._closed:
            raise Unavailable("rabbitmq transport is closed", retry_after_s=1.0)
        if self._alive() and self._ch is not None:
            return self._ch
        async with self._connect_lock:
            if self._conn is not None and self._conn_alive() and (self._ch is None or self._ch.is_closed):
                # The shared channel alone was closed by a channel error: reopen
                # it and keep the group channels with their unacked deliveries.
                ch = await self._io(self._conn.channel(publisher_confirms=True))
                self._ch, self._exchange = ch, await self._io(ch.get_exchange(self._exchange_name(), ensure=False))
            if not self._alive():
                await self._drop_connection()
                # Plain connect, not connect_robust: a dead broker must fail now, not be retried forever.
                conn = await self._io(aio_pika.connect(
                    self.url, timeout=self.timeout_s,
                    client_properties={"connection_name": f"coordinator {self.namespace}"}))
                try:
                    ch = await self._io(conn.channel(publisher_confirms=True))
                    exchange = await self._io(ch.get_exchange(self._exchange_name(), ensure=False))
                except BaseException:
                    with contextlib.suppress(*_BROKER_ERRORS):
                        await self._io(conn.close())
                    raise
                self._conn, self._ch, self._exchange = conn, ch, exchange
                self._last_error = ""
            if self._ch is None:
                raise Unavailable("rabbitmq channel is gone", retry_after_s=1.0)
            return self._ch

    async def _drop_connection(self) -> None:
        """Close everything; the broker requeues every unacked delivery."""
        groups, self._groups = list(self._groups.values()), {}
        conn, self._conn, self._ch, self._exchange = self._conn, None, None, None
        for state in groups:
            state.wake.set()
        if conn is not None:
            with contextlib.suppress(*_BROKER_ERRORS):
                await self._io(conn.close())

    async def _prune_groups(self) -> None:
        for key, state in list(self._groups.items()):
            if state.channel.is_closed:
                del self._groups[key]
                state.wake.set()

    async def _temp_channel(self) -> AbstractChannel:
        """A channel for an operation that may close it (a passive declare of
        a queue that is not there closes its channel)."""
        await self._connected()
        if self._conn is None:
            raise Unavailable("rabbitmq connection is gone", retry_after_s=1.0)
        return await self._io(self._conn.channel(publisher_confirms=True))

    async def _close_channel(self, channel: AbstractChannel) -> None:
        if not channel.is_closed:
            with contextlib.suppress(*_BROKER_ERRORS):
                await self._io(channel.close())

    async def _exists(self, queue_name: str) -> bool:
        channel = await self._temp_channel()
        try:
            await self._io(channel.get_queue(queue_name, ensure=True))
            return True
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            await self._close_channel(channel)

    async def start(self) -> None:
        """Connect. ``Unavailable`` when the broker cannot be reached in ``timeout_s``."""
        self._closed = False
        async with self._guard("connect"):
            await self._connected()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(),
                                                                   name="rabbitmq-sweeper")

    async def close(self) -> None:
        """Stop the sweeper and close the connection (idempotent); the broker
        requeues what this instance held unacked."""
        self._closed = True
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await self._drop_connection()
        self._last_error = "closed"

    async def health(self) -> TransportHealth:
        """Never raises; ok while the connection is open."""
        if self._alive():
            return TransportHealth(True, f"connected to {self._shown_url}")
        return TransportHealth(False, f"not connected to {self._shown_url}: {self._last_error or 'connection lost'}")

    # -- topics -----------------------------------------------------------

    def _topic_lock(self, topic: str) -> asyncio.Lock:
        return self._topic_locks.setdefault(topic, asyncio.Lock())

    async def bind(self, topic: str) -> None:
        """Declare the exchange, the topic's stream and its registry (idempotent)."""
        async with self._guard(f"bind {topic!r}"):
            ch = await self._connected()
            exchange = await self._io(ch.declare_exchange(self._exchange_name(), aio_pika.ExchangeType.DIRECT,
                                                          durable=True, auto_delete=True))
            stream = await self._io(ch.declare_queue(self._log_name(topic), durable=True,
                                                     arguments={"x-queue-type": "stream"}))
            await self._io(ch.declare_queue(self._registry_name(topic), durable=True))
            await self._io(stream.bind(exchange, routing_key=topic))

    async def unbind(self, topic: str) -> None:
        """Delete the topic's groups, stream and registry, with their messages (idempotent)."""
        async with self._guard(f"unbind {topic!r}"):
            ch = await self._connected()
            groups = {group for (t, group) in self._groups if t == topic}
            for key in [k for k in self._groups if k[0] == topic]:
                state = self._groups.pop(key)
                state.wake.set()
                await self._close_channel(state.channel)
            groups |= await self._registered_groups(topic)
            for group in sorted(groups):
                await self._io(ch.queue_delete(self._group_name(topic, group)))
                await self._io(ch.queue_delete(self._filling_name(topic, group)))
            await self._io(ch.queue_delete(self._registry_name(topic)))
            await self._io(ch.queue_delete(self._log_name(topic)))
            self._topic_locks.pop(topic, None)

    async def _registered_groups(self, topic: str) -> set[str]:
        """The groups in the topic's registry. Read without acking: the
        registry is deleted next, or its messages go back when the channel closes."""
        channel = await self._temp_channel()
        groups: set[str] = set()
        try:
            registry = await self._io(channel.get_queue(self._registry_name(topic), ensure=True))
            while (message := await self._io(registry.get(no_ack=False, fail=False,
                                                          timeout=self.timeout_s))) is not None:
                groups.add(message.body.decode())
        except aio_pika.exceptions.ChannelNotFoundEntity:
            pass
        finally:
            await self._close_channel(channel)
        return groups

    async def publish(self, entries: list[TransportEntry]) -> int:
        """Publish persistent messages to the topic's routing key and wait for
        every confirm. All are counted as new: RabbitMQ cannot dedupe."""
        if not entries:
            return 0
        topic = entries[0].topic
        if any(entry.topic != topic for entry in entries):
            raise ValueError("publish takes entries of one topic")
        async with self._guard(f"publish to {topic!r}"):
            await self._connected()
            exchange = self._exchange
            if exchange is None:
                raise Unavailable("rabbitmq exchange is gone", retry_after_s=1.0)
            async with self._topic_lock(topic):
                for start in range(0, len(entries), _PUBLISH_WINDOW):
                    window = entries[start:start + _PUBLISH_WINDOW]
                    results = await self._io(asyncio.gather(
                        *(exchange.publish(self._message(entry), routing_key=topic, mandatory=True)
                          for entry in window),
                        return_exceptions=True))
                    for result in results:
                        if isinstance(result, aio_pika.exceptions.ChannelNotFoundEntity):
                            # no exchange: no topic of the namespace is bound
                            raise Unavailable(f"topic {topic!r} is not bound", retry_after_s=1.0)
                        if isinstance(result, BaseException):
                            raise result
                        if isinstance(getattr(result, "delivery", None), Basic.Return):  # unroutable
                            raise Unavailable(f"topic {topic!r} is not bound", retry_after_s=1.0)
        for (t, _), state in self._groups.items():
            if t == topic:
                state.wake.set()
        return len(entries)

    async def publish_direct(self, entries: list[TransportEntry]) -> int:
        """As ``publish`` (confirms awaited; offset header 0, ``message_id`` the
        publisher's key). RabbitMQ cannot dedupe: all are counted as new, and
        a client retry stores them again."""
        return await self.publish(entries)

    @staticmethod
    def _message(entry: TransportEntry) -> aio_pika.Message:
        return aio_pika.Message(
            json.dumps(entry.message, separators=(",", ":")).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=entry.key,
            headers={_TOPIC: entry.topic, _OFFSET: entry.offset, _INDEX: entry.index},
        )

    # -- groups -----------------------------------------------------------

    async def subscribe(self, topic: str, group: str) -> None:
        """Create the group's queue, reading from the topic's first message (idempotent).

        A new group's queue is bound first and then backfilled from the
        topic's stream up to a marker written after the binding, so no
        message falls between the two. ``{ns}/filling/...`` exists until the
        backfill is done: if it was interrupted, the next call redoes it."""
        queue_name = self._group_name(topic, group)
        filling_name = self._filling_name(topic, group)
        async with self._guard(f"subscribe {group!r} to {topic!r}"):
            if not await self._exists(self._log_name(topic)):
                raise Unavailable(f"topic {topic!r} is not bound", retry_after_s=1.0)
            exists = await self._exists(queue_name)
            if exists and not await self._exists(filling_name):
                return
            ch = await self._connected()
            exchange = self._exchange
            if exchange is None:
                raise Unavailable("rabbitmq exchange is gone", retry_after_s=1.0)
            # Order matters for a crash at any step: the flag first, then the
            # registry (so unbind finds the queue), then the queue.
            await self._io(ch.declare_queue(filling_name, durable=True))
            await self._io(ch.default_exchange.publish(
                aio_pika.Message(group.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=self._registry_name(topic)))
            queue = await self._io(ch.declare_queue(queue_name, durable=True))
            if exists:  # an interrupted backfill: start it over rather than duplicate it
                await self._io(queue.purge())
            marker = uuid.uuid4().hex
            # This instance's publishes to the topic either finished before
            # the binding or are routed to the new queue too.
            async with self._topic_lock(topic):
                await self._io(queue.bind(exchange, routing_key=topic))
                await self._io(ch.default_exchange.publish(
                    aio_pika.Message(b"", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                     headers={_MARKER: marker}),
                    routing_key=self._log_name(topic)))
            await self._backfill(topic, queue_name, marker)
            await self._io(ch.queue_delete(filling_name))

    async def _backfill(self, topic: str, queue_name: str, marker: str) -> None:
        """Copy the topic's stream, from its first message up to ``marker``,
        into the queue ``queue_name``. Each wait is bounded by ``timeout_s``."""
        channel = await self._temp_channel()
        try:
            await self._io(channel.set_qos(prefetch_count=_BACKFILL_PREFETCH))
            stream = await self._io(channel.get_queue(self._log_name(topic), ensure=False))
            arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue(maxsize=2 * _BACKFILL_PREFETCH)

            async def on_message(message: AbstractIncomingMessage) -> None:
                arrived.put_nowait(message)  # the prefetch bounds what is outstanding

            tag = await self._io(stream.consume(on_message, no_ack=False, arguments={"x-stream-offset": "first"}))
            done = False
            while not done:
                batch: list[AbstractIncomingMessage] = [await self._io(arrived.get())]
                while len(batch) < _PUBLISH_WINDOW and not arrived.empty():
                    batch.append(arrived.get_nowait())
                copies = []
                for message in batch:
                    seen = (message.headers or {}).get(_MARKER)
                    if seen == marker:
                        done = True
                        break
                    if seen is None:
                        copies.append(channel.default_exchange.publish(self._copy(message), routing_key=queue_name))
                results = await self._io(asyncio.gather(*copies, return_exceptions=True))
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                await self._io(batch[-1].ack(multiple=True))  # stream credit
            await self._io(stream.cancel(tag))
        finally:
            await self._close_channel(channel)

    @staticmethod
    def _copy(message: AbstractIncomingMessage) -> aio_pika.Message:
        headers = {k: v for k, v in (message.headers or {}).items() if k in (_TOPIC, _OFFSET, _INDEX)}
        return aio_pika.Message(message.body, content_type=message.content_type,
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                message_id=message.message_id, headers=headers)

    async def _group(self, topic: str, group: str) -> _Group | None:
        """This instance's consumer of ``group``: None when its queue is not there."""
        key = (topic, group)
        state = self._groups.get(key)
        if state is not None and not state.channel.is_closed:
            return state
        async with self._group_lock:
            state = self._groups.get(key)
            if state is not None and not state.channel.is_closed:
                return state
            self._groups.pop(key, None)
            await self._connected()
            if self._conn is None:
                raise Unavailable("rabbitmq connection is gone", retry_after_s=1.0)
            queue_name = self._group_name(topic, group)
            channel = await self._io(self._conn.channel(publisher_confirms=False))
            try:
                queue = await self._io(channel.get_queue(queue_name, ensure=True))
            except aio_pika.exceptions.ChannelNotFoundEntity:
                await self._close_channel(channel)
                return None
            except BaseException:
                await self._close_channel(channel)
                raise
            state = _Group(queue_name, channel, queue)
            self._groups[key] = state
            return state

    async def _existing_group(self, topic: str, group: str) -> _Group:
        state = await self._group(topic, group)
        if state is None:
            raise Unavailable(f"group {group!r} of {topic!r} does not exist", retry_after_s=1.0)
        return state

    async def _expire(self, state: _Group, now: float) -> None:
        """Give back the deliveries unacked for ``ack_timeout_s``."""
        overdue = [delivery_id for delivery_id, pending in state.pending.items() if pending.due <= now]
        for delivery_id in overdue:
            pending = state.pending.pop(delivery_id)
            await self._io(pending.message.reject(requeue=True))
        if overdue:
            state.wake.set()

    async def _sweep_forever(self) -> None:
        """Enforce ack timeouts, and give back the prefetched messages of
        groups nobody fetched from here for ``_IDLE_S``."""
        interval_s = max(0.05, min(1.0, self.ack_timeout_s / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            for state in list(self._groups.values()):
                idle = self._idle(state, loop.time()) and (state.consumer_tag is not None or bool(state.buffer))
                if not state.pending and not idle:
                    continue
                try:
                    async with self._guard("sweep"):
                        await self._expire(state, loop.time())
                        if idle:
                            await self._give_back(state)
                except Unavailable as exc:
                    log.debug("sweep: %s", exc)
                except Exception:  # a bug must not stop ack timeouts for good
                    log.exception("sweep failed")

    @staticmethod
    def _idle(state: _Group, now: float) -> bool:
        return now - state.busy_until >= _IDLE_S

    async def _consume(self, state: _Group) -> None:
        """Start the group's push consumer, unless it is running."""
        underlay = await state.channel.get_underlay_channel()
        # aiormq forgets a tag on cancel-ok and on the broker's own basic.cancel
        # (the queue was deleted), so a consumer lost either way is restarted
        # here, and a deleted queue fails the consume as a basic.get did.
        if state.consumer_tag in underlay.consumers:
            return
        async with state.lock:
            if state.consumer_tag in underlay.consumers:
                return

            async def on_message(message: AbstractIncomingMessage) -> None:
                state.buffer.append(message)  # the prefetch bounds the buffer
                state.wake.set()

            await self._io(state.channel.set_qos(prefetch_count=_PREFETCH))
            state.consumer_tag = await self._io(state.queue.consume(on_message, no_ack=False))

    async def _give_back(self, state: _Group) -> None:
        """Cancel the group's consumer, then reject with requeue what it
        pushed that no fetch took. A message that arrives after the cancel
        (its callback was already scheduled) goes back on the next sweep."""
        loop = asyncio.get_running_loop()
        async with state.lock:
            if state.consumer_tag is not None:
                await self._io(state.queue.cancel(state.consumer_tag))  # waits for cancel-ok
                state.consumer_tag = None
            # A fetch that came meanwhile takes the buffer, and restarts the consumer.
            while state.buffer and self._idle(state, loop.time()):
                message = state.buffer.popleft()
                if message.message_id and self._first_delivery(state, message):
                    state.given_back.pop(message.message_id, None)
                    state.given_back[message.message_id] = None
                    while len(state.given_back) > _GIVEN_BACK_MAX:
                        del state.given_back[next(iter(state.given_back))]
                await self._io(message.reject(requeue=True))
        state.wake.set()

    @staticmethod
    def _first_delivery(state: _Group, message: AbstractIncomingMessage) -> bool:
        """Whether no caller saw ``message`` before: it is not flagged
        redelivered, or this instance only ever buffered it and gave it back."""
        return not message.redelivered or (message.message_id or "") in state.given_back

    async def fetch(self, topic: str, group: str, consumer: str, max_n: int,
                    wait_s: float) -> list[TransportDelivery]:
        """Up to ``max_n`` deliveries, waiting up to ``wait_s`` for the first.

        All consumers of the group on this instance share its channel and
        its buffer; each buffered message is handed to one of them only.
        ``consumer`` is not needed by the broker."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        delay_s = _POLL_MIN_S
        while True:
            async with self._guard(f"fetch {group!r} of {topic!r}"):
                state = await self._existing_group(topic, group)
                # Busy until this fetch's next check at the latest, so a long wait
                # keeps the group busy and a fetch that returned does not.
                state.busy_until = max(state.busy_until, min(deadline, loop.time() + delay_s))
                await self._expire(state, loop.time())
                await self._consume(state)
                state.wake.clear()
                out = await self._take(state, topic, max_n)
            remaining = deadline - loop.time()
            if out or remaining <= 0:
                return out
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, delay_s)):
                    await state.wake.wait()
            delay_s = min(delay_s * 2, _POLL_MAX_S)

    async def _take(self, state: _Group, topic: str, max_n: int) -> list[TransportDelivery]:
        out: list[TransportDelivery] = []
        while len(out) < max_n and state.buffer:
            message = state.buffer.popleft()
            # Tracked before any other await, so a cancelled fetch still times out its deliveries.
            self._seq += 1
            delivery_id = str(self._seq)
            state.pending[delivery_id] = _Pending(message, asyncio.get_running_loop().time() + self.ack_timeout_s)
            try:
                headers = message.headers or {}
                payload: Any = json.loads(message.body)
                offset = int(str(headers[_OFFSET]))
                key = message.message_id or f"{topic}:{offset}"
            except (ValueError, KeyError, TypeError):
                log.warning("dropping a message that is not ours from %s", state.queue_name)
                del state.pending[delivery_id]
                await self._io(message.reject(requeue=False))
                continue
            redelivered = not self._first_delivery(state, message)
            if message.redelivered:  # seen now: if it comes back again, that is a redelivery
                state.given_back.pop(message.message_id or "", None)
            out.append(TransportDelivery(delivery_id, topic, offset, key, payload, redelivered))
        return out

    async def ack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        """Remove the deliveries (idempotent: unknown or expired ids are ignored)."""
        state = self._groups.get((topic, group))
        if state is None:
            return
        async with self._guard(f"ack {group!r} of {topic!r}"):
            for delivery_id in delivery_ids:
                pending = state.pending.pop(delivery_id, None)
                if pending is not None:
                    await self._io(pending.message.ack())

    async def nack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        """Give the deliveries back to the group's queue, flagged redelivered."""
        state = self._groups.get((topic, group))
        if state is None:
            return
        async with self._guard(f"nack {group!r} of {topic!r}"):
            for delivery_id in delivery_ids:
                pending = state.pending.pop(delivery_id, None)
                if pending is not None:
                    await self._io(pending.message.reject(requeue=True))
        state.wake.set()

    async def lag(self, topic: str, group: str) -> int:
        """The group queue's ready messages plus this instance's buffered and
        unacked ones; 0 for a group that does not exist."""
        async with self._guard(f"lag of {group!r} of {topic!r}"):
            state = await self._group(topic, group)
            if state is None:
                return 0
            try:
                declared = await self._io(state.channel.declare_queue(state.queue_name, passive=True))
            except aio_pika.exceptions.ChannelNotFoundEntity:  # unbound meanwhile
                await self._prune_groups()
                return 0
            ready = int(declared.declaration_result.message_count or 0)
            return ready + len(state.buffer) + len(state.pending)
