"""Clocks and randomness, injected wherever they are used."""

from __future__ import annotations

import logging
import random
import secrets
import time
from typing import Any

log = logging.getLogger(__name__)


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()


CLOCK_OFFSET_FILE = "unsafe-clock-offset-ms"  # in the node's data directory
CLOCK_OFFSET_MAX_MS = 86_400_000  # one day either way


class OffsetClock(SystemClock):
    """UNSAFE, chaos tests only (``--unsafe-test-clock-control``): the wall
    clock plus ``offset_ms``, which the nemesis changes to make this node's
    clock jump forward or back. ``monotonic`` stays real, as it does when an
    operating system's wall clock jumps (NTP step, a VM resumed)."""

    def __init__(self, offset_ms: int = 0) -> None:
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        return super().now_ms() + self.offset_ms


def parse_clock_offset(text: str) -> int:
    """The offset in a control file: an integer of milliseconds within
    ``CLOCK_OFFSET_MAX_MS``; an empty file means 0. ``ValueError`` otherwise."""
    text = text.strip()
    if not text:
        return 0
    if len(text) > 20:
        raise ValueError("clock offset: too long")
    offset_ms = int(text)
    if abs(offset_ms) > CLOCK_OFFSET_MAX_MS:
        raise ValueError(f"clock offset: beyond {CLOCK_OFFSET_MAX_MS} ms")
    return offset_ms


class SteadyClock:
    """The wall clock a node stamps proposals and fires timers with, not
    following a step of the operating system's clock.

    ``inner``'s wall clock is followed while it stays within ``step_max_ms``
    of this clock's own timeline (the last value plus the monotonic time
    since). A bigger jump, forward or back (an NTP step, a VM resumed, the
    clock-skew nemesis), is not taken at once: the timeline runs on with
    real (monotonic) time and slews towards the wall clock at ``slew`` of
    the elapsed time (5 %: a minute's jump is absorbed in 20 minutes, or
    undone if the clock jumps back). So one node's clock step cannot expire
    TTLs, close windows or prune deduplication early; the state machine's
    own clamp (never back, a bounded step per entry) covers what is left.

    Values never decrease. Loop thread only."""

    def __init__(self, inner: Any, *, step_max_ms: int = 1_000, slew: float = 0.05) -> None:
        self.inner = inner
        self.step_max_ms = step_max_ms
        self.slew = slew
        self.jumps = 0  # wall-clock steps seen (each one logged)
        self.absorbing = False  # a step is being slewed away
        self.offset_ms = 0  # the wall clock minus this clock
        self._value = float(inner.now_ms())
        self._mono = inner.monotonic()

    def now_ms(self) -> int:
        wall, mono = self.inner.now_ms(), self.inner.monotonic()
        elapsed_ms = max(0.0, (mono - self._mono) * 1000)
        timeline = self._value + elapsed_ms
        gap = wall - timeline
        if abs(gap) <= self.step_max_ms:
            value = float(wall)
            if self.absorbing:
                log.warning("the wall clock agrees with this node's timeline again")
            self.absorbing = False
        else:
            if not self.absorbing:
                self.jumps += 1
                log.warning("the wall clock stepped %+d ms; not followed at once (slewing %g of real time)",
                            round(gap), self.slew)
            self.absorbing = True
            step = min(abs(gap), self.slew * elapsed_ms)
            value = timeline + (step if gap > 0 else -step)
        value = max(value, self._value)
        self.offset_ms = round(wall - value)
        self._value, self._mono = value, mono
        return int(value)

    def monotonic(self) -> float:
        return self.inner.monotonic()


class ManualClock:
    """A clock that moves only when a test says so."""

    def __init__(self, now_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = now_ms
        self._mono = 0.0

    def now_ms(self) -> int:
        return self._now_ms

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._now_ms += int(seconds * 1000)

    def step_wall(self, ms: int) -> None:
        """The wall clock jumps by ``ms``; monotonic time does not move."""
        self._now_ms += ms


class SystemRng:
    def token_hex(self, nbytes: int) -> str:
        return secrets.token_hex(nbytes)


class SeededRng:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._random = random.Random(seed)

    def token_hex(self, nbytes: int) -> str:
        return self._random.randbytes(nbytes).hex()
