"""The guards the raft engine adds to pysyncobj, each shown failing without it.

These drive pysyncobj's real Raft code in-process with a recording transport
(no sockets, no tick thread) so each step is exact.
"""

from __future__ import annotations

import os

import pytest
from pysyncobj import SyncObj, SyncObjConf
from pysyncobj.transport import TCPTransport, Transport

from cluster import raft_pysyncobj as raft
from cluster.errors import MissingSecret
from cluster.journal import DurableJournal
from coordinator.codec import encode_record
from coordinator.services.applier import Applier

ME, B, C = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"


class RecordingTransport(Transport):
    def __init__(self) -> None:
        super().__init__(None, None, None)
        self.sent: list[tuple[str, dict]] = []

    def send(self, node, message) -> bool:
        self.sent.append((node.id, message))
        return True


def _node(journal_file) -> tuple[SyncObj, RecordingTransport]:
    transport = RecordingTransport()
    conf = SyncObjConf(autoTick=False, journalFile=journal_file)
    return SyncObj(ME, [B, C], conf=conf, transport=transport), transport


def _durable_path(tmp_path) -> raft._JournalPath:
    path = raft._JournalPath(str(tmp_path / "raft.journal"))
    path.durability = "fsync"
    path.journal = None
    return path


def _request_vote(node: SyncObj, candidate: str, term: int) -> None:
    message = {"type": "request_vote", "term": term, "last_log_index": 1, "last_log_term": 0}
    node._SyncObj__onMessageReceived(_tcp_node(candidate), message)


def _tcp_node(address: str):
    from pysyncobj.node import TCPNode

    return TCPNode(address)


def _votes(transport: RecordingTransport) -> list[str]:
    return [node for node, message in transport.sent if message["type"] == "response_vote"]


@pytest.mark.parametrize("durable", [True, False], ids=["durable-journal", "pysyncobj-memory-journal"])
def test_a_restarted_node_does_not_vote_twice_in_a_term(tmp_path, durable) -> None:
    """Vote for B in term 5, crash, restart: C must not get a vote in term 5.
    With pysyncobj's in-memory journal the restarted node votes again: two
    leaders could be elected in one term."""
    path = _durable_path(tmp_path) if durable else None
    node, transport = _node(path)
    _request_vote(node, B, 5)
    assert _votes(transport) == [B]
    if durable:
        path.journal._destroy()  # the process dies; nothing else is flushed

    path = _durable_path(tmp_path) if durable else None
    restarted, transport = _node(path)
    _request_vote(restarted, C, 5)
    if durable:
        path.journal._destroy()
    if durable:
        assert restarted.raftCurrentTerm == 5
        assert _votes(transport) == []
    else:
        assert _votes(transport) == [C]  # the defect the durable journal removes


def test_no_message_leaves_before_the_journal_is_synced(tmp_path, monkeypatch) -> None:
    journal = DurableJournal(str(tmp_path / "raft.journal"))
    monkeypatch.setattr(journal, "_destroy", journal._destroy)
    journal.add(b"entry", 1, 1)
    seen = []
    monkeypatch.setattr(TCPTransport, "send", lambda self, node, message: seen.append(journal.dirty) or True)
    transport = object.__new__(raft._SyncingTransport)
    transport._journal = journal
    transport._relays = {}
    transport.send(_tcp_node(B), {"type": "next_node_idx"})
    journal.add(b"entry-2", 2, 1)
    transport.send(_tcp_node(B), {"type": "response_vote"})
    journal.add(b"entry-3", 3, 1)
    transport.send(_tcp_node(B), {"type": "append_entries"})  # the leader's own appends may go first
    journal._destroy()
    assert seen == [False, False, True]
    assert journal.syncs == 3 and journal.synced_len == 3


def _relaying_transport(tmp_path, monkeypatch) -> tuple[raft._SyncingTransport, DurableJournal, list]:
    journal = DurableJournal(str(tmp_path / "raft.journal"))
    sent: list[tuple[str, dict, bool]] = []
    monkeypatch.setattr(TCPTransport, "send",
                        lambda self, node, message: sent.append((node.id, message, journal.dirty)) or True)
    transport = object.__new__(raft._SyncingTransport)
    transport._journal = journal
    transport._relays = {}
    transport._relay_batch_bytes = 1 << 20
    return transport, journal, sent


def test_relayed_commands_leave_batched_unsynced_and_in_link_order(tmp_path, monkeypatch) -> None:
    """A follower's relayed commands and the leader's answers acknowledge
    nothing durable: they leave without a sync (the leader used to fsync once
    per command written through a follower), batched into one frame per link
    at the end of the tick, and before any later message to the same node."""
    transport, journal, sent = _relaying_transport(tmp_path, monkeypatch)
    journal.add(b"entry", 1, 1)
    for request in (1, 2):
        transport.send(_tcp_node(B), {"type": "apply_command_response", "request_id": request, "log_idx": request})
    transport.send(_tcp_node(C), {"type": "apply_command", "command": b"x", "request_id": 7})
    assert sent == [] and journal.syncs == 0
    transport.send(_tcp_node(B), {"type": "next_node_idx", "success": True})  # flushes B's relays first
    assert [(node, message["type"]) for node, message, _ in sent] == [(B, "relay_batch"), (B, "next_node_idx")]
    assert [m["request_id"] for m in sent[0][1]["messages"]] == [1, 2]
    assert sent[0][2] is True and sent[1][2] is False  # the relay went unsynced, the acknowledgement synced
    transport.flush_relays()  # end of tick: C's single relay goes as itself
    assert sent[2][:2] == (C, {"type": "apply_command", "command": b"x", "request_id": 7})
    transport.flush_relays()
    assert len(sent) == 3
    journal._destroy()


def test_a_relay_batch_delivers_only_relays_in_order(tmp_path, monkeypatch) -> None:
    transport, journal, _ = _relaying_transport(tmp_path, monkeypatch)
    got = []
    monkeypatch.setattr(TCPTransport, "_onMessageReceived", lambda self, node, message: got.append(message))
    relays = [{"type": "apply_command", "command": b"a"}, {"type": "apply_command_response", "request_id": 1}]
    smuggled = [{"type": "next_node_idx", "success": True}, "garbage", None]
    transport._onMessageReceived(_tcp_node(B), {"type": "relay_batch", "messages": relays + smuggled})
    transport._onMessageReceived(_tcp_node(B), {"type": "relay_batch", "messages": "not a list"})
    assert got == relays
    journal._destroy()


def test_snapshot_load_keeps_the_journal_tail(tmp_path) -> None:
    """A crash after writing a snapshot but before compacting the journal:
    pysyncobj would clear the journal unless it starts with the snapshot's
    entries. The engine trims the head so entries after the snapshot stay."""
    engine = raft.PySyncObjEngine(node_id="n1", address=ME, peers=[B, C], data_dir=str(tmp_path),
                                  secret="s" * 32, fsm=Applier())
    journal = DurableJournal(str(tmp_path / "raft.journal"))
    for i in range(1, 11):
        journal.add(f"c{i}".encode(), i, 1)
    engine._journal = journal
    engine._keep_journal_tail((b"c5", 5, 1))
    journal._destroy()
    assert journal[0] == (b"c5", 5, 1)
    assert [e[1] for e in journal] == [5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("secret", ["", "short"])
def test_the_raft_port_needs_a_secret(tmp_path, secret) -> None:
    with pytest.raises(MissingSecret):
        raft.PySyncObjEngine(node_id="n1", address=ME, peers=[B, C], data_dir=str(tmp_path), secret=secret,
                             fsm=Applier())


def _append(prev: tuple[int, int], entries: list[tuple[bytes, int, int]], commit: int = 0) -> dict:
    return {"type": "append_entries", "term": 2, "commit_index": commit, "prevLogIdx": prev[0],
            "prevLogTerm": prev[1], "entries": entries}


def _log(n: int, term: int = 1) -> list[tuple[bytes, int, int]]:
    return [(f"c{i}".encode(), i, term) for i in range(1, n + 1)]


def _reject(index: int) -> dict:
    return {"type": "next_node_idx", "next_node_idx": index, "reset": True, "success": False}


def test_a_conflict_backs_the_leader_up_over_the_whole_conflicting_term() -> None:
    # 1..5 committed in term 1; 6..20 appended alone by a deposed leader in term 3
    journal = _log(5) + [(f"x{i}".encode(), i, 3) for i in range(6, 21)]
    assert raft.back_up_over_term(_reject(20), journal, commit_index=5)["next_node_idx"] == 6
    # never below the follower's commit index + 1 (committed entries match the leader's)
    assert raft.back_up_over_term(_reject(20), journal, commit_index=9)["next_node_idx"] == 10
    # two terms of divergence: one term per answer
    mixed = _log(5) + [(b"y", i, 2) for i in range(6, 9)] + [(b"z", i, 3) for i in range(9, 12)]
    assert raft.back_up_over_term(_reject(11), mixed, commit_index=5)["next_node_idx"] == 9
    assert raft.back_up_over_term(_reject(8), mixed, commit_index=5)["next_node_idx"] == 6
    # a shorter log (next = its end + 1) or nothing to skip: unchanged
    short = _reject(21)
    assert raft.back_up_over_term(short, journal, commit_index=5) is short
    at_commit = _reject(6)
    assert raft.back_up_over_term(at_commit, journal, commit_index=5) is at_commit
    assert raft.back_up_over_term(_reject(3), [], commit_index=0)["next_node_idx"] == 3


def test_re_sent_entries_do_not_truncate_a_matching_log() -> None:
    journal = _log(10)
    # entries 4..6 again, as after a nextIndex reset: all match and we hold more: nothing to do
    assert raft.trim_append_entries(_append((3, 1), journal[3:6]), journal) is None
    # 4..12 with 11, 12 new: deliver only the new part, after entry 10
    new = [(b"c11", 11, 2), (b"c12", 12, 2)]
    trimmed = raft.trim_append_entries(_append((3, 1), journal[3:10] + new), journal)
    assert (trimmed["prevLogIdx"], trimmed["prevLogTerm"], trimmed["entries"]) == (10, 1, new)
    # a conflict at 6 (another term): deliver from the conflict, so pysyncobj truncates from 6 as Raft does
    conflicting = [(b"c4", 4, 1), (b"c5", 5, 1), (b"x6", 6, 2)]
    trimmed = raft.trim_append_entries(_append((3, 1), conflicting), journal)
    assert (trimmed["prevLogIdx"], trimmed["entries"]) == (5, [(b"x6", 6, 2)])
    # nothing known yet, heartbeats, snapshot transmissions: unchanged
    beyond = _append((10, 1), [(b"c11", 11, 2)])
    assert raft.trim_append_entries(beyond, journal) is beyond
    heartbeat = _append((10, 1), [])
    assert raft.trim_append_entries(heartbeat, journal) is heartbeat


def test_pysyncobj_keeps_the_matching_log_behind_the_guard(tmp_path) -> None:
    """Without the guard, pysyncobj drops entries 7..10 when 4..6 are re-sent."""
    path = _durable_path(tmp_path)
    node, _ = _node(path)
    leader = _tcp_node(B)
    node._SyncObj__onMessageReceived(leader, _append((1, 0), [(f"c{i}".encode(), i, 1) for i in range(2, 11)]))
    assert len(path.journal) == 10
    resent = _append((3, 1), [(f"c{i}".encode(), i, 1) for i in range(4, 7)])
    guarded = raft.trim_append_entries(resent, path.journal)
    assert guarded is None and len(path.journal) == 10
    node._SyncObj__onMessageReceived(leader, resent)  # what pysyncobj alone does with it
    assert len(path.journal) == 6
    path.journal._destroy()


class _PostedBridge:
    """Stands in for the engine's bridge to the loop: records what it is given."""

    def __init__(self) -> None:
        self.posted: list[tuple] = []

    def post(self, item: tuple) -> None:
        self.posted.append(item)


def test_an_installed_snapshot_is_on_disk_before_the_journal_is_cleared_and_the_install_acknowledged(
        tmp_path, monkeypatch) -> None:
    """A follower far behind gets the leader's snapshot in chunks; pysyncobj
    writes it to a temporary file, renames it into place, loads it, clears the
    journal and acknowledges. Before the journal loses its entries and before
    the leader can count the install, the snapshot's data and its rename must
    be on disk: fsync of the file, then of the directory. (Without the
    engine's durable rename there was neither.)"""
    engine = raft.PySyncObjEngine(node_id="n1", address=ME, peers=[B, C], data_dir=str(tmp_path),
                                  secret="s" * 32, fsm=Applier())
    engine._bridge = _PostedBridge()
    journal_path = _durable_path(tmp_path)
    conf = engine._conf(journal_path)
    conf.autoTick = False
    transport = RecordingTransport()
    node = SyncObj(ME, [B, C], conf=conf, transport=transport)
    engine._journal = journal = journal_path.journal
    leader = _tcp_node(B)
    node._SyncObj__onMessageReceived(leader, _append((1, 0), [(f"c{i}".encode(), i, 1) for i in range(2, 5)]))
    assert len(journal) == 4

    events: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    real_clear = journal.clear
    monkeypatch.setattr(journal, "clear", lambda: events.append(("clear", "")) or real_clear())
    real_send = transport.send
    monkeypatch.setattr(transport, "send", lambda node_, message: events.append(("send", message["type"]))
                        or real_send(node_, message))

    snapshot = encode_record({"v": 1, "last": [b"c20", 20, 2], "prev": [b"c19", 19, 2], "cluster": [ME, B, C],
                              "fsm": Applier().snapshot(), "applied_index": 20})
    half = len(snapshot) // 2
    for chunk in ((snapshot[:half], True, False), (snapshot[half:], False, False), (b"", False, True)):
        node._SyncObj__onMessageReceived(leader, {"type": "append_entries", "term": 2, "commit_index": 20,
                                                  "serialized": chunk})

    snapshot_file = str(tmp_path / "raft.snapshot")
    with open(snapshot_file, "rb") as f:
        assert f.read() == snapshot
    assert [(e[1], e[2]) for e in journal] == [(19, 2), (20, 2)]  # the journal now starts at the snapshot
    assert ("restore", Applier().snapshot(), 20) in engine._bridge.posted
    received = ("fsync", snapshot_file + ".1.tmp")  # the file as received, before its rename
    assert received in events, f"the received snapshot was never fsynced: {events}"
    file_synced = events.index(received)
    assert ("fsync", str(tmp_path)) in events[file_synced:], f"the directory was not fsynced after it: {events}"
    dir_synced = events.index(("fsync", str(tmp_path)), file_synced)
    cleared = events.index(("clear", ""))
    acknowledged = events.index(("send", "next_node_idx"))
    assert file_synced < dir_synced < cleared < acknowledged, events
    journal._destroy()
