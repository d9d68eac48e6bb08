"""The durable journal: what survives a restart, a torn write, damage."""

from __future__ import annotations

import os
import struct

import pytest

from cluster.errors import JournalCorrupt
from cluster.journal import DurableJournal, frame


@pytest.fixture
def opened():
    """Open journals through this, so every file handle is closed at the end."""
    journals: list[DurableJournal] = []

    def open_journal(path, **kwargs) -> DurableJournal:
        journal = DurableJournal(str(path), **kwargs)
        journals.append(journal)
        return journal

    yield open_journal
    for journal in journals:
        if not journal._file.closed:
            journal._file.close()


def _fill(journal: DurableJournal, count: int, term: int = 1) -> None:
    for i in range(1, count + 1):
        journal.add(f"cmd-{i}".encode(), i, term)


def test_entries_term_and_vote_survive_reopen(opened, tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    journal = opened(path)
    _fill(journal, 5)
    journal.setCurrentTerm(7, "127.0.0.1:7102")
    journal.sync()
    journal._destroy()

    again = opened(path)
    assert [e[1] for e in again] == [1, 2, 3, 4, 5]
    assert again[4] == (b"cmd-5", 5, 1)
    assert again.getCurrentTerm() == 7
    assert again.getVotedForNodeId() == "127.0.0.1:7102"


def test_term_and_vote_are_on_disk_when_set_current_term_returns(opened, tmp_path) -> None:
    """No sync, no destroy: a process killed right after the call keeps the vote."""
    path = str(tmp_path / "raft.journal")
    journal = opened(path)
    journal.setCurrentTerm(3, "n2")
    reader = opened(path)  # a second open sees what a restart would see
    assert (reader.getCurrentTerm(), reader.getVotedForNodeId()) == (3, "n2")


def test_sync_is_group_commit(opened, tmp_path) -> None:
    journal = opened(tmp_path / "raft.journal")
    _fill(journal, 10)
    assert journal.dirty and journal.synced_len == 0
    journal.sync()
    journal.sync()
    assert journal.syncs == 1 and not journal.dirty and journal.synced_len == 10


def test_torn_tail_is_cut_off(opened, tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    journal = opened(path)
    _fill(journal, 3)
    journal.sync()
    journal._destroy()
    with open(path, "ab") as f:  # a crash in the middle of writing record 4
        f.write(b"\x30\x00\x00\x00\x01\x02")
    again = opened(path)
    assert len(again) == 3
    again.add(b"cmd-4", 4, 1)
    again.sync()
    again._destroy()
    assert [e[1] for e in opened(path)] == [1, 2, 3, 4]


def test_damage_before_the_tail_refuses_to_open(opened, tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    journal = opened(path)
    _fill(journal, 4)
    journal.sync()
    offset = journal._offsets[1]
    journal._destroy()
    with open(path, "r+b") as f:
        f.seek(offset + 20)  # inside record 2's payload
        f.write(b"\xff")
    with pytest.raises(JournalCorrupt):
        DurableJournal(path)


def _length_field(data: bytes, offset: int, payload_length: int) -> int:
    """Where the record at ``offset`` stores its payload length (either format)."""
    position = data.find(struct.pack("<I", payload_length), offset, offset + 8)
    assert position >= 0, "no length field at the record's start"
    return position


@pytest.mark.parametrize("flip", [(3, 0x80), (0, 0x01)], ids=["length-made-huge", "length-off-by-one"])
def test_a_damaged_length_in_the_middle_refuses_to_open(opened, tmp_path, flip) -> None:
    """A flipped bit in a middle record's length: it used to read as a torn
    tail (a length past the end of the file) and cut entries 3..6 off."""
    path = str(tmp_path / "raft.journal")
    journal = opened(path)
    _fill(journal, 6)
    journal.sync()
    offset = journal._offsets[2]
    journal._destroy()
    with open(path, "rb") as f:
        data = f.read()
    where = _length_field(data, offset, 16 + len(b"cmd-3")) + flip[0]
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(bytes([data[where] ^ flip[1]]))
    with pytest.raises(JournalCorrupt) as caught:
        DurableJournal(path)
    assert f"{path}: damaged record at byte {offset}" in str(caught.value)
    with open(path, "rb") as f:
        assert len(f.read()) == len(data)  # nothing was cut off


def test_a_torn_last_record_is_cut_off(opened, tmp_path) -> None:
    """A crash in the middle of appending record 5: its header and part of its
    payload are on disk. That is a torn tail, not damage: entries 1..4 stay."""
    path = str(tmp_path / "raft.journal")
    journal = opened(path)
    _fill(journal, 5)
    journal.sync()
    journal._destroy()
    size = os.path.getsize(path)
    os.truncate(path, size - 3)
    again = opened(path)
    assert [e[1] for e in again] == [1, 2, 3, 4]
    again.add(b"cmd-5", 5, 2)
    again.sync()
    again._destroy()
    assert [(e[1], e[2]) for e in opened(path)] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2)]


@pytest.mark.parametrize("tail", ["zeros", "damaged-header"])
def test_an_unwritten_or_damaged_last_record_is_a_torn_tail(opened, tmp_path, tail) -> None:
    """Blocks of the last, unsynced appends may come back as zeros after a
    power cut; and damage to the very last record looks the same as a torn
    write. With nothing valid after it, it is cut off."""
    path = str(tmp_path / "raft.journal")
    journal = opened(path)
    _fill(journal, 4)
    journal.sync()
    last = journal._offsets[3]
    journal._destroy()
    with open(path, "r+b") as f:
        if tail == "zeros":
            f.seek(0, os.SEEK_END)
            f.write(bytes(4096))
        else:
            f.seek(last + 3)
            f.write(b"\xee")
    assert [e[1] for e in opened(path)] == ([1, 2, 3, 4] if tail == "zeros" else [1, 2, 3])


def _write_old_format(path: str, count: int) -> bytes:
    """A ``COORDJ1`` journal as an earlier release wrote it: length, CRC32, payload."""
    data = b"COORDJ1\n" + b"".join(frame(struct.pack("<QQ", i, 1) + f"cmd-{i}".encode()) for i in range(1, count + 1))
    with open(path, "wb") as f:
        f.write(data)
    return data


def test_an_old_format_journal_opens_and_is_upgraded(opened, tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    _write_old_format(path, 5)
    journal = opened(path)
    assert [e for e in journal] == [(f"cmd-{i}".encode(), i, 1) for i in range(1, 6)]
    with open(path, "rb") as f:
        assert f.read(8) == b"COORDJ2\n"  # rewritten in the current format before any append
    journal.add(b"cmd-6", 6, 2)
    journal.sync()
    journal._destroy()
    assert [(e[1], e[2]) for e in opened(path)] == [(i, 1) for i in range(1, 6)] + [(6, 2)]


def test_an_old_format_journal_with_a_damaged_length_refuses_to_open(opened, tmp_path) -> None:
    """COORDJ1's length is outside its CRC; a valid record after the stop
    shows the stop was damage, not a torn tail."""
    path = str(tmp_path / "raft.journal")
    data = _write_old_format(path, 6)
    third = 8 + 2 * (8 + 16 + len(b"cmd-1"))
    with open(path, "r+b") as f:
        f.seek(third + 3)
        f.write(b"\x40")
    with pytest.raises(JournalCorrupt, match=f"damaged record at byte {third}"):
        DurableJournal(path)
    with open(path, "rb") as f:
        assert f.read(8) == data[:8]  # not upgraded, not cut


def test_an_old_format_torn_tail_is_cut_off(opened, tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    _write_old_format(path, 4)
    os.truncate(path, os.path.getsize(path) - 2)
    assert [e[1] for e in opened(path)] == [1, 2, 3]


def test_a_journal_torn_while_being_created_starts_empty(opened, tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    with open(path, "wb") as f:
        f.write(b"COORD")
    journal = opened(path)
    assert len(journal) == 0
    journal.add(b"cmd-1", 1, 1)
    journal.sync()
    journal._destroy()
    assert [e[1] for e in opened(path)] == [1]


def test_truncate_and_compact(opened, tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    journal = opened(path)
    _fill(journal, 10)
    journal.deleteEntriesFrom(7)  # a follower drops a conflicting suffix
    journal.add(b"new-8", 8, 2)
    journal.deleteEntriesTo(3)  # compaction keeps entries 4..8
    journal.sync()
    journal._destroy()
    again = opened(path)
    assert [(e[1], e[2]) for e in again] == [(4, 1), (5, 1), (6, 1), (7, 1), (8, 2)]
    assert again[-1][0] == b"new-8"


def test_metadata_is_not_pickle(opened, tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    opened(path).setCurrentTerm(2, "n3")
    with open(path + ".meta", "rb") as f:
        data = f.read()
    assert data[:1] == b"R"  # our codec's record kind, msgpack inside
    assert b"\x80\x04" not in data[:2]


def test_durability_none_never_fsyncs(opened, tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    journal = opened(tmp_path / "raft.journal", durability="none")
    _fill(journal, 3)
    journal.sync()
    assert calls == [] and journal.synced_len == 3
