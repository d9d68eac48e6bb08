"""Shared pieces of the benchmark reports: percentiles, CPU time, the line
describing the machine, and the markdown section a run writes.

Standard library only. ``pct``, ``cpu_s`` and ``process_cpu_s`` keep their
names and meaning: ``bench.gen_ab --ref`` runs an older ``bench/load.py``
against this package, and it imports ``cpu_s`` from here."""

from __future__ import annotations

import os
import platform
import resource
from collections.abc import Iterable
from pathlib import Path


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace (or append) the section of the markdown file ``path`` that
    starts with ``marker`` (a ``\\n## Title\\n`` line) and runs to the next
    ``## `` heading; the other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    before, _, after = text.partition(marker)
    rest = after[after.find("\n## "):] if "\n## " in after else ""
    path.write_text(before.rstrip("\n") + "\n" + marker + "\n" + body + "\n" + rest)


def publish(text: str, out: str | Path | None, marker: str) -> None:
    """Print a run's section and, with ``--out``, write it into that
    markdown file under ``marker`` (``write_section``)."""
    print(text)
    if out:
        write_section(Path(out), marker, text)


def machine() -> str:
    """The machine a run shares with what it measures, for a report's
    header: ``2 cores, CPython 3.11.7``."""
    return f"{os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}"


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nan when empty); nearest rank, no interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pct_ms(seconds: list[float], q: float) -> float:
    """The ``q`` quantile of durations in seconds, in milliseconds (nan when empty)."""
    return pct(seconds, q) * 1000


def process_cpu_s(pid: int) -> float:
    """CPU time (user and system) of process ``pid`` so far, from /proc; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def processes_cpu_s(pids: Iterable[int | None]) -> float:
    """CPU time of these processes (all their threads) so far, together;
    None (a process known to be gone) and a process gone since count 0."""
    return sum(process_cpu_s(pid) for pid in pids if pid is not None)


def cpu_s() -> float:
    """This process's CPU time, user and system (a load generator's own cost)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
