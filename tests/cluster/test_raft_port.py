"""The Raft port's bounded reading: frames are capped before they can be
authenticated, buffered without quadratic copies, and read a budget at a time.

``FrameReader`` is tested on its own; ``_BoundedConnection`` over a real
socket pair driven by pysyncobj's poller, with our wire: msgpack messages,
many to a frame, one FrameBox seal per frame, frames numbered per
connection (no pickle anywhere).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import CONNECTION_STATE, TcpConnection

from cluster import raft_pysyncobj as raft
from cluster.errors import FrameRefused
from coordinator import crypto
from coordinator.codec import pack_wire
from coordinator.errors import InvalidInput

SECRET = "k" * 32
BOX = crypto.FrameBox(crypto.derived_key(SECRET, crypto.KEY_RAFT_WIRE))


def _frame(body: bytes) -> bytes:
    return struct.pack("i", len(body)) + body


def test_frames_arriving_in_pieces_come_out_whole_and_in_order() -> None:
    reader = raft.FrameReader(1000)
    stream = _frame(b"first") + _frame(b"") + _frame(b"x" * 300)
    frames = []
    for i in range(len(stream)):  # one byte at a time
        reader.feed(stream[i:i + 1])
        while (frame := reader.next_frame()) is not None:
            frames.append(frame)
    assert frames == [_frame(b"first"), _frame(b""), _frame(b"x" * 300)]
    assert len(reader) == 0


@pytest.mark.parametrize("declared", [1001, 2**31 - 1, -1, -(2**31)])
def test_a_declared_length_over_the_cap_or_negative_is_refused_before_the_frame_is_buffered(declared) -> None:
    reader = raft.FrameReader(1000)
    reader.feed(_frame(b"ok"))
    assert reader.next_frame() == _frame(b"ok")
    with pytest.raises(FrameRefused, match=f"{declared} bytes declared, at most 1000"):
        reader.feed(struct.pack("i", declared)[:3] + struct.pack("i", declared)[3:] + b"\x00" * 10)
    with pytest.raises(FrameRefused):
        reader.next_frame()


def test_a_frame_behind_a_complete_one_is_checked_when_it_comes_up() -> None:
    reader = raft.FrameReader(100)
    reader.feed(_frame(b"a" * 10) + struct.pack("i", 5000))  # the head frame is fine
    assert reader.next_frame() == _frame(b"a" * 10)
    with pytest.raises(FrameRefused):
        reader.next_frame()


def test_the_cap_may_be_raised_between_frames() -> None:
    reader = raft.FrameReader(16)
    reader.feed(_frame(b"key"))
    assert reader.next_frame() == _frame(b"key")
    reader.frame_max_bytes = 1 << 20
    big = b"y" * 100_000
    reader.feed(_frame(big))
    assert reader.next_frame() == _frame(big)


def test_a_large_frame_in_small_pieces_costs_linear_time() -> None:
    """16 MiB in 4 KiB pieces: with bytes concatenation (pysyncobj) that copies
    ~32 GiB; the growable buffer copies each byte a bounded number of times."""
    piece = b"z" * 4096
    count = 4096
    reader = raft.FrameReader(len(piece) * count)
    started = time.monotonic()
    reader.feed(struct.pack("i", len(piece) * count))
    for _ in range(count):
        reader.feed(piece)
    frame = reader.next_frame()
    assert frame is not None and len(frame) == 4 + len(piece) * count
    assert time.monotonic() - started < 5, "buffering grew quadratically"


def test_relays_are_split_so_no_frame_outgrows_the_batch() -> None:
    batch = [{"type": "apply_command", "command": b"c" * 400, "request_id": i} for i in range(10)]
    batch.insert(3, {"type": "apply_command_response", "request_id": 99, "log_idx": 5})
    parts = raft.split_relays(batch, 1000)
    assert [m for part in parts for m in part] == batch  # nothing lost, order kept
    assert all(sum(64 + len(m.get("command", b"")) for m in part) <= 1000 for part in parts)
    assert raft.split_relays([{"type": "apply_command", "command": b"c" * 5000}], 1000) == \
        [[{"type": "apply_command", "command": b"c" * 5000}]]  # one oversized message still goes, alone


# -- a connection over a real socket pair ------------------------------------------------------


class _Link:
    """A ``_BoundedConnection`` on one end of a socket pair (as accepted by the
    port), the test's raw socket on the other, pysyncobj's poller between."""

    def __init__(self, frame_max_bytes: int = 1 << 20, *, plain: bool = False,
                 accepted: tuple[crypto.FrameBox, ...] = ()) -> None:
        self.poller = createPoller("auto")
        ours, self.theirs = socket.socketpair()
        ours.setblocking(False)
        self.refused: list[str] = []
        self.received: list = []
        if plain:  # pysyncobj's own connection, to show what the bounded one changes
            self.conn = TcpConnection(poller=self.poller, socket=ours, timeout=30.0)
        else:
            self.conn = raft._BoundedConnection(poller=self.poller, socket=ours, timeout=30.0,
                                                frame_max_bytes=frame_max_bytes, on_refused=self.refused.append,
                                                box=BOX, accepted=accepted)
        self.conn.setOnMessageReceivedCallback(self.received.append)
        self.seq = 0  # the next frame number the test's side sends

    def pump(self, until, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not until() and time.monotonic() < deadline:
            self.poller.poll(0.05)
        assert until(), "the condition did not come about in time"

    def close(self) -> None:
        self.conn.disconnect()
        self.theirs.close()


def _sealed(message, seq: int = 0, box: crypto.FrameBox = BOX) -> bytes:
    """Frame number ``seq`` holding ``message`` as a peer knowing the secret sends it."""
    return _frame(box.seal(pack_wire(seq) + pack_wire(message)))


@pytest.fixture
def link():
    made = _Link()
    yield made
    made.close()


def test_a_stranger_declaring_a_huge_frame_is_disconnected_at_once(link) -> None:
    link.theirs.sendall(struct.pack("i", 2**31 - 1) + b"\x00" * 1000)
    link.pump(lambda: link.conn.state == CONNECTION_STATE.DISCONNECTED)
    assert link.refused and "before authentication" in link.refused[0]
    assert link.theirs.recv(1) == b""  # the stranger sees the connection closed


def test_pysyncobj_alone_keeps_buffering_a_strangers_huge_frame() -> None:
    """The defect: pysyncobj's connection takes a declared 2 GiB frame and
    buffers whatever follows, waiting for the frame to complete."""
    link = _Link(plain=True)
    try:
        link.theirs.sendall(struct.pack("i", 2**31 - 1) + b"\x00" * 1000)
        link.pump(lambda: len(link.conn._TcpConnection__readBuffer) == 1004)
        assert link.conn.state == CONNECTION_STATE.CONNECTED
    finally:
        link.close()


def test_before_authentication_even_a_batch_sized_frame_is_refused(link) -> None:
    """The first frame on a connection is a 32-byte key: a stranger cannot make
    the node buffer more than ``HANDSHAKE_FRAME_MAX_BYTES`` for it."""
    link.theirs.sendall(struct.pack("i", raft.HANDSHAKE_FRAME_MAX_BYTES + 1))
    link.pump(lambda: link.conn.state == CONNECTION_STATE.DISCONNECTED)
    assert link.refused


def test_a_complete_frame_that_does_not_decrypt_is_refused(link) -> None:
    link.theirs.sendall(_frame(b"\x80" * 5000))
    link.pump(lambda: link.conn.state == CONNECTION_STATE.DISCONNECTED)
    assert link.refused == ["a first frame that does not verify with the cluster secret"]
    assert link.received == []


def test_a_peer_with_the_secret_authenticates_and_may_then_send_large_frames(link) -> None:
    link.theirs.sendall(_sealed(b"k" * 32))
    link.pump(lambda: link.received == [b"k" * 32])
    assert link.conn.authenticated
    big = {"type": "append_entries", "entries": ((os.urandom(200_000), 1, 1),)}  # arrays arrive as tuples
    sealed = _sealed(big, 1)
    assert len(sealed) > raft.HANDSHAKE_FRAME_MAX_BYTES
    sender = threading.Thread(target=link.theirs.sendall, args=(sealed,))  # more than the socket buffers hold
    sender.start()
    link.pump(lambda: len(link.received) == 2)
    sender.join(5)
    assert link.received[1] == big and link.refused == []
    assert link.conn.state == CONNECTION_STATE.CONNECTED


def test_an_authenticated_peer_still_cannot_declare_more_than_the_cap() -> None:
    link = _Link(frame_max_bytes=100_000)
    try:
        link.theirs.sendall(_sealed(b"k" * 32))
        link.pump(lambda: link.conn.authenticated)
        link.theirs.sendall(struct.pack("i", 100_001))
        link.pump(lambda: link.conn.state == CONNECTION_STATE.DISCONNECTED)
        assert link.refused and "before authentication" not in link.refused[0]
    finally:
        link.close()


def test_one_readiness_event_reads_at_most_the_budget(link, monkeypatch) -> None:
    """A sender faster than the node keeps the socket readable forever:
    pysyncobj read until the socket was empty, holding the tick thread."""
    monkeypatch.setattr(raft, "READ_BUDGET_BYTES", 4096)
    link.theirs.sendall(_sealed(b"k" * 32))
    link.pump(lambda: link.conn.authenticated)
    link.theirs.setblocking(False)
    sent = 0
    try:
        sent += link.theirs.send(struct.pack("i", 1_000_000))  # a frame the cap allows, never completed
        while sent < 500_000:
            sent += link.theirs.send(b"\x00" * 8192)
    except BlockingIOError:
        pass
    assert sent > 3 * 8192  # far more waiting than one event may read
    link.poller.poll(1.0)
    recv_size = link.conn._TcpConnection__recvBufferSize
    assert 0 < len(link.conn._reader) < 4096 + recv_size
    assert link.conn.state == CONNECTION_STATE.CONNECTED


# -- the wire: no pickle, many messages a frame, numbered frames ---------------------------------

def test_a_frame_replayed_or_out_of_order_closes_the_connection(link) -> None:
    first = _sealed(b"k" * 32, 0)
    link.theirs.sendall(first)
    link.pump(lambda: link.received == [b"k" * 32])
    link.theirs.sendall(first)  # the same frame again: a replay
    link.pump(lambda: link.conn.state == CONNECTION_STATE.DISCONNECTED)
    assert link.refused == ["frame 0 where 1 was due (replayed or reordered)"]


def test_a_frame_sealed_under_another_key_is_refused_even_after_authentication(link) -> None:
    link.theirs.sendall(_sealed(b"k" * 32, 0))
    link.pump(lambda: link.conn.authenticated)
    other = crypto.FrameBox(crypto.derived_key("another-secret-" + "x" * 20, crypto.KEY_RAFT_WIRE))
    link.theirs.sendall(_sealed({"type": "request_vote", "term": 99}, 1, other))
    link.pump(lambda: link.conn.state == CONNECTION_STATE.DISCONNECTED)
    assert link.refused == ["a frame that does not verify with the cluster secret"]
    assert link.received == [b"k" * 32]


def test_frames_under_an_accepted_secret_open_and_a_third_secret_is_still_refused() -> None:
    """A node changing the cluster secret (``accept_secret_file``) opens
    frames sealed under its own secret or the accepted one, in any order on
    one connection, and still refuses any other key."""
    accepted = crypto.FrameBox(crypto.derived_key("accepted-secret-" + "a" * 20, crypto.KEY_RAFT_WIRE))
    third = crypto.FrameBox(crypto.derived_key("third-secret-" + "t" * 20, crypto.KEY_RAFT_WIRE))
    made = _Link(accepted=(accepted,))
    try:
        made.theirs.sendall(_sealed(b"k" * 32, 0, accepted))
        made.pump(lambda: made.conn.authenticated)
        made.theirs.sendall(_sealed({"type": "x", "n": 1}, 1, BOX) + _sealed({"type": "x", "n": 2}, 2, accepted))
        made.pump(lambda: len(made.received) == 3)
        made.theirs.sendall(_sealed({"type": "x", "n": 3}, 3, third))
        made.pump(lambda: made.conn.state == CONNECTION_STATE.DISCONNECTED)
        assert made.refused == ["a frame that does not verify with the cluster secret"]
        assert [m if isinstance(m, bytes) else m["n"] for m in made.received] == [b"k" * 32, 1, 2]
    finally:
        made.close()


def test_a_message_of_another_connection_is_refused(link) -> None:
    """pysyncobj's handshake on top: once this side chose its random key, every
    message must carry it (a frame recorded on another connection does not)."""
    link.theirs.sendall(_sealed(b"k" * 32, 0))
    link.pump(lambda: link.conn.authenticated)
    link.conn.recvRandKey = b"r" * 32
    link.theirs.sendall(_sealed((b"s" * 32, {"type": "append_entries"}), 1))
    link.pump(lambda: link.conn.state == CONNECTION_STATE.DISCONNECTED)
    assert link.refused == ["a message without this connection's key (from another connection)"]


def test_queued_messages_leave_as_one_frame_and_arrive_in_order() -> None:
    poller = createPoller("auto")
    left, right = socket.socketpair()
    for sock in (left, right):
        sock.setblocking(False)
    got: list = []
    sender = raft._BoundedConnection(poller=poller, socket=left, timeout=30.0, frame_max_bytes=1 << 20,
                                     on_refused=pytest.fail, box=BOX)
    receiver = raft._BoundedConnection(poller=poller, socket=right, timeout=30.0, frame_max_bytes=1 << 20,
                                       on_refused=pytest.fail, box=BOX)
    receiver.setOnMessageReceivedCallback(got.append)
    try:
        messages = [{"type": "append_entries", "term": 2, "entries": ((os.urandom(50), i, 2),)} for i in range(10)]
        for message in messages:
            sender.send(message)
        assert sender.frames_sent == 0  # queued until flushed
        sender.flush()
        assert sender.frames_sent == 1 and sender.messages_sent == 10
        deadline = time.monotonic() + 5
        while len(got) < 10 and time.monotonic() < deadline:
            poller.poll(0.05)
        # arrays come back as tuples (pysyncobj compares log entries as tuples)
        assert got == messages and isinstance(got[0]["entries"][0], tuple)
        with pytest.raises(InvalidInput):
            sender.send({"type": "x", "object": object()})  # only plain data travels: never pickle
    finally:
        sender.disconnect()
        receiver.disconnect()


def test_frames_stay_under_what_the_peer_accepts() -> None:
    poller = createPoller("auto")
    left, right = socket.socketpair()
    left.setblocking(False)
    sender = raft._BoundedConnection(poller=poller, socket=left, timeout=30.0, frame_max_bytes=200_000,
                                     on_refused=pytest.fail, box=BOX)
    sizes: list[int] = []
    seal = sender._seal
    sender._seal = lambda batch: sizes.append(len(frame := seal(batch))) or frame  # type: ignore[method-assign]
    try:
        for i in range(20):  # 400 KB of commands, queued in one tick
            sender.send({"type": "apply_command", "command": os.urandom(20_000), "request_id": i})
        sender.flush()
        assert sender.messages_sent == 20 and len(sizes) >= 2
        assert all(size - 4 <= 200_000 for size in sizes), sizes  # the peer's FrameReader accepts each
    finally:
        sender.disconnect()
        right.close()
