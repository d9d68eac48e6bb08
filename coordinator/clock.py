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
