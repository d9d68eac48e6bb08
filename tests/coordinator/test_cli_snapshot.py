"""``coordinator snapshot ...`` refusals that need no cluster (the whole
procedures run in tests/integration/test_operations.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator import cli, snapshot_file
from coordinator.services.applier import Applier


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _backup(path: Path, index: int = 5) -> None:
    applier = Applier()
    applier.machine.applied_index = index
    data, _ = snapshot_file.encode({"index": index, "term": 1, "members": [
        {"id": "old1", "raft": "10.0.0.1:7101", "http": "10.0.0.1:7001"}]}, applier.snapshot())
    path.write_bytes(data)


def test_save_never_replaces_a_file_without_force(tmp_path: Path, capsys) -> None:
    target = tmp_path / "b.snap"
    target.write_bytes(b"keep me")
    code, _, err = _run(capsys, "snapshot", "save", str(target), "--endpoint", "127.0.0.1:9")
    assert code == 2 and "exists (--force replaces it)" in err
    assert target.read_bytes() == b"keep me" and not (tmp_path / "b.snap.tmp").exists()


def test_save_from_an_unreachable_node_leaves_no_file(tmp_path: Path, capsys) -> None:
    target = tmp_path / "b.snap"
    code, _, err = _run(capsys, "snapshot", "save", str(target), "--endpoint", "127.0.0.1:9", "--timeout", "5")
    assert code == 2 and "downloading from 127.0.0.1:9 failed" in err
    assert list(tmp_path.iterdir()) == []


def test_status_refuses_what_is_not_a_snapshot(tmp_path: Path, capsys) -> None:
    (tmp_path / "x").write_bytes(b"not a snapshot at all, not even close")
    code, _, err = _run(capsys, "snapshot", "status", str(tmp_path / "x"))
    assert code == 2 and "not a coordinator snapshot file" in err
    code, _, err = _run(capsys, "snapshot", "status", str(tmp_path / "missing"))
    assert code == 2 and "No such file" in err


def test_restore_checks_its_arguments_and_names_old_members(tmp_path: Path, capsys) -> None:
    backup = tmp_path / "b.snap"
    _backup(backup)
    base = ("snapshot", "restore", str(backup), "--node-id", "n1", "--http", "127.0.0.1:7001",
            "--raft", "127.0.0.1:7101")
    code, _, err = _run(capsys, *base, "--data-dir", str(tmp_path / "d"), "--peer", "n2=nonsense")
    assert code == 2 and "peer" in err and not (tmp_path / "d").exists()
    code, _, err = _run(capsys, *base, "--data-dir", str(tmp_path / "d"), "--engine", "pbft")
    assert code == 2 and "engine: restore supports raft" in err
    code, out, _ = _run(capsys, *base, "--data-dir", str(tmp_path / "d"), "--json")
    result = json.loads(out)
    assert code == 0 and result["index"] == 5 and result["stale_members"] == ["old1"]
    assert (tmp_path / "d" / "raft.snapshot").exists()
    code, _, err = _run(capsys, *base, "--data-dir", str(tmp_path / "d"))
    assert code == 2 and "is not empty" in err
