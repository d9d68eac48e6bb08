"""The ``coordinator agent-key`` command: a key file an agent (or the dashboard) signs with."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from coordinator.cli import main
from coordinator.crypto import AgentKeys


def _printed(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_new_writes_a_private_key_file_and_prints_only_its_public_key(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "alice.key"
    assert main(["agent-key", "new", str(path)]) == 0
    out, _ = _printed(capsys)
    keys = AgentKeys.load(path)
    assert json.loads(out) == {"public_key": keys.public_key}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text())["seed"] not in out

    assert main(["agent-key", "show", str(path)]) == 0
    assert json.loads(_printed(capsys)[0]) == {"public_key": keys.public_key}


def test_new_does_not_replace_a_key_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "alice.key"
    main(["agent-key", "new", str(path)])
    first = AgentKeys.load(path).public_key
    capsys.readouterr()
    assert main(["agent-key", "new", str(path)]) == 2
    assert "exists" in _printed(capsys)[1] and AgentKeys.load(path).public_key == first
    assert main(["agent-key", "new", "--force", str(path)]) == 0
    assert AgentKeys.load(path).public_key != first


def test_show_refuses_a_key_others_may_read_and_a_missing_file(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "alice.key"
    main(["agent-key", "new", str(path)])
    capsys.readouterr()
    path.chmod(0o644)
    assert main(["agent-key", "show", str(path)]) == 2
    assert "chmod 600" in _printed(capsys)[1]
    assert main(["agent-key", "show", str(tmp_path / "missing.key")]) == 2
    assert "No such file" in _printed(capsys)[1]
