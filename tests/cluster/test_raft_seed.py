"""Offline data directories for backups and new clusters (docs/operations.md):
``PySyncObjEngine.read_data_dir`` reads a stopped node's snapshot and journal
without changing them, and ``seed_data_dir`` writes one that starts a new
cluster at the snapshot's index, whose first leader goes on from there. A
one-node pysyncobj cluster in-process, as in test_raft_halt."""

from __future__ import annotations

import os

import pytest

from cluster import raft_pysyncobj as raft
from cluster.errors import EngineError
from coordinator.services.applier import Applier
from tests.cluster.test_raft_halt import _engine, _write, until


async def test_a_stopped_nodes_data_dir_is_read_whole_and_unchanged(tmp_path) -> None:
    applier = Applier()
    engine = _engine(tmp_path / "old", applier, compaction_entries=10)
    await engine.start()
    try:
        for i in range(25):  # past two compactions: a snapshot and a journal tail
            await _write(engine, f"k{i:02d}", i)
        await until(lambda: engine.snapshots >= 1, "a compaction")
        await until(lambda: applier.machine.kv.get("k24") is not None, "every write applied")
    finally:
        await engine.stop()
    files = {name: (tmp_path / "old" / name).read_bytes() for name in os.listdir(tmp_path / "old")}

    found = raft.PySyncObjEngine.read_data_dir(str(tmp_path / "old"))
    assert {name: (tmp_path / "old" / name).read_bytes() for name in os.listdir(tmp_path / "old")} == files
    assert found["snapshot_index"] > 0 and found["fsm"] is not None
    replayed = Applier()
    replayed.restore(found["fsm"])
    for index, _term, blob in found["entries"]:
        replayed.apply(index, blob)
    assert [replayed.machine.kv.get(f"k{i:02d}").value for i in range(25)] == list(range(25))
    assert replayed.digest.value == applier.digest.value  # the same state, entry for entry
    assert found["last_index"] >= replayed.applied_index


async def test_a_seeded_data_dir_starts_a_new_cluster_at_the_snapshots_index(tmp_path) -> None:
    source = Applier()
    old = _engine(tmp_path / "old", source)
    await old.start()
    try:
        for i in range(5):
            await _write(old, f"k{i}", i)
        await until(lambda: source.machine.kv.get("k4") is not None, "every write applied")
    finally:
        await old.stop()
    index, blob = source.applied_index, source.snapshot()

    restored = Applier()
    new = _engine(tmp_path / "new", restored)
    raft.PySyncObjEngine.seed_data_dir(str(tmp_path / "new"), blob, index, [new.address])
    await new.start()
    try:
        await until(lambda: restored.applied_index == index, "the seeded snapshot to be restored")
        assert restored.digest.value == source.digest.value
        await _write(new, "after", 1)  # the new cluster's first leader writes after the snapshot
        assert restored.machine.kv.get("after").value == 1 and restored.applied_index > index
        assert new.status().term >= 1
    finally:
        await new.stop()

    with pytest.raises(EngineError, match="not empty"):
        raft.PySyncObjEngine.seed_data_dir(str(tmp_path / "new"), blob, index, [new.address])
    with pytest.raises(EngineError, match="holds nothing"):
        raft.PySyncObjEngine.seed_data_dir(str(tmp_path / "empty"), blob, 1, [new.address])
