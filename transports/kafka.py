"""``KafkaTransport``: the bus over Apache Kafka (aiokafka).

This is the only module that imports ``aiokafka``. Layout at the broker, all
under the transport's namespace so clusters and tests sharing one Kafka never
meet (names escaped: every character outside ``[A-Za-z0-9-]`` becomes ``_``
and its hex code, so ``.`` only ever separates)::

    <ns>.<topic>                 a Kafka topic with one partition per bound topic
        key    the entry's key "<topic>:<offset>"
        value  {"v": 1, "offset": <offset>, "index": <log index>, "message": {...}}
    <ns>.<topic>/<group>         a consumer group per subscribed group: its
                                 committed offset, metadata = the topic offset
                                 acked through
    <ns>.<topic>/_publisher      the publisher's offset, committed in each
                                 publishing transaction: metadata = the last
                                 topic offset published
    transactional id <ns>.publisher   one per namespace: a new leader fences the old

Why aiokafka and not confluent-kafka (its asyncio AIOProducer/AIOConsumer):
``python -m bench.kafka_clients`` on this machine (2 cores, loopback, Kafka
4.4), two runs each, messages per second:

    batch of 500:  produce      aiokafka 71-72k   confluent 62k
                   produce-txn  aiokafka 29-35k   confluent 39-41k
                   consume      aiokafka 270-435k confluent 550-700k
    batch of 50:   produce      aiokafka 42-45k   confluent 7.7-7.8k
                   produce-txn  aiokafka 2.2-3.5k confluent 7.5-8.9k

CPU per message is about the same (7-13 us producing, 1-2.5 us consuming).
Neither wins everywhere: confluent-kafka consumes faster (both far above what
the bus carries) and runs back-to-back small transactions faster, because
aiokafka waits a fixed 20 ms when the broker answers CONCURRENT_TRANSACTIONS
while the previous transaction's markers are written (KAFKA-5477); with the
driver's batches under load (up to 500) the two are close. aiokafka is
asyncio itself: a broker call is cancelled by ``asyncio.timeout`` instead of
running on in an executor thread, and a consumer group costs no librdkafka
threads. If publish latency at a light load comes to matter more than that,
confluent-kafka is the one to measure again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    CoordinatorNotAvailableError,
    KafkaError,
    NotCoordinatorError,
    ProducerFenced,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import OffsetAndMetadata

from coordinator.errors import InvalidInput, InvariantError, Unavailable
from coordinator.redact import redact_url, scrub
from coordinator.types import TransportDelivery, TransportEntry, TransportHealth
from transports.names import bounded, escape

log = logging.getLogger(__name__)

# One encoder for every record: json.dumps with options makes a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
RECORD_VERSION = 1
PUBLISHER_GROUP = "_publisher"
POLL_SLICE_S = 0.25  # a waiting fetch re-checks timed-out and nacked deliveries this often
NAME_MAX = 200  # Kafka topic names stop at 249 characters
RETIRE_S = 60.0  # a dropped producer's stop may wait this long for its broker
RETIRING_MAX = 8  # dropped producers still stopping: past that, no new one
COORDINATOR_TRIES = 50  # group lookups while a fresh broker creates its offsets topic (0.1 s apart)
BIND_CHECKS = 100  # a created topic is looked for this often, 50 ms apart
FETCH_BYTES_MAX = 1 << 20  # per fetch request and partition: bounds what a group's consumer buffers
# A message may be as large as an HTTP body (1 MiB) plus our envelope: the broker's
# message.max.bytes must allow it (scripts/kafka/server.properties.in sets 2 MiB).
RECORD_BYTES_MAX = 2 << 20


def client_settings(url: str) -> dict[str, Any]:
    """aiokafka's connection settings from ``kafka://[user:password@]host:port[,host:port]``
    (SASL PLAIN when a user is given; ``kafka+ssl://`` for TLS)."""
    parts = urlsplit(url)
    if parts.scheme not in ("kafka", "kafka+ssl"):
        raise InvalidInput(f"{redact_url(url)} is not a kafka:// or kafka+ssl:// URL", field="url")
    netloc = parts.netloc
    user = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, _, password = userinfo.partition(":")
        user, password = unquote(user), unquote(password)
    servers = [s.strip() for s in netloc.split(",") if s.strip()]
    if not servers:
        raise InvalidInput(f"{redact_url(url)} names no broker", field="url")
    tls = parts.scheme == "kafka+ssl"
    settings: dict[str, Any] = {"bootstrap_servers": servers}
    if user:
        settings.update(security_protocol="SASL_SSL" if tls else "SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                        sasl_plain_username=user, sasl_plain_password=password)
    elif tls:
        settings["security_protocol"] = "SSL"
    if tls:
        from aiokafka.helpers import create_ssl_context
        settings["ssl_context"] = create_ssl_context()
    return settings


def _read_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _read_batch_errors(producer: AIOKafkaProducer) -> None:
    """aiokafka fails a batch it could not send (a fenced producer's, for one)
    by setting its drain waiter to the error, which nobody reads: asyncio
    then logs "Future exception was never retrieved" with a traceback when it
    is collected, at every leader change. Read it when it is set. (Private
    attributes: without them nothing happens but that log line.)"""
    accumulator = getattr(producer, "_message_accumulator", None)
    batches = [b for queue in getattr(accumulator, "_batches", {}).values() for b in queue]
    for batch in batches + list(getattr(accumulator, "_pending_batches", ())):
        waiter = getattr(batch, "_drain_waiter", None)
        if isinstance(waiter, asyncio.Future):
            waiter.add_done_callback(_read_exception)


@dataclass
class _Held:
    """A record read from the partition and not acked yet."""

    kafka_offset: int
    offset: int  # the topic offset
    key: str
    message: dict[str, Any]
    text: bytes = b""  # the message's JSON as the record holds it, when known (direct mode)


@dataclass
class _Group:
    """One consumer group of one topic, as this transport serves it."""

    consumer: AIOKafkaConsumer
    tp: TopicPartition
    committed: int  # Kafka offset committed for the group (the next to read after a restart)
    read_to: int  # Kafka offset after the last record read
    read_offset: int  # topic offset of the last record read (acked-through when nothing is held)
    held: dict[int, _Held] = field(default_factory=dict)  # kafka offset -> record, delivered or returned
    pending: dict[str, tuple[int, float]] = field(default_factory=dict)  # delivery id -> (kafka offset, due)
    returned: deque[int] = field(default_factory=deque)  # kafka offsets nacked or timed out
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    commit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one offset commit at a time
    seq: int = 0


class KafkaTransport:
    """The bus over Kafka: ``exactly-once`` publishing, at-least-once delivery.

    **Publishing does not duplicate.** Every publish is one Kafka transaction
    of an idempotent producer (acks=all) whose transactional id is the
    namespace's: a publisher that starts (a new leader) fences every earlier
    one, whose next commit fails (``ProducerFenced``; it then stays away for
    ``fenced_backoff_s`` before it fences back, so two racing leaders do not
    take turns forever). In the same transaction the publisher commits the
    offset of the group ``<topic>/_publisher`` with the last topic offset as
    metadata, so what Kafka holds and what it says it holds move together. A
    publisher reads that offset once after it became the current one (and
    after any failure) and skips every entry at or below it: a re-publish
    after a leader change or a lost confirmation adds nothing, and a
    concurrent one cannot commit. Hence ``guarantee = "exactly-once"``.
    Consumers read ``read_committed``: an aborted publish is never seen.

    **Durability**: ``publish`` returns after the transaction committed, that
    is after every in-sync replica has the records (acks=all; each topic has
    ``replicas`` copies, 1 by default as on this machine). A clean broker
    restart loses nothing committed before the stop began. With one replica,
    a transaction committed while the broker stops can hang: the controlled
    shutdown leaves its partitions with no leader (-1), and Kafka's
    transaction coordinator takes a partition without a leader for a deleted
    one and completes the transaction without writing its markers there
    (seen in 2 of 20 restart-test runs stopped mid-stream: the records'
    marker, or the publisher offset's, missing). Its records then stay
    unreadable to read_committed consumers, and everything after them, until
    the transaction is aborted by hand (``kafka-transactions.sh
    find-hanging`` / ``abort``); a publisher offset that never applied makes
    the next publish read a lower offset, which is read again for
    ``stale_read_s`` (a coordinator still loading may answer no offset) and then
    logged as an error. Disabling the controlled shutdown does not help: the
    restarted broker is fenced when its old session times out, and the
    markers it re-sends meanwhile are skipped the same way. Replicas on
    other brokers avoid it. A crash loses more, on a single node: Kafka does not
    fsync each write, and after an unclean shutdown Kafka 4.4 truncated each
    partition to its high-watermark checkpoint (written every 5 s), so in our
    runs a SIGKILL right after a commit lost that transaction, records and
    publisher offset alike (4 times out of 4), and one 6 s after the commit
    lost nothing. The leader's cursor had moved past the lost messages: they
    are gone, and the next publish leaves a gap (logged as a warning). Only replicas on other brokers
    (``replicas`` >= 3, ``min.insync.replicas`` = 2) make a confirmed publish
    survive a crash.

    **Consumer groups.** Each subscribed group is a Kafka consumer group used
    for its committed offset only: this transport's consumer is assigned the
    topic's partition by hand (no group membership, no rebalances: one
    node serves a group, the leader in log mode, the member the API ranks
    first in direct mode: ``one_reader_per_group``) and never auto-commits. Records read are held in
    memory and handed out to our consumers, one consumer each, like the
    others' competing consumers; an ack removes a record, and the group's
    offset is committed up to the lowest record still held (Kafka has no
    per-message ack). A nacked record is handed out again at once, one not
    acked within ``ack_timeout_s`` on the next fetch, both ``redelivered``.
    A group holds at most ``inflight_max`` records; past that a fetch gives
    only redeliveries until some are acked. A new leader (or this transport
    after ``close``) reads from the committed offset, so every record not
    acked comes again (``redelivered`` is False then: Kafka cannot tell).

    **Lag** is the last published topic offset (the publisher's metadata, or
    what this transport published itself if that is more: Kafka shows a
    transaction's offsets a moment after its commit returned) minus the
    group's acked-through offset, exact because topic offsets are dense.

    **Bounded.** Every broker call sits in ``asyncio.timeout`` (``timeout_s``;
    a fetch adds its wait) and raises ``Unavailable``; fetches buffer at most
    ``FETCH_BYTES_MAX`` per group; at most ``groups_max`` groups are open (the
    least recently used beyond that is closed: its held records come again).
    The URL's password never appears in errors, logs, ``health`` or ``repr``.

    **Weak points**: ``unbind`` deletes the topic but not the groups' offsets
    (aiokafka has no DeleteGroups); a group (or the publisher) whose committed
    offset lies beyond the end of a re-created topic is reset to its start,
    which is right unless the new topic already grew past the old offset
    before the group's first fetch. Topic offsets must be dense, as the
    service's are.
    """

    name = "kafka"
    guarantee = "exactly-once"
    # A group's partition is read by hand (no group membership): two nodes reading one
    # group would each deliver every record, so the service reads it through one node.
    one_reader_per_group = True

    def __init__(self, url: str = "kafka://127.0.0.1:9092", *, namespace: str = "coord", timeout_s: float = 5.0,
                 ack_timeout_s: float = 30.0, inflight_max: int = 1000, groups_max: int = 64,
                 fenced_backoff_s: float = 2.0, replicas: int = 1) -> None:
        if not namespace:
            raise InvariantError("a transport namespace must not be empty")
        if timeout_s <= 0 or ack_timeout_s <= 0 or inflight_max <= 0 or groups_max <= 0 or replicas <= 0:
            raise InvariantError("timeout_s, ack_timeout_s, inflight_max, groups_max and replicas must be positive")
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.inflight_max = inflight_max
        self.groups_max = groups_max
        self.fenced_backoff_s = fenced_backoff_s
        self.replicas = replicas  # of each topic; the broker's min.insync.replicas decides what acks=all waits for
        self._url = url
        self._where = redact_url(url)
        self._prefix = escape(namespace)
        self._admin: AIOKafkaAdminClient | None = None
        self._reader: AIOKafkaConsumer | None = None  # no group: end offsets, committed offsets
        self._producer: AIOKafkaProducer | None = None
        self._direct_producer: AIOKafkaProducer | None = None  # direct mode: idempotent, no transactions
        self._publish_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._direct_lock = asyncio.Lock()  # the first direct publishes at once make one producer
        self._last: dict[str, int] = {}  # kafka topic -> last topic offset published, while our producer is current
        # kafka topic -> the last topic offset whose transaction this process saw committed (kept across
        # producers): a broker that answers lower right after a restart may not have completed that
        # transaction's offset commit yet (its markers are written after the restart)
        self._confirmed: dict[str, int] = {}
        self.stale_read_s = 10.0  # how long a lower answer is read again before it counts as a loss
        # kafka topic -> when a lower answer was first read (loop time): the reads go on across publishes,
        # each bounded by timeout_s, until stale_read_s has passed since then
        self._stale_since: dict[str, float] = {}
        self._fenced_until = 0.0
        self._retiring: set[asyncio.Task[None]] = set()  # dropped producers being stopped
        self._groups: dict[tuple[str, str], _Group] = {}  # (topic, group), least recently used first
        self._problem = f"kafka at {self._where}: not started"

    def __repr__(self) -> str:
        return f"KafkaTransport({self._where!r}, namespace={self.namespace!r})"

    # -- names and errors ---------------------------------------------------------------------------

    def _topic(self, topic: str) -> str:
        if not topic:
            raise InvalidInput("a topic needs a name", field="topic")
        return bounded(f"{self._prefix}.{escape(topic)}", NAME_MAX)

    def _group_id(self, topic: str, group: str) -> str:
        if not group:
            raise InvalidInput("a consumer group needs a name", field="group")
        return f"{self._topic(topic)}/{escape(group)}"

    def _describe(self, exc: BaseException) -> str:
        return scrub(f"{type(exc).__name__}: {str(exc) or type(exc).__name__}", self._url)

    @contextlib.asynccontextmanager
    async def _guard(self, what: str, extra_s: float = 0.0) -> AsyncIterator[None]:
        """Bound a broker call by ``timeout_s`` (+ ``extra_s``); the client's
        failures become ``Unavailable`` with a message free of secrets."""
        limit_s = self.timeout_s + extra_s
        try:
            async with asyncio.timeout(limit_s):
                yield
        except (Unavailable, InvalidInput, InvariantError):
            raise
        except TimeoutError:
            raise Unavailable(f"kafka at {self._where}: {what} timed out after {limit_s:g} s",
                              retry_after_s=1.0) from None
        except (KafkaError, OSError) as exc:
            raise Unavailable(f"kafka at {self._where}: {what}: {self._describe(exc)}", retry_after_s=1.0) from None

    def _started(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._reader is None:
            raise Unavailable(f"kafka at {self._where}: not connected", retry_after_s=1.0)
        return self._admin, self._reader

    def _settings(self) -> dict[str, Any]:
        return {**client_settings(self._url), "request_timeout_ms": int(self.timeout_s * 1000),
                "client_id": f"coordinator-{self.namespace}"}

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the admin client and the reader (idempotent). ``Unavailable``
        within about ``timeout_s`` when no broker answers."""
        if self._admin is not None:
            return
        settings = self._settings()
        admin = AIOKafkaAdminClient(**settings)
        # The reader only asks for offsets: the high watermark (read_uncommitted) bounds every
        # committed offset even while a transaction's markers are being written.
        reader = AIOKafkaConsumer(**settings, enable_auto_commit=False, isolation_level="read_uncommitted")
        try:
            async with self._guard("connect"):
                await admin.start()
                await reader.start()
        except Unavailable as exc:
            self._problem = exc.message
            await self._stop_quietly(admin.close(), reader.stop())
            raise
        self._admin, self._reader = admin, reader
        self._problem = ""

    async def _stop_quietly(self, *closing: Any) -> None:
        for step in closing:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await step
            except Exception as exc:  # closing is best effort: the sockets go either way
                log.debug("kafka at %s: closing (%s): %s", self._where, getattr(step, "__qualname__", step),
                          self._describe(exc))

    async def close(self) -> None:
        """Close every client (idempotent). Held deliveries are not committed:
        a later consumer of their groups gets them again."""
        groups, self._groups = list(self._groups.values()), {}
        admin, reader, self._admin, self._reader = self._admin, self._reader, None, None
        await self._drop_producer()
        await self._drop_direct()
        steps = [g.consumer.stop() for g in groups]
        if admin is not None and reader is not None:
            steps += [admin.close(), reader.stop()]
        await self._stop_quietly(*steps)
        retiring = list(self._retiring)
        if retiring:
            _, late = await asyncio.wait(retiring, timeout=self.timeout_s)
            for task in late:
                task.cancel()
        self._problem = f"kafka at {self._where}: closed"

    async def health(self) -> TransportHealth:
        """Never raises: ``ok`` only when connected and the cluster answers."""
        if self._admin is None:
            return TransportHealth(False, self._problem)
        try:
            async with self._guard("health"):
                cluster = await self._admin.describe_cluster()
        except Unavailable as exc:
            return TransportHealth(False, exc.message)
        except Exception as exc:  # health must answer, whatever went wrong
            return TransportHealth(False, f"kafka at {self._where}: {type(exc).__name__}")
        brokers = len(cluster.get("brokers", ()))
        return TransportHealth(True, f"kafka at {self._where}: cluster {cluster.get('cluster_id')}, "
                                     f"{brokers} broker(s)")

    # -- topics -------------------------------------------------------------------------------------

    async def bind(self, topic: str) -> None:
        """Create the topic's Kafka topic (one partition, ``replicas`` copies) if
        it is missing (idempotent: an existing one is kept as it is)."""
        name = self._topic(topic)
        admin, _ = self._started()
        async with self._guard(f"bind {topic!r}"):
            response = await admin.create_topics([NewTopic(name, 1, self.replicas)],
                                                 timeout_ms=int(self.timeout_s * 1000))
            for _, code, *rest in response.topic_errors:  # (name, code, message) in every version
                if code and code != TopicAlreadyExistsError.errno:
                    raise Unavailable(f"kafka at {self._where}: bind {topic!r}: error {code} {rest[:1]}",
                                      retry_after_s=1.0)
            # The controller has the topic; the broker's metadata shows it a moment later.
            for _ in range(BIND_CHECKS):
                (described,) = await admin.describe_topics([name])
                if not described.get("error_code") and described.get("partitions"):
                    return
                await asyncio.sleep(0.05)
            raise Unavailable(f"kafka at {self._where}: bind {topic!r}: the topic does not show", retry_after_s=1.0)

    async def unbind(self, topic: str) -> None:
        """Delete the Kafka topic and its records (idempotent); this transport
        forgets its groups of the topic."""
        name = self._topic(topic)
        admin, _ = self._started()
        self._last.pop(name, None)
        self._confirmed.pop(name, None)
        self._stale_since.pop(name, None)
        closing = [self._groups.pop(key).consumer.stop() for key in list(self._groups) if key[0] == topic]
        await self._stop_quietly(*closing)
        async with self._guard(f"unbind {topic!r}"):
            response = await admin.delete_topics([name], timeout_ms=int(self.timeout_s * 1000))
            for _, code, *_rest in response.topic_error_codes:
                if code and code != UnknownTopicOrPartitionError.errno:
                    raise Unavailable(f"kafka at {self._where}: unbind {topic!r}: error {code}", retry_after_s=1.0)

    # -- publishing ---------------------------------------------------------------------------------

    async def publish(self, entries: list[TransportEntry]) -> int:
        """Store the entries not stored yet, in offset order, in one transaction
        per topic; return how many were new. ``Unavailable`` when the broker
        fails, the topic is not bound, or another publisher fenced this one
        (then for ``fenced_backoff_s``); nothing of a failed transaction is
        visible, and the next call starts from what Kafka holds."""
        if not entries:
            return 0
        by_topic: dict[str, list[TransportEntry]] = {}
        for entry in entries:
            if entry.offset < 0:
                raise InvariantError(f"offset {entry.offset} of {entry.topic!r} is negative")
            by_topic.setdefault(entry.topic, []).append(entry)
        new = 0
        async with self._publish_lock:
            for topic, batch in by_topic.items():
                new += await self._publish_topic(topic, batch)
        return new

    async def _publish_topic(self, topic: str, entries: list[TransportEntry]) -> int:
        name = self._topic(topic)
        async with self._guard(f"publish to {topic!r}"):
            try:
                producer = await self._current_producer()
                last = await self._last_published(name)
                todo = [e for e in entries if e.offset > last]
                if not todo:
                    return 0
                if todo[0].offset != last + 1:
                    log.warning("kafka: %r holds offsets up to %d, publishing from %d: a gap", topic, last,
                                todo[0].offset)
                tp = TopicPartition(name, 0)
                await producer.begin_transaction()
                sent = [await producer.send(name, self._value(e), key=e.key.encode(), partition=0) for e in todo]
                _read_batch_errors(producer)
                placed = await asyncio.gather(*sent)
                await producer.send_offsets_to_transaction(
                    {tp: OffsetAndMetadata(placed[-1].offset + 1, str(todo[-1].offset))},
                    f"{name}/{PUBLISHER_GROUP}")
                await producer.commit_transaction()
            except ProducerFenced:
                self._fenced_until = asyncio.get_running_loop().time() + self.fenced_backoff_s
                await self._drop_producer()
                raise Unavailable(f"kafka at {self._where}: another publisher of {self.namespace!r} took over "
                                  f"(fenced); standing back {self.fenced_backoff_s:g} s", retry_after_s=1.0) from None
            except (AssertionError, RuntimeError) as exc:
                # aiokafka checks its transaction states with asserts (a producer fenced in the
                # background refuses to begin): a broken producer, not a broken caller.
                await self._drop_producer()
                raise Unavailable(f"kafka at {self._where}: publish to {topic!r}: the producer failed "
                                  f"({self._describe(exc)}); a new one takes over", retry_after_s=1.0) from None
            except BaseException:
                await self._drop_producer()  # the next publish starts anew from what Kafka holds
                raise
        self._last[name] = todo[-1].offset
        self._confirmed[name] = max(self._confirmed.get(name, 0), todo[-1].offset)
        return len(todo)

    async def publish_direct(self, entries: list[TransportEntry]) -> int:
        """Send with the node's idempotent, non-transactional producer
        (acks=all): no transaction and no fencing, so every node publishes
        at once; concurrent calls share the producer's batches (its
        ``linger_ms``). The idempotent producer drops its own retries of a
        batch; Kafka cannot recognise a key, so a client retry stores the
        message again and all are counted as new. The record value has no
        topic offset: a delivery's offset is the Kafka offset + 1."""
        if not entries:
            return 0
        topic = entries[0].topic
        name = self._topic(topic)
        async with self._guard(f"publish to {topic!r}"):
            try:
                producer = await self._direct()
                sent = [await producer.send(name, self._direct_value(e), key=e.key.encode(), partition=0)
                        for e in entries]
                await asyncio.gather(*sent)
            except (AssertionError, RuntimeError) as exc:
                await self._drop_direct()
                raise Unavailable(f"kafka at {self._where}: publish to {topic!r}: the producer failed "
                                  f"({self._describe(exc)})", retry_after_s=1.0) from None
            except UnknownTopicOrPartitionError:
                raise Unavailable(f"kafka at {self._where}: topic {topic!r} is not bound", retry_after_s=1.0) \
                    from None
        return len(entries)

    async def _direct(self) -> AIOKafkaProducer:
        """The direct-mode producer, made once: concurrent first publishes wait
        for the one being started (each made its own before, and all but the
        last were never closed)."""
        if self._direct_producer is not None:
            return self._direct_producer
        async with self._direct_lock:
            if self._direct_producer is None:
                producer = AIOKafkaProducer(**self._settings(), enable_idempotence=True, acks="all", linger_ms=2,
                                            max_batch_size=512 * 1024,
                                            max_request_size=RECORD_BYTES_MAX)
                try:
                    await producer.start()
                except BaseException:
                    await self._stop_quietly(producer.stop())
                    raise
                self._direct_producer = producer
            return self._direct_producer

    async def _drop_direct(self) -> None:
        producer, self._direct_producer = self._direct_producer, None
        if producer is not None:
            await self._stop_quietly(producer.stop())

    @staticmethod
    def _direct_value(entry: TransportEntry) -> bytes:
        try:
            return _encode({"v": RECORD_VERSION, "key": entry.key, "message": entry.message}).encode()
        except (TypeError, ValueError) as exc:
            raise InvariantError(f"message {entry.key} is not JSON: {exc}") from exc

    @staticmethod
    def _value(entry: TransportEntry) -> bytes:
        try:
            return _encode({"v": RECORD_VERSION, "offset": entry.offset, "index": entry.index,
                            "message": entry.message}).encode()
        except (TypeError, ValueError) as exc:
            raise InvariantError(f"message at {entry.key} is not JSON: {exc}") from exc

    async def _current_producer(self) -> AIOKafkaProducer:
        """The transactional producer, made (and fencing every earlier one of
        the namespace) when there is none."""
        if self._producer is not None:
            return self._producer
        if len(self._retiring) >= RETIRING_MAX:
            raise Unavailable(f"kafka at {self._where}: {len(self._retiring)} earlier producers are still "
                              "closing", retry_after_s=1.0)
        if asyncio.get_running_loop().time() < self._fenced_until:
            raise Unavailable(f"kafka at {self._where}: fenced by another publisher of {self.namespace!r}",
                              retry_after_s=1.0)
        self._started()
        producer = AIOKafkaProducer(**self._settings(), transactional_id=f"{self._prefix}.publisher",
                                    enable_idempotence=True, acks="all", linger_ms=0, retry_backoff_ms=20,
                                    max_batch_size=FETCH_BYTES_MAX // 4, max_request_size=RECORD_BYTES_MAX,
                                    transaction_timeout_ms=max(1000, int(self.timeout_s * 4000)))
        try:
            await producer.start()  # InitProducerId: bumps the epoch, aborts a fenced publisher's open transaction
        except BaseException:
            await self._stop_quietly(producer.stop())
            raise
        self._producer = producer
        self._last.clear()
        return producer

    async def _drop_producer(self) -> None:
        """Forget the producer (after a failure, or fenced): the next publish
        makes a new one, which fences it for good. It is stopped in the
        background: its stop waits for what it still has in flight, and cut
        short (a broker away) it would leave aiokafka's tasks and connections
        behind."""
        producer, self._producer = self._producer, None
        self._last.clear()
        if producer is None:
            return
        task = asyncio.get_running_loop().create_task(self._retire(producer))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, producer: AIOKafkaProducer) -> None:
        try:
            async with asyncio.timeout(RETIRE_S):
                await producer.stop()
        except Exception as exc:  # best effort: it is fenced or failed already
            log.debug("kafka at %s: stopping an old producer: %s", self._where, self._describe(exc))
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout_s):
                    await producer.client.close()  # after a stop cut short: its sockets at least
            # A fenced or failed producer leaves its error on a future nobody awaits (aiokafka's
            # transaction manager); asyncio would log it with a traceback. (Private attribute.)
            waiter = getattr(getattr(producer, "_txn_manager", None), "_transaction_waiter", None)
            if isinstance(waiter, asyncio.Future) and waiter.done() and not waiter.cancelled():
                waiter.exception()

    async def _last_published(self, name: str) -> int:
        """The last topic offset Kafka holds for the Kafka topic ``name``:
        the publisher group's metadata, 0 when there is none or it lies beyond
        the topic's end (a re-created topic)."""
        if name in self._last:
            return self._last[name]
        admin, reader = self._started()
        tp = TopicPartition(name, 0)
        last = await self._committed(admin, reader, f"{name}/{PUBLISHER_GROUP}", tp)
        confirmed = self._confirmed.get(name, 0)
        loop = asyncio.get_running_loop()
        if last[1] < confirmed:
            # Lower than a commit this process saw succeed. Right after a broker restart the group
            # coordinator may still be loading (aiokafka's admin ignores a top-level error: no offset): read again.
            # The deadline outlives this call (each is cut at timeout_s), so a lower answer that
            # stays, a transaction Kafka completed without its markers, ends the wait.
            deadline = self._stale_since.setdefault(name, loop.time()) + self.stale_read_s
            while last[1] < confirmed and loop.time() < deadline:
                await asyncio.sleep(0.2)
                last = await self._committed(admin, reader, f"{name}/{PUBLISHER_GROUP}", tp)
        self._stale_since.pop(name, None)
        if last[1] < confirmed:
            log.error("kafka: %r answers offset %d, below %d whose transaction committed: Kafka completed it "
                      "without its markers (a partition with no leader at that moment, as in a single-replica "
                      "broker's controlled shutdown) or lost it; its records may stay unreadable to read_committed "
                      "consumers until the hanging transaction is aborted (kafka-transactions.sh find-hanging)",
                      name, last[1], confirmed)
        self._last[name] = last[1]
        return last[1]

    async def _committed(self, admin: AIOKafkaAdminClient, reader: AIOKafkaConsumer, group_id: str,
                         tp: TopicPartition) -> tuple[int, int]:
        """(Kafka offset, topic offset) a group committed for ``tp``; (-1, 0)
        when it has none, or when it is beyond the topic's end. Raises
        ``Unavailable`` when the topic does not exist."""
        found = (await self._group_offsets(admin, group_id, tp)).get(tp)
        if found is None or found.offset < 0:
            await self._end_offset(reader, tp)  # the topic must exist
            return -1, 0
        if found.offset > await self._end_offset(reader, tp):
            return -1, 0
        try:
            return found.offset, int(found.metadata or 0)
        except ValueError:
            return found.offset, 0

    async def _group_offsets(self, admin: AIOKafkaAdminClient, group_id: str,
                             tp: TopicPartition) -> dict[TopicPartition, OffsetAndMetadata]:
        """The group's committed offsets. A fresh broker creates its offsets
        topic at the first group lookup and answers "coordinator not available"
        meanwhile: asked again, up to ``COORDINATOR_TRIES`` times (the caller's
        timeout bounds the whole)."""
        for attempt in range(COORDINATOR_TRIES):
            try:
                return await admin.list_consumer_group_offsets(group_id, partitions=[tp])
            except (CoordinatorNotAvailableError, NotCoordinatorError, CoordinatorLoadInProgressError):
                if attempt == COORDINATOR_TRIES - 1:
                    raise
                await asyncio.sleep(0.1)
        raise InvariantError("unreachable")

    async def _end_offset(self, reader: AIOKafkaConsumer, tp: TopicPartition) -> int:
        admin, _ = self._started()
        (described,) = await admin.describe_topics([tp.topic])
        if described.get("error_code"):  # UNKNOWN_TOPIC_OR_PARTITION: not bound (or unbound)
            raise Unavailable(f"kafka at {self._where}: topic {tp.topic!r} is not bound", retry_after_s=1.0)
        return (await reader.end_offsets([tp]))[tp]

    # -- consumer groups ----------------------------------------------------------------------------

    async def subscribe(self, topic: str, group: str) -> None:
        """Make the group exist at Kafka, reading from the topic's first record
        (idempotent: a group with a committed offset keeps it)."""
        name, group_id = self._topic(topic), self._group_id(topic, group)
        admin, reader = self._started()
        tp = TopicPartition(name, 0)
        async with self._guard(f"subscribe {group!r} to {topic!r}"):
            committed, _ = await self._committed(admin, reader, group_id, tp)
            if committed >= 0:
                return
            start = (await reader.beginning_offsets([tp]))[tp]
            consumer = AIOKafkaConsumer(**self._settings(), group_id=group_id, enable_auto_commit=False)
            await consumer.start()
            try:
                consumer.assign([tp])
                await consumer.commit({tp: OffsetAndMetadata(start, "0")})
            finally:
                await self._stop_quietly(consumer.stop())

    async def _open(self, topic: str, group: str) -> _Group:
        key = (topic, group)
        state = self._groups.pop(key, None)
        if state is not None:
            self._groups[key] = state  # most recently used last
            return state
        async with self._open_lock:  # two first fetches of a group make one consumer
            state = self._groups.get(key)
            return state if state is not None else await self._make_group(topic, group)

    async def _make_group(self, topic: str, group: str) -> _Group:
        key = (topic, group)
        name, group_id = self._topic(topic), self._group_id(topic, group)
        admin, reader = self._started()
        tp = TopicPartition(name, 0)
        committed, acked_through = await self._committed(admin, reader, group_id, tp)
        if committed < 0 and (await self._group_offsets(admin, group_id, tp)).get(tp) is None:
            raise Unavailable(f"kafka at {self._where}: group {group!r} of {topic!r} does not exist",
                              retry_after_s=1.0)
        if committed < 0:
            committed = (await reader.beginning_offsets([tp]))[tp]
        consumer = AIOKafkaConsumer(**self._settings(), group_id=group_id, enable_auto_commit=False,
                                    isolation_level="read_committed", auto_offset_reset="earliest",
                                    max_partition_fetch_bytes=FETCH_BYTES_MAX, fetch_max_bytes=FETCH_BYTES_MAX)
        try:
            await consumer.start()
            consumer.assign([tp])
            consumer.seek(tp, committed)
        except BaseException:
            await self._stop_quietly(consumer.stop())
            raise
        while len(self._groups) >= self.groups_max:
            oldest = next(iter(self._groups))
            await self._stop_quietly(self._groups.pop(oldest).consumer.stop())
        state = _Group(consumer, tp, committed, committed, acked_through)
        self._groups[key] = state
        return state

    async def fetch(self, topic: str, group: str, consumer: str, max_n: int,
                    wait_s: float) -> list[TransportDelivery]:
        """Nacked and timed-out records first (``redelivered``), then new ones,
        up to ``max_n``; waits up to ``wait_s`` for the first, re-checking
        every ``POLL_SLICE_S``. ``Unavailable`` when the group does not exist."""
        if max_n <= 0:
            return []
        wait_s = max(0.0, wait_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        async with self._guard(f"fetch from {group!r} of {topic!r}", extra_s=wait_s):
            state = await self._open(topic, group)
            async with state.lock:
                while True:
                    out = self._take_returned(topic, state, max_n, loop.time())
                    room = min(max_n - len(out), self.inflight_max - len(state.held))
                    remaining = deadline - loop.time()
                    if room > 0:
                        slice_s = 0.0 if out or remaining <= 0 else min(remaining, POLL_SLICE_S)
                        out += await self._read_new(topic, state, room, slice_s, loop.time())
                    elif not out and remaining > 0:
                        await asyncio.sleep(min(remaining, POLL_SLICE_S))  # full: wait for acks or timeouts
                    if out or loop.time() >= deadline:
                        return out

    def _deliver(self, topic: str, state: _Group, held: _Held, now: float, redelivered: bool) -> TransportDelivery:
        state.seq += 1
        delivery_id = f"{held.kafka_offset}.{state.seq}"
        state.pending[delivery_id] = (held.kafka_offset, now + self.ack_timeout_s)
        return TransportDelivery(delivery_id, topic, held.offset, held.key, held.message, redelivered, held.text)

    def _take_returned(self, topic: str, state: _Group, max_n: int, now: float) -> list[TransportDelivery]:
        for delivery_id, (kafka_offset, due) in list(state.pending.items()):
            if due <= now:
                del state.pending[delivery_id]
                state.returned.append(kafka_offset)
        out = []
        while state.returned and len(out) < max_n:
            held = state.held.get(state.returned.popleft())
            if held is not None:
                out.append(self._deliver(topic, state, held, now, True))
        return out

    async def _read_new(self, topic: str, state: _Group, count: int, wait_s: float,
                        now: float) -> list[TransportDelivery]:
        batches = await state.consumer.getmany(state.tp, timeout_ms=int(wait_s * 1000), max_records=count)
        out = []
        for record in batches.get(state.tp, ()):
            state.read_to = record.offset + 1
            held = self._decode(topic, record)
            if held is None:
                continue  # not ours: skipped, and committed past with the rest
            state.read_offset = held.offset
            state.held[held.kafka_offset] = held
            out.append(self._deliver(topic, state, held, now, False))
        if not out:
            await self._commit(state)  # foreign records or control markers only: move past them
        return out

    @staticmethod
    def _decode(topic: str, record: Any) -> _Held | None:
        direct = _read_direct(record.value)
        if direct is not None:
            key, message, text = direct
            return _Held(record.offset, record.offset + 1, key, message, text)
        try:
            body = json.loads(record.value)
            if body.get("v") != RECORD_VERSION or not isinstance(body.get("message"), dict):
                raise ValueError("not a record of this transport")
            if "key" in body:  # published directly: no topic offset, Kafka's orders them
                return _Held(record.offset, record.offset + 1, str(body["key"]), body["message"])
            offset = int(body["offset"])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("kafka topic of %r: skipping record %d: %s", topic, record.offset, exc)
            return None
        return _Held(record.offset, offset, f"{topic}:{offset}", body["message"])

    async def ack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        """Forget the records and commit the group's offset up to the lowest
        record still held. Ids that are not current deliveries are ignored.
        ``Unavailable`` when the commit fails: then nothing is forgotten."""
        state = self._groups.get((topic, group))
        if state is None:
            return
        taken = {d: state.pending.pop(d) for d in dict.fromkeys(delivery_ids) if d in state.pending}
        forgotten = {k: state.held.pop(k) for k, _ in taken.values() if k in state.held}
        try:
            async with self._guard(f"ack on {group!r} of {topic!r}"):
                await self._commit(state)
        except BaseException:
            # Not acked after all: the records stay out with their consumer and come
            # back after the ack timeout, as with a broker that lost the ack.
            state.held.update(forgotten)
            state.pending.update(taken)
            raise

    async def _commit(self, state: _Group) -> None:
        """Commit the group's offset up to the lowest record held. One commit
        at a time: acks that come while one is in flight wait for it, and
        the first of them commits for all (the point is read after the
        wait), so concurrent consumers share a round trip."""
        async with state.commit_lock:
            if state.held:
                lowest = min(state.held)
                point, acked_through = lowest, state.held[lowest].offset - 1
            else:
                point, acked_through = state.read_to, state.read_offset
            if point <= state.committed:
                return
            await state.consumer.commit({state.tp: OffsetAndMetadata(point, str(acked_through))})
            state.committed = point

    async def release(self, topic: str, group: str) -> None:
        """Stop serving the group from here (another node reads it now): its
        consumer is closed and what it held is forgotten; records handed out
        and not acked come again from the committed offset to whoever reads
        the group next. Idempotent."""
        state = self._groups.pop((topic, group), None)
        if state is not None:
            await self._stop_quietly(state.consumer.stop())

    async def nack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        """Hand the records out again on the next fetch (``redelivered``)."""
        state = self._groups.get((topic, group))
        if state is None:
            return
        for delivery_id in delivery_ids:
            found = state.pending.pop(delivery_id, None)
            if found is not None:
                state.returned.append(found[0])

    async def lag(self, topic: str, group: str) -> int:
        """Published minus acked-through topic offsets of the group; every
        published message when the group does not exist, 0 when the topic is
        not bound."""
        name, group_id = self._topic(topic), self._group_id(topic, group)
        admin, reader = self._started()
        tp = TopicPartition(name, 0)
        async with self._guard(f"lag of {group!r} on {topic!r}"):
            try:
                _, top = await self._committed(admin, reader, f"{name}/{PUBLISHER_GROUP}", tp)
            except Unavailable:
                return 0
            # Kafka shows a transaction's offset commit a moment after the commit returned
            # (its markers are written after): what this transport published itself counts at once.
            top = max(top, self._last.get(name, 0))
            state = self._groups.get((topic, group))
            if state is not None:  # read but not acked, plus not read yet
                return len(state.held) + max(0, top - state.read_offset)
            _, acked_through = await self._committed(admin, reader, group_id, tp)
            return max(0, top - acked_through)


_DIRECT_HEAD = f'{{"v":{RECORD_VERSION},"key":'
_DIRECT_MESSAGE = ',"message":'
_scan = json.JSONDecoder().raw_decode


def _read_direct(value: bytes | None) -> tuple[str, dict[str, Any], bytes] | None:
    """A direct record as ``_direct_value`` writes it, read in one pass: its
    key, its message and the message's JSON text exactly as the record holds
    it (a fetch's response copies it instead of encoding the message again).
    None for anything else (a log-mode record, another layout): the caller
    reads it the general way."""
    try:
        text = value.decode() if value else ""
        if not text.startswith(_DIRECT_HEAD):
            return None
        key, at = _scan(text, len(_DIRECT_HEAD))
        if not isinstance(key, str) or not text.startswith(_DIRECT_MESSAGE, at):
            return None
        start = at + len(_DIRECT_MESSAGE)
        message, end = _scan(text, start)
    except ValueError:  # UnicodeDecodeError too
        return None
    if not isinstance(message, dict) or text[end:] != "}":
        return None
    return key, message, text[start:end].encode()
