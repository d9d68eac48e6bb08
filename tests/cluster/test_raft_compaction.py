"""Compaction by bytes and a snapshot failure's backoff (issue 20, item 6):
a few large entries make the journal compact long before
``compaction_entries``, and a state that cannot be snapshotted is tried
again after a growing backoff, not on every tick. A one-node pysyncobj
cluster in-process, as in test_raft_halt."""

from __future__ import annotations

import asyncio
import logging

from coordinator.codec import encode_command
from coordinator.services.applier import Applier
from coordinator.types import Command
from tests.cluster.test_raft_halt import _engine, _write, until


def _big(key: str, size: int) -> bytes:
    return encode_command(Command(op="kv.put", args={"key": key, "value": "x" * size}, now_ms=1))


async def test_a_journal_over_compaction_bytes_is_compacted_before_compaction_entries(tmp_path) -> None:
    applier = Applier()
    engine = _engine(tmp_path, applier, compaction_entries=10_000, compaction_bytes=1 << 20)
    await engine.start()
    try:
        await _write(engine, "first", 0)
        for i in range(12):  # about 1.2 MiB in 12 entries, far below 10000 entries
            engine.submit(_big(f"k{i}", 100_000), lambda reason: None)
        await until(lambda: applier.machine.kv.get("k11") is not None, "the large entries to apply")
        await until(lambda: engine.snapshots >= 1, "a snapshot forced by the journal's size")
        await until(lambda: engine._journal is not None and engine._journal.size_bytes < 1 << 20,
                     "the journal to be trimmed")
        assert len(engine._journal) < 12
        await _write(engine, "after", 1)  # past the snapshot: only the journal holds it
    finally:
        await engine.stop()
    # and the state is all there after a restart from snapshot and journal. The same address, as a
    # node restarts: the snapshot names its members, and a new address would make the old one a
    # second voter that never answers (no election, so the journal's tail would never apply).
    replayed = Applier()
    again = _engine(tmp_path, replayed, address=engine.address, compaction_entries=10_000,
                    compaction_bytes=1 << 20)
    await again.start()
    try:
        await until(lambda: replayed.machine.kv.get("after") is not None,
                    lambda: f"the restart to restore everything (it has {len(replayed.machine.kv)} keys, applied "
                            f"index {replayed.machine.applied_index}; engine {again.status()}; files "
                            f"{sorted((p.name, p.stat().st_size) for p in tmp_path.iterdir())})")
        assert len(replayed.machine.kv.get("k0").value) == 100_000 and replayed.machine.kv.get("k11") is not None
        assert again.status().members == (engine.address,)
    finally:
        await again.stop()


async def test_a_failing_snapshot_backs_off_instead_of_retrying_every_tick(tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.CRITICAL)
    applier = Applier()
    engine = _engine(tmp_path, applier, compaction_entries=5, compaction_bytes=1 << 20)
    attempts = 0

    def failing_snapshot() -> bytes:
        nonlocal attempts
        attempts += 1
        raise MemoryError("the state does not fit")

    monkeypatch.setattr(applier, "snapshot", failing_snapshot)
    await engine.start()
    try:
        await _write(engine, "a", 0)
        for i in range(20):
            engine.submit(_big(f"k{i}", 10), lambda reason: None)
        await until(lambda: engine.snapshot_failures >= 2, "two failed snapshots")
        # pysyncobj asks on every tick (50 ms); the backoff (1 s, then 2 s, 4 s) lets few through
        started, seen = asyncio.get_running_loop().time(), attempts
        await until(lambda: engine.snapshots_deferred >= 40, "pysyncobj's attempts during the backoff")
        elapsed = asyncio.get_running_loop().time() - started
        assert attempts - seen <= 1 + elapsed / 2, (attempts, seen, elapsed)
        assert engine.status().healthy  # the node serves on; the journal keeps everything
        monkeypatch.undo()
        await until(lambda: engine.snapshots >= 1, "a snapshot once the state can be taken", timeout_s=30)
        assert engine.snapshot_failures == 0
    finally:
        await engine.stop()


async def test_journal_meta_and_snapshot_files_are_the_owners_only(tmp_path) -> None:
    """Whatever the umask (a node sets 0077 itself; this checks the files
    don't depend on it), the journal, its metadata and snapshots are 0600,
    and an older journal with a wider mode is narrowed when opened."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        applier = Applier()
        engine = _engine(tmp_path, applier, compaction_entries=10_000, compaction_bytes=1 << 16)
        await engine.start()
        try:
            await _write(engine, "first", 0)
            for i in range(3):
                engine.submit(_big(f"k{i}", 40_000), lambda reason: None)
            await until(lambda: engine.snapshots >= 1, "a snapshot")
        finally:
            await engine.stop()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.name.startswith("raft.")}
        assert modes and set(modes.values()) == {0o600}, modes
        assert {"raft.journal", "raft.journal.meta", "raft.snapshot"} <= set(modes)
        (tmp_path / "raft.journal").chmod(0o644)
        again = _engine(tmp_path, Applier())
        await again.start()
        await again.stop()
        assert stat.S_IMODE((tmp_path / "raft.journal").stat().st_mode) == 0o600
    finally:
        os.umask(old)
