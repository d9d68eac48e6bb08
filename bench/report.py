"""Shared pieces of the benchmark reports."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace (or append) the section of the markdown file ``path`` that
    starts with ``marker`` (a ``\\n## Title\\n`` line) and runs to the next
    ``## `` heading; the other sections stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    before, _, after = text.partition(marker)
    rest = after[after.find("\n## "):] if "\n## " in after else ""
    path.write_text(before.rstrip("\n") + "\n" + marker + "\n" + body + "\n" + rest)


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nan when empty); nearest rank, no interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def process_cpu_s(pid: int) -> float:
    """CPU time (user and system) of process ``pid`` so far, from /proc; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_s() -> float:
    """This process's CPU time, user and system (a load generator's own cost)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
