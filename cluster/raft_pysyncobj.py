"""The ``raft`` ConsensusEngine, on pysyncobj. The only module importing it.

pysyncobj replicates opaque byte strings for us through one replicated
method, ``_ReplicatedLog._apply``; its log index is the entry's index. The
domain never reaches this module: the FSM (``coordinator.ports.ReplicatedFSM``)
is driven on the event loop, in log order, through ``_Bridge``.

Where pysyncobj 0.3.17 would lose data or answer slowly, this adapter changes it:

* Durability. pysyncobj's FileJournal keeps entries in an mmap it never
  syncs and its metadata in a pickle. We swap in ``cluster.journal.DurableJournal``
  (through pysyncobj's module-level ``createJournal`` factory) and a transport
  that syncs the journal before any message leaves the node. currentTerm and
  votedFor are fsynced before the vote is sent (``setCurrentTerm``).
* Snapshots (log compaction) go through our msgpack codec
  (``SyncObjConf.serializer``); the FSM state is taken on the loop at exactly
  the index pysyncobj is compacting to. When a node restarts between writing a
  snapshot and trimming its journal, pysyncobj would clear the whole journal
  and lose its tail; ``_deserialize`` trims the journal first so the tail stays.
* Latency. pysyncobj either batches (commands wait up to ``appendEntriesPeriod``,
  ~100 ms) or sends per command. We keep batching but wake the tick thread when
  a command is submitted and flush appends and commit-index changes at the end
  of every tick: a lone command goes out at once, a burst goes out as one batch.
* Liveness of the apply loop. If pysyncobj's applied index stops while its
  commit index moves (seen: IndexError inside pysyncobj under ~20k queued
  commands) or its tick thread dies, the node reports itself unhealthy and
  rebuilds the SyncObj from its journal and snapshot; a stall that comes
  back at the same index after ``rebuilds_max`` rebuilds is deterministic,
  and the engine halts instead of rebuilding forever.
* A replica that cannot apply. When the FSM raises from ``apply`` or
  ``restore`` (a bug: ``ReplicatedFSM`` never raises for bad input), the
  bridge applies nothing after it and the engine *halts*: it destroys the
  SyncObj and stays down (role ``stopped``, ``healthy`` false, ``problem``
  "apply failed at index N: <type>") while the HTTP node stays up to say so.
  Why leave consensus instead of staying a follower: pysyncobj cannot make a
  member stop voting or refuse to lead at run time, and a member with the
  longest log may win an election; a leader whose state machine is stopped
  cannot answer any write, and would run the leader's duties (lease expiry,
  sagas, deliveries) from a half-applied state; its log compaction would
  also snapshot that state. With the SyncObj gone, the others elect a
  leader among themselves (a 3-node cluster tolerates no further failure
  until the node is restarted, which replays from the journal and snapshot;
  the journal on disk is left untouched).
* Security. The port refuses to start without the cluster secret: pysyncobj
  unpickles what arrives on it, so only peers knowing the secret may talk.
  pysyncobj buffers a whole frame (up to 2 GiB, by quadratic concatenation)
  before its Fernet token can be checked; here every frame is capped (twice
  the append batch size; a connection's first frame, its key exchange, at
  ``HANDSHAKE_FRAME_MAX_BYTES``) and read into a growable buffer, at most
  ``READ_BUDGET_BYTES`` per readiness event, and at most
  ``UNAUTHENTICATED_MAX`` incoming connections may be waiting to prove the
  secret, each for ``connectionTimeout`` at most (``_BoundedConnection``,
  ``_BoundedServer``).

Threads: pysyncobj runs its own tick thread. Everything public here is called
on the event loop; everything the tick thread produces reaches the loop via
``loop.call_soon_threadsafe``. Nothing here calls pysyncobj with ``sync=True``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj import serializer as _pysyncobj_serializer
from pysyncobj import syncobj as _pysyncobj
from pysyncobj.node import TCPNode
from pysyncobj.pipe_notifier import PipeNotifier
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection
from pysyncobj.transport import TCPTransport
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

from cluster import files
from cluster.errors import EngineError, FrameRefused, MissingSecret
from cluster.journal import DurableJournal, read_entries, read_meta, replace_durably, write_file_durably
from cluster.power_loss import PowerLossRecorder
from cluster.read_index import REFUSED, UNAVAILABLE, LeaderView, ReadRounds, Waiter
from coordinator import crypto
from coordinator.codec import decode_record, encode_record, pack_wire, unpack_wire
from coordinator.crypto import FrameBox
from coordinator.errors import InvalidInput, ReadIndexRefused, ReplicaHalted, Unavailable
from coordinator.ports import Done, EngineStatus, Failure, ReplicatedFSM

PINNED_PYSYNCOBJ = "0.3.17"
if PYSYNCOBJ_VERSION != PINNED_PYSYNCOBJ:  # we reach into its internals below
    raise ImportError(f"cluster.raft_pysyncobj needs pysyncobj=={PINNED_PYSYNCOBJ}, found {PYSYNCOBJ_VERSION}")

log = logging.getLogger(__name__)

_ROLES = {0: "follower", 1: "candidate", 2: "leader"}
_FAILURES = {
    FAIL_REASON.QUEUE_FULL: Failure.QUEUE_FULL,
    FAIL_REASON.MISSING_LEADER: Failure.NO_LEADER,
    FAIL_REASON.DISCARDED: Failure.DISCARDED,
    FAIL_REASON.NOT_LEADER: Failure.NOT_LEADER,
    FAIL_REASON.LEADER_CHANGED: Failure.LEADER_CHANGED,
    FAIL_REASON.REQUEST_DENIED: Failure.DENIED,
    FAIL_REASON.UNKNOWN_OUTCOME: Failure.UNKNOWN,
}


# -- journal and transport injection ------------------------------------------------

class _JournalPath(str):
    """A journal path that asks ``_create_journal`` for our durable journal.
    The journal it creates is left on ``.journal`` for the engine to hold."""

    durability: str
    journal: DurableJournal | None


_pysyncobj_create_journal = _pysyncobj.createJournal


def _create_journal(path: Any) -> Any:
    if isinstance(path, _JournalPath):
        path.journal = DurableJournal(str(path), path.durability)
        return path.journal
    return _pysyncobj_create_journal(path)


_pysyncobj.createJournal = _create_journal


class _QuietDumpFailures(logging.Filter):
    """pysyncobj warns "Failed to store full dump" on every failed attempt;
    the engine logs the failure itself and refuses attempts during its
    backoff, which pysyncobj would otherwise report on every tick."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Failed to store full dump"


logging.getLogger(_pysyncobj.__name__).addFilter(_QuietDumpFailures())

# pysyncobj renames snapshot files itself (ours into place after ``_serialize``
# wrote it, and one received from the leader): through ``cluster.files``, like
# every rename of a durable file, so a power-loss run sees them.
_pysyncobj_serializer.atomicReplace = files.replace


# -- the Raft port: bounded frames, bounded strangers ------------------------------------

_ASKED_BY_MAX = 4096  # followers' read-index requests held for one tick (each answers a batch of reads)
_FRAME_LENGTH = struct.Struct("i")  # pysyncobj's frame prefix: a native signed 32-bit length
HANDSHAKE_FRAME_MAX_BYTES = 64 << 10  # a connection's first frame is a key exchange of ~200 bytes
READ_BUDGET_BYTES = 1 << 20  # read per readiness event and connection; the poller is level-triggered
UNAUTHENTICATED_MAX = 8  # incoming connections that have not yet proved the cluster secret
_ACCEPTS_PER_EVENT = 16
_WARN_EVERY_S = 10.0
_last_warned: dict[str, float] = {}


def _warn_throttled(kind: str, message: str, *args: Any) -> None:
    """A warning at most every ``_WARN_EVERY_S`` per kind: a stranger flooding
    the port must not flood the log as well (tick thread)."""
    now = time.monotonic()
    if now - _last_warned.get(kind, float("-inf")) >= _WARN_EVERY_S:
        _last_warned[kind] = now
        log.warning(message, *args)


class FrameReader:
    """pysyncobj's length-prefixed frames out of a byte stream, with a cap.

    Bytes go into one growable buffer and complete frames are cut off its
    front in place, so a frame arriving in many pieces costs time linear in
    its size (pysyncobj concatenates immutable bytes: quadratic). A frame
    whose declared length is negative or over ``frame_max_bytes`` raises
    ``FrameRefused`` as soon as its 4-byte length is in, so no more of it is
    buffered than what arrived with the length. ``frame_max_bytes`` may be
    raised between frames (after the connection authenticated).

    Owned by one connection; used only on the tick thread."""

    def __init__(self, frame_max_bytes: int) -> None:
        self.frame_max_bytes = frame_max_bytes
        self._buffer = bytearray()

    def __len__(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append received bytes. Raises ``FrameRefused`` (the buffer is then
        of no further use: the caller closes the connection)."""
        self._buffer += data
        self._declared()

    def next_frame(self) -> bytes | None:
        """The next complete frame, length prefix included (what pysyncobj's
        parser takes), or None until one is complete. Raises ``FrameRefused``."""
        length = self._declared()
        if length is None or len(self._buffer) < _FRAME_LENGTH.size + length:
            return None
        end = _FRAME_LENGTH.size + length
        frame = bytes(self._buffer[:end])
        del self._buffer[:end]  # deleting from the front of a bytearray moves no bytes
        return frame

    def clear(self) -> None:
        self._buffer.clear()

    def _declared(self) -> int | None:
        if len(self._buffer) < _FRAME_LENGTH.size:
            return None
        (length,) = _FRAME_LENGTH.unpack_from(self._buffer)
        if length < 0 or length > self.frame_max_bytes:
            raise FrameRefused(f"a frame of {length} bytes declared, at most {self.frame_max_bytes} allowed")
        return length


class _BoundedConnection(TcpConnection):
    """pysyncobj's TcpConnection with our wire and a bounded reader.

    The wire: each frame is one ``FrameBox`` seal (XSalsa20-Poly1305 under a
    key derived from the cluster secret, ``crypto.KEY_RAFT_WIRE``) of
    msgpack: the frame's sequence number on this connection, then every
    message queued since the last frame. No pickle, no deflate, and one
    authenticated encryption per frame instead of pickle + zlib + Fernet per
    message. A frame that does not verify, does not decode or comes out of
    order (a replay) closes the connection. pysyncobj's handshake still runs
    on top (each side sends a random key; every later message carries the
    peer's, so frames of another connection are refused too).

    Messages queue in ``send`` and leave as one frame in ``flush``: the engine
    flushes every connection at the end of each tick and the transport after
    reading a connection's input (``on_drained``), so answers go out as soon
    as the input that caused them is handled.

    The reader: until one frame has verified, the connection is a stranger's:
    its frames may be at most ``HANDSHAKE_FRAME_MAX_BYTES``; after that,
    ``frame_max_bytes``. A frame over the cap closes the connection before it
    is buffered.

    Changing the cluster secret: frames are sealed with ``box`` (the node's
    secret) and open with it or any of ``accepted`` (the other secrets this
    node accepts, ``--accept-secret-file``); the key that opened the last
    frame is tried first.

    Tick thread only, like every pysyncobj connection."""

    def __init__(self, *args: Any, frame_max_bytes: int, on_refused: Callable[[str], None], box: FrameBox,
                 on_drained: Callable[[], None] = lambda: None, accepted: tuple[FrameBox, ...] = (),
                 **kwargs: Any) -> None:
        self.frame_max_bytes = frame_max_bytes
        self.authenticated = False
        self.opened_at = _pysyncobj.monotonicTime()
        self.frames_sent = 0
        self.messages_sent = 0
        self._reader = FrameReader(min(HANDSHAKE_FRAME_MAX_BYTES, frame_max_bytes))
        self._on_refused = on_refused
        self._on_drained = on_drained
        self._box = box
        self._opening = (box, *accepted)  # the first one opened the last frame
        # a frame's plaintext stays well under what the peer accepts
        self._frame_budget = max(HANDSHAKE_FRAME_MAX_BYTES // 2, frame_max_bytes // 2 - FrameBox.OVERHEAD)
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._inbox: deque[Any] = deque()
        self._send_seq = 0
        self._recv_seq = 0
        super().__init__(*args, **kwargs)

    def connect(self, host: Any, port: Any) -> bool:
        self._restart()
        return super().connect(host, port)

    def disconnect(self) -> None:
        self._restart()
        super().disconnect()

    def _restart(self) -> None:
        self._reader.clear()
        self._reader.frame_max_bytes = min(HANDSHAKE_FRAME_MAX_BYTES, self.frame_max_bytes)
        self.authenticated = False
        self.opened_at = _pysyncobj.monotonicTime()
        self._outbox.clear()
        self._outbox_bytes = 0
        self._inbox.clear()
        self._send_seq = self._recv_seq = 0

    def _refuse(self, reason: str) -> None:
        self._on_refused(reason)
        self.disconnect()

    # -- sending --

    def send(self, message: Any) -> None:
        """Queue ``message`` for the next frame (pysyncobj's send wrote a frame
        per message). Tagged with the peer's random key once it is known."""
        if self.sendRandKey:
            message = (self.sendRandKey, message)
        packed = pack_wire(message)
        self._outbox.append(packed)
        self._outbox_bytes += len(packed)
        if self._outbox_bytes >= self._frame_budget:
            self.flush()

    def flush(self) -> None:
        """Seal what is queued into frames of at most ``_frame_budget`` bytes
        of messages (one message alone may be larger) and start sending them."""
        if not self._outbox:
            return
        if self.state == CONNECTION_STATE.DISCONNECTED:
            self._outbox.clear()
            self._outbox_bytes = 0
            return
        frames = []
        batch: list[bytes] = []
        size = 0
        for packed in self._outbox:
            if batch and size + len(packed) > self._frame_budget:
                frames.append(self._seal(batch))
                batch, size = [], 0
            batch.append(packed)
            size += len(packed)
        frames.append(self._seal(batch))
        self.messages_sent += len(self._outbox)
        self._outbox.clear()
        self._outbox_bytes = 0
        self._TcpConnection__writeBuffer += b"".join(frames)
        self._TcpConnection__trySendBuffer()

    def _seal(self, batch: list[bytes]) -> bytes:
        sealed = self._box.seal(pack_wire(self._send_seq) + b"".join(batch))
        self._send_seq += 1
        self.frames_sent += 1
        return _FRAME_LENGTH.pack(len(sealed)) + sealed

    # -- reading: pysyncobj's private methods (name-mangled), replaced --

    def _TcpConnection__tryReadBuffer(self) -> None:  # noqa: N802
        """Read what arrived, at most ``READ_BUDGET_BYTES``: the rest is read on
        the next tick, so one fast sender cannot hold the tick thread here."""
        got = 0
        while got < READ_BUDGET_BYTES:  # every turn reads at least a byte or leaves
            read = self._read_once()
            if read <= 0:
                break
            got += read
        self._TcpConnection__lastReadTime = _pysyncobj.monotonicTime()

    def _read_once(self) -> int:
        sock = self._TcpConnection__socket
        try:
            incoming = sock.recv(self._TcpConnection__recvBufferSize)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                self.disconnect()
            return 0
        if not incoming or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.disconnect()
            return 0
        try:
            self._reader.feed(incoming)
        except FrameRefused as exc:
            self._refuse(str(exc) if self.authenticated else f"before authentication, {exc}")
            return 0
        return len(incoming)

    def _TcpConnection__processParseMessage(self) -> Any:  # noqa: N802
        """The next message, or None when none is complete (then what the
        handled input caused is sent: ``on_drained``)."""
        while not self._inbox:
            if not self._open_next_frame():
                self._on_drained()
                return None
        message = self._inbox.popleft()
        if self.recvRandKey:  # pysyncobj's check: the message was sent on this connection
            if not (isinstance(message, tuple) and len(message) == 2 and message[0] == self.recvRandKey):
                self._refuse("a message without this connection's key (from another connection)")
                return None
            message = message[1]
        return message

    def _open_next_frame(self) -> bool:
        """Decrypt and decode the next complete frame into the inbox; False
        when there is none (or the connection was closed for it)."""
        try:
            frame = self._reader.next_frame()
        except FrameRefused as exc:
            self._refuse(str(exc) if self.authenticated else f"before authentication, {exc}")
            return False
        if frame is None:
            return False
        plaintext = self._unseal(frame[_FRAME_LENGTH.size:])
        if plaintext is None:
            self._refuse("a frame that does not verify with the cluster secret" if self.authenticated
                         else "a first frame that does not verify with the cluster secret")
            return False
        try:
            seq, *messages = unpack_wire(plaintext)
        except (InvalidInput, ValueError):
            self._refuse("a frame that verifies but does not decode")
            return False
        if seq != self._recv_seq:
            self._refuse(f"frame {seq!r} where {self._recv_seq} was due (replayed or reordered)")
            return False
        self._recv_seq += 1
        if not self.authenticated:
            self.authenticated = True
            self._reader.frame_max_bytes = self.frame_max_bytes
        self._inbox.extend(messages)
        return True


    def _unseal(self, sealed: bytes) -> bytes | None:
        for position, box in enumerate(self._opening):
            plaintext = box.unseal(sealed)
            if plaintext is not None:
                if position:
                    self._opening = (box, *self._opening[:position], *self._opening[position + 1:])
                return plaintext
        return None


class _BoundedServer:
    """The Raft port's listening socket, in place of pysyncobj's TcpServer
    (which accepts without limit and unbinds for good on any accept error,
    EMFILE included). Accepts at most ``_ACCEPTS_PER_EVENT`` connections per
    tick and hands each socket to ``accept``, which may close it at once.
    Same interface as TcpServer (``bind``, ``unbind``); tick thread only."""

    def __init__(self, poller: Any, host: str, port: int | str, accept: Callable[[socket.socket], None],
                 send_buffer_bytes: int, recv_buffer_bytes: int) -> None:
        self._poller = poller
        self._address = (host, int(port))
        self._accept = accept
        self._send_buffer_bytes = send_buffer_bytes
        self._recv_buffer_bytes = recv_buffer_bytes
        self._socket: socket.socket | None = None

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self._address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_buffer_bytes)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            sock.bind(self._address)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._poller.subscribe(sock.fileno(), self._on_event, POLL_EVENT_TYPE.READ | POLL_EVENT_TYPE.ERROR)

    def unbind(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            self._poller.unsubscribe(sock.fileno())
            sock.close()

    def _on_event(self, descr: int, event: int) -> None:
        sock = self._socket
        if sock is None or descr != sock.fileno():
            self._poller.unsubscribe(descr)
            return
        if event & POLL_EVENT_TYPE.ERROR:
            self.unbind()
            return
        for _ in range(_ACCEPTS_PER_EVENT):
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # EMFILE and the like: the port stays; the next tick tries again
                _warn_throttled("accept", "raft port: accept failed: %s", exc)
                return
            self._accept(conn)


class _SnapshotPath(str):
    """The snapshot path handed to pysyncobj (``fullDumpFile``): a rename onto
    it goes through ``_replace_snapshot``, durable unless ``durability`` is
    ``"none"``."""

    durability: str


_pysyncobj_atomic_replace = _pysyncobj_serializer.atomicReplace


def _replace_snapshot(src: Any, dst: Any) -> Any:
    """pysyncobj's Serializer renames every snapshot into place with its
    ``atomicReplace``: ours after ``_serialize`` wrote it, and one received
    from the leader (``setTransmissionData``), which it wrote unsynced. Right
    after that rename a follower loads the snapshot, clears its journal and
    acknowledges the install: with the file or the rename still in the page
    cache, a power cut would leave neither the entries nor the snapshot that
    replaced them. For our snapshot path the file is fsynced, renamed and the
    directory fsynced before pysyncobj goes on (an ``OSError`` makes it drop
    the install unacknowledged)."""
    if not isinstance(dst, _SnapshotPath):
        return _pysyncobj_atomic_replace(src, dst)
    replace_durably(src, dst, fsync=dst.durability == "fsync")
    if str(src).endswith(".1.tmp"):  # pysyncobj's name for a snapshot received from the leader
        log.info("installed a snapshot received from the leader (%s)", "synced" if dst.durability == "fsync"
                 else "not synced: durability none")
    return True


_pysyncobj_serializer.atomicReplace = _replace_snapshot


_RELAYED = ("apply_command", "apply_command_response")  # a follower's command and the leader's answer
_READS = ("read_index", "read_index_reply")  # a follower asks the leader for a read index (ours, not pysyncobj's)
_NO_SYNC = ("append_entries", *_RELAYED, *_READS)


class _SyncingTransport(TCPTransport):
    """pysyncobj's TCP transport, but no acknowledgement leaves before the
    journal is durable: an append or vote response only reflects synced state.

    The leader's own ``append_entries`` may go out first, so followers write
    while the leader syncs (Raft thesis §10.2.1); the leader still counts its
    own entries only once they are synced, because ``_on_tick`` syncs right
    after sending and before the tick thread polls for the acknowledgements
    that let the commit index move. A relayed command and the leader's answer
    (the index it was given) acknowledge nothing durable and go out unsynced:
    syncing before each answer cost the leader one fdatasync per command
    written through a follower.

    Relayed commands and answers are also batched: pysyncobj sends each as its
    own pickled, compressed, encrypted frame; here they wait in ``_relays``
    until the end of the tick (``flush_relays``) or until another message goes
    to the same node (so the order on each link is unchanged), and leave as
    one ``relay_batch`` frame (several when their commands exceed the append
    batch size, so no frame nears the cap a peer enforces).

    The port itself is bounded (see ``_BoundedConnection``): every connection
    reads through a capped ``FrameReader``; an incoming connection beyond
    ``UNAUTHENTICATED_MAX`` still proving the secret is closed at once, and
    one that has not proved it within ``connectionTimeout`` is closed then.
    ``refusals`` counts strangers' connections and frames refused.

    ReadIndex (``cluster.read_index``): every append_entries leaves stamped
    with the latest read round's number (``ri``); while pysyncobj handles a
    stamped append_entries, the answer it sends back (``next_node_idx``, at
    most one, from inside its handler) carries the stamp and the message's
    term (``ri``, ``ri_term``), which the leader hands to ``rounds``. The
    engine's own ``read_index`` and ``read_index_reply`` messages go to
    ``on_read_message`` and never reach pysyncobj."""

    _rounds: ReadRounds | None = None
    _on_read_message: Callable[[Any, dict[str, Any]], None] | None = None
    _answering: tuple[Any, Any, int] | None = None  # (node, term, stamp) of the append being handled

    def __init__(self, sync_obj: Any, self_node: Any, other_nodes: Any, journal: DurableJournal,
                 rounds: ReadRounds | None = None,
                 on_read_message: Callable[[Any, dict[str, Any]], None] | None = None,
                 accepted_secrets: tuple[str, ...] = ()) -> None:
        self._journal = journal
        self._rounds = rounds
        self._on_read_message = on_read_message
        self._answering = None
        self._relays: dict[Any, list[dict[str, Any]]] = {}
        self.refusals = 0
        batch_bytes = sync_obj.conf.appendEntriesBatchSizeBytes
        self._relay_batch_bytes = batch_bytes
        # pysyncobj sends up to a batch of entries plus the one that crosses it; entries are at
        # most a quarter of a batch, and a frame holds half of this of messages.
        self.frame_max_bytes = 2 * batch_bytes
        self._box = FrameBox(crypto.derived_key(sync_obj.conf.password, crypto.KEY_RAFT_WIRE))
        self._accepted = tuple(FrameBox(crypto.derived_key(s, crypto.KEY_RAFT_WIRE)) for s in accepted_secrets)
        super().__init__(sync_obj, self_node, other_nodes)

    # -- the bounded port (overrides of TCPTransport) --

    def _createServer(self) -> None:  # noqa: N802 - pysyncobj's name
        # pysyncobj binds every interface (0.0.0.0) unless told otherwise; the
        # port listens on the node's own Raft address only, as documented.
        conf = self._syncObj.conf
        host, port = (conf.bindAddress or self._selfNode.address).rsplit(":", 1)
        host = host.strip("[]")
        if host not in ("0.0.0.0", "::"):
            host = _pysyncobj.globalDnsResolver().resolve(host)
        if host is None:
            raise EngineError(f"cannot resolve the Raft address {self._selfNode.address}")
        self._server = _BoundedServer(self._syncObj._poller, host, port, self._accept_connection,
                                      conf.sendBufferSize, conf.recvBufferSize)

    def _connection(self, **kwargs: Any) -> _BoundedConnection:
        conf = self._syncObj.conf
        return _BoundedConnection(poller=self._syncObj._poller, timeout=conf.connectionTimeout,
                                  sendBufferSize=conf.sendBufferSize, recvBufferSize=conf.recvBufferSize,
                                  frame_max_bytes=self.frame_max_bytes, on_refused=self._refused, box=self._box,
                                  accepted=self._accepted, on_drained=self.flush_frames, **kwargs)

    def _accept_connection(self, sock: socket.socket) -> None:
        """A new incoming connection (tick thread): closed at once when
        ``UNAUTHENTICATED_MAX`` others are still proving the secret."""
        waiting = sum(1 for conn in self._unknownConnections if not getattr(conn, "authenticated", False))
        if waiting >= UNAUTHENTICATED_MAX:
            sock.close()
            self._refused(f"a connection beyond the {UNAUTHENTICATED_MAX} still proving the cluster secret")
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._syncObj.conf.sendBufferSize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._syncObj.conf.recvBufferSize)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        self._onNewIncomingConnection(self._connection(socket=sock))

    def addNode(self, node: Any) -> None:  # noqa: N802 - pysyncobj's name
        """pysyncobj's addNode with our connection class for outgoing links."""
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conn = self._connection(keepalive=self._syncObj.conf.tcp_keepalive)
            conn.encryptor = self._syncObj.encryptor
            conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
            conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
            conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
            self._connections[node] = conn

    def _onTick(self) -> None:  # noqa: N802 - pysyncobj's name
        super()._onTick()
        now = _pysyncobj.monotonicTime()
        limit = self._syncObj.conf.connectionTimeout
        for conn in list(self._unknownConnections):  # at most UNAUTHENTICATED_MAX plus utility links
            if not getattr(conn, "authenticated", True) and now - conn.opened_at > limit:
                self._refused(f"a connection that did not prove the cluster secret within {limit:g} s")
                conn.disconnect()

    def _refused(self, reason: str) -> None:
        self.refusals += 1
        _warn_throttled(reason.split(",")[0], "raft port: closed %s (%d refusals so far)", reason, self.refusals)

    # -- sending --

    def send(self, node: Any, message: Any) -> bool:
        kind = message.get("type")
        if kind in _RELAYED:
            self._relays.setdefault(node, []).append(message)
            return True
        self._flush_relays_to(node)
        if self._journal.dirty and kind not in _NO_SYNC:
            self._journal.sync()
        if kind == "append_entries" and self._rounds is not None:
            message = {**message, "ri": self._rounds.stamp()}
        elif kind == "next_node_idx" and self._answering is not None and self._answering[0] == node:
            message = {**message, "ri": self._answering[2], "ri_term": self._answering[1]}
        if kind == "next_node_idx" and message.get("reset") and not message.get("success"):
            commit = self._syncObj._SyncObj__raftCommitIndex
            message = back_up_over_term(message, self._journal, commit)
        return super().send(node, message)

    def flush_frames(self) -> None:
        """Send what every connection has queued, each as one frame (tick
        thread: at the end of a tick, and after a connection's input)."""
        for conn in (*self._connections.values(), *self._unknownConnections):
            if conn._outbox:
                conn.flush()

    def flush_relays(self) -> None:
        """Send every batched relay (tick thread, at the end of a tick)."""
        for node in list(self._relays):
            self._flush_relays_to(node)

    def _flush_relays_to(self, node: Any) -> None:
        batch = self._relays.pop(node, None)
        if not batch:
            return
        for part in split_relays(batch, self._relay_batch_bytes):
            message = part[0] if len(part) == 1 else {"type": "relay_batch", "messages": part}
            super().send(node, message)

    def _onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802 - pysyncobj's name
        if isinstance(message, dict) and "transmission" in message:
            # pysyncobj sends an entry larger than a batch pickled, in pieces, and
            # unpickles it on arrival; entries are capped at a quarter of a batch,
            # so no peer of ours sends one, and none is ever unpickled here.
            self.refusals += 1
            _warn_throttled("transmission", "raft port: dropped an append of a pickled oversized entry from %s "
                            "(never unpickled)", getattr(node, "id", node))
            return
        if isinstance(message, dict) and message.get("type") == "relay_batch":
            inner = message.get("messages")
            for item in inner if isinstance(inner, (list, tuple)) else ():
                if isinstance(item, dict) and item.get("type") in _RELAYED:
                    super()._onMessageReceived(node, item)
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if kind in _READS:
            if self._on_read_message is not None:
                self._on_read_message(node, message)
            return
        message = trim_append_entries(message, self._journal)
        if message is None:
            return
        stamp = message.get("ri")
        if kind == "append_entries" and isinstance(stamp, int):
            # pysyncobj answers (if at all) from inside this call: the answer carries the stamp
            self._answering = (node, message.get("term"), stamp)
            try:
                super()._onMessageReceived(node, message)
            finally:
                self._answering = None
            return
        if kind == "next_node_idx" and self._rounds is not None:
            term = message.get("ri_term")
            if isinstance(stamp, int) and isinstance(term, int):
                self._rounds.on_answer(node.id, term, stamp)
        super()._onMessageReceived(node, message)


def split_relays(batch: list[dict[str, Any]], batch_bytes: int) -> list[list[dict[str, Any]]]:
    """``batch`` in order, cut into parts whose commands add up to at most
    ``batch_bytes`` (a part holds at least one message)."""
    parts: list[list[dict[str, Any]]] = [[]]
    size = 0
    for message in batch:
        command = message.get("command")
        weight = 64 + (len(command) if isinstance(command, (bytes, bytearray, str)) else 0)
        if parts[-1] and size + weight > batch_bytes:
            parts.append([])
            size = 0
        parts[-1].append(message)
        size += weight
    return parts


def trim_append_entries(message: Any, journal: Any) -> Any:
    """Keep pysyncobj from truncating log entries that match the leader's.

    pysyncobj deletes everything after ``prevLogIdx`` whenever it holds more,
    even entries identical to the ones re-sent (Raft deletes only from the
    first conflicting entry). After such a truncation the leader's matchIndex
    for this node can exceed what the node still holds. So: skip the leading
    entries we already hold with the same term (move ``prevLogIdx`` past
    them); if every entry matched and we hold more after them, the message
    says nothing new and is dropped (Raft tolerates lost messages; the next
    append continues from the leader's nextIndex). Returns the message to
    deliver, possibly rewritten, or None."""
    if not isinstance(message, dict) or message.get("type") != "append_entries" or "transmission" in message:
        return message
    entries = message.get("entries")
    if not entries or "prevLogIdx" not in message or len(journal) == 0:
        return message
    first, last = journal[0][1], journal[-1][1]
    matched = 0
    for _command, index, term in entries:
        if not first <= index <= last or journal[index - first][2] != term:
            break
        matched += 1
    if matched == 0:
        return message
    if matched == len(entries) and last > entries[-1][1]:
        return None
    trimmed = dict(message)
    trimmed["prevLogIdx"], trimmed["prevLogTerm"] = entries[matched - 1][1], entries[matched - 1][2]
    trimmed["entries"] = entries[matched:]
    return trimmed


def back_up_over_term(message: dict[str, Any], journal: Any, commit_index: int) -> dict[str, Any]:
    """Answer a conflicting append with the first index of the conflicting term.

    pysyncobj's follower, when its entry at ``prevLogIdx`` has another term
    than the leader's, answers ``next_node_idx = prevLogIdx``: the leader
    backs up one entry per heartbeat, so a deposed leader holding hundreds of
    entries it appended alone takes that many heartbeats to rejoin. Raft's
    usual optimisation (Raft paper §5.3): skip back over every entry of the
    conflicting term, never below ``commit_index + 1`` (committed entries
    match the leader's by Log Matching). Backing up further than needed is
    always safe; matching entries re-sent are skipped by
    ``trim_append_entries``. Other answers (the follower's log is shorter)
    pass unchanged."""
    index = message.get("next_node_idx")
    if not isinstance(index, int) or len(journal) == 0:
        return message
    first, last = journal[0][1], journal[-1][1]
    if not first <= index <= last or index <= commit_index + 1:
        return message
    term = journal[index - first][2]
    start = index
    while start - 1 > commit_index and start - 1 >= first and journal[start - 1 - first][2] == term:
        start -= 1
    if start == index:
        return message
    return {**message, "next_node_idx": start}


# -- failpoints (tests only) ---------------------------------------------------------------

def _failpoints() -> dict[str, int]:
    """``COORD_FAILPOINTS="apply_stall_at=12"``: inject pysyncobj's apply stall
    (an exception inside its apply loop at that index) into the first
    incarnation of the SyncObj, to prove that the node notices and recovers.
    ``apply_stall_always_at=12``: the same stall in every incarnation (a
    deterministic one), to prove that the watchdog gives up and halts."""
    out: dict[str, int] = {}
    for part in os.environ.get("COORD_FAILPOINTS", "").split(","):
        name, _, value = part.partition("=")
        if name.strip() and value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


# -- the SyncObj ---------------------------------------------------------------------

# Our log entries: pysyncobj's command-type byte, then the command as the
# codec encoded it. pysyncobj's own entries of a replicated method are a
# pickle of (method id, args, kwargs) that every replica unpickles when it
# applies them; ours are never pickled, on the wire or in the journal.
COMMAND_TYPE_OURS = 7
_COMMAND_OURS = bytes([COMMAND_TYPE_OURS])
_pysyncobj_do_apply = SyncObj._SyncObj__doApplyCommand  # type: ignore[attr-defined]


class _ReplicatedLog(SyncObj):
    def __init__(self, bridge: _Bridge, self_address: str, partners: list[str], conf: SyncObjConf,
                 transport_class: Callable[..., Any], stall_at: int | None) -> None:
        self._bridge = bridge
        self._stall_at = stall_at
        super().__init__(self_address, partners, conf=conf, transportClass=transport_class)

    def submit(self, blob: bytes, callback: Callable[[Any, int], None]) -> None:
        """Queue ``blob`` for the log as one of our entries (any thread)."""
        self._applyCommand(blob, callback, COMMAND_TYPE_OURS)

    def _SyncObj__doApplyCommand(self, command: bytes) -> Any:  # noqa: N802 - pysyncobj's private name
        """Apply one committed entry (tick thread): ours here; pysyncobj's own
        (membership, version, and entries of ``_apply`` written before ours
        existed) as pysyncobj does."""
        if command[:1] == _COMMAND_OURS:
            return self._apply_blob(bytes(command[1:]))
        return _pysyncobj_do_apply(self, command)

    def _apply_blob(self, blob: bytes) -> None:
        index = self.raftLastApplied + 1
        if self._stall_at is not None and index >= self._stall_at:
            raise IndexError(f"failpoint apply_stall_at={self._stall_at}")
        self._bridge.post(("apply", index, blob))

    @replicated
    def _apply(self, blob: bytes) -> None:
        """Entries written before ``COMMAND_TYPE_OURS`` (a journal of an older
        version) still apply through pysyncobj's replicated method."""
        self._apply_blob(blob)


class _Bridge:
    """Carries everything the tick thread produces to the loop, in order.

    An exception from ``fsm.apply`` or ``fsm.restore`` halts the bridge: it
    sets ``halted`` (the problem), calls ``on_halt(problem)`` once, and from
    then on hands the FSM nothing (applies, restores and resets are dropped,
    snapshot requests fail) so no later entry lands on a half-applied state."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fsm: ReplicatedFSM,
                 on_role: Callable[[str], None], on_halt: Callable[[str], None] = lambda problem: None) -> None:
        self._loop = loop
        self._fsm = fsm
        self._on_role = on_role
        self._on_halt = on_halt
        self.halted: str | None = None
        self._items: deque[tuple[Any, ...]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self.applied_index = 0  # last index handed to the FSM
        self.closed = False

    def post(self, item: tuple[Any, ...]) -> None:
        with self._lock:
            self._items.append(item)
            if self._scheduled or self.closed:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _drain(self, budget: int = 2000) -> None:
        """Dispatch what was posted, at most ``budget`` items per call: each
        lock round takes every item waiting (up to what is left of the
        budget), so a tick's entries cost one lock, not one each."""
        batch: deque[tuple[Any, ...]] = deque()
        try:
            while budget > 0:
                with self._lock:
                    if not self._items:
                        self._scheduled = False
                        return
                    if len(self._items) <= budget:
                        batch, self._items = self._items, deque()
                    else:
                        batch = deque(self._items.popleft() for _ in range(budget))
                budget -= len(batch)
                while batch:
                    self._dispatch(batch.popleft())
        finally:
            if batch:  # only if a dispatch raised past its own handler: keep the order
                with self._lock:
                    self._items.extendleft(reversed(batch))
        self._loop.call_soon(self._drain)  # yield to other tasks, then go on

    def _dispatch(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if self.halted is not None and kind in ("apply", "restore", "reset", "snapshot"):
            if kind == "snapshot" and not item[1].done():
                item[1].set_exception(EngineError(f"no snapshot of a halted replica ({self.halted})"))
            return
        try:
            if kind == "apply":
                self._fsm.apply(item[1], item[2])
                self.applied_index = item[1]
            elif kind == "done":
                item[1](item[2])
            elif kind == "snapshot":
                future: concurrent.futures.Future[bytes] = item[1]
                if not future.done():
                    future.set_result(self._fsm.snapshot())
            elif kind == "restore":
                self._fsm.restore(item[1])
                self.applied_index = item[2]
            elif kind == "reset":
                self._fsm.reset()
                self.applied_index = 0
            elif kind == "role":
                self._on_role(item[1])
        except Exception as exc:
            if kind in ("apply", "restore"):
                self.halt(_problem_of(kind, item[1] if kind == "apply" else item[2], exc))
                return
            log.exception("engine bridge: %s failed", kind)
            if kind == "snapshot" and not item[1].done():
                item[1].set_exception(EngineError("snapshot failed"))


    def halt(self, problem: str) -> None:
        """Apply nothing more; tell the engine once. Loop thread."""
        if self.halted is not None:
            return
        self.halted = problem
        log.critical("raft engine: %s; this node applies no later entry and leaves the cluster until it is "
                     "restarted", problem)
        self._on_halt(problem)


def _problem_of(kind: str, index: int, exc: Exception) -> str:
    """What failed, where, and the exception's type: never its text (it may
    quote an entry's data). ``ReplicaHalted`` already says it that way."""
    if isinstance(exc, ReplicaHalted):
        return exc.message.removeprefix("this replica halted: ")
    return f"{kind} failed at index {index}: {type(exc).__name__}"


class PySyncObjEngine:
    """A ``ConsensusEngine`` over pysyncobj. Construct on the event loop thread.

    ``address`` is this node's Raft address (``host:port``), ``peers`` the
    others'. ``data_dir`` holds the journal (``raft.journal``, ``.meta``) and
    the snapshot (``raft.snapshot``).

    ``dial`` maps a peer's address (its identity) to the address this node
    connects to, when they differ (a fault-injection proxy in between).
    pysyncobj knows peers only by the address it dials, so the engine
    translates: everything it reports and every snapshot speaks identities.

    Compaction (a snapshot, then the journal trimmed) starts after
    ``compaction_entries`` entries or once the journal holds
    ``compaction_bytes``, whichever comes first: a few large entries must not
    grow the journal (and its copy in memory) for long. A snapshot that
    failed is tried again only after a backoff (1 s, doubling to 60 s), not
    on every tick: a state too large to snapshot in time must not stall the
    tick thread over and over.

    ``power_loss`` (UNSAFE, chaos tests only: ``--unsafe-test-power-loss``)
    records what a power cut would leave of ``data_dir`` for the lost-fsync
    nemesis (``cluster.power_loss``); it costs a copy of every synced byte.
    """

    def __init__(self, *, node_id: str, address: str, peers: list[str], data_dir: str, secret: str,
                 fsm: ReplicatedFSM, durability: str = "fsync", election_timeout_s: tuple[float, float] = (0.5, 1.0),
                 heartbeat_s: float = 0.1, leader_fallback_s: float = 2.0, queue_max: int = 4096,
                 compaction_entries: int = 20_000, stall_timeout_s: float = 5.0, rebuilds_max: int = 2,
                 max_entry_bytes: int = 1 << 20, dial: dict[str, str] | None = None,
                 power_loss: bool = False, compaction_bytes: int = 64 << 20,
                 snapshot_timeout_s: float = 20.0, bind: str | None = None,
                 accepted_secrets: tuple[str, ...] = ()) -> None:
        """``address`` is this node's Raft identity, the one its peers dial;
        ``bind`` where its port listens when that differs (0.0.0.0:7101).
        ``accepted_secrets``: other cluster secrets whose frames this node
        also opens (it seals with ``secret`` only)."""
        if not secret or len(secret) < 16:
            raise MissingSecret("the Raft port needs a cluster secret of at least 16 characters")
        if durability not in ("fsync", "none"):
            raise EngineError("durability must be 'fsync' or 'none'")
        self.node_id = node_id
        self.address = address
        self.bind = bind
        self.peers = [p for p in peers if p != address]
        self._dial = {identity: via for identity, via in (dial or {}).items() if identity != via}
        self._identity = {via: identity for identity, via in self._dial.items()}
        self.data_dir = data_dir
        self.durability = durability
        self.stall_timeout_s = stall_timeout_s
        self.rebuilds_max = rebuilds_max  # rebuilds for a stall at one index before halting
        self.compaction_bytes = compaction_bytes
        self.snapshot_timeout_s = snapshot_timeout_s
        self.snapshots = 0  # taken (tick thread)
        self.snapshot_failures = 0  # in a row; the backoff doubles with each
        self.snapshots_deferred = 0  # attempts pysyncobj made during a backoff, refused at once
        self._snapshot_retry_at = 0.0  # monotonic time before which no snapshot is tried
        self._compaction_forced_at = 0.0
        self._secret = secret
        self._accepted_secrets = tuple(s for s in accepted_secrets if s != secret)
        self._fsm = fsm
        self._tuning = dict(election_timeout_s=election_timeout_s, heartbeat_s=heartbeat_s,
                            leader_fallback_s=leader_fallback_s, queue_max=queue_max,
                            compaction_entries=compaction_entries, max_entry_bytes=max_entry_bytes)
        self._role_listeners: list[Callable[[str], None]] = []
        self._sync: _ReplicatedLog | None = None
        self._journal: DurableJournal | None = None
        self._transport: _SyncingTransport | None = None
        self._bridge: _Bridge | None = None
        self._notifier: PipeNotifier | None = None
        self._last_flush: tuple[int, int] = (0, 0)
        self._monitor: asyncio.Task[None] | None = None
        self._healthy = True
        self._problem: str | None = None
        self.halted: str | None = None  # why this engine left consensus for good (see the module docstring)
        self._halting: asyncio.Task[None] | None = None
        self._last_seen = (0, 0, (address,))  # term, commit index, members when the SyncObj went away
        self._stalled_at: tuple[int, int] = (-1, 0)  # (index, rebuilds for a stall there)
        self.generation = 0
        self.recoveries = 0
        self.watch_rounds = 0  # times the apply watchdog looked (tests wait on it)
        self._failpoints = _failpoints()
        self.quorum_lease_s = election_timeout_s[0]  # coordinator.ports.KnowsQuorumContact
        # ReadIndex (coordinator.ports.ConfirmsReads): a round without a majority fails when pysyncobj
        # itself would give up leading; the state below is the tick thread's
        self._rounds = ReadRounds(timeout_s=leader_fallback_s)
        self._read_timeout_s = leader_fallback_s + 1.0  # the loop's own bound on one read
        self._asked: dict[int, tuple[list[Waiter], float]] = {}  # a follower's requests to the leader
        self._ask_ids = itertools.count(1)
        self._asked_by: list[tuple[Any, int]] = []  # requests from followers (node, id), for the next tick
        self._apply_waits: list[tuple[int, Callable[[], None]]] = []  # confirmed reads waiting for the replica
        os.makedirs(data_dir, exist_ok=True)
        # UNSAFE, chaos tests only: record what a power cut would leave (before any file is opened)
        self._power_loss = PowerLossRecorder(data_dir) if power_loss else None
        if self._power_loss is not None:
            self._power_loss.start()

    @classmethod
    def from_config(cls, config: Any, fsm: ReplicatedFSM) -> PySyncObjEngine:
        """Build the engine from a ``coordinator.config.NodeConfig``."""
        return cls(node_id=config.node_id, address=config.raft, bind=getattr(config, "raft_bind", "") or None,
                   peers=[p.raft for p in config.peers],
                   dial={p.raft: p.dial for p in config.peers if p.dial},
                   data_dir=config.data_dir, secret=config.secret, fsm=fsm, durability=config.durability,
                   election_timeout_s=(config.election_timeout_min_s, config.election_timeout_max_s),
                   heartbeat_s=config.heartbeat_s, leader_fallback_s=config.leader_fallback_s,
                   compaction_entries=config.compaction_entries, stall_timeout_s=config.stall_timeout_s,
                   power_loss=config.unsafe_test_power_loss, compaction_bytes=config.compaction_bytes,
                   accepted_secrets=tuple(getattr(config, "accepted_secrets", ())))

    # -- offline: backups and new clusters (coordinator snapshot ...) ------------------------

    SNAPSHOT_FILE = "raft.snapshot"
    JOURNAL_FILE = "raft.journal"

    @classmethod
    def seed_data_dir(cls, data_dir: str, fsm_blob: bytes, index: int, members: list[str]) -> None:
        """Write a data directory that starts a NEW cluster at ``index`` with
        the state ``fsm_blob`` (``ReplicatedFSM.snapshot`` bytes at that index)
        and the voting members ``members`` (Raft addresses, this node's
        included). Offline: nothing runs on ``data_dir``; it must be empty.

        It holds only a snapshot record, as log compaction writes it, whose
        last two entries are synthetic no-ops at ``index - 1`` and ``index``
        in term 1, the same bytes on every member seeded from the same file
        with the same members: pysyncobj loads it at start (applied index
        ``index``), the first election is for term 1 and the new leader's
        entries follow at ``index + 1``, so the log's terms never go down.
        Raises ``EngineError`` for an index below 2 or a non-empty directory."""
        if index < 2:
            raise EngineError(f"a snapshot at index {index} holds nothing to restore")
        if os.path.isdir(data_dir) and os.listdir(data_dir):
            raise EngineError(f"{data_dir} is not empty: restore writes a fresh data directory only")
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        noop = bytes([_pysyncobj._COMMAND_TYPE.NO_OP])
        record = {
            "v": 1,
            "last": [noop, index, 1],
            "prev": [noop, index - 1, 1],
            "cluster": sorted(set(members)),
            "fsm": fsm_blob,
            "applied_index": index,
        }
        write_file_durably(os.path.join(data_dir, cls.SNAPSHOT_FILE), encode_record(record))

    @classmethod
    def read_data_dir(cls, data_dir: str) -> dict[str, Any]:
        """What a stopped node's data directory holds, read without changing
        it: ``fsm`` (its snapshot's state machine bytes, or None),
        ``snapshot_index``, ``entries`` after it as (index, term, blob) for
        the entries of ours (pysyncobj's own no-op and membership entries are
        left out, and counted in ``skipped``), ``last_index`` and
        ``last_term`` of its log, ``commit_index`` as last saved (about once
        a second: it may lag) and ``members`` of its last snapshot."""
        fsm: bytes | None = None
        snapshot_index = 0
        members: list[str] = []
        path = os.path.join(data_dir, cls.SNAPSHOT_FILE)
        if os.path.exists(path):
            with open(path, "rb") as f:
                record = decode_record(f.read())
            fsm, snapshot_index, members = record["fsm"], record["applied_index"], list(record["cluster"])
        journal_path = os.path.join(data_dir, cls.JOURNAL_FILE)
        if not os.path.exists(journal_path) and fsm is None:
            raise EngineError(f"{data_dir} holds neither {cls.SNAPSHOT_FILE} nor {cls.JOURNAL_FILE}")
        entries = []
        skipped = 0
        last_index, last_term = snapshot_index, 0
        for command, index, term in read_entries(journal_path):
            last_index, last_term = max(last_index, index), term
            if index <= snapshot_index:
                continue
            if command[:1] == _COMMAND_OURS:
                entries.append((index, term, bytes(command[1:])))
            else:
                skipped += 1
        meta = read_meta(journal_path)
        return {"fsm": fsm, "snapshot_index": snapshot_index, "entries": entries, "skipped": skipped,
                "last_index": last_index, "last_term": max(last_term, int(meta.get("term", 0))),
                "commit_index": int(meta.get("commit_index", 1)), "members": members}

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._bridge = _Bridge(loop, self._fsm, self._notify_role, self._halt)
        self._sync = self._make_sync()
        await asyncio.to_thread(self._sync.waitBinded)
        self._monitor = asyncio.create_task(self._watch_apply_loop(), name="raft-apply-watch")

    async def stop(self) -> None:
        if self._halting is not None:
            await asyncio.gather(self._halting, return_exceptions=True)
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        if self._sync is not None:
            await asyncio.to_thread(self._destroy, self._sync)
            self._sync = None
        if self._bridge is not None:
            self._bridge.closed = True
        if self._power_loss is not None:
            self._power_loss.stop()

    def _make_sync(self) -> _ReplicatedLog:
        journal_path = _JournalPath(os.path.join(self.data_dir, "raft.journal"))
        journal_path.durability = self.durability
        journal_path.journal = None
        conf = self._conf(journal_path)

        def transport_class(sync_obj: Any, self_node: Any, other_nodes: Any) -> _SyncingTransport:
            if journal_path.journal is None:
                raise EngineError("journal was not created before the transport")
            self._journal = journal_path.journal  # before the tick thread can need it
            self._transport = _SyncingTransport(sync_obj, self_node, other_nodes, journal_path.journal,
                                                self._rounds, self._on_read_message, self._accepted_secrets)
            return self._transport

        stall_at = self._failpoints.get("apply_stall_at") if self.generation == 0 else None
        stall_at = self._failpoints.get("apply_stall_always_at", stall_at)
        self._notifier = None
        self._last_flush = (0, 0)
        sync = _ReplicatedLog(self._bridge, self.address, [self._dial_of(p) for p in self.peers], conf,
                              transport_class, stall_at)
        sync.addOnTickCallback(self._on_tick)
        return sync

    def _conf(self, journal_path: _JournalPath) -> SyncObjConf:
        """pysyncobj's configuration for this engine (a fresh one per SyncObj)."""
        t = self._tuning
        low, high = t["election_timeout_s"]
        snapshot_path = _SnapshotPath(os.path.join(self.data_dir, "raft.snapshot"))
        snapshot_path.durability = self.durability
        return SyncObjConf(
            password=self._secret,
            journalFile=journal_path,
            fullDumpFile=snapshot_path,
            serializer=self._serialize,
            deserializer=self._deserialize,
            dynamicMembershipChange=True,
            appendEntriesUseBatch=True,
            appendEntriesPeriod=t["heartbeat_s"],
            appendEntriesBatchSizeBytes=max(4 * t["max_entry_bytes"], 1 << 20),
            raftMinTimeout=low,
            raftMaxTimeout=high,
            leaderFallbackTimeout=t["leader_fallback_s"],
            connectionTimeout=max(3.0, high * 2),
            connectionRetryTime=0.5,
            commandsWaitLeader=False,
            commandsQueueSize=t["queue_max"],
            logCompactionMinEntries=t["compaction_entries"],
            logCompactionMinTime=3600,
            autoTickPeriod=0.05,
            bindAddress=self.bind,
            bindRetryTime=0.5,
            maxBindRetries=20,
            onStateChanged=self._on_state_changed,
        )

    @staticmethod
    def _destroy(sync: _ReplicatedLog) -> None:
        if sync.tick_thread_alive():
            sync.destroy_synchronous()
        else:
            sync._doDestroy()

    # -- tick thread ----------------------------------------------------------------------

    def _on_tick(self) -> None:
        """End of every pysyncobj tick (its thread): send new entries and
        commit-index changes to followers at once and the batched relays, then
        sync what was appended."""
        sync = self._sync
        journal = self._journal
        if sync is None or journal is None:
            return
        if self._notifier is None:
            self._notifier = PipeNotifier(sync._poller)
        started = self._read_tick(sync)
        if sync._isLeader():
            marker = (journal[-1][1], sync.raftCommitIndex)
            if marker != self._last_flush or started:
                self._last_flush = marker
                sync._SyncObj__sendAppendEntries()
        if self._apply_waits:
            self._settle_applied(sync.raftLastApplied)
        transport = self._transport
        if transport is not None:  # relays need no sync: out before it
            transport.flush_relays()
            # every queued frame, the leader's appends first among them: followers
            # write while this node syncs (an answer was queued only after a sync)
            transport.flush_frames()
        if journal.dirty:  # before polling: no acknowledgement is processed before this
            journal.sync()
        if journal.size_bytes >= self.compaction_bytes:
            now = time.monotonic()
            # pysyncobj clears the flag when it starts; forcing again while one
            # runs or during a failure's backoff would only repeat the refusal
            if now >= self._snapshot_retry_at and now - self._compaction_forced_at >= 1.0:
                self._compaction_forced_at = now
                sync.forceLogCompaction()

    def _read_tick(self, sync: _ReplicatedLog) -> bool:
        """ReadIndex on the tick thread: settle and start rounds when this node
        leads, else pass this node's reads on to the leader. True when a round
        started (append_entries must go out now, carrying its stamp)."""
        rounds = self._rounds
        now = time.monotonic()
        if self._asked:
            self._expire_asked(now)
        if sync._isLeader():
            for node, request_id in self._asked_by:
                rounds.request(self._replier(node, request_id))
            self._asked_by.clear()
            if not rounds.in_flight() and not rounds.has_waiting():
                return False
            noop = sync._SyncObj__noopIDx
            commit = sync.raftCommitIndex
            view = LeaderView(leader=True, term=sync.raftCurrentTerm, commit_index=commit,
                              term_committed=noop is not None and commit >= noop,
                              voters=frozenset(node.id for node in sync._SyncObj__otherNodes))
            return rounds.on_tick(view, now)
        for node, request_id in self._asked_by:
            self._replier(node, request_id)(None, REFUSED, "not the leader")
        self._asked_by.clear()
        rounds.step_down()
        waiting = rounds.take_waiting()
        if waiting:
            self._ask_leader(sync, waiting, now)
        return False

    def _ask_leader(self, sync: _ReplicatedLog, waiting: list[Waiter], now: float) -> None:
        """A follower's reads: one request to the leader for all of them."""
        leader = sync._getLeader()
        transport = self._transport
        if leader is None or transport is None:
            for waiter in waiting:
                waiter(None, REFUSED, "no leader known")
            return
        request_id = next(self._ask_ids)
        if not transport.send(leader, {"type": "read_index", "id": request_id}):
            for waiter in waiting:
                waiter(None, REFUSED, "not connected to the leader")
            return
        self._asked[request_id] = (waiting, now + self._rounds.timeout_s)

    def _expire_asked(self, now: float) -> None:
        for request_id, (waiting, deadline) in list(self._asked.items()):
            if now > deadline:
                del self._asked[request_id]
                for waiter in waiting:
                    waiter(None, UNAVAILABLE, "the leader did not confirm a read index in time")

    def _replier(self, node: Any, request_id: int) -> Waiter:
        """A waiter that answers a follower's request (tick thread)."""
        transport = self._transport

        def reply(index: int | None, kind: str | None, why: str | None) -> None:
            if transport is not None:
                transport.send(node, {"type": "read_index_reply", "id": request_id, "index": index,
                                      "kind": kind, "why": why})
        return reply

    def _on_read_message(self, node: Any, message: dict[str, Any]) -> None:
        """``read_index`` from a follower, or the leader's ``read_index_reply`` (tick thread)."""
        request_id = message.get("id")
        if not isinstance(request_id, int):
            return
        if message.get("type") == "read_index":
            if len(self._asked_by) < _ASKED_BY_MAX:
                self._asked_by.append((node, request_id))
            return
        asked = self._asked.pop(request_id, None)
        if asked is None:
            return
        index, kind, why = message.get("index"), message.get("kind"), message.get("why")
        for waiter in asked[0]:
            if kind is None and isinstance(index, int):
                waiter(index, None, None)
            else:
                waiter(None, kind if kind in (REFUSED, UNAVAILABLE) else UNAVAILABLE, str(why))

    def _settle_applied(self, applied: int) -> None:
        """Confirmed reads whose index this replica applied: answered through
        the bridge, after every apply it carried before them (tick thread)."""
        ready = [answer for index, answer in self._apply_waits if index <= applied]
        if ready:
            self._apply_waits = [(index, answer) for index, answer in self._apply_waits if index > applied]
            for answer in ready:
                answer()

    def _on_state_changed(self, old: int, new: int) -> None:
        if self._bridge is not None:
            self._bridge.post(("role", _ROLES.get(new, "follower")))

    def _serialize(self, path: str, data: Any) -> None:
        """pysyncobj's snapshot hook (tick thread): FSM state at the compaction
        point, taken on the loop, written with our codec and fsynced."""
        now = time.monotonic()
        if now < self._snapshot_retry_at:
            self.snapshots_deferred += 1
            raise EngineError("snapshot deferred after a failure")  # pysyncobj counts it failed, cheaply
        try:
            self._write_snapshot(path, data)
        except Exception as exc:
            self.snapshot_failures += 1
            backoff_s = min(60.0, 2.0 ** (self.snapshot_failures - 1))
            self._snapshot_retry_at = time.monotonic() + backoff_s
            log.error("snapshot failed (%s: %s); the next try in %.0f s", type(exc).__name__, exc, backoff_s)
            raise
        self.snapshots += 1
        self.snapshot_failures = 0

    def _write_snapshot(self, path: str, data: Any) -> None:
        last, prev, cluster = data
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        self._bridge.post(("snapshot", future))
        fsm_blob = future.result(timeout=self.snapshot_timeout_s)
        record = {
            "v": 1,
            "last": [bytes(last[0]), last[1], last[2]],
            "prev": [bytes(prev[0]), prev[1], prev[2]],
            "cluster": sorted(self._identity_of(node.id) for node in cluster),
            "fsm": fsm_blob,
            "applied_index": last[1],
        }
        write_file_durably(path, encode_record(record))

    def _deserialize(self, path: str) -> tuple[Any, Any, Any]:
        """pysyncobj's snapshot loader (tick thread)."""
        with open(path, "rb") as f:
            record = decode_record(f.read())
        last = (bytes(record["last"][0]), record["last"][1], record["last"][2])
        prev = (bytes(record["prev"][0]), record["prev"][1], record["prev"][2])
        self._keep_journal_tail(prev)
        self._bridge.post(("restore", record["fsm"], record["applied_index"]))
        return last, prev, {TCPNode(self._dial_of(address)) for address in record["cluster"]}

    def _keep_journal_tail(self, prev: tuple[bytes, int, int]) -> None:
        """pysyncobj clears the journal unless it starts with the snapshot's two
        entries; a crash between snapshot and compaction would lose the tail.
        Trim the head ourselves so the journal starts where the snapshot ends."""
        journal = self._journal
        if journal is None or len(journal) < 2:
            return
        first = journal[0][1]
        position = prev[1] - first
        if 0 < position < len(journal) - 1 and tuple(journal[position]) == prev:
            journal.deleteEntriesTo(position)

    # -- loop side ---------------------------------------------------------------------------

    def submit(self, blob: bytes, done: Done) -> None:
        sync = self._sync
        if sync is None or not self._healthy:
            done(Failure.NO_LEADER)
            return
        bridge = self._bridge

        def callback(result: Any, error: int) -> None:
            reason = None if error == FAIL_REASON.SUCCESS else _FAILURES.get(error, Failure.UNKNOWN)
            bridge.post(("done", done, reason))

        sync.submit(blob, callback)
        notifier = self._notifier
        if notifier is not None:
            notifier.notify()

    async def read_index(self) -> int:
        """``coordinator.ports.ConfirmsReads``: see ``cluster.read_index`` and
        cluster/design.md. Loop thread."""
        sync, bridge = self._sync, self._bridge
        if sync is None or bridge is None or not self._healthy:
            raise ReadIndexRefused("the raft engine is not running")
        future: asyncio.Future[tuple[int | None, str | None, str | None]] = (
            asyncio.get_running_loop().create_future())

        def settle(answer: tuple[int | None, str | None, str | None]) -> None:
            if not future.done():
                future.set_result(answer)

        def finish(index: int | None, kind: str | None, why: str | None) -> None:  # tick thread
            if kind is None and index is not None:
                self._apply_waits.append((index, lambda: bridge.post(("done", settle, (index, None, None)))))
            else:
                bridge.post(("done", settle, (None, kind, why)))

        self._rounds.request(finish)
        notifier = self._notifier
        if notifier is not None:
            notifier.notify()
        try:
            async with asyncio.timeout(self._read_timeout_s):
                index, kind, why = await future
        except TimeoutError:
            raise Unavailable(f"no read index within {self._read_timeout_s:g} s", retry_after_s=0.5) from None
        if kind == REFUSED:
            raise ReadIndexRefused(f"no ReadIndex read: {why}", retry_after_s=0.2)
        if index is None:
            raise Unavailable(f"read not confirmed: {why}", retry_after_s=0.5)
        return index

    @property
    def read_rounds(self) -> int:
        """ReadIndex rounds this node started as leader."""
        return self._rounds.rounds

    def status(self) -> EngineStatus:
        sync = self._sync
        if sync is None:
            term, commit, members = self._last_seen if self.halted is not None else (0, 0, (self.address,))
            return EngineStatus(node=self.address, role="stopped", leader=None, term=term, commit_index=commit,
                                applied_index=self._bridge.applied_index if self._bridge else 0, members=members,
                                healthy=False, problem=self.halted or self._problem or "stopped")
        leader = sync._getLeader()
        dialed = sorted(node.id for node in sync.otherNodes)
        others = [self._identity_of(n) for n in dialed]
        connected = tuple(self._identity_of(n) for n in dialed if sync.isNodeConnected(TCPNode(n)))
        return EngineStatus(
            node=self.address,
            role=_ROLES.get(sync._SyncObj__raftState, "follower"),
            leader=self._identity_of(leader.id) if leader is not None else None,
            term=sync.raftCurrentTerm,
            commit_index=sync.raftCommitIndex,
            applied_index=self._bridge.applied_index if self._bridge else 0,
            members=tuple(sorted([self.address, *others])),
            healthy=self._healthy,
            problem=self._problem,
            connected=connected,
        )

    def on_role_change(self, listener: Callable[[str], None]) -> None:
        self._role_listeners.append(listener)

    def _dial_of(self, identity: str) -> str:
        return self._dial.get(identity, identity)

    def _identity_of(self, dialed: str) -> str:
        return self._identity.get(dialed, dialed)

    def _notify_role(self, role: str) -> None:
        for listener in self._role_listeners:
            listener(role)

    async def add_member(self, address: str) -> None:
        await self._change_membership("addNodeToCluster", address)

    async def remove_member(self, address: str) -> None:
        await self._change_membership("removeNodeFromCluster", address)

    async def _change_membership(self, method: str, address: str) -> None:
        sync = self._sync
        if sync is None:
            raise Unavailable("engine is stopped")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()

        def callback(result: Any, error: int) -> None:
            reason = None if error == FAIL_REASON.SUCCESS else _FAILURES.get(error, Failure.UNKNOWN)
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(reason))

        getattr(sync, method)(self._dial_of(address), callback=callback)
        if self._notifier is not None:
            self._notifier.notify()
        async with asyncio.timeout(10):
            reason = await future
        if reason is not None:
            raise Unavailable(f"membership change refused: {reason}")

    # -- quorum contact (coordinator.ports.KnowsQuorumContact) ------------------------------

    def quorum_contact_age_s(self) -> float | None:
        """Seconds since a majority (this node counted) last answered this
        leader, from the per-follower response times pysyncobj keeps for its
        ``leaderFallbackTimeout``; None unless this node leads. Loop thread."""
        sync = self._sync
        if sync is None or not sync._isLeader():
            return None
        # The tick thread writes both; copying a dict or set is one step under the GIL.
        answered = sync._SyncObj__lastResponseTime.copy()
        voters = sync._SyncObj__otherNodes.copy()
        needed = (len(voters) + 1) // 2  # followers that make a majority with this node
        if needed == 0:
            return 0.0
        latest = sorted((answered.get(node, float("-inf")) for node in voters), reverse=True)
        # pysyncobj's clock (CLOCK_MONOTONIC_RAW on Linux), not time.monotonic
        return max(0.0, _pysyncobj.monotonicTime() - latest[needed - 1])

    # -- health of the apply loop -------------------------------------------------------------

    async def _watch_apply_loop(self) -> None:
        seen_applied = -1
        changed_at = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            self.watch_rounds += 1
            sync = self._sync
            if sync is None:
                continue
            applied, commit = sync.raftLastApplied, sync.raftCommitIndex
            now = time.monotonic()
            if applied != seen_applied:
                seen_applied, changed_at = applied, now
            problem = None
            if not sync.tick_thread_alive():
                problem = "raft tick thread died"
            elif commit > applied and now - changed_at > self.stall_timeout_s:
                problem = f"apply stalled at index {applied} while the commit index is {commit}"
            if problem is not None:
                index, rebuilds = self._stalled_at
                rebuilds = rebuilds + 1 if index == applied else 1
                self._stalled_at = (applied, rebuilds)
                if rebuilds > self.rebuilds_max:
                    # The same stall after every rebuild: deterministic. Rebuilding
                    # again would replay into it forever; halt and say so instead.
                    self._halt(f"{problem}, again after {self.rebuilds_max} rebuilds")
                    continue
                await self._recover(problem)
                seen_applied, changed_at = -1, time.monotonic()
            elif not self._healthy and commit - applied <= 1:
                log.warning("raft engine recovered (generation %d)", self.generation)
                self._healthy, self._problem = True, None

    async def _recover(self, problem: str) -> None:
        """Rebuild the SyncObj from journal and snapshot; the FSM replays.
        Never for a halted engine."""
        if self.halted is not None:
            return
        log.error("raft engine unhealthy: %s; rebuilding from the journal", problem)
        self._healthy, self._problem = False, problem
        old = self._sync
        self._sync = None
        if old is not None:
            await asyncio.to_thread(self._destroy, old)
        self.generation += 1
        self.recoveries += 1
        self._bridge.post(("reset",))
        self._sync = self._make_sync()
        await asyncio.to_thread(self._sync.waitBinded)


    # -- halting (see the module docstring) ----------------------------------------------------

    def _halt(self, problem: str) -> None:
        """Leave consensus for good: no later entry reaches the FSM, the SyncObj
        is destroyed (no vote, no leadership, no snapshot of the broken state),
        role listeners hear "stopped". Idempotent; loop thread."""
        if self.halted is not None:
            return
        self.halted = problem
        self._healthy, self._problem = False, problem
        if self._bridge is not None:
            self._bridge.halt(problem)
        sync, self._sync = self._sync, None  # submit and status see it at once
        if sync is not None:
            others = sorted(self._identity_of(node.id) for node in sync.otherNodes)
            self._last_seen = (sync.raftCurrentTerm, sync.raftCommitIndex, tuple(sorted([self.address, *others])))
        self._halting = asyncio.get_running_loop().create_task(self._leave(sync), name="raft-halt")

    async def _leave(self, sync: _ReplicatedLog | None) -> None:
        if sync is not None:
            await asyncio.to_thread(self._destroy, sync)
        log.critical("raft engine halted: %s; the node stays up to report it and refuses reads and writes; "
                     "restart it to replay from the journal and snapshot", self.halted)
        self._notify_role("stopped")
