"""bench/gen_ab.py: one short round of the generator against its own HEAD,
on bare aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_one_short_round_against_head_reports_both_generators() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    result = subprocess.run([sys.executable, "-m", "bench.gen_ab", "--ref", "HEAD", "--rounds", "1", "--seconds", "0.3",
                             "--clients", "4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = result.stdout.split("medians over 1 rounds, bare servers, 4 clients in 2 generator processes")[1]
    for name in ("ref", "this"):
        line = next(x for x in summary.splitlines() if x.strip().startswith(f"write {name}"))
        assert "generator" in line and "servers" in line and "nan" not in line
