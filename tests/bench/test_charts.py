"""bench.charts: one chart per section of docs/benchmarks.md, from its table."""

from __future__ import annotations

from pathlib import Path

from bench.charts import ROOT_DOC, run

DOC = """# Benchmarks

## Alpha: one table

Some words.

| workload | clients | ops/s | p50 ms |
|---|---|---|---|
| write 64 B | 1 | 398 | 2.42 |
| read | 64 | 1,200 | 9.1 |

## Beta: no table

Only words.

## Gamma: before and after

| servers | kind | ops/s old → new |
|---|---|---|
| etcd 3.4.23, 3 members | write | 979 → 1558 |
"""


def test_every_section_with_a_table_gets_its_chart_once(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC)
    charts = tmp_path / "charts"
    assert run(doc, charts, check=True) != []  # nothing drawn yet
    assert run(doc, charts, check=False) == []
    text = doc.read_text()
    assert "## Alpha: one table\n\n![chart: ops/s](charts/alpha-one-table.png)\n\nSome words." in text
    assert "![chart: ops/s old → new](charts/gamma-before-and-after.png)" in text
    assert "beta" not in " ".join(p.name for p in charts.iterdir())
    assert run(doc, charts, check=True) == []
    run(doc, charts, check=False)  # again: nothing added twice
    assert doc.read_text() == text


def test_a_chart_drawn_from_another_table_is_found_stale(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC)
    run(doc, tmp_path / "charts", check=False)
    doc.write_text(doc.read_text().replace("| 398 |", "| 401 |"))
    problems = run(doc, tmp_path / "charts", check=True)
    assert len(problems) == 1 and problems[0].startswith("Alpha: one table")


def test_the_benchmarks_document_has_every_chart_current() -> None:
    """A new or re-run benchmark section needs ``python -m bench.charts``."""
    assert run(ROOT_DOC, ROOT_DOC.parent / "charts", check=True) == []
