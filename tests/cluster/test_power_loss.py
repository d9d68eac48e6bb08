"""The power-loss record (``cluster.power_loss``) and the rollback that reads
it (``chaos.power_loss``), in one process: what a power cut leaves of the
journal, its metadata and atomically replaced files is exactly what was
synced, and a name survives only once its directory was synced."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from chaos.power_loss import NoRecord, cut_power
from cluster import files
from cluster.journal import DurableJournal, write_file_durably
from cluster.power_loss import RECORD_DIR, PowerLossRecorder


@pytest.fixture
def recorded(tmp_path):
    """A data directory with a started recorder; detached at the end."""
    recorders: list[PowerLossRecorder] = []

    def start(directory=tmp_path) -> PowerLossRecorder:
        recorder = PowerLossRecorder(str(directory))
        recorder.start()
        recorders.append(recorder)
        return recorder

    yield start
    for recorder in recorders:
        recorder.stop()


def _crash(journal: DurableJournal) -> None:
    """The process dies: no sync, the descriptor just goes away."""
    journal._file.close()


def _entries(path) -> list[tuple[bytes, int, int]]:
    journal = DurableJournal(str(path))
    try:
        return [tuple(e) for e in journal]
    finally:
        journal._file.close()


def _power_cut(directory, recorder: PowerLossRecorder, *, seed: int = 1, torn_tail: bool = False) -> dict:
    recorder.stop()
    return cut_power(str(directory), random.Random(seed), torn_tail=torn_tail)


def test_synced_entries_survive_and_unsynced_ones_are_lost(recorded, tmp_path) -> None:
    recorder = recorded()
    path = tmp_path / "raft.journal"
    journal = DurableJournal(str(path))
    for i in range(1, 6):
        journal.add(f"cmd-{i}".encode(), i, 1)
    journal.sync()
    for i in range(6, 9):
        journal.add(f"cmd-{i}".encode(), i, 1)
    journal._file.flush()  # in the page cache, not synced
    _crash(journal)
    lost = _power_cut(tmp_path, recorder)
    assert lost["reverted"] == ["raft.journal"] and lost["dropped_bytes"] > 0
    assert [e[1] for e in _entries(path)] == [1, 2, 3, 4, 5]
    assert os.listdir(tmp_path / RECORD_DIR) == ["power-cut"]  # the next start adopts what is on disk


def test_a_node_cut_again_before_it_recorded_anything_loses_nothing_more(recorded, tmp_path) -> None:
    recorder = recorded()
    write_file_durably(str(tmp_path / "raft.journal.meta"), b"meta")
    _power_cut(tmp_path, recorder)
    assert cut_power(str(tmp_path), random.Random(2))["dropped_bytes"] == 0  # killed while starting up
    recorder = recorded()  # started at last: adopts, removes the marker
    assert os.listdir(tmp_path / RECORD_DIR) != ["power-cut"]
    _power_cut(tmp_path, recorder)
    assert (tmp_path / "raft.journal.meta").read_bytes() == b"meta"


def test_a_torn_tail_keeps_a_prefix_of_what_was_not_synced(recorded, tmp_path) -> None:
    kept = set()
    for seed in range(12):
        directory = tmp_path / str(seed)
        directory.mkdir()
        recorder = recorded(directory)
        journal = DurableJournal(str(directory / "raft.journal"))
        for i in range(1, 4):
            journal.add(b"x" * 50, i, 1)
        journal.sync()
        for i in range(4, 10):
            journal.add(b"y" * 50, i, 1)
        journal._file.flush()
        _crash(journal)
        _power_cut(directory, recorder, seed=seed, torn_tail=True)
        indexes = [e[1] for e in _entries(directory / "raft.journal")]  # opens: a torn record is cut off
        assert indexes == list(range(1, len(indexes) + 1)) and 3 <= len(indexes) <= 9
        kept.add(len(indexes))
    assert len(kept) > 2  # some cuts dropped everything unsynced, some kept whole or torn records


def test_without_fsync_nothing_written_survives(recorded, tmp_path) -> None:
    """durability "none" (the deliberately broken fsync): the journal and the
    term and vote are lost whole."""
    recorder = recorded()
    journal = DurableJournal(str(tmp_path / "raft.journal"), durability="none")
    journal.setCurrentTerm(3, "n2")
    for i in range(1, 6):
        journal.add(b"cmd", i, 3)
    journal.sync()
    _crash(journal)
    lost = _power_cut(tmp_path, recorder)
    assert "raft.journal.meta" in lost["removed"]
    reopened = DurableJournal(str(tmp_path / "raft.journal"))
    try:
        assert len(reopened) == 0 and reopened.getCurrentTerm() == 0 and reopened.getVotedForNodeId() is None
    finally:
        reopened._file.close()


def test_term_and_vote_survive_as_last_synced(recorded, tmp_path) -> None:
    recorder = recorded()
    journal = DurableJournal(str(tmp_path / "raft.journal"))
    journal.setCurrentTerm(4, "n3")
    journal.setRaftCommitIndex(9)  # kept in memory, written only by the one-second timer
    _crash(journal)
    _power_cut(tmp_path, recorder)
    reopened = DurableJournal(str(tmp_path / "raft.journal"))
    try:
        assert (reopened.getCurrentTerm(), reopened.getVotedForNodeId()) == (4, "n3")
    finally:
        reopened._file.close()


def test_truncated_and_rewritten_but_unsynced_reverts_to_the_old_entries(recorded, tmp_path) -> None:
    """A follower cuts a conflicting suffix and appends the leader's entries:
    until it syncs, the old suffix is what a power cut leaves."""
    recorder = recorded()
    path = tmp_path / "raft.journal"
    journal = DurableJournal(str(path))
    for i in range(1, 6):
        journal.add(b"old", i, 1)
    journal.sync()
    journal.deleteEntriesFrom(2)
    for i in range(3, 6):
        journal.add(b"new", i, 2)
    journal._file.flush()
    _crash(journal)
    _power_cut(tmp_path, recorder)
    assert _entries(path) == [(b"old", i, 1) for i in range(1, 6)]


def test_truncated_rewritten_and_synced_survives(recorded, tmp_path) -> None:
    recorder = recorded()
    path = tmp_path / "raft.journal"
    journal = DurableJournal(str(path))
    for i in range(1, 6):
        journal.add(b"old", i, 1)
    journal.sync()
    journal.deleteEntriesFrom(2)
    for i in range(3, 5):
        journal.add(b"new", i, 2)
    journal.sync()
    journal.add(b"lost", 5, 2)
    _crash(journal)
    _power_cut(tmp_path, recorder)
    assert _entries(path) == [(b"old", 1, 1), (b"old", 2, 1), (b"new", 3, 2), (b"new", 4, 2)]


def test_compaction_survives_once_its_rename_is_synced(recorded, tmp_path) -> None:
    recorder = recorded()
    path = tmp_path / "raft.journal"
    journal = DurableJournal(str(path))
    for i in range(1, 9):
        journal.add(b"e", i, 1)
    journal.sync()
    journal.deleteEntriesTo(5)  # rewrite, fsync, rename, fsync of the directory
    journal.add(b"e", 9, 1)
    journal.sync()
    _crash(journal)
    _power_cut(tmp_path, recorder)
    assert [e[1] for e in _entries(path)] == [6, 7, 8, 9]


def test_a_rename_without_a_directory_fsync_reverts_to_the_old_file(recorded, tmp_path) -> None:
    recorder = recorded()
    path = str(tmp_path / "raft.snapshot")
    write_file_durably(path, b"first")
    with open(path + ".tmp", "wb") as f:  # as pysyncobj does: write, sync, rename, no directory fsync
        f.write(b"second")
        f.flush()
        files.sync(f.fileno(), path + ".tmp")
    files.replace(path + ".tmp", path)
    _power_cut(tmp_path, recorder)
    assert Path(path).read_bytes() == b"first"
    assert not os.path.exists(path + ".tmp")


def test_a_renamed_file_never_synced_survives_empty(recorded, tmp_path) -> None:
    """The rename and the directory are synced, the file's own content was
    not (pysyncobj's install of a snapshot received from the leader)."""
    recorder = recorded()
    path = str(tmp_path / "raft.snapshot")
    write_file_durably(path, b"first")
    with open(path + ".1.tmp", "wb") as f:
        f.write(b"from the leader")
    files.replace(path + ".1.tmp", path)
    files.sync_dir(path)
    _power_cut(tmp_path, recorder)
    assert Path(path).read_bytes() == b""


def test_a_new_file_vanishes_until_its_directory_is_synced(recorded, tmp_path) -> None:
    recorder = recorded()
    path = tmp_path / "journal"
    with open(path, "wb") as f:
        f.write(b"abc")
        f.flush()
        files.sync(f.fileno(), str(path))
    _power_cut(tmp_path, recorder)
    assert not path.exists()


def test_what_a_crashed_process_did_not_sync_stays_unsynced_after_a_restart(recorded, tmp_path) -> None:
    """A plain crash keeps the page cache: a restarted process can read what
    its predecessor never synced, which is still not durable."""
    recorder = recorded()
    path = tmp_path / "log"
    with open(path, "wb") as f:
        f.write(b"synced")
        f.flush()
        files.sync(f.fileno(), str(path))
    files.sync_dir(str(path))
    with open(path, "ab") as f:
        f.write(b" and not")
    recorder.stop()
    recorder = recorded()  # the restart: the record stands
    assert path.read_bytes() == b"synced and not"
    _power_cut(tmp_path, recorder)
    assert path.read_bytes() == b"synced"


def test_a_reopened_journal_makes_what_it_read_durable(recorded, tmp_path) -> None:
    """The restarted node reads entries its crashed predecessor never
    synced, and a leader's heartbeat that matches them appends nothing, so
    no sync happens before the node acknowledges them: opening the journal
    must sync what it read (found by this record; the journal did not)."""
    recorder = recorded()
    path = tmp_path / "raft.journal"
    journal = DurableJournal(str(path))
    journal.add(b"a", 1, 1)
    journal.sync()
    journal.add(b"b", 2, 1)
    journal._file.flush()
    _crash(journal)
    recorder.stop()
    recorder = recorded()
    journal = DurableJournal(str(path))
    assert len(journal) == 2 and not journal.dirty  # what it would acknowledge without a sync
    _crash(journal)
    _power_cut(tmp_path, recorder)
    assert [e[1] for e in _entries(path)] == [1, 2]


def test_a_crash_between_rename_and_directory_fsync_keeps_the_synced_content(recorded, tmp_path) -> None:
    """The meta file was synced and renamed into place, then the process
    died before the directory fsync; the restart syncs the directory. What
    survives is the synced new content, not an empty file."""
    recorder = recorded()
    path = str(tmp_path / "raft.journal.meta")
    write_file_durably(path, b"old")
    with open(path + ".tmp", "wb") as f:
        f.write(b"new")
        f.flush()
        files.sync(f.fileno(), path + ".tmp")
    files.replace(path + ".tmp", path)
    recorder.stop()  # the crash
    recorder = recorded()
    files.sync_dir(path)
    _power_cut(tmp_path, recorder)
    assert Path(path).read_bytes() == b"new"


def test_files_present_at_the_first_start_are_adopted(recorded, tmp_path) -> None:
    (tmp_path / "pbft").mkdir()
    (tmp_path / "pbft" / "checkpoint").write_bytes(b"cp")
    (tmp_path / "unsafe-clock-offset-ms").write_text("0\n")
    recorder = recorded()
    (tmp_path / "pbft" / "checkpoint").write_bytes(b"changed, never synced")
    lost = _power_cut(tmp_path, recorder)
    assert lost["reverted"] == [os.path.join("pbft", "checkpoint")]
    assert (tmp_path / "pbft" / "checkpoint").read_bytes() == b"cp"


def test_a_directory_without_a_record_is_refused(tmp_path) -> None:
    with pytest.raises(NoRecord):
        cut_power(str(tmp_path), random.Random(1))
