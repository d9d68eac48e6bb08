"""Rate limits, retry budgets and backoff for the balancer, driven by an injected clock.

Pure: no I/O, no clock, no global randomness. Every method takes ``now``,
monotonic seconds; ``now`` should not go backwards, and a smaller ``now``
than one seen before counts as no time passing. Not thread-safe: one owner
(the event loop's balancer) calls each object.

Constructors reject nonsensical values with ``ValueError`` naming the parameter.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import random

# A failed take's Retry-After is nudged up by at most this many steps of one ulp
# so that take(now + wait) succeeds despite rounding (one or two are ever needed).
_MAX_NUDGES = 64
# RetryBudget's window is kept as this many buckets: bounded memory at any rate.
_BUDGET_BUCKETS = 10


def _check_number(name: str, value: Any, low: float, *, inclusive: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (value == low and not inclusive):
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_take(n: Any, burst: float) -> float:
    """A take of more than ``burst`` could never succeed: an error, not an infinite Retry-After."""
    ok = isinstance(n, int | float) and not isinstance(n, bool) and 0 < n <= burst
    if not ok:
        raise ValueError(f"n must be a number in (0, burst={burst:g}], got {n!r}")
    return float(n)


class TokenBucket:
    """``rate`` tokens per second up to ``burst`` tokens, full at ``now``.

    ``burst >= 1`` so that a take of one token is always possible eventually.
    """

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = _check_number("rate", rate, 0.0, inclusive=False)
        self.burst = _check_number("burst", burst, 1.0)
        self._tokens = self.burst
        self._at = now  # when _tokens was right

    def _tokens_at(self, now: float) -> float:
        if now <= self._at:
            return self._tokens
        return min(self.burst, self._tokens + (now - self._at) * self.rate)

    def take(self, now: float, n: float = 1.0) -> float:
        """Take ``n`` tokens (0 < n <= burst, fractions allowed): 0.0 if taken.
        Otherwise nothing is taken and nothing changes, and the answer is the
        seconds until ``n`` tokens will be there (the Retry-After): when nothing
        else takes in between, ``take(now + answer, n)`` succeeds."""
        n = _check_take(n, self.burst)
        tokens = self._tokens_at(now)
        if tokens >= n:
            self._tokens = tokens - n
            self._at = max(self._at, now)
            return 0.0
        # A refused take leaves the state alone, so the check below predicts
        # exactly what take(now + wait) will compute.
        wait = max(0.0, self._at - now) + (n - tokens) / self.rate
        for _ in range(_MAX_NUDGES):
            if self._tokens_at(now + wait) >= n:
                break
            wait += math.ulp(now + wait)
        return wait


class KeyedBuckets:
    """Token buckets by key (a caller id, an agent type), bounded: least recently
    used keys are dropped beyond ``max_keys``.

    Lenient by design: a dropped key comes back with a full bucket, so more than
    ``max_keys`` active keys (many callers, or one caller cycling through ids)
    get more than their rate. Size ``max_keys`` above the keys expected to be
    active at once; ``evictions`` counts the drops (for metrics).
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate = _check_number("rate", rate, 0.0, inclusive=False)
        self.burst = _check_number("burst", burst, 1.0)
        self.max_keys = _check_int("max_keys", max_keys, 1)
        self.evictions = 0
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float, n: float = 1.0) -> float:
        """``TokenBucket.take`` on ``key``'s bucket, made full at ``now`` if the
        key is new (or was dropped). Any take, refused or not, uses the key."""
        _check_take(n, self.burst)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
                self.evictions += 1
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now, n)


class RetryBudget:
    """Finagle-style: retries may add at most ``ratio`` of the requests seen in
    the last ``window_s`` seconds, plus ``min_per_s`` retries per second, so
    retries cannot amplify an outage.

    Two pools, the ratio pool drawn first:

    - ratio: a retry is allowed while retries + 1 <= ratio * requests, both
      counted over the window (10 buckets of window_s / 10 each, so a
      deposit counts for between 0.9 * window_s and window_s seconds).
      Retries age out of the window like requests do.
    - floor: a token bucket of rate ``min_per_s`` and burst one second's
      worth (at least 1), made full at the first call, since the constructor
      has no ``now``. With no requests at all, at most
      ``min_per_s * (elapsed + 1 s)`` retries go. ``min_per_s = 0`` disables it.

    ``ratio = 0`` and ``min_per_s = 0`` together forbid every retry.
    """

    def __init__(self, ratio: float = 0.2, min_per_s: float = 10.0, window_s: float = 10.0) -> None:
        self.ratio = _check_number("ratio", ratio, 0.0)
        self.min_per_s = _check_number("min_per_s", min_per_s, 0.0)
        self.window_s = _check_number("window_s", window_s, 0.0, inclusive=False)
        self._bucket_s = self.window_s / _BUDGET_BUCKETS
        self._buckets: deque[list[int]] = deque()  # [epoch, requests, retries], oldest first
        self._requests = 0  # sums over _buckets
        self._retries = 0
        self._floor: TokenBucket | None = None
        self._now = -math.inf

    def request(self, now: float) -> None:
        """A first attempt happened: deposits ``ratio`` of a retry for the window."""
        bucket = self._current(now)
        bucket[1] += 1
        self._requests += 1

    def try_retry(self, now: float) -> bool:
        """May one retry go now? Withdraws from the budget when True."""
        bucket = self._current(now)
        if self._retries + 1 <= self.ratio * self._requests:
            bucket[2] += 1
            self._retries += 1
            return True
        return self._floor is not None and self._floor.take(self._now) == 0.0

    def _current(self, now: float) -> list[int]:
        """Clamp ``now``, age the window and return the bucket of ``now``."""
        if now > self._now:
            self._now = now
        if self._floor is None and self.min_per_s > 0:
            self._floor = TokenBucket(self.min_per_s, max(1.0, self.min_per_s), self._now)
        epoch = math.floor(self._now / self._bucket_s)
        oldest = epoch - _BUDGET_BUCKETS + 1
        while self._buckets and self._buckets[0][0] < oldest:
            _, requests, retries = self._buckets.popleft()
            self._requests -= requests
            self._retries -= retries
        if not self._buckets or self._buckets[-1][0] != epoch:
            self._buckets.append([epoch, 0, 0])
        return self._buckets[-1]


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """The wait before retry number ``attempt`` (1 for the first retry), full
    jitter: uniform(0, min(max_s, base_s * 2 ** (attempt - 1))). The only
    randomness is ``rng``'s, one ``uniform`` draw per call, so a seeded rng
    gives the same waits. Any ``attempt`` is fine: the growth is computed with
    ldexp (exact, no libm pow) and saturates at ``max_s`` instead of overflowing."""
    _check_int("attempt", attempt, 1)
    base_s = _check_number("base_s", base_s, 0.0)
    max_s = _check_number("max_s", max_s, 0.0)
    try:
        # 2 ** 2100 exceeds the ratio of any two positive doubles, so the exponent
        # is clipped there: beyond it the cap is max_s anyway, unless base_s is 0.
        grown_s = math.ldexp(base_s, min(attempt - 1, 2100))
    except OverflowError:
        grown_s = math.inf
    return rng.uniform(0.0, min(max_s, grown_s))
