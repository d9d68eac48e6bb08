"""bench/apply.py: one round of every mode in process, and ``--trees``
running this file against each tree's ``coordinator`` in a fresh
interpreter (never the tree's own ``bench`` package, which an older tree
may lack or have in another shape)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench import apply

ROOT = Path(__file__).resolve().parents[2]


def test_one_round_times_every_mode_and_the_modes_reach_one_digest() -> None:
    measured = apply.one_round(commands=60, warmup_count=30)
    assert set(apply.MODES) <= set(measured)
    assert all(measured[mode]["cpu"] > 0 for mode in apply.MODES)
    assert len(measured["final"]["digest"]) == 64  # one_round raises when the modes disagree


def test_trees_run_this_file_with_the_tree_first_on_sys_path(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for package in ("coordinator", "cluster"):
        (tree / package).symlink_to(ROOT / package)
    (tree / "bench").mkdir()  # a tree whose bench package must not be the one that runs
    (tree / "bench" / "__init__.py").write_text('raise ImportError("the tree\'s bench package ran")\n')
    result = subprocess.run([sys.executable, "-m", "bench.apply", "--trees", str(tree), "--commands", "40",
                             "--warmup", "20", "--rounds", "1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"round 1 {tree}" in result.stdout
    assert "digests equal across trees" in result.stdout
