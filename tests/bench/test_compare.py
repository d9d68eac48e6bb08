"""bench/: the side-by-side benchmark with etcd (its report logic, and one
short real run when etcd is installed; scripts/bench.sh installs it)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ab
from bench.compare import generator_procs, report
from bench.etcd import b64
from bench.load import Requests, key_of
from bench.report import pct, write_section
from tests import debian


def _cell(system: str, ops: float, p99: float, errors: dict[str, int] | None = None, *, cpu: float = 1.0,
          terms: int = 0) -> dict:
    return {"system": system, "ops_s": ops, "p50_ms": p99 / 3, "p99_ms": p99, "errors": errors or {},
            "gen_cpu": 0.25, "procs": 1, "server_ms_per_op": cpu, "term_changes": terms}


def test_the_report_gives_each_pairs_ratio_and_their_median() -> None:
    measured = {
        "cells": {("write", 64): [{"etcd": _cell("etcd", 2000, 10), "coord": _cell("coord", 3000, 15)},
                                  {"etcd": _cell("etcd", 3000, 10), "coord": _cell("coord", 3000, 30)},
                                  {"etcd": _cell("etcd", 2500, 20, cpu=0.4),
                                   "coord": _cell("coord", 2000, 20, {"503": 2}, cpu=0.6, terms=1)}]},
        "failovers": {"etcd": [1.0, 2.0, 3.0], "coord": [0.8, 0.9, 1.4]},
        "steady": {"coord": _cell("coord", 1500, 50, cpu=0.7, terms=0)},
    }
    table = report(measured, argparse.Namespace(steady_s=600))
    row = next(line for line in table.splitlines() if line.startswith("| write 64 B | 64 |"))
    assert "| 1.50, 1.00, 0.80 (1.00) |" in row  # ours / etcd per round, then the median
    assert "| 2500 |" in row and "| 3000 |" in row  # medians of each system
    assert "| 0 / 2 |" in row  # errors summed per system
    assert "| 1.50 |" in row  # the median of the p99 ratios (1.5, 3.0, 1.0)
    assert "this project, 3 tries: min 0.80 s, median 0.90 s, max 1.40 s" in table
    assert "coord 503 x2" in table
    assert "| 1.00 / 1.00 (1.00) | 0 / 1 |" in row  # server CPU per op medians and their ratio; term changes
    assert "Steady writes, 64 clients, this project: 1500 ops/s for 600 s, 0 leader changes" in table


def test_generators_split_from_64_clients_and_keys_match_on_both_systems() -> None:
    assert [generator_procs(c) for c in (1, 16, 63, 64, 256)] == [1, 1, 1, 2, 2]
    assert key_of(3, 205) == "bench/3/5"
    assert b64("bench/0/0") == "YmVuY2gvMC8w"
    with pytest.raises(ValueError):
        Requests("zookeeper")
    assert pct([], 0.5) != pct([], 0.5)  # nan
    assert pct([5.0, 1.0, 3.0, 2.0, 4.0], 0.5) == 3.0 and pct([1.0, 2.0], 0.99) == 2.0


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nkeep b\n")
    write_section(doc, "\n## A\n", "new a")
    write_section(doc, "\n## C\n", "new c")
    text = doc.read_text()
    assert "old a" not in text and "new a" in text and "keep b" in text and text.rstrip().endswith("new c")
    assert text.index("## A") < text.index("## B") < text.index("## C")


@pytest.mark.cluster
def test_a_short_real_run_against_etcd(tmp_path: Path) -> None:
    if not shutil.which("etcd"):
        reason = debian.install(["etcd-server"], "/usr/bin/etcd")  # as scripts/bench.sh does
        if reason is not None:
            pytest.skip(reason)
    out, png = tmp_path / "benchmarks.md", tmp_path / "chart.png"
    out.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    result = subprocess.run([sys.executable, "-m", "bench.compare", "--seconds", "0.5", "--rounds", "2",
                             "--concurrency", "2", "--kinds", "write,read", "--failovers", "1",
                             "--out", str(out), "--chart", str(png)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = out.read_text()
    assert "kept" in text and "## Side by side with etcd" in text
    rows = [line for line in text.splitlines() if line.startswith(("| write 64 B | 2 |", "| linearizable read | 2 |"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[5]) > 0  # both systems did work
        assert cells[8] == "0 / 0"  # and no request failed
    assert "etcd, 1 tries" in text and "this project, 1 tries" in text
    assert png.stat().st_size > 10_000


def test_ab_compares_two_checkouts_with_one_generator(capsys: pytest.CaptureFixture[str]) -> None:
    """bench.ab against this checkout twice: both sides serve writes, and the ratio line is printed."""
    repo = Path(__file__).resolve().parents[2]
    assert ab.main([str(repo), str(repo), "--clients", "2", "--rounds", "1", "--seconds", "1"]) == 0
    out = capsys.readouterr().out
    assert "round 1 before" in out and "round 1 after" in out
    assert "errors 0" in out
    assert "after ÷ before, writes at 2 clients" in out
