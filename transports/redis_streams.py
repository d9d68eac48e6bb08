"""``RedisStreamsTransport``: the message bus's topics carried by Redis Streams
(redis-py's asyncio client). The only module that imports ``redis``.

Layout at the broker, one stream per bound topic, everything under the
transport's namespace::

    {namespace}:topic:{topic}        a stream; entry ID "<offset>-1"
        fields  v=1  index=<log index>  message=<the message as JSON>
        groups  one Redis consumer group per subscribed group (they live
                inside the stream key, so the namespaced key scopes them)
        consumer "_returned"  owns the entries given back by ``nack``

Nothing else is created: deleting the stream (``unbind``) deletes its
entries, its groups and their pending lists in one command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from coordinator.errors import InvariantError, Unavailable
from coordinator.redact import redact_url, scrub
from coordinator.types import TransportDelivery, TransportEntry, TransportHealth

log = logging.getLogger(__name__)

T = TypeVar("T")

RECORD_VERSION = "1"  # the ``v`` field of every entry we write
RETURNED_CONSUMER = "_returned"  # owner of nacked entries until a fetch claims them
POLL_SLICE_S = 0.25  # a waiting fetch re-checks timed-out and nacked entries this often
MAX_CONNECTIONS = 32  # pool bound: each waiting fetch holds one connection while it blocks
PUBLISH_CHUNK = 500  # XADDs per pipeline round trip
DIRECT_WAITING_MAX = 1000  # direct publishes waiting for a shared pipeline; past that, Unavailable
IDS_CHUNK = 1000  # ids per XACK / XCLAIM
CLAIM_SCANS = 4  # XAUTOCLAIM calls per fetch (each looks at up to 10 * count pending entries)
_ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _offset_of(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def block_milliseconds(block_s: float) -> int | None:
    """XREADGROUP's BLOCK for a wait of ``block_s``: None (do not block) for no
    wait, else at least 1 ms. ``BLOCK 0`` means forever, so a wait under a
    millisecond must round up, never down to 0."""
    return math.ceil(block_s * 1000) if block_s > 0 else None


class RedisStreamsTransport:
    """A bound topic is a Redis stream; a consumer group is a Redis consumer group.

    **Guarantee: exactly-once at the broker, at-least-once to a consumer.**
    ``guarantee = "exactly-once"``: a re-published entry never becomes a
    second stream entry, so no consumer sees a key twice *because of a
    re-publish*. Why: an entry's stream ID is its topic offset
    (``"<offset>-1"``, given explicitly to XADD), and Redis refuses an ID
    that is not greater than the stream's top, so a re-sent offset is
    refused instead of appended (and not counted as new). That the refusal
    means "already there" rests on the publisher's contract: a topic's
    entries are published in offset order from the committed cursor, which
    only moves past offsets Redis confirmed, so no offset below the top can
    be missing. Old and new leader publishing the same range at once cannot
    open a gap either: the first XADD of an ID at or above an offset ``o``
    comes from a publisher whose own XADD of ``o`` came first. Deliveries
    themselves are at-least-once, as with any broker: an entry a consumer
    does not ack in time is delivered again (``redelivered=True``), and the
    service deduplicates those by ``key``.

    **Durability: only as far as the Redis server's own persistence.**
    ``publish`` returns once Redis has executed the XADDs. That survives a
    Redis restart only with AOF (``appendonly yes``; ``appendfsync always``
    to lose nothing, ``everysec`` loses up to a second) and a failover only
    with replicas that got the writes; a Redis without persistence (as on
    this development machine: ``--save '' --appendonly no``) loses every
    stream on restart, and with it the messages the cursor counts as
    delivered. ``health().detail`` says whether AOF is on.

    **Competing consumers**: XREADGROUP ``>`` hands each new entry to one
    consumer of the group, and XAUTOCLAIM moves a timed-out entry to one
    claimer atomically, so one entry is never out with two consumers of a
    group at once (except after its ack timeout: that is redelivery).
    Different groups each have their own cursor and get every entry.

    **Redelivery**: a fetch first claims (XAUTOCLAIM) entries of the group
    pending longer than ``ack_timeout_s``, then reads new ones. ``nack``
    moves entries to the reserved consumer ``_returned`` with their idle
    time set to ``ack_timeout_s`` (XCLAIM ... IDLE), so the next fetch of
    any consumer claims them at once. A waiting fetch re-checks every
    ``POLL_SLICE_S`` seconds, so redelivery is late by at most that much.

    **Lag**: the group's pending entries (delivered, not acked) plus the
    entries after its last-delivered ID (Redis 7's ``lag`` of XINFO GROUPS;
    on older servers, or when Redis cannot tell, the offset distance to the
    stream's top, exact because offsets are dense).

    **Weak points**: ``delivery_id`` is the entry ID, so a late ack or nack
    from a consumer whose delivery already timed out acts on the entry's
    current delivery (an ack is still right: the message was handled; a
    nack makes it claimable while its new holder works on it). Streams keep
    every entry until ``unbind`` (nothing trims acked entries, because a
    group subscribed later must read from the first message). Consumer
    names accumulate in a group until ``unbind``.

    Used from one event loop. Every call is bounded by ``timeout_s`` (a
    waiting fetch by its wait plus ``timeout_s``) and raises ``Unavailable``
    when Redis cannot be reached or refuses; the URL's password never
    appears in messages, logs, ``health()`` or ``repr()``.
    """

    name = "redis"
    guarantee = "exactly-once"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, namespace: str = "coord", timeout_s: float = 5.0,
                 ack_timeout_s: float = 30.0) -> None:
        if not namespace:
            raise InvariantError("a transport namespace must not be empty")
        if timeout_s <= 0 or ack_timeout_s <= 0:
            raise InvariantError("timeout_s and ack_timeout_s must be positive")
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.ack_timeout_s = ack_timeout_s
        self._url = url
        self._where = redact_url(url)
        self._client: aioredis.Redis | None = None
        self._server = ""  # "redis 7.0.15, AOF off", learnt at start
        self._problem = f"redis at {self._where}: not started"  # health detail while not connected
        # direct publishes waiting for the next shared pipeline, and the task sending them
        self._direct_waiting: list[tuple[list[TransportEntry], asyncio.Future[int]]] = []
        self._direct_sender: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"RedisStreamsTransport({self._where!r}, namespace={self.namespace!r})"

    # -- plumbing -----------------------------------------------------------

    def _key(self, topic: str) -> str:
        return f"{self.namespace}:topic:{topic}"

    @property
    def _ack_timeout_ms(self) -> int:
        return max(1, int(self.ack_timeout_s * 1000))

    def _scrub(self, text: str) -> str:
        return scrub(text, self._url)

    def _unavailable(self, what: str, exc: BaseException | None = None) -> Unavailable:
        reason = "timed out" if exc is None else self._scrub(str(exc) or type(exc).__name__)
        return Unavailable(f"redis at {self._where}: {what}: {reason}", retry_after_s=1.0)

    async def _call(self, what: str, op: Callable[[aioredis.Redis], Awaitable[T]], extra_s: float = 0.0) -> T:
        """Run ``op`` on the client within ``timeout_s`` (+ ``extra_s`` for a
        blocking read); every broker failure becomes ``Unavailable``."""
        client = self._client
        if client is None:
            raise Unavailable(f"redis at {self._where}: {what}: not connected", retry_after_s=1.0)
        try:
            async with asyncio.timeout(self.timeout_s + extra_s):
                return await op(client)
        except TimeoutError as exc:
            raise self._unavailable(what) from exc
        except (RedisError, OSError) as exc:
            raise self._unavailable(what, exc) from exc

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Connect and check the server answers (idempotent). ``Unavailable``
        when it cannot be reached, refuses the credentials or times out."""
        if self._client is not None:
            return
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url, max_connections=MAX_CONNECTIONS, timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s, socket_timeout=self.timeout_s + POLL_SLICE_S,
                decode_responses=True, retry=Retry(NoBackoff(), 1))  # one retry: a stale pooled connection
        except (ValueError, RedisError) as exc:
            self._problem = f"redis at {self._where}: bad url: {self._scrub(str(exc))}"
            raise Unavailable(self._problem, retry_after_s=30.0) from exc
        self._client = aioredis.Redis.from_pool(pool)
        try:
            info = await self._call("connect", self._describe_server)
        except Unavailable as exc:
            await self.close()
            self._problem = exc.message
            raise
        self._server = info
        if "AOF off" in info:
            log.warning("redis at %s keeps streams in memory only (AOF off): a restart loses them", self._where)

    async def _describe_server(self, client: aioredis.Redis) -> str:
        await client.ping()
        info = await client.info("server")
        persistence = await client.info("persistence")
        aof = "AOF on" if int(persistence.get("aof_enabled", 0)) else "AOF off"
        if aof == "AOF on":
            try:  # CONFIG is often disabled on managed servers: the fsync policy is a nicety
                policy = (await client.config_get("appendfsync")).get("appendfsync")
                aof += f" (appendfsync {policy})" if policy else ""
            except ResponseError:
                pass
        return f"redis {info.get('redis_version', '?')}, {aof}"

    async def close(self) -> None:
        waiting, self._direct_waiting = self._direct_waiting, []
        for _, done in waiting:
            if not done.done():
                done.set_exception(Unavailable(f"redis at {self._where}: closed", retry_after_s=1.0))
        client, self._client = self._client, None
        if client is None:
            return
        self._problem = f"redis at {self._where}: closed"
        try:
            async with asyncio.timeout(self.timeout_s):
                await client.aclose()
        except (TimeoutError, RedisError, OSError) as exc:
            log.debug("closing redis at %s: %s", self._where, self._scrub(str(exc)))

    async def health(self) -> TransportHealth:
        """Never raises: ok False with the reason when not connected."""
        if self._client is None:
            return TransportHealth(False, self._problem)
        try:
            await self._call("ping", lambda client: client.ping())
        except Unavailable as exc:
            return TransportHealth(False, exc.message)
        except Exception as exc:  # health must answer, whatever went wrong
            return TransportHealth(False, f"redis at {self._where}: {type(exc).__name__}")
        return TransportHealth(True, f"{self._server} at {self._where}")

    # -- topics -------------------------------------------------------------

    async def bind(self, topic: str) -> None:
        """Create the topic's (empty) stream; idempotent. A stream cannot be
        created empty directly: a throwaway group with a random name is
        created with MKSTREAM and destroyed in one MULTI."""
        key = self._key(topic)

        async def create(client: aioredis.Redis) -> None:
            kind = await client.type(key)
            if kind == "stream":
                return
            if kind != "none":
                raise ResponseError(f"key {key!r} holds a {kind}, not a stream")
            scratch = f"_bind-{secrets.token_hex(8)}"
            async with client.pipeline(transaction=True) as pipe:
                pipe.xgroup_create(key, scratch, id="$", mkstream=True)
                pipe.xgroup_destroy(key, scratch)
                await pipe.execute()

        await self._call(f"bind {topic!r}", create)

    async def unbind(self, topic: str) -> None:
        """Delete the stream: its entries, groups and pending lists (idempotent)."""
        key = self._key(topic)
        await self._call(f"unbind {topic!r}", lambda client: client.delete(key))

    async def publish(self, entries: list[TransportEntry]) -> int:
        """XADD each entry with ID ``"<offset>-1"``; returns how many Redis
        appended. One refused as not above the stream's top is a re-send,
        not counted. ``Unavailable`` when a topic is not bound (NOMKSTREAM:
        a late publish never resurrects an unbound topic) or Redis fails;
        entries appended before the failure dedupe on the retry."""
        for entry in entries:
            if entry.offset < 0:
                raise InvariantError(f"offset {entry.offset} of {entry.topic!r} is negative")
        new = 0
        for first in range(0, len(entries), PUBLISH_CHUNK):
            chunk = entries[first:first + PUBLISH_CHUNK]
            fields = [self._fields(entry) for entry in chunk]

            async def send(client: aioredis.Redis, chunk: list[TransportEntry] = chunk,
                           fields: list[dict[str, str]] = fields) -> list[Any]:
                async with client.pipeline(transaction=False) as pipe:
                    for entry, body in zip(chunk, fields, strict=True):
                        pipe.xadd(self._key(entry.topic), body, id=f"{entry.offset}-1", nomkstream=True)
                    return await pipe.execute(raise_on_error=False)

            results = await self._call(f"publish to {chunk[0].topic!r}", send)
            for entry, result in zip(chunk, results, strict=True):
                if isinstance(result, ResponseError):
                    if "equal or smaller" in str(result):
                        continue  # already there: a re-send
                    raise self._unavailable(f"publish to {entry.topic!r}", result)
                if isinstance(result, BaseException):
                    raise self._unavailable(f"publish to {entry.topic!r}", result)
                if result is None:
                    raise Unavailable(f"topic {entry.topic!r} has no stream at the broker (not bound, unbound, "
                                      "or lost by a Redis restart without persistence)", retry_after_s=1.0)
                new += 1
        return new

    async def publish_direct(self, entries: list[TransportEntry]) -> int:
        """XADD each entry with an ID Redis chooses (``*``) and the publisher's
        key as the ``key`` field. Concurrent calls share pipelines: a call
        that comes while one is in flight waits for it and goes out with the
        others that came meanwhile, up to ``PUBLISH_CHUNK`` entries per
        round trip. Redis cannot recognise a key it holds: every entry is
        new, and a client retry after a lost answer stores it again. A call
        fails (``Unavailable``) when any of its own entries failed."""
        if not entries:
            return 0
        if len(self._direct_waiting) >= DIRECT_WAITING_MAX:
            raise Unavailable(f"redis at {self._where}: {len(self._direct_waiting)} publishes wait for a pipeline",
                              retry_after_s=0.2)
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieved)  # its caller may be gone (cancelled) by the time it fails
        self._direct_waiting.append((entries, done))
        if self._direct_sender is None or self._direct_sender.done():
            self._direct_sender = asyncio.get_running_loop().create_task(self._send_direct())
        return await asyncio.shield(done)  # a cancelled caller leaves the batch it joined alone

    async def _send_direct(self) -> None:
        while self._direct_waiting:
            batch: list[tuple[list[TransportEntry], asyncio.Future[int]]] = []
            size = 0
            while self._direct_waiting and (not batch or size + len(self._direct_waiting[0][0]) <= PUBLISH_CHUNK):
                entries, done = self._direct_waiting.pop(0)
                batch.append((entries, done))
                size += len(entries)
            try:
                results = await self._xadd_direct([e for entries, _ in batch for e in entries])
            except Exception as exc:  # every caller of the batch gets it (Unavailable from _call)
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            first = 0
            for entries, done in batch:
                own = results[first:first + len(entries)]
                first += len(entries)
                failed = next((r for r in own if isinstance(r, BaseException) or r is None), False)
                if done.done():
                    continue
                if failed is None:
                    done.set_exception(Unavailable(
                        f"topic {entries[0].topic!r} has no stream at the broker (not bound, unbound, or lost "
                        "by a Redis restart without persistence)", retry_after_s=1.0))
                elif isinstance(failed, BaseException):
                    done.set_exception(self._unavailable(f"publish to {entries[0].topic!r}", failed))
                else:
                    done.set_result(len(entries))

    async def _xadd_direct(self, entries: list[TransportEntry]) -> list[Any]:
        fields = [{**self._fields(entry), "key": entry.key} for entry in entries]

        async def send(client: aioredis.Redis) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for entry, body in zip(entries, fields, strict=True):
                    pipe.xadd(self._key(entry.topic), body, nomkstream=True)
                return await pipe.execute(raise_on_error=False)

        return await self._call(f"publish to {entries[0].topic!r}", send)

    @staticmethod
    def _fields(entry: TransportEntry) -> dict[str, str]:
        try:
            message = json.dumps(entry.message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvariantError(f"message at {entry.key} is not JSON: {exc}") from exc
        return {"v": RECORD_VERSION, "index": str(entry.index), "message": message}

    # -- groups -------------------------------------------------------------

    async def subscribe(self, topic: str, group: str) -> None:
        """XGROUP CREATE at ID 0 (the first entry); BUSYGROUP means it exists."""
        key = self._key(topic)

        async def create(client: aioredis.Redis) -> None:
            try:
                await client.xgroup_create(key, group, id="0")
            except ResponseError as exc:
                if "BUSYGROUP" in str(exc):
                    return
                if "requires the key to exist" in str(exc):
                    raise Unavailable(f"topic {topic!r} is not bound", retry_after_s=1.0) from exc
                raise

        await self._call(f"subscribe {group!r} to {topic!r}", create)

    async def fetch(self, topic: str, group: str, consumer: str, max_n: int,
                    wait_s: float) -> list[TransportDelivery]:
        """Timed-out and nacked entries first (claimed, ``redelivered``),
        then new ones; blocks in slices of ``POLL_SLICE_S`` until something
        arrives or ``wait_s`` passed. ``Unavailable`` when the group does not
        exist. An entry handed out here stays pending until acked."""
        if max_n <= 0:
            return []
        key = self._key(topic)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        while True:
            out = await self._claim(topic, key, group, consumer, max_n)
            if len(out) < max_n:
                remaining = deadline - loop.time()
                block_s = 0.0 if out or remaining <= 0 else min(remaining, POLL_SLICE_S)
                out += await self._read_new(topic, key, group, consumer, max_n - len(out), block_s)
            if out or loop.time() >= deadline:
                return out

    @staticmethod
    def _check_group(topic: str, group: str, exc: ResponseError) -> None:
        """NOGROUP (no such stream or group) becomes ``Unavailable``, as in
        the reference transport; the caller re-raises any other refusal."""
        if str(exc).startswith("NOGROUP"):
            raise Unavailable(f"group {group!r} of {topic!r} does not exist", retry_after_s=1.0) from exc

    async def _claim(self, topic: str, key: str, group: str, consumer: str, max_n: int) -> list[TransportDelivery]:
        async def claim(client: aioredis.Redis) -> list[TransportDelivery]:
            out: list[TransportDelivery] = []
            start = "0-0"
            for _ in range(CLAIM_SCANS):
                try:
                    reply = await client.xautoclaim(key, group, consumer, self._ack_timeout_ms, start_id=start,
                                                    count=max_n - len(out))
                except ResponseError as exc:
                    self._check_group(topic, group, exc)
                    raise
                out += await self._decode(client, topic, key, group, reply[1], redelivered=True)
                start = reply[0]
                if start == "0-0" or len(out) >= max_n:
                    break
            return out

        return await self._call(f"fetch from {topic!r}", claim)

    async def _read_new(self, topic: str, key: str, group: str, consumer: str, count: int,
                        block_s: float) -> list[TransportDelivery]:
        block_ms = block_milliseconds(block_s)

        async def read(client: aioredis.Redis) -> list[TransportDelivery]:
            try:
                reply = await client.xreadgroup(group, consumer, {key: ">"}, count=count, block=block_ms)
            except ResponseError as exc:
                self._check_group(topic, group, exc)
                raise
            if not reply:
                return []
            return await self._decode(client, topic, key, group, reply[0][1], redelivered=False)

        return await self._call(f"fetch from {topic!r}", read, extra_s=block_s)

    async def _decode(self, client: aioredis.Redis, topic: str, key: str, group: str, items: list[Any],
                      redelivered: bool) -> list[TransportDelivery]:
        """Entries to deliveries. An entry we did not write (or deleted under
        us) cannot be delivered; it is acked so it does not come back forever."""
        out: list[TransportDelivery] = []
        foreign: list[str] = []
        for entry_id, fields in items:
            try:
                if not fields or fields.get("v") != RECORD_VERSION:
                    raise ValueError("not a record of this transport")
                message = json.loads(fields["message"])
                if not isinstance(message, dict):
                    raise ValueError("message is not an object")
            except (ValueError, KeyError) as exc:
                log.warning("redis stream of %r: skipping entry %s: %s", topic, entry_id, exc)
                foreign.append(entry_id)
                continue
            if "key" in fields:  # published directly: Redis chose the ID, the publisher the key
                out.append(TransportDelivery(entry_id, topic, 0, fields["key"], message, redelivered))
                continue
            offset = _offset_of(entry_id)
            out.append(TransportDelivery(entry_id, topic, offset, f"{topic}:{offset}", message, redelivered))
        if foreign:
            await client.xack(key, group, *foreign)
        return out

    async def ack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        """XACK (idempotent; ids that are not ours are ignored)."""
        key = self._key(topic)
        ids = [i for i in delivery_ids if _ENTRY_ID.fullmatch(i)]
        for first in range(0, len(ids), IDS_CHUNK):
            chunk = ids[first:first + IDS_CHUNK]
            await self._call(f"ack on {topic!r}", lambda client, chunk=chunk: client.xack(key, group, *chunk))

    async def nack(self, topic: str, group: str, delivery_ids: list[str]) -> None:
        """Hand pending entries to the reserved consumer with an idle time of
        ``ack_timeout_s``, so the next fetch claims them as timed out. Ids no
        longer pending (acked) are left alone by XCLAIM."""
        key = self._key(topic)
        ids = [i for i in delivery_ids if _ENTRY_ID.fullmatch(i)]

        async def give_back(client: aioredis.Redis, chunk: list[str]) -> None:
            try:
                await client.xclaim(key, group, RETURNED_CONSUMER, 0, chunk, idle=self._ack_timeout_ms, justid=True)
            except ResponseError as exc:
                self._check_group(topic, group, exc)
                raise

        for first in range(0, len(ids), IDS_CHUNK):
            chunk = ids[first:first + IDS_CHUNK]
            await self._call(f"nack on {topic!r}", lambda client, chunk=chunk: give_back(client, chunk))

    async def lag(self, topic: str, group: str) -> int:
        """Pending (delivered, unacked) plus not yet delivered entries of the
        group; every entry of the topic when the group does not exist, 0
        when the topic is not bound."""
        key = self._key(topic)

        async def count(client: aioredis.Redis) -> int:
            try:
                groups = await client.xinfo_groups(key)
            except ResponseError as exc:
                if "no such key" in str(exc):
                    return 0
                raise
            found = next((g for g in groups if g.get("name") == group), None)
            if found is None:
                return int(await client.xlen(key))
            undelivered = found.get("lag")
            if undelivered is None:  # Redis < 7, or it cannot tell: offsets are dense
                top = (await client.xinfo_stream(key)).get("last-generated-id", "0-0")
                undelivered = max(0, _offset_of(top) - _offset_of(found.get("last-delivered-id", "0-0")))
            return int(found.get("pending", 0)) + int(undelivered)

        return await self._call(f"lag of {group!r} on {topic!r}", count)
