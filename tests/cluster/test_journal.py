"""The durable journal: what survives a restart, a torn write, damage."""

from __future__ import annotations

import os

import pytest

from cluster.errors import JournalCorrupt
from cluster.journal import DurableJournal


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
        f.seek(offset + 12)  # inside record 2's payload
        f.write(b"\xff")
    with pytest.raises(JournalCorrupt):
        DurableJournal(path)


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
