"""Progress of long runs (chaos runs, benchmarks): a bar on a terminal, a
plain line now and then otherwise (CI logs, files, pipes).

    with Progress("nemesis run", total_s=60) as progress:
        ...
        progress.update(elapsed_s, "ok 120  fail 3  nemesis: partition")

On a terminal (stderr is a TTY) and with tqdm installed (the ``chaos`` and
``test`` extras) it draws one line that moves: elapsed of total seconds and
the status. Otherwise ``update`` prints ``  12s  <status>`` to stdout at
most every ``every_s`` seconds, as these scripts always did, so a log keeps
its lines. tqdm is imported only when a bar is drawn.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    def __init__(self, description: str, total_s: float | None = None, *, every_s: float = 5.0,
                 stream: TextIO | None = None, bar: bool | None = None) -> None:
        """``bar``: force the bar (True) or the lines (False); None decides by the terminal."""
        self.description = description
        self.total_s = total_s
        self.every_s = every_s
        self.stream = stream or sys.stdout
        tqdm = _tqdm()
        wanted = sys.stderr.isatty() if bar is None else bar
        self._bar = tqdm(total=round(total_s) if total_s else None, desc=description, unit="s", leave=True,
                         bar_format="{desc}: {n_fmt}/{total_fmt} s |{bar:20}| {postfix}", dynamic_ncols=True,
                         file=sys.stderr) if wanted and tqdm is not None else None
        self._printed_at = float("-inf")
        self.lines = 0  # plain lines printed

    def update(self, elapsed_s: float, status: str) -> None:
        if self._bar is not None:
            self._bar.n = min(round(elapsed_s), self._bar.total or round(elapsed_s))
            self._bar.set_postfix_str(status, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._printed_at >= self.every_s:
            self._printed_at = now
            self.lines += 1
            print(f"  {elapsed_s:5.0f}s  {status}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Steps:
    """Progress over a known number of steps (a benchmark's cells): a bar on
    a terminal, else one line per finished step, ``  [3/12] kafka direct,
    round 2 (41 s, about 123 s left)``, to stdout."""

    def __init__(self, description: str, total: int, *, stream: TextIO | None = None, bar: bool | None = None
                 ) -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self.done = 0
        self.started = time.monotonic()
        tqdm = _tqdm()
        wanted = sys.stderr.isatty() if bar is None else bar
        self._bar = tqdm(total=total, desc=description, unit="cell", leave=True, dynamic_ncols=True,
                         file=sys.stderr) if wanted and tqdm is not None else None

    def step(self, what: str) -> None:
        """One step finished: ``what`` it was."""
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)
            return
        elapsed = time.monotonic() - self.started
        left = elapsed / self.done * (self.total - self.done)
        print(f"  [{self.done}/{self.total}] {what} ({elapsed:.0f} s, about {left:.0f} s left)", file=self.stream,
              flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
