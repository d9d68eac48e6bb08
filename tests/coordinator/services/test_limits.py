"""TokenBucket, KeyedBuckets, RetryBudget and backoff_s on explicit timelines."""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.services.balancer.limits import KeyedBuckets, RetryBudget, TokenBucket, backoff_s

FUZZ = settings(max_examples=200, deadline=None)


# -- constructors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "name"), [
    (lambda: TokenBucket(0, 5, 0.0), "rate"),
    (lambda: TokenBucket(-1, 5, 0.0), "rate"),
    (lambda: TokenBucket(float("nan"), 5, 0.0), "rate"),
    (lambda: TokenBucket(float("inf"), 5, 0.0), "rate"),
    (lambda: TokenBucket(1, 0.5, 0.0), "burst"),
    (lambda: TokenBucket(1, True, 0.0), "burst"),
    (lambda: KeyedBuckets(0, 5), "rate"),
    (lambda: KeyedBuckets(1, 0), "burst"),
    (lambda: KeyedBuckets(1, 5, max_keys=0), "max_keys"),
    (lambda: KeyedBuckets(1, 5, max_keys=2.5), "max_keys"),
    (lambda: RetryBudget(ratio=-0.1), "ratio"),
    (lambda: RetryBudget(min_per_s=-1), "min_per_s"),
    (lambda: RetryBudget(window_s=0), "window_s"),
    (lambda: RetryBudget(window_s=float("inf")), "window_s"),
    (lambda: backoff_s(0, 1.0, 10.0, random.Random(1)), "attempt"),
    (lambda: backoff_s(1, -1.0, 10.0, random.Random(1)), "base_s"),
    (lambda: backoff_s(1, 1.0, float("inf"), random.Random(1)), "max_s"),
])
def test_nonsense_values_name_the_parameter(make: Any, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("n", [0, -1, 5.5, float("nan")])
def test_a_take_that_could_never_succeed_is_an_error(n: float) -> None:
    bucket = TokenBucket(10, 5, 0.0)
    with pytest.raises(ValueError, match="n must"):
        bucket.take(0.0, n)
    with pytest.raises(ValueError, match="n must"):
        KeyedBuckets(10, 5).take("k", 0.0, n)


# -- TokenBucket ---------------------------------------------------------------------------------------


def test_burst_then_the_rate_exactly() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05)  # a refusal takes nothing
    assert bucket.take(0.1) == 0.0
    assert bucket.take(0.1) == pytest.approx(0.1)


def test_an_empty_bucket_grants_exactly_the_rate() -> None:
    bucket = TokenBucket(rate=16, burst=4, now=0.0)  # binary fractions: no rounding anywhere
    assert [bucket.take(0.0) for _ in range(4)] == [0.0] * 4
    granted = [i for i in range(1, 129) if bucket.take(i / 128) == 0.0]  # 1 s at 128 tries/s
    assert granted == list(range(8, 129, 8))


def test_never_more_than_burst_after_a_long_idle() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    bucket.take(0.0)
    granted = sum(bucket.take(1e6) == 0.0 for _ in range(20))
    assert granted == 5


def test_retry_after_is_when_the_take_succeeds() -> None:
    bucket = TokenBucket(rate=3, burst=2, now=7.3)
    bucket.take(7.3, 2)
    wait = bucket.take(7.4, 1.7)
    assert wait == pytest.approx(1.7 / 3 - 0.1)
    assert bucket.take(7.4 + wait * 0.99, 1.7) > 0
    assert bucket.take(7.4 + wait, 1.7) == 0.0


def test_fractional_takes() -> None:
    bucket = TokenBucket(rate=1, burst=1.5, now=0.0)
    assert [bucket.take(0.0, 0.5) for _ in range(3)] == [0.0] * 3
    assert bucket.take(0.0, 0.5) == pytest.approx(0.5)
    assert bucket.take(0.25, 0.25) == 0.0


def test_time_going_backwards_adds_no_tokens() -> None:
    bucket = TokenBucket(rate=1, burst=2, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(9.0) == 0.0  # the second token, taken "before" the first
    assert bucket.take(10.0) == pytest.approx(1.0)  # no token for the second between 9.0 and 10.0
    wait = bucket.take(9.0)
    assert wait == pytest.approx(2.0)  # from 9.0: the token is there at 11.0
    assert bucket.take(9.0 + wait) == 0.0


@FUZZ
@given(rate=st.floats(0.01, 1e4), burst=st.floats(1.0, 1e3), start=st.floats(0.0, 1e6),
       gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=60),
       sizes=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=60))
def test_grants_never_exceed_burst_plus_rate_times_elapsed(rate: float, burst: float, start: float,
                                                           gaps: list[float], sizes: list[float]) -> None:
    bucket = TokenBucket(rate, burst, start)
    now, granted = start, []  # (time, n) of each take that succeeded
    for i, gap in enumerate(gaps):
        now += gap
        n = min(burst, sizes[i % len(sizes)] * burst)
        if bucket.take(now, n) == 0.0:
            granted.append((now, n))
    for i, (t0, _) in enumerate(granted):
        total = 0.0
        for t1, n in granted[i:]:
            total += n
            # the slack covers rounding: a few ulps of now, times the rate, per refill
            assert total <= burst + rate * (t1 - t0) + 1e-9 * (burst + rate * now), (t0, t1, total)


@FUZZ
@given(rate=st.floats(0.01, 1e4), burst=st.floats(1.0, 1e3), start=st.floats(0.0, 1e6),
       first=st.floats(0.01, 1.0), then=st.floats(0.01, 1.0), gap=st.floats(0.0, 10.0))
def test_waiting_the_retry_after_always_succeeds(rate: float, burst: float, start: float, first: float,
                                                 then: float, gap: float) -> None:
    bucket = TokenBucket(rate, burst, start)
    bucket.take(start, first * burst)
    now = start + gap
    n = then * burst
    wait = bucket.take(now, n)
    if wait > 0:
        assert bucket.take(now + wait, n) == 0.0


# -- KeyedBuckets ------------------------------------------------------------------------------------


def test_keys_are_independent() -> None:
    buckets = KeyedBuckets(rate=1, burst=2)
    assert [buckets.take("a", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a", 0.0) == pytest.approx(1.0)
    assert [buckets.take("b", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a", 1.0) == 0.0


def test_least_recently_used_keys_are_dropped_beyond_max_keys() -> None:
    buckets = KeyedBuckets(rate=1, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        buckets.take(key, 0.0)
    assert buckets.take("a", 0.1) > 0  # a is now the most recently used, b the least
    buckets.take("d", 0.2)
    assert len(buckets) == 3
    assert buckets.evictions == 1
    assert buckets.take("a", 0.3) > 0  # kept, still empty
    assert buckets.take("c", 0.3) > 0  # kept
    for i in range(100):
        buckets.take(f"k{i}", 0.4)
    assert len(buckets) == 3
    assert buckets.evictions == 101


def test_a_dropped_key_comes_back_full() -> None:
    """Lenient by design (see KeyedBuckets): the drop forgets the debt."""
    buckets = KeyedBuckets(rate=1, burst=2, max_keys=1)
    buckets.take("a", 0.0, 2)
    assert buckets.take("a", 0.0) > 0
    buckets.take("b", 0.0)  # drops a
    assert buckets.take("a", 0.0, 2) == 0.0


# -- RetryBudget ---------------------------------------------------------------------------------------


def _retries(budget: RetryBudget, start: float, end: float, step: float) -> int:
    """Try a retry every ``step`` seconds in [start, end)."""
    count, i = 0, 0
    while (now := start + i * step) < end:
        count += budget.try_retry(now)
        i += 1
    return count


def test_with_no_traffic_only_the_floor_rate() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=10, window_s=10)
    granted = _retries(budget, 0.0, 30.0, 0.001)
    # 10/s for 30 s, plus the floor's burst of one second's worth at the start
    assert 300 <= granted <= 300 + 10 + 1
    assert _retries(RetryBudget(ratio=0.2, min_per_s=0), 0.0, 30.0, 0.01) == 0


def test_retries_are_a_ratio_of_requests_plus_the_floor() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=10, window_s=10)
    for i in range(1000):
        budget.request(i * 0.001)
    granted = sum(budget.try_retry(1.0) for _ in range(1000))
    assert granted == 200 + 10  # the ratio, then the floor's burst
    assert not budget.try_retry(1.0)
    assert budget.try_retry(1.1)  # the floor refills at 10/s


def test_without_a_floor_exactly_the_ratio() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0, window_s=10)
    for _ in range(1000):
        budget.request(0.0)
    assert sum(budget.try_retry(0.0) for _ in range(1000)) == 200
    for _ in range(5):
        budget.request(0.5)
    assert budget.try_retry(0.5)  # 5 more requests deposit one more retry
    assert not budget.try_retry(0.5)


def test_old_deposits_expire_after_window_s() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0, window_s=10)
    for _ in range(1000):
        budget.request(0.0)
    assert budget.try_retry(9.99)
    assert not budget.try_retry(10.0)


def test_retries_age_out_with_the_window() -> None:
    budget = RetryBudget(ratio=0.5, min_per_s=0, window_s=10)
    for _ in range(10):
        budget.request(0.0)
    assert sum(budget.try_retry(0.0) for _ in range(10)) == 5
    for _ in range(10):
        budget.request(10.0)  # the first 10 requests and their 5 retries left the window
    assert sum(budget.try_retry(10.0) for _ in range(10)) == 5


@FUZZ
@given(events=st.lists(st.tuples(st.booleans(), st.floats(0.0, 0.5)), max_size=300))
def test_retries_never_exceed_the_budget(events: list[tuple[bool, float]]) -> None:
    """Over the whole run: retries <= ratio * requests + the floor's rate over the run plus its burst."""
    budget = RetryBudget(ratio=0.2, min_per_s=2, window_s=1)
    now, requests, retries = 0.0, 0, 0
    for is_request, gap in events:
        now += gap
        if is_request:
            budget.request(now)
            requests += 1
        else:
            retries += budget.try_retry(now)
    assert retries <= 0.2 * requests + 2 * now + 2 + 1e-9


# -- backoff_s --------------------------------------------------------------------------------------------


@FUZZ
@given(attempt=st.integers(1, 100_000), base_s=st.floats(0.0, 10.0), max_s=st.floats(0.0, 3600.0),
       seed=st.integers(0, 2**32))
def test_backoff_stays_within_the_cap(attempt: int, base_s: float, max_s: float, seed: int) -> None:
    cap = float(min(Fraction(max_s), Fraction(base_s) * 2 ** (attempt - 1)))  # exact, then rounded
    assert 0.0 <= backoff_s(attempt, base_s, max_s, random.Random(seed)) <= cap


def test_backoff_grows_then_saturates_without_overflow() -> None:
    rng = random.Random(7)
    assert max(backoff_s(1, 0.1, 30.0, rng) for _ in range(200)) <= 0.1
    assert max(backoff_s(3, 0.1, 30.0, rng) for _ in range(200)) > 0.2  # up to 0.4
    for attempt in (10_000, 10**9):
        assert 0.0 <= backoff_s(attempt, 0.1, 30.0, rng) <= 30.0
    assert backoff_s(10_000, 0.0, 30.0, rng) == 0.0
    assert backoff_s(10_000, 1e300, 1e308, rng) <= 1e308


def test_backoff_is_deterministic_with_a_seeded_rng() -> None:
    def waits(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [backoff_s(attempt, 0.05, 5.0, rng) for attempt in range(1, 20)]

    assert waits(42) == waits(42)
    assert waits(42) != waits(43)
    assert len(set(waits(42))) == 19  # one fresh draw per call
