"""A circuit breaker per backend (an agent), driven by an injected clock.

```
                 consecutive failures >= consecutive_failures, or
                 failures/requests >= failure_rate with requests >= min_requests
      closed ──────────────────────────────────────────────────────────► open
        ▲                                                            │   ▲
        │ successes_to_close probe successes                 open_s  │   │ a probe fails
        │ (the window is reset)                              passed  ▼   │ (fresh cool-down)
        └────────────────────────────────────────────────────── half_open
```

Pure: no I/O, no clock, no randomness. Every method takes ``now``, monotonic
seconds; ``now`` should not go backwards, and a smaller ``now`` than one seen
before is taken as the latest one seen. Not thread-safe: one owner (the
event loop's balancer) calls it.

The caller's contract: every ``allow(now) is True`` is followed by exactly one
``record(ok, now)`` (the request was sent and answered, or failed) or
``release(now)`` (it was never sent, or cancelled before any outcome).
``allow()`` returns no ticket, so the breaker cannot tell which request an
outcome belongs to; what follows from that is spelled out on ``record``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# The failure-rate window is kept as this many buckets of window_s / WINDOW_BUCKETS
# each: memory stays bounded whatever the request rate, at the price of outcomes
# leaving the window a whole bucket at a time.
WINDOW_BUCKETS = 10


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_float(name: str, value: Any, *, allow_zero: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker opens and how it recovers. ``check()`` validates it
    (``CircuitBreaker`` calls it); constructing one checks nothing."""

    window_s: float = 10.0  # failure-rate window, WINDOW_BUCKETS buckets of window_s / 10
    min_requests: int = 10  # the failure rate counts only with at least this many outcomes in the window
    failure_rate: float = 0.5  # open when failures / requests >= this (and min_requests)
    consecutive_failures: int = 5  # or after this many failures in a row, however far apart
    open_s: float = 5.0  # cool-down before half-open; 0 goes half-open at once
    half_open_probes: int = 1  # probe requests allowed at once while half-open
    # Probe successes needed to close. May exceed half_open_probes: a probe's
    # outcome frees its slot, so with 1 probe and 3 to close, three probes in
    # sequence must succeed. Any probe failure reopens.
    successes_to_close: int = 1

    def check(self) -> None:
        """``ValueError`` naming the first nonsensical field; None otherwise."""
        _check_float("window_s", self.window_s, allow_zero=False)
        _check_int("min_requests", self.min_requests, 1)
        ok = (isinstance(self.failure_rate, int | float) and not isinstance(self.failure_rate, bool)
              and 0 < self.failure_rate <= 1)
        if not ok:
            raise ValueError(f"failure_rate must be in (0, 1], got {self.failure_rate!r}")
        _check_int("consecutive_failures", self.consecutive_failures, 1)
        _check_float("open_s", self.open_s, allow_zero=True)
        _check_int("half_open_probes", self.half_open_probes, 1)
        _check_int("successes_to_close", self.successes_to_close, 1)


class CircuitBreaker:
    """One backend's breaker. ``transitions`` counts state changes (for metrics),
    including open → half_open, which happens lazily at the first call that
    sees ``now >= opened_at + open_s``."""

    def __init__(self, config: BreakerConfig) -> None:
        config.check()
        self.config = config
        self.transitions = 0
        self._state = CLOSED
        self._now = -math.inf  # the latest now seen
        self._bucket_s = config.window_s / WINDOW_BUCKETS
        self._buckets: deque[list[int]] = deque()  # [epoch, requests, failures], oldest first
        self._requests = 0  # sums over _buckets
        self._failures = 0
        self._consecutive = 0
        self._opened_at = 0.0
        self._half_open_at = 0.0  # _opened_at + open_s, computed once so the boundary is exact
        self._probes_out = 0  # half-open slots taken and not yet given back
        self._probe_successes = 0

    # -- queries ----------------------------------------------------------------------

    def state(self, now: float) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``. An open breaker turns
        half-open here once ``open_s`` has passed (so this may count a transition)."""
        self._advance(now)
        return self._state

    def snapshot(self, now: float) -> dict[str, Any]:
        """For /v1/status: ``state``; ``failures`` and ``requests`` in the
        window; ``consecutive_failures`` (when open or half-open: the run that
        opened it); ``opened_at`` when open or half-open (the latest opening);
        ``retry_in_s`` when open (until half-open); ``probes_in_flight`` when
        half-open."""
        now = self._advance(now)
        self._expire(now)
        out: dict[str, Any] = {"state": self._state, "failures": self._failures, "requests": self._requests,
                               "consecutive_failures": self._consecutive}
        if self._state != CLOSED:
            out["opened_at"] = self._opened_at
        if self._state == OPEN:
            out["retry_in_s"] = max(0.0, self._half_open_at - now)
        if self._state == HALF_OPEN:
            out["probes_in_flight"] = self._probes_out
        return out

    # -- a request's life -----------------------------------------------------------------

    def allow(self, now: float) -> bool:
        """May a request go now? Closed: yes. Open: no. Half-open: yes while
        fewer than ``half_open_probes`` probes are out, and the request takes a
        probe slot (given back by ``record`` or ``release``)."""
        self._advance(now)
        if self._state == CLOSED:
            return True
        if self._state == HALF_OPEN and self._probes_out < self.config.half_open_probes:
            self._probes_out += 1
            return True
        return False

    def record(self, ok: bool, now: float) -> None:
        """The outcome of a request that ``allow()`` let through.

        - closed: counted in the window and the run of failures; a failure may open.
        - open: ignored. Such an outcome is a late answer to a request allowed
          before the breaker opened (or a probe still out when another probe
          failed); it says nothing about the backend since the opening.
        - half-open with probes out: taken as a probe's outcome and frees its
          slot. A failure reopens with a fresh cool-down; the
          ``successes_to_close``-th success closes with an empty window. Without
          tickets a late answer of a pre-opening request that lands here is
          indistinguishable from a probe's and is counted as one: a late failure
          reopens (the safe side), a late success counts toward closing.
        - half-open with no probe out: a late answer, ignored.
        """
        now = self._advance(now)
        if self._state == CLOSED:
            self._count(ok, now)
            if not ok and self._should_trip():
                self._become_open(now)
        elif self._state == HALF_OPEN and self._probes_out > 0:
            self._probes_out -= 1
            if not ok:
                self._become_open(now)
                return
            self._probe_successes += 1
            if self._probe_successes >= self.config.successes_to_close:
                self._become_closed()

    def release(self, now: float) -> None:
        """A request that ``allow()`` let through will have no outcome (never
        sent, cancelled): give its probe slot back if half-open; nothing is
        counted. A no-op when closed or open."""
        self._advance(now)
        if self._state == HALF_OPEN and self._probes_out > 0:
            self._probes_out -= 1

    # -- transitions ------------------------------------------------------------------------

    def _advance(self, now: float) -> float:
        """Clamp ``now`` to the latest seen, and turn open into half-open when due."""
        if now > self._now:
            self._now = now
        if self._state == OPEN and self._now >= self._half_open_at:
            self._state = HALF_OPEN
            self._probes_out = 0  # a new episode: slots of probes sent before the last opening are forgotten
            self._probe_successes = 0
            self.transitions += 1
        return self._now

    def _become_open(self, now: float) -> None:
        self._state = OPEN
        self._opened_at = now
        self._half_open_at = now + self.config.open_s
        self.transitions += 1
        # With open_s == 0 the breaker is half-open at once.
        self._advance(now)

    def _become_closed(self) -> None:
        self._state = CLOSED
        self._buckets.clear()
        self._requests = self._failures = self._consecutive = 0
        self._probes_out = self._probe_successes = 0
        self.transitions += 1

    # -- the window ------------------------------------------------------------------------

    def _epoch(self, now: float) -> int:
        return math.floor(now / self._bucket_s)

    def _expire(self, now: float) -> None:
        """Drop buckets older than the window: it holds the current bucket and
        the WINDOW_BUCKETS - 1 before it, so an outcome counts for between
        window_s * (1 - 1/WINDOW_BUCKETS) and window_s seconds."""
        oldest = self._epoch(now) - WINDOW_BUCKETS + 1
        while self._buckets and self._buckets[0][0] < oldest:
            _, requests, failures = self._buckets.popleft()
            self._requests -= requests
            self._failures -= failures

    def _count(self, ok: bool, now: float) -> None:
        self._expire(now)
        epoch = self._epoch(now)
        if not self._buckets or self._buckets[-1][0] != epoch:
            self._buckets.append([epoch, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        self._requests += 1
        if ok:
            self._consecutive = 0
        else:
            bucket[2] += 1
            self._failures += 1
            self._consecutive += 1

    def _should_trip(self) -> bool:
        """Checked after a failure only: a success never opens the breaker,
        even when older successes aging out leave a high rate behind."""
        config = self.config
        if self._consecutive >= config.consecutive_failures:
            return True
        # Divided, as the config states it: 3 / 10 >= 0.3 holds where 3 >= 0.3 * 10 does not.
        return self._requests >= config.min_requests and self._failures / self._requests >= config.failure_rate
