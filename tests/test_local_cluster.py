"""scripts/local_cluster.py (behind cluster-up.sh): which engine a data directory belongs to."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "scripts" / "local_cluster.py")
assert _spec is not None and _spec.loader is not None
local_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_cluster)


def test_a_restart_without_engine_keeps_the_engine_of_the_data(tmp_path: Path) -> None:
    assert local_cluster.engine_on_disk(tmp_path) is None  # nothing yet: cluster-up defaults to raft
    for i in (1, 2, 3, 4):
        (tmp_path / f"n{i}" / "pbft").mkdir(parents=True)
    assert local_cluster.engine_on_disk(tmp_path) == "pbft"
    raft = tmp_path / "raft-cluster"
    for i in (1, 2, 3):
        (raft / f"n{i}").mkdir(parents=True)
        (raft / f"n{i}" / "raft.journal").write_bytes(b"")
    assert local_cluster.engine_on_disk(raft) == "raft"
    (raft / "n1" / "pbft").mkdir()  # both kinds of data: no guess
    assert local_cluster.engine_on_disk(raft) is None
