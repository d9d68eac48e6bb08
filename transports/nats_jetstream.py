"""``NatsJetStreamTransport``: the bus over NATS JetStream (nats-py).

This is the only module that imports ``nats``. Layout on the broker, all
under the transport's ``namespace`` so clusters and tests sharing one server
never meet:

* one stream per bound topic, named ``<ns>_S<topic>`` (stream names cannot
  hold dots, so names are escaped: every character outside ``[A-Za-z0-9-]``
  becomes ``_`` and two hex digits, which keeps the mapping one-to-one),
  holding the single subject ``<ns>.bus.<topic>``;
* one durable pull consumer per consumer group on that stream, named after
  the escaped group, with explicit acks.

A message is stored as its JSON body with the headers ``Nats-Msg-Id`` (the
entry's key), ``Coord-Offset`` and ``Coord-Index``; it is published with
``Nats-Expected-Last-Msg-Id`` (its predecessor's key) when it has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    DEFAULT_PREFIX,
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import JetStreamContext

from coordinator.errors import InvalidInput, Unavailable
from coordinator.redact import redact_url, scrub
from coordinator.types import TransportDelivery, TransportEntry, TransportHealth
from transports.names import bounded, escape

_log = logging.getLogger(__name__)

_TOPIC_RE = re.compile(r"[A-Za-z0-9_\-:@]+(?:\.[A-Za-z0-9_\-:@]+)*")
_NAME_MAX = 120  # stream and consumer names become file names on the server
_OFFSET = "Coord-Offset"
_INDEX = "Coord-Index"
_MSG_ID = "Nats-Msg-Id"
_EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
# One encoder for every message body: json.dumps with options makes a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# JetStream API error codes (nats-server's errors.json).
_STREAM_NOT_FOUND = 10059
_CONSUMER_NOT_FOUND = 10014
_NO_MESSAGE_FOUND = 10037
_STREAM_NAME_IN_USE = 10058


class NatsJetStreamTransport:
    """The bus over NATS JetStream: ``exactly-once`` publishing, at-least-once delivery.

    **Publishing does not duplicate.** Every message carries the header
    ``Nats-Msg-Id`` = the entry's key (``topic:offset``), and each topic's
    stream has an explicit duplicate window (``duplicate_window_s``, 2
    minutes by default) inside which JetStream drops a message whose id it
    already stored and answers ``duplicate``. Beyond the window the broker
    alone would store a re-published entry again, so ``publish`` first reads
    the stream's last message and skips every entry whose offset is not past
    the stored one. Entries come in offset order and go out pipelined, each
    carrying ``Nats-Expected-Last-Msg-Id`` = its predecessor's key, so
    JetStream stores one only right after the one before it: the stream always
    holds a gap-free prefix of the topic and that comparison is exact at any
    age. What is left
    is two publishers racing on the same offsets (a deposed and a new leader)
    and that is what the window removes; only a publisher stalled longer than
    the window between reading the last offset and publishing could store a
    key twice. Hence ``guarantee = "exactly-once"``: consumers never see a key
    twice because of a re-publish.

    **Durability.** ``publish`` returns after JetStream acknowledged every
    message, that is after it was written to the stream's file store (and,
    with ``replicas`` > 1 in a NATS cluster, to a quorum of servers). A
    single server fsyncs on its ``sync_interval`` (2 minutes by default), so
    a machine crash, not a process crash, can lose the last acknowledged
    messages unless the server runs with ``sync_interval: always``.

    **Delivery is at-least-once.** Each consumer group is a durable pull
    consumer with explicit acks, ``deliver_policy=all`` (a new group reads
    the topic from its first message) and ``ack_wait = ack_timeout_s``.
    Competing consumers of a group are competing pull requests on that one
    consumer: JetStream hands each message to one request and not again
    while it is unacked. An unacked message comes back after ``ack_wait``
    and a nacked one (``-NAK``) at once, both with ``redelivered=True``
    (delivery count > 1). Groups fan out: each has its own consumer. The
    ``consumer`` name of ``fetch`` is not needed by the broker. A group holds
    at most ``max_ack_pending`` (1000) unacked messages; past that JetStream
    delivers nothing more to it until some are acked or time out.

    **Lag** is the consumer's ``num_pending`` (not yet delivered) plus
    ``num_ack_pending`` (delivered, not acked): exact when nothing moves.

    **Bounded in time.** Every broker call sits in ``asyncio.timeout``
    (``timeout_s``; ``fetch`` adds its ``wait_s``) and raises ``Unavailable``
    on failure. nats-py's own reconnection is off and its connection attempts
    are bounded, so ``start`` against a dead server fails within a second or
    so; after a lost connection the next call connects again (bounded the
    same way). Streams keep messages until ``unbind``: there is no age or
    size limit on a topic.
    """

    name = "nats"
    guarantee = "exactly-once"

    def __init__(self, url: str = "nats://127.0.0.1:4222", *, namespace: str = "coord", timeout_s: float = 5.0,
                 ack_timeout_s: float = 30.0, duplicate_window_s: float = 120.0, replicas: int = 1,
                 max_ack_pending: int = 1000, fetch_max_n: int = 1000) -> None:
        if timeout_s <= 0 or ack_timeout_s <= 0 or duplicate_window_s <= 0:
            raise ValueError("timeout_s, ack_timeout_s and duplicate_window_s must be positive")
        self._url = url
        self._servers = [s.strip() for s in url.split(",") if s.strip()]
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.duplicate_window_s = duplicate_window_s
        self.replicas = replicas
        self.max_ack_pending = max_ack_pending
        self.fetch_max_n = fetch_max_n
        self._prefix = escape(namespace)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connect_lock = asyncio.Lock()
        self._closed = False
        self._last_error = "not started"
        self._known_groups: set[tuple[str, str]] = set()  # (stream, durable) seen to exist
        self._acks: _AckInbox | None = None  # JetStream's answers to direct publishes, per connection

    def __repr__(self) -> str:
        return f"NatsJetStreamTransport({redact_url(self._url)!r}, namespace={self.namespace!r})"

    # -- names -------------------------------------------------------------------------------------

    def _check_topic(self, topic: str) -> None:
        if not _TOPIC_RE.fullmatch(topic):
            raise InvalidInput(f"{topic!r} is not a topic name (dot-separated tokens of [A-Za-z0-9_-:@])",
                               field="topic")

    def _stream(self, topic: str) -> str:
        self._check_topic(topic)
        return bounded(f"{self._prefix}_S{escape(topic)}", _NAME_MAX)

    def _subject(self, topic: str) -> str:
        return f"{self._prefix}.bus.{topic}"

    @staticmethod
    def _durable(group: str) -> str:
        if not group:
            raise InvalidInput("a consumer group needs a name", field="group")
        return bounded(escape(group), _NAME_MAX)

    def _delivery_re(self, stream: str, durable: str) -> re.Pattern[str]:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the form with
        # a domain and an account hash before the stream and a random token at the end.
        token = r"[^.\s*>]+"
        return re.compile(rf"\$JS\.ACK\.(?:{token}\.{token}\.)?{re.escape(stream)}\.{re.escape(durable)}"
                          rf"(?:\.\d+){{5}}(?:\.{token})?")

    # -- errors and the connection ---------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return scrub(text, self._url)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, nats.js.errors.APIError):
            text = f"{exc.code}/{exc.err_code} {exc.description}"
        else:
            text = str(exc) or type(exc).__name__
        return self._scrub(f"{type(exc).__name__}: {text}")

    @contextlib.asynccontextmanager
    async def _guard(self, what: str, extra_s: float = 0.0) -> AsyncIterator[None]:
        """Bound a broker call by ``timeout_s`` (+ ``extra_s``) and turn the
        client's failures into ``Unavailable`` with a message free of secrets."""
        limit_s = self.timeout_s + extra_s
        try:
            async with asyncio.timeout(limit_s):
                yield
        except (Unavailable, InvalidInput):
            raise
        except TimeoutError:  # asyncio's and nats-py's timeouts alike
            raise Unavailable(f"nats: {what} timed out after {limit_s:g} s", retry_after_s=1.0) from None
        except nats.js.errors.APIError as exc:
            raise Unavailable(f"nats: JetStream refused {what}: {self._describe(exc)}",
                              retry_after_s=1.0) from None
        except (nats.errors.Error, OSError) as exc:
            self._last_error = self._describe(exc)
            raise Unavailable(f"nats: {what} failed: {self._last_error}", retry_after_s=1.0) from None

    async def _on_error(self, exc: Exception) -> None:
        # nats-py's default callback logs the exception at ERROR with its traceback; keep it short.
        self._last_error = self._describe(exc)
        _log.debug("nats %s: %s", redact_url(self._url), self._last_error)

    async def _drop_connection(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self._known_groups.clear()
        acks, self._acks = self._acks, None
        if acks is not None:
            acks.fail()
        if nc is None or nc.is_closed:
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                await nc.close()
        except Exception as exc:  # closing is best effort: the socket goes either way
            _log.debug("nats: closing the old connection: %s", self._describe(exc))

    async def _connect(self) -> None:
        await self._drop_connection()
        self._last_error = ""
        nc = Client()
        try:
            async with asyncio.timeout(self.timeout_s):
                await nc.connect(
                    servers=self._servers,
                    name=f"coordinator-{self.namespace}",
                    error_cb=self._on_error,
                    connect_timeout=self.timeout_s,
                    # nats-py would retry and reconnect for minutes by default; this transport
                    # reconnects itself on the next call instead, bounded by timeout_s.
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=min(0.2, self.timeout_s / 10),
                    ping_interval=10,
                    max_outstanding_pings=3,
                    dont_randomize=True,
                    # Every subject is built here from checked names (topics match _TOPIC_RE,
                    # streams and groups are escaped, acks go to ids _delivery_re matched), so
                    # nats-py's check of each (two per publish) adds nothing.
                    skip_subject_validation=True,
                )
        except Exception as exc:
            if not isinstance(exc, nats.errors.NoServersError) or not self._last_error:
                self._last_error = self._describe(exc)
            with contextlib.suppress(Exception):
                await nc.close()
            raise Unavailable(f"nats: cannot connect to {redact_url(self._url)}: {self._last_error}",
                              retry_after_s=1.0) from None
        self._nc = nc
        self._js = nc.jetstream(timeout=self.timeout_s)
        self._last_error = ""

    async def _connection(self) -> tuple[Client, JetStreamContext]:
        """The live connection, connecting again if it was lost."""
        if self._closed:
            raise Unavailable("nats: the transport is closed", retry_after_s=1.0)
        if self._nc is None or not self._nc.is_connected or self._js is None:
            async with self._connect_lock:
                if self._nc is None or not self._nc.is_connected or self._js is None:
                    await self._connect()
        nc, js = self._nc, self._js
        if nc is None or js is None:  # closed while connecting
            raise Unavailable("nats: the transport is closed", retry_after_s=1.0)
        return nc, js

    # -- BusTransport ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect. ``Unavailable`` within about ``timeout_s`` when the server cannot be reached."""
        self._closed = False
        async with self._connect_lock:
            await self._connect()

    async def close(self) -> None:
        """Close the connection (idempotent); later calls raise ``Unavailable``."""
        self._closed = True
        await self._drop_connection()
        self._last_error = "closed"

    async def bind(self, topic: str) -> None:
        """Create the topic's stream if it is missing (idempotent; an existing
        stream is left as it is, whatever its settings)."""
        stream = self._stream(topic)
        _, js = await self._connection()
        async with self._guard(f"bind {topic!r}"):
            try:
                await js.stream_info(stream)
                return
            except nats.js.errors.NotFoundError:
                pass
            config = StreamConfig(
                name=stream,
                subjects=[self._subject(topic)],
                retention=RetentionPolicy.LIMITS,  # every group reads every message; kept until unbind
                storage=StorageType.FILE,
                discard=DiscardPolicy.OLD,
                num_replicas=self.replicas,
                duplicate_window=self.duplicate_window_s,
            )
            try:
                await js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:  # another node created it meanwhile
                    raise

    async def unbind(self, topic: str) -> None:
        """Delete the topic's stream with its messages and consumers (idempotent)."""
        stream = self._stream(topic)
        _, js = await self._connection()
        self._known_groups = {k for k in self._known_groups if k[0] != stream}
        async with self._guard(f"unbind {topic!r}"):
            try:
                await js.delete_stream(stream)
            except nats.js.errors.NotFoundError:
                pass

    async def publish(self, entries: list[TransportEntry]) -> int:
        """Store the entries in offset order; return how many JetStream had not
        stored yet. Entries at or below the stream's last stored offset are
        skipped. The rest go out pipelined (all written, then all acks
        awaited), each chained to its predecessor by
        ``Nats-Expected-Last-Msg-Id``: JetStream refuses a message whose
        predecessor is not the stream's last one, so a failed publish can never
        leave a gap that a later one would paper over (the next round skips what
        was stored and resends from the first refused). ``Unavailable`` when
        the topic is not bound or the broker fails; what was stored stays."""
        if not entries:
            return 0
        for entry in entries:
            self._check_topic(entry.topic)
        _, js = await self._connection()
        acks: list[asyncio.Future[Any]] = []
        async with self._guard(f"publish to {entries[0].topic!r}"):
            last: dict[str, tuple[int, str | None]] = {}
            try:
                for entry in entries:
                    if entry.topic not in last:
                        last[entry.topic] = await self._last_stored(js, entry.topic, self._stream(entry.topic))
                    last_offset, last_key = last[entry.topic]
                    if entry.offset <= last_offset:
                        continue
                    headers = {_MSG_ID: entry.key, _OFFSET: str(entry.offset), _INDEX: str(entry.index)}
                    if last_key is not None:
                        headers[_EXPECTED_LAST_MSG_ID] = last_key
                    payload = _encode(entry.message).encode()
                    acks.append(await js.publish_async(self._subject(entry.topic), payload,
                                                       stream=self._stream(entry.topic), headers=headers))
                    last[entry.topic] = (entry.offset, entry.key)
                results = await asyncio.gather(*acks, return_exceptions=True)
            finally:
                for ack in acks:
                    ack.cancel()  # on a timeout: stop waiting, free the client's in-flight slots
            for result in results:
                if isinstance(result, nats.js.errors.NoStreamResponseError):
                    raise Unavailable(f"nats: topic {entries[0].topic!r} is not bound", retry_after_s=1.0)
                if isinstance(result, BaseException):
                    raise result
            return sum(1 for ack in results if not ack.duplicate)

    async def publish_direct(self, entries: list[TransportEntry]) -> int:
        """Publish pipelined (all written, then all answers awaited), each with
        its key as ``Nats-Msg-Id``: JetStream drops a key it saw within the
        stream's duplicate window (``duplicate`` in its answer), so a client
        retry with the same request id stores nothing twice inside the
        window. No ``Nats-Expected-Last-Msg-Id`` chain: many nodes publish at
        once, and the stream's sequence is the order. Concurrent calls share
        the connection's writes (the client flushes them together) and one
        reply inbox (``_AckInbox``: one reply subject and one future per
        call, where ``publish_async`` makes a future, a token and a header
        per message)."""
        if not entries:
            return 0
        topic = entries[0].topic
        if any(entry.topic != topic for entry in entries):
            raise InvalidInput("publish_direct takes entries of one topic", field="topic")
        subject = self._subject(topic)
        nc, _ = await self._connection()
        async with self._guard(f"publish to {topic!r}"):
            acks = self._acks
            if acks is None or acks.nc is not nc:
                acks = self._acks = _AckInbox(nc)
                await acks.start()
            reply, batch = acks.expect(len(entries))
            try:
                for entry in entries:
                    await nc.publish(subject, _encode(entry.message).encode(), reply=reply,
                                     headers={_MSG_ID: entry.key})
                await batch.done
            finally:
                acks.forget(reply)
            if batch.unbound:  # no responders: no stream
                raise Unavailable(f"nats: topic {topic!r} is not bound", retry_after_s=1.0)
            if batch.refusal is not None:
                raise Unavailable(f"nats: JetStream refused a publish to {topic!r}: {batch.refusal}",
                                  retry_after_s=1.0)
            return batch.new

    async def _last_stored(self, js: JetStreamContext, topic: str, stream: str) -> tuple[int, str | None]:
        """The offset and message id of the stream's last message: (0, None)
        when it is empty, (0, its id or None) when it is not ours (someone
        published by hand; the duplicate window still recognises re-sends)."""
        try:
            last = await js.get_last_msg(stream, self._subject(topic))
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                raise Unavailable(f"nats: topic {topic!r} is not bound", retry_after_s=1.0) from None
            if exc.err_code == _NO_MESSAGE_FOUND:
                return 0, None  # nothing stored yet
            raise
        headers = last.headers or {}
        try:
            return int(headers[_OFFSET]), headers.get(_MSG_ID)
        except (KeyError, ValueError):
            return 0, headers.get(_MSG_ID)

    async def subscribe(self, topic: str, group: str) -> None:
        """Create the group's durable consumer from the topic's first message
        (idempotent: an existing consumer is kept, with its position)."""
        stream, durable = self._stream(topic), self._durable(group)
        _, js = await self._connection()
        async with self._guard(f"subscribe {group!r} to {topic!r}"):
            try:
                await js.consumer_info(stream, durable)
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code == _STREAM_NOT_FOUND:
                    raise Unavailable(f"nats: topic {topic!r} is not bound", retry_after_s=1.0) from None
                await js.add_consumer(stream, ConsumerConfig(
                    durable_name=durable,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=self.ack_timeout_s,
                    max_deliver=-1,
                    max_ack_pending=self.max_ack_pending,
                ))
        self._known_groups.add((stream, durable))

    async def _check_group(self, js: JetStreamContext, topic: str, group: str, stream: str, durable: str) -> None:
        # A pull request for a consumer that does not exist gets no answer at all, so check first.
        if (stream, durable) in self._known_groups:
            return
        try:
            await js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            raise Unavailable(f"nats: group {group!r} of {topic!r} does not exist", retry_after_s=1.0) from None
        if len(self._known_groups) > 10_000:
            self._known_groups.clear()
        self._known_groups.add((stream, durable))

    async def fetch(self, topic: str, group: str, consumer: str, max_n: int,
                    wait_s: float) -> list[TransportDelivery]:
        """Up to ``max_n`` (at most ``fetch_max_n``) deliveries, waiting up to
        ``wait_s`` for the first. First a ``no_wait`` pull for what is there;
        if nothing is, a pull of one message that expires with ``wait_s``,
        then a ``no_wait`` pull for the rest. A pull of one never outlives its
        call with messages still owed to it, so nothing is handed to an inbox
        nobody reads (except in the last instant of an expiry, and such a
        message comes back after the ack timeout)."""
        stream, durable = self._stream(topic), self._durable(group)
        max_n = min(max_n, self.fetch_max_n)
        if max_n <= 0:
            return []
        wait_s = max(0.0, wait_s)
        nc, js = await self._connection()
        out: list[TransportDelivery] = []
        async with self._guard(f"fetch from {group!r} of {topic!r}", extra_s=wait_s):
            await self._check_group(js, topic, group, stream, durable)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            request_subject = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
            pull = _Pull(self, nc, request_subject, topic, group, stream, durable, out)
            sub = await nc.subscribe(nc.new_inbox(), cb=pull.on_msg, pending_msgs_limit=max_n + 16)
            pull.reply = sub.subject
            try:
                if not await pull.run({"batch": max_n, "no_wait": True}, max_n, self.timeout_s):
                    self._known_groups.discard((stream, durable))
                    raise Unavailable(f"nats: no answer for group {group!r} of {topic!r}", retry_after_s=1.0)
                remaining_s = deadline - loop.time()
                if not out and remaining_s > 0.01:
                    await pull.run({"batch": 1, "expires": int(remaining_s * 1e9)}, 1,
                                   remaining_s + min(0.25, self.timeout_s))
                    if out and max_n > 1:
                        await pull.run({"batch": max_n - 1, "no_wait": True}, max_n - 1, self.timeout_s)
            finally:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
        return out

    async def ack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        """Acknowledge (``+ACK``): all written, then one flush round trip, so
        the server has read them when this returns (one request per ack cost
        a round trip and a reply inbox each: a third of a consumer's time).
        JetStream applies an ack a moment later; one it lost comes back after
        ``ack_wait`` (at-least-once). Ids that are not deliveries of this
        group, or whose group is gone, are ignored."""
        await self._answer(topic, group, delivery_ids, b"+ACK", "ack")

    async def nack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        """Give deliveries back for redelivery at once (``-NAK``)."""
        await self._answer(topic, group, delivery_ids, b"-NAK", "nack")

    async def _answer(self, topic: str, group: str, delivery_ids: list[str], body: bytes, what: str) -> None:
        pattern = self._delivery_re(self._stream(topic), self._durable(group))
        valid = [d for d in dict.fromkeys(delivery_ids) if pattern.fullmatch(d)]
        if not valid:
            return
        nc, _ = await self._connection()
        async with self._guard(f"{what} for {group!r} of {topic!r}"):
            for delivery_id in valid:  # to a consumer or stream that is gone: nobody reads it, nothing lost
                await nc.publish(delivery_id, body)
            await nc.flush(timeout=max(1, math.ceil(self.timeout_s)))

    async def _terminate(self, nc: Client, reply: str) -> None:
        with contextlib.suppress(nats.errors.Error):
            await nc.publish(reply, b"+TERM")

    async def health(self) -> TransportHealth:
        """Never raises: ``ok`` only when connected and JetStream answers."""
        where = redact_url(self._url)
        nc, js = self._nc, self._js
        if self._closed or nc is None or js is None or not nc.is_connected:
            return TransportHealth(False, f"nats {where}: not connected ({self._last_error or 'connection lost'})")
        try:
            async with asyncio.timeout(self.timeout_s):
                info = await js.account_info()
        except Exception as exc:
            return TransportHealth(False, f"nats {where}: JetStream does not answer ({self._describe(exc)})")
        version = nc.connected_server_version
        return TransportHealth(True, f"nats {where}: connected to server {version.major}.{version.minor}."
                                     f"{version.patch}, JetStream with {info.streams} streams")

    async def lag(self, topic: str, group: str) -> int:
        """Not yet delivered plus delivered and unacked messages of the group;
        the stream's message count when the group does not exist, 0 when the
        topic is not bound."""
        stream, durable = self._stream(topic), self._durable(group)
        _, js = await self._connection()
        async with self._guard(f"lag of {group!r} on {topic!r}"):
            try:
                info = await js.consumer_info(stream, durable)
            except nats.js.errors.NotFoundError as exc:
                if exc.err_code == _STREAM_NOT_FOUND:
                    return 0
                try:
                    return (await js.stream_info(stream)).state.messages
                except nats.js.errors.NotFoundError:
                    return 0
            return info.num_pending + info.num_ack_pending


class _AckInbox:
    """One wildcard inbox of a connection for JetStream's answers to direct
    publishes: each ``publish_direct`` call gets one reply subject under it
    for all its messages (JetStream answers each message once, there) and
    one future, which the subscription's callback resolves when the last
    answer came: no future, reply subject and callback per message."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        self.waiting: dict[str, _AckBatch] = {}
        self._seq = 0

    async def start(self) -> None:
        await self.nc.subscribe(f"{self.prefix}.*", cb=self._on_msg)

    def expect(self, n: int) -> tuple[str, _AckBatch]:
        self._seq += 1
        reply = f"{self.prefix}.{self._seq}"
        batch = self.waiting[reply] = _AckBatch(asyncio.get_running_loop().create_future(), n)
        return reply, batch

    def forget(self, reply: str) -> None:
        batch = self.waiting.pop(reply, None)
        if batch is not None and not batch.done.done():
            batch.done.cancel()

    def fail(self) -> None:
        """The connection is gone: nothing waiting will be answered."""
        for batch in self.waiting.values():
            if not batch.done.done():
                batch.done.set_exception(nats.errors.ConnectionClosedError())
        self.waiting.clear()

    async def _on_msg(self, msg: Msg) -> None:
        batch = self.waiting.get(msg.subject)
        if batch is None:
            return  # its call is over (timed out): nobody waits
        batch.count(msg)
        if batch.remaining <= 0:
            del self.waiting[msg.subject]
            if not batch.done.done():
                batch.done.set_result(None)


class _AckBatch:
    """What JetStream answered to one ``publish_direct`` call so far."""

    __slots__ = ("done", "new", "refusal", "remaining", "unbound")

    def __init__(self, done: asyncio.Future[None], n: int) -> None:
        self.done = done
        self.remaining = n
        self.new = 0  # stored and not a duplicate
        self.unbound = False  # a 503 (no responders): the stream is missing
        self.refusal: str | None = None  # the first error JetStream answered

    def count(self, msg: Msg) -> None:
        self.remaining -= 1
        if msg.headers and msg.headers.get("Status") == "503":
            self.unbound = True
            return
        data = msg.data
        if data[:10] == b'{"stream":' and b'"error"' not in data and b'"duplicate"' not in data:
            self.new += 1  # {"stream":..,"seq":..}: stored and new (read without json: most answers)
            return
        try:
            body = json.loads(data)
        except ValueError:
            body = {"error": {"description": "an answer that is not JSON"}}
        if not isinstance(body, dict) or "error" in body:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            if self.refusal is None:
                self.refusal = str(error.get("description", error) if isinstance(error, dict) else error)
            return
        self.new += not body.get("duplicate", False)


class _Pull:
    """Pull requests of one ``fetch`` on its own inbox, one at a time, each
    read to its end (the batch filled, or a status such as 404 No Messages
    or 408 Request Timeout) before the next is sent. The inbox's callback
    (``on_msg``, called in order by the client) takes the answers: reading
    them one ``next_msg`` at a time cost a task and a timer per message.
    Answers that come after their request ended are not read (they come
    back after ``ack_wait``), as before."""

    def __init__(self, transport: NatsJetStreamTransport, nc: Client, request_subject: str,
                 topic: str, group: str, stream: str, durable: str, out: list[TransportDelivery]) -> None:
        self.transport = transport
        self.nc = nc
        self.reply = ""  # the inbox, once subscribed
        self.request_subject = request_subject
        self.topic = topic
        self.group = group
        self.stream = stream
        self.durable = durable
        self.out = out
        self._done: asyncio.Future[None] | None = None
        self._want = 0
        self._got = 0
        self._answered = False

    async def run(self, request: dict[str, Any], want: int, wait_s: float) -> bool:
        """Send one pull request and read its answers for up to ``wait_s``;
        True when the server answered anything."""
        done = self._done = asyncio.get_running_loop().create_future()
        self._want, self._got, self._answered = want, 0, False
        await self.nc.publish(self.request_subject, json.dumps(request).encode(), reply=self.reply)
        try:
            async with asyncio.timeout(wait_s):
                await done
        except TimeoutError:
            pass
        finally:
            self._done = None
        return self._answered

    def _end(self, error: BaseException | None = None) -> None:
        done = self._done
        if done is not None and not done.done():
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    async def on_msg(self, msg: Msg) -> None:
        if self._done is None or self._done.done():
            return  # its request is over
        self._answered = True
        status = msg.headers.get("Status") if msg.headers else None
        if status == "100":  # idle heartbeat
            return
        if status == "503":
            self._end(Unavailable(f"nats: group {self.group!r} of {self.topic!r} does not exist", retry_after_s=1.0))
            return
        if status == "409" and "deleted" in (msg.headers or {}).get("Description", "").lower():
            self.transport._known_groups.discard((self.stream, self.durable))
            self._end(Unavailable(f"nats: group {self.group!r} of {self.topic!r} was deleted", retry_after_s=1.0))
            return
        if status:  # 404 No Messages, 408 Request Timeout, other 409s: this request is over
            self._end()
            return
        delivery = self._delivery(msg)
        self._got += 1
        if delivery is None:
            await self.transport._terminate(self.nc, msg.reply)
        else:
            self.out.append(delivery)
        if self._got >= self._want:
            self._end()

    def _delivery(self, msg: Msg) -> TransportDelivery | None:
        headers = msg.headers or {}
        try:
            sequence, delivered = _reply_numbers(msg.reply)
            # published directly: no topic offset, the stream's sequence orders them
            offset = int(headers[_OFFSET]) if _OFFSET in headers else sequence
            message = json.loads(msg.data)
            redelivered = delivered > 1
        except (KeyError, ValueError, TypeError, nats.errors.Error):
            _log.warning("nats: dropping a message of %r that this transport did not publish", self.topic)
            return None
        if not isinstance(message, dict) or not msg.reply:
            return None
        key = headers.get(_MSG_ID) or f"{self.topic}:{offset}"
        return TransportDelivery(msg.reply, self.topic, offset, key, message, redelivered, bytes(msg.data))


def _reply_numbers(reply: str) -> tuple[int, int]:
    """The stream sequence and the delivery count of a JetStream delivery,
    from its ack subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>...``,
    or the form with a domain and an account hash), read as nats-py's
    ``Msg.metadata`` reads them without the rest it builds (a datetime, two
    objects: a tenth of a fetch's time per message). ``ValueError`` when it
    is not one."""
    tokens = reply.split(".") if reply else []
    if len(tokens) < 9 or tokens[0] != Msg.Ack.Prefix0 or tokens[1] != Msg.Ack.Prefix1:
        raise ValueError("not a JetStream delivery")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[4])
    if len(tokens) >= 11:
        return int(tokens[Msg.Ack.StreamSeq]), int(tokens[Msg.Ack.NumDelivered])
    raise ValueError("not a JetStream delivery")
