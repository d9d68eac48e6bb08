"""Clocks and randomness, injected wherever they are used."""

from __future__ import annotations

import random
import secrets
import time


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


class SystemRng:
    def token_hex(self, nbytes: int) -> str:
        return secrets.token_hex(nbytes)


class SeededRng:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._random = random.Random(seed)

    def token_hex(self, nbytes: int) -> str:
        return self._random.randbytes(nbytes).hex()
