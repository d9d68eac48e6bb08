"""An asyncio driver for one PBFT ``Replica`` over loopback TCP.

Contract
--------
``PbftNode`` owns one ``Replica`` and runs it on the event loop it was
started on; every method must be called from that loop (the replica is not
thread-safe and is only ever touched from it). ``start()`` listens on the
node's own address, opens one outbound link to every peer and starts the
tick timer; ``stop()`` closes all of it and fails pending ``submit`` calls
with ``NodeStopped``. Only 127.0.0.1 is accepted.

Links: each node *sends* only on the connections it opened (one per peer,
reconnected with exponential backoff) and *receives* only on the ones it
accepted. No handshake is needed because every replica message is signed
and the replica authenticates it; a peer connection carries no trust.

Framing: a frame is a 4-byte big-endian length and a payload of at most
``max_frame_bytes`` (4 MiB by default: larger states cannot be transferred,
see design.md). A payload is a ``coordinator.codec`` record of one of:

- ``encode_envelope(env)`` (``[1, "env", sender, body, signature]``): the
  replica's own wire format, unchanged, fed to the behaviour's
  ``on_message`` (with ``src`` the envelope's claimed sender);
- ``[1, "creply", sender, body, signature]``: a signed ``Reply`` envelope
  for a client this node hosts (the replica's ``ClientReply`` effect, routed
  to the client's home node);
- ``[1, "creq", client, timestamp, operation, signature]``: a client's
  signed request relayed on retry (a PBFT client multicasts its request when
  the first attempt times out, OSDI 4.1), fed to the behaviour's
  ``on_request``.

A frame whose length is over the bound, or whose payload is none of these,
makes the receiver drop the connection and count it in ``counters``.

Send queues: one per peer, bounded (``send_queue_max``); when full the
*oldest* frame is dropped (``counters["send_dropped"]``): PBFT recovers lost
messages by its status retransmission, and newer messages (status, the
latest view) are the more useful ones. A queue outlives its connection:
what piled up while a peer was away is sent when it is back (harmless, the
replica drops what is stale; bounded by the queue).

Behaviour: every message, request and tick reaches the replica through a
``cluster.pbft.faults.Node`` (default ``CorrectNode``, which passes them
through unchanged); a Byzantine behaviour (``make_behaviour``) makes this
node a silent, equivocating or forging replica for chaos tests. The node
sends whatever effects the behaviour returns, including ``RawSend``: an
``Envelope`` payload as an ``env`` frame, a ``bytes`` payload as a frame of
exactly those bytes (receivers drop the connection if it is none of the
frames above), anything else is dropped (``counters["raw_unsendable"]``).
The client side (``submit``, checking replies) stays honest whatever the
behaviour: a forger's lies to its own clients are outvoted there too.

Storage (optional, ``cluster.pbft.storage.PbftStorage``): ``start()``
loads what an earlier run persisted and recovers the replica from it
(``Replica.recover``: muted in the view it crashed in). From then on a
step that changed the replica's durable facts holds its effects until a
flush persisted them in a worker thread; later steps queue behind it, so
nothing leaves the node that reflects a fact not yet on disk. Without
storage the replica lives in memory: a restart is a new replica.

Clients: ``client_keys`` holds the signing keys of the clients this node
submits for; ``client_homes`` maps every client id to the node that hosts it,
which is where every replica sends that client's replies. ``submit`` waits
for f+1 matching, validly signed replies from distinct replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.pbft.errors import MalformedMessage, PbftError
from cluster.pbft.faults import CorrectNode, Node, NodeEffect, RawSend
from cluster.pbft.messages import (
    MAX_CLIENT_ID_LEN,
    MAX_OPERATION_BYTES,
    MAX_SIGNATURE_LEN,
    PROTOCOL_VERSION,
    Envelope,
    Reply,
    Request,
    decode_message,
    encode_envelope,
    sign_request,
    verify_envelope,
)
from cluster.pbft.replica import (
    Broadcast,
    ClientReply,
    Execute,
    FetchingState,
    Replica,
    Send,
    StateTransferred,
    ViewChanged,
)
from cluster.pbft.storage import PbftStorage
from coordinator.codec import decode_record, encode_record
from coordinator.crypto import AgentKeys
from coordinator.errors import InvalidInput

LOOPBACK = "127.0.0.1"
HEADER_BYTES = 4
DEFAULT_MAX_FRAME_BYTES = 4 << 20


class NodeError(PbftError):
    code = "pbft_node"


class NodeStopped(NodeError):
    """The node was stopped (or never started) while a call needed it."""

    code = "pbft_node_stopped"


class SubmitTimeout(NodeError):
    """f+1 matching replies did not arrive within the request timeout. The
    request may still be executed later (the outcome is unknown)."""

    code = "pbft_submit_timeout"


class FrameError(NodeError):
    """A payload that is none of the frames this driver speaks."""

    code = "pbft_frame"


# -- frames (pure) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplyFrame:
    """A reply envelope for a client hosted by the receiving node."""

    envelope: Envelope


Frame = Envelope | ReplyFrame | Request


def encode_frame(item: Frame) -> bytes:
    """Length header + payload for ``item``."""
    if isinstance(item, Envelope):
        payload = encode_envelope(item)
    elif isinstance(item, ReplyFrame):
        e = item.envelope
        payload = encode_record([PROTOCOL_VERSION, "creply", e.sender, e.body, e.signature])
    else:
        payload = encode_record([PROTOCOL_VERSION, "creq", item.client, item.timestamp, item.operation,
                                 item.signature])
    return len(payload).to_bytes(HEADER_BYTES, "big") + payload


def _envelope_fields(sender: Any, body: Any, signature: Any) -> Envelope:
    if type(sender) is not int or not isinstance(body, bytes) or not isinstance(signature, str):
        raise FrameError("malformed envelope frame")
    if len(signature) > MAX_SIGNATURE_LEN:
        raise FrameError("signature too long")
    return Envelope(sender, body, signature)


def decode_frame(payload: bytes) -> Frame:
    """Parse one frame's payload (without the header). Raises ``FrameError``."""
    try:
        row = decode_record(payload)
    except (InvalidInput, ValueError, TypeError):
        raise FrameError("undecodable frame") from None
    if not isinstance(row, list) or len(row) < 2 or type(row[0]) is not int or row[0] != PROTOCOL_VERSION:
        raise FrameError("not a frame of this protocol version")
    tag, fields = row[1], row[2:]
    if tag == "env" and len(fields) == 3:
        return _envelope_fields(*fields)
    if tag == "creply" and len(fields) == 3:
        return ReplyFrame(_envelope_fields(*fields))
    if tag == "creq" and len(fields) == 4:
        client, timestamp, operation, signature = fields
        if (not isinstance(client, str) or not 0 < len(client) <= MAX_CLIENT_ID_LEN
                or type(timestamp) is not int or not 0 <= timestamp < 2**64
                or not isinstance(operation, bytes) or len(operation) > MAX_OPERATION_BYTES
                or not isinstance(signature, str) or len(signature) > MAX_SIGNATURE_LEN):
            raise FrameError("malformed request frame")
        return Request(client, timestamp, operation, signature)
    raise FrameError(f"unknown frame {tag!r}")


# -- the node -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[bytes]
    replies: dict[int, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class _Link:
    peer: int
    queue: asyncio.Queue[bytes]
    task: asyncio.Task[None] | None = None
    connected: bool = False


class PbftNode:
    """One replica on TCP. See the module docstring for the contract."""

    def __init__(
        self,
        replica: Replica,
        addresses: Sequence[tuple[str, int]],
        public_keys: Sequence[str],
        *,
        client_keys: Mapping[str, AgentKeys],
        client_homes: Mapping[str, int],
        clock: Callable[[], float] | None = None,
        tick_interval_ms: int = 10,
        send_queue_max: int = 1024,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        connect_timeout_ms: int = 1000,
        write_timeout_ms: int = 2000,
        idle_timeout_ms: int = 30_000,
        reconnect_min_ms: int = 20,
        reconnect_max_ms: int = 1000,
        request_timeout_ms: int = 10_000,
        retry_ms: int = 500,
        stop_timeout_ms: int = 2000,
        inbound_max: int | None = None,
        storage: PbftStorage | None = None,
        behaviour: Node | None = None,
    ) -> None:
        """``addresses[i]`` is replica i's (host, port), ``public_keys[i]`` its
        key (to check replies). ``clock`` returns monotonic seconds (default
        ``loop.time``). ``behaviour`` drives ``replica`` (default
        ``CorrectNode(replica)``; it must be built around this replica, e.g.
        by ``cluster.pbft.faults.make_behaviour``). Raises ``NodeError`` for a
        non-loopback address, sizes that do not match the replica, or a
        behaviour for another replica."""
        if len(addresses) != replica.n or len(public_keys) != replica.n:
            raise NodeError("addresses and public_keys must have one entry per replica")
        if behaviour is not None and (behaviour.id != replica.id
                                      or getattr(behaviour, "replica", replica) is not replica):
            raise NodeError("the behaviour must drive this node's replica")
        if any(host != LOOPBACK for host, _ in addresses):
            raise NodeError("only 127.0.0.1 is supported")
        if min(tick_interval_ms, send_queue_max, max_frame_bytes, connect_timeout_ms, write_timeout_ms,
               idle_timeout_ms, reconnect_min_ms, request_timeout_ms, retry_ms, stop_timeout_ms) < 1:
            raise NodeError("timeouts and limits must be positive")
        self.replica = replica  # always the real replica, whatever the behaviour does with it
        self.behaviour: Node = CorrectNode(replica) if behaviour is None else behaviour
        self.id = replica.id
        self.n = replica.n
        self.f = replica.f
        self.addresses = [(h, int(p)) for h, p in addresses]
        self.public_keys = tuple(public_keys)
        self.client_keys = dict(client_keys)
        self.client_homes = dict(client_homes)
        self._clock = clock
        self.tick_interval_ms = tick_interval_ms
        self.send_queue_max = send_queue_max
        self.max_frame_bytes = max_frame_bytes
        self.connect_timeout_s = connect_timeout_ms / 1000
        self.write_timeout_s = write_timeout_ms / 1000
        self.idle_timeout_s = idle_timeout_ms / 1000
        self.reconnect_min_s = reconnect_min_ms / 1000
        self.reconnect_max_s = max(reconnect_max_ms, reconnect_min_ms) / 1000
        self.request_timeout_s = request_timeout_ms / 1000
        self.retry_s = retry_ms / 1000
        self.stop_timeout_s = stop_timeout_ms / 1000
        # Each peer needs one inbound connection; a few spare for reconnects racing the old one's close.
        self.inbound_max = 4 * self.n if inbound_max is None else inbound_max
        self.failure: BaseException | None = None  # the first error that killed a background task
        self.counters: Counter[str] = Counter()
        self.last_executed_seq = 0
        # when a frame from each peer last arrived (now_ms); the sender id is the
        # envelope's, checked by the replica afterwards: liveness only, not proof
        self.last_heard_ms: dict[int, int] = {}
        self.view_changes: list[ViewChanged] = []
        self._links: dict[int, _Link] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inbound: set[asyncio.StreamWriter] = set()
        self._waiters: dict[tuple[str, int], _Waiter] = {}
        self._client_locks: dict[str, asyncio.Lock] = {}
        self._last_timestamp: dict[str, int] = {}
        self._running = False
        self._started = False  # start() ran once: the replica was recovered (or is new)
        self.storage = storage
        self._persisted_version = 0
        self._flushing = False
        self._held: list[NodeEffect] = []

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def connected_peers(self) -> tuple[int, ...]:
        """Ids of the peers whose outbound link is connected now, ascending
        (this node sends only on the links it opened)."""
        return tuple(peer for peer, link in sorted(self._links.items()) if link.connected)

    def now_ms(self) -> int:
        seconds = self._clock() if self._clock is not None else asyncio.get_running_loop().time()
        return int(seconds * 1000)

    async def start(self) -> None:
        """Listen, connect to the peers, start ticking. Raises ``OSError`` if
        the port cannot be bound (within ``connect_timeout_ms``)."""
        if self._running:
            return
        if self.storage is not None:
            recovered = await asyncio.to_thread(self.storage.load)
            if recovered is not None and not self._started:
                self.replica.recover(recovered.view, recovered.active, recovered.checkpoint,
                                     recovered.certificates)
                self.counters["recovered"] += 1
            self._persisted_version = self.replica.durable_version
        self._started = True
        host, port = self.addresses[self.id]
        async with asyncio.timeout(self.connect_timeout_s):
            self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self._running = True
        for peer in range(self.n):
            if peer != self.id:
                link = _Link(peer, asyncio.Queue(maxsize=self.send_queue_max))
                link.task = self._spawn(self._run_link(link))
                self._links[peer] = link
        self._spawn(self._run_ticks())

    async def stop(self) -> None:
        """Close the server, every connection and task; fail pending submits. Idempotent."""
        if not self._running:
            return
        self._running = False
        if self._server is not None:
            self._server.close()
        for writer in list(self._inbound):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.stop_timeout_s)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.stop_timeout_s):
                    await self._server.wait_closed()
            self._server = None
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(NodeStopped(f"node {self.id} stopped"))
        self._waiters.clear()
        self._links.clear()
        self._held.clear()
        if self.storage is not None:
            self.storage.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            # A bug (the replica or app raised): keep it for the owner instead of losing it.
            self.failure = task.exception()
            self.counters["task_failed"] += 1

    # -- client side ----------------------------------------------------------------------------

    async def submit(self, operation: bytes, client_id: str) -> bytes:
        """Sign ``operation`` as ``client_id`` (hosted here), order it, and
        return the result once f+1 replicas sent matching signed replies.
        One request per client at a time (later calls wait their turn, as a
        PBFT client has one outstanding request). Raises ``NodeStopped``,
        ``SubmitTimeout`` (outcome unknown) or ``NodeError`` for a client
        not hosted here."""
        keys = self.client_keys.get(client_id)
        if keys is None or self.client_homes.get(client_id) != self.id:
            raise NodeError(f"client {client_id!r} is not hosted by node {self.id}")
        if not self._running:
            raise NodeStopped(f"node {self.id} is not running")
        lock = self._client_locks.setdefault(client_id, asyncio.Lock())
        try:
            async with asyncio.timeout(self.request_timeout_s):
                async with lock:
                    return await self._submit_locked(operation, client_id, keys)
        except TimeoutError:
            raise SubmitTimeout(f"{client_id}: no f+1 matching replies in {self.request_timeout_s} s") from None

    async def _submit_locked(self, operation: bytes, client_id: str, keys: AgentKeys) -> bytes:
        if not self._running:  # stopped while this call waited for the client's lock
            raise NodeStopped(f"node {self.id} stopped")
        # Timestamps must grow per client, across restarts of this node too: use
        # the clock in microseconds, bumped past the last one used.
        timestamp = max(self._last_timestamp.get(client_id, 0) + 1, self.now_ms() * 1000)
        self._last_timestamp[client_id] = timestamp
        request = sign_request(keys, client_id, timestamp, operation)
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        key = (client_id, timestamp)
        self._waiters[key] = waiter
        try:
            self._apply(self.behaviour.on_request(request, self.now_ms()))
            while True:
                done, _ = await asyncio.wait([waiter.future], timeout=self.retry_s)
                if done:
                    return waiter.future.result()
                if not self._running:
                    raise NodeStopped(f"node {self.id} stopped")
                # Retry as a PBFT client does: to every replica, so that each
                # starts its timer and a faulty primary is replaced.
                self.counters["request_retry"] += 1
                self._broadcast_frame(encode_frame(request))
                self._apply(self.behaviour.on_request(request, self.now_ms()))
        finally:
            self._waiters.pop(key, None)

    def _on_reply(self, envelope: Envelope) -> None:
        sender = envelope.sender
        if type(sender) is not int or not 0 <= sender < self.n:
            self.counters["reply_malformed"] += 1
            return
        try:
            reply = decode_message(envelope.body)
        except MalformedMessage:
            self.counters["reply_malformed"] += 1
            return
        if not isinstance(reply, Reply) or reply.replica != sender:
            self.counters["reply_malformed"] += 1
            return
        waiter = self._waiters.get((reply.client, reply.timestamp))
        if waiter is None or waiter.future.done():
            # Most replies arrive after f+1 matching ones settled the request:
            # checking their signatures (the costly part) would change nothing.
            self.counters["reply_late"] += 1
            return
        if not verify_envelope(envelope, self.public_keys[sender]):
            self.counters["reply_bad_signature"] += 1
            return
        waiter.replies[sender] = reply.result
        votes = Counter(waiter.replies.values())
        result, count = max(votes.items(), key=lambda item: (item[1], item[0]))
        if count >= self.f + 1:
            waiter.future.set_result(result)

    # -- effects --------------------------------------------------------------------------------

    def _apply(self, effects: list[NodeEffect]) -> None:
        """Carry out what the behaviour produced, after what it must not
        forget is on disk: with storage, a step that changed the replica's
        durable facts (a view, a prepared certificate, a stable checkpoint)
        holds its effects, and every later one behind them, until a flush
        has persisted them (group commit: one write and fsync for all the
        steps that piled up meanwhile)."""
        if self.storage is not None and (self._flushing or self.replica.durable_version != self._persisted_version):
            self._held.extend(effects)
            if not self._flushing:
                self._flushing = True
                self._spawn(self._flush())
            return
        self._carry_out(effects)

    async def _flush(self) -> None:
        storage = self.storage
        try:
            while self._running and storage is not None:
                held, self._held = self._held, []
                version = self.replica.durable_version
                if version != self._persisted_version:
                    await asyncio.to_thread(storage.save, self.replica.durable())
                    self._persisted_version = version
                    self.counters["persisted"] += 1
                self._carry_out(held)
                if not self._held and self.replica.durable_version == self._persisted_version:
                    return
        finally:
            self._flushing = False

    def _carry_out(self, effects: list[NodeEffect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self._enqueue(effect.to, encode_frame(effect.envelope))
            elif isinstance(effect, Broadcast):
                self._broadcast_frame(encode_frame(effect.envelope))
            elif isinstance(effect, ClientReply):
                home = self.client_homes.get(effect.client)
                if home == self.id:
                    self._on_reply(effect.envelope)
                elif home is None:
                    self.counters["reply_unknown_client"] += 1
                else:
                    self._enqueue(home, encode_frame(ReplyFrame(effect.envelope)))
            elif isinstance(effect, Execute):
                # The replica already called the app; this only reports it.
                self.last_executed_seq = effect.seq
            elif isinstance(effect, StateTransferred):
                self.last_executed_seq = effect.seq
                self.counters["state_transferred"] += 1
            elif isinstance(effect, ViewChanged):
                self.view_changes.append(effect)
                del self.view_changes[:-64]
            elif isinstance(effect, FetchingState):
                self.counters["fetching_state"] += 1
            elif isinstance(effect, RawSend):
                self._send_raw(effect)

    def _send_raw(self, effect: RawSend) -> None:
        payload = effect.payload
        if isinstance(payload, Envelope):
            frame = encode_frame(payload)
        elif isinstance(payload, bytes):
            frame = len(payload).to_bytes(HEADER_BYTES, "big") + payload
        else:
            self.counters["raw_unsendable"] += 1
            return
        self.counters["raw_sent"] += 1
        self._enqueue(effect.to, frame)

    def _broadcast_frame(self, frame: bytes) -> None:
        for peer in self._links:
            self._enqueue(peer, frame)

    def _enqueue(self, peer: int, frame: bytes) -> None:
        link = self._links.get(peer)
        if link is None:
            self.counters["send_no_link"] += 1
            return
        if link.queue.full():
            link.queue.get_nowait()  # drop the oldest
            self.counters["send_dropped"] += 1
        link.queue.put_nowait(frame)

    # -- timers ---------------------------------------------------------------------------------

    async def _run_ticks(self) -> None:
        interval = self.tick_interval_ms / 1000
        while self._running:
            self._apply(self.behaviour.on_tick(self.now_ms()))
            await asyncio.sleep(interval)

    # -- outbound links -------------------------------------------------------------------------

    async def _run_link(self, link: _Link) -> None:
        host, port = self.addresses[link.peer]
        backoff = self.reconnect_min_s
        while self._running:
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    reader, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError):
                self.counters["connect_failed"] += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.reconnect_max_s)
                continue
            backoff = self.reconnect_min_s
            self.counters["connected"] += 1
            link.connected = True
            try:
                await self._session(link, reader, writer)
            finally:
                link.connected = False
                writer.close()
                with contextlib.suppress(OSError, TimeoutError):
                    async with asyncio.timeout(self.write_timeout_s):
                        await writer.wait_closed()
            self.counters["disconnected"] += 1

    async def _session(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Pump the queue into the connection until it fails or the peer closes it."""
        pump = asyncio.ensure_future(self._pump(link, writer))
        # The peer never sends on this connection: a read returns only at EOF (or on misbehaviour).
        watch = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait([pump, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            await asyncio.wait([pump, watch])
            for task in (pump, watch):
                if not task.cancelled() and task.exception() is not None:
                    self.counters["send_failed"] += 1

    async def _pump(self, link: _Link, writer: asyncio.StreamWriter) -> None:
        while True:
            frame = await link.queue.get()
            writer.write(frame)
            async with asyncio.timeout(self.write_timeout_s):
                await writer.drain()

    # -- inbound connections --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._running or len(self._inbound) >= self.inbound_max:
            self.counters["inbound_refused"] += 1
            writer.close()
            return
        self._inbound.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._read_frames(reader)
        except (asyncio.IncompleteReadError, OSError, TimeoutError):
            self.counters["inbound_closed"] += 1
        except asyncio.CancelledError:
            # stop() cancels this connection's task. asyncio's stream protocol calls
            # exception() on a finished handler task and logs an error for a
            # cancelled one, so end normally: stop() only waits for it to finish.
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            self._inbound.discard(writer)
            writer.close()

    async def _read_frames(self, reader: asyncio.StreamReader) -> None:
        while self._running:
            async with asyncio.timeout(self.idle_timeout_s):
                header = await reader.readexactly(HEADER_BYTES)
            length = int.from_bytes(header, "big")
            if length > self.max_frame_bytes:
                self.counters["frame_oversized"] += 1
                return
            async with asyncio.timeout(self.idle_timeout_s):
                payload = await reader.readexactly(length)
            try:
                item = decode_frame(payload)
            except FrameError:
                self.counters["frame_malformed"] += 1
                return
            self.counters["frames_received"] += 1
            self._handle(item)

    def _handle(self, item: Frame) -> None:
        now = self.now_ms()
        if isinstance(item, Envelope):
            if item.sender != self.id:
                self.last_heard_ms[item.sender] = now
            self._apply(self.behaviour.on_message(item.sender, item, now))
        elif isinstance(item, ReplyFrame):
            self._on_reply(item.envelope)
        else:
            self._apply(self.behaviour.on_request(item, now))


__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "FrameError",
    "NodeError",
    "NodeStopped",
    "PbftNode",
    "ReplyFrame",
    "SubmitTimeout",
    "decode_frame",
    "encode_frame",
]
