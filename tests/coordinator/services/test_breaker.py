"""CircuitBreaker: explicit timelines through ``now``, then a hypothesis state
machine over random allow/record/release/time sequences."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from coordinator.services.balancer.breaker import BreakerConfig, CircuitBreaker


def breaker(**fields: Any) -> CircuitBreaker:
    return CircuitBreaker(BreakerConfig(**fields))


def fail(b: CircuitBreaker, times: int, now: float) -> None:
    for _ in range(times):
        assert b.allow(now)
        b.record(False, now)


def succeed(b: CircuitBreaker, times: int, now: float) -> None:
    for _ in range(times):
        assert b.allow(now)
        b.record(True, now)


def opened(now: float = 0.0, **fields: Any) -> CircuitBreaker:
    """A breaker that opened at ``now`` on consecutive failures."""
    b = breaker(**fields)
    fail(b, b.config.consecutive_failures, now)
    assert b.state(now) == "open"
    return b


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("window_s", 0), ("window_s", -1.0), ("window_s", float("inf")), ("window_s", float("nan")),
    ("min_requests", 0), ("min_requests", 1.5), ("min_requests", True),
    ("failure_rate", 0), ("failure_rate", 1.01), ("failure_rate", -0.5), ("failure_rate", float("nan")),
    ("consecutive_failures", 0), ("open_s", -0.1), ("open_s", float("nan")),
    ("half_open_probes", 0), ("successes_to_close", 0), ("successes_to_close", "2"),
])
def test_nonsense_config_names_the_field(field: str, value: Any) -> None:
    config = dataclasses.replace(BreakerConfig(), **{field: value})
    with pytest.raises(ValueError, match=field):
        config.check()
    with pytest.raises(ValueError, match=field):
        CircuitBreaker(config)


def test_edge_configs_are_valid() -> None:
    BreakerConfig(failure_rate=1.0, open_s=0.0, min_requests=1, successes_to_close=3, half_open_probes=1).check()


# -- closed → open ---------------------------------------------------------------------------


def test_opens_after_n_consecutive_failures_not_before() -> None:
    b = breaker(consecutive_failures=5, min_requests=100)
    fail(b, 4, 0.0)
    assert b.state(0.0) == "closed"
    assert b.allow(0.0)
    b.record(False, 0.0)
    assert b.state(0.0) == "open"
    assert b.transitions == 1


def test_a_success_breaks_the_run_of_failures() -> None:
    b = breaker(consecutive_failures=3, min_requests=100)
    for _ in range(10):
        fail(b, 2, 0.0)
        succeed(b, 1, 0.0)
    assert b.state(0.0) == "closed"
    assert b.snapshot(0.0)["consecutive_failures"] == 0


def test_failure_rate_opens_only_with_min_requests() -> None:
    b = breaker(min_requests=10, failure_rate=0.5, consecutive_failures=100)
    for _ in range(4):  # 8 outcomes at 50 %: too few to judge
        fail(b, 1, 0.0)
        succeed(b, 1, 0.0)
    assert b.state(0.0) == "closed"
    succeed(b, 1, 0.0)
    fail(b, 1, 0.0)  # 10 outcomes, 5 failures: 50 % reached with min_requests
    assert b.state(0.0) == "open"


def test_rate_threshold_compares_like_the_config_states_it() -> None:
    b = breaker(min_requests=10, failure_rate=0.3, consecutive_failures=100)
    succeed(b, 7, 0.0)
    fail(b, 3, 0.0)  # 3 / 10 >= 0.3, although 0.3 * 10 > 3 in floats
    assert b.state(0.0) == "open"


def test_failures_spread_thin_stay_closed() -> None:
    b = breaker()  # 50 % over 10 s, 5 in a row
    now = 0.0
    for _ in range(1000):
        fail(b, 1, now)
        succeed(b, 2, now)
        now += 0.05
    assert b.state(now) == "closed"
    snap = b.snapshot(now)
    assert snap["failures"] / snap["requests"] == pytest.approx(1 / 3, abs=0.01)


def test_old_buckets_age_out() -> None:
    b = breaker(min_requests=10, failure_rate=0.5, consecutive_failures=100)
    succeed(b, 1, 0.0)
    fail(b, 8, 0.0)
    assert b.snapshot(5.0)["failures"] == 8  # still in the window
    succeed(b, 1, 11.0)
    assert b.snapshot(11.0) == {"state": "closed", "failures": 0, "requests": 1, "consecutive_failures": 0}
    fail(b, 1, 11.0)  # with the 8 failures of 11 s ago this would be 9 of 11
    assert b.state(11.0) == "closed"
    assert b.snapshot(11.0)["requests"] == 2


def test_the_window_drops_a_bucket_at_a_time() -> None:
    """10 buckets of 1 s: an outcome counts until its bucket is 10 buckets old."""
    b = breaker(consecutive_failures=100)
    fail(b, 1, 0.5)
    assert b.snapshot(9.99)["failures"] == 1
    assert b.snapshot(10.0)["failures"] == 0


def test_a_success_does_not_open_even_when_the_rate_is_high() -> None:
    b = breaker(min_requests=4, failure_rate=0.5, consecutive_failures=100)
    succeed(b, 3, 0.0)
    fail(b, 3, 9.5)  # 3 of 6
    assert b.state(9.5) == "open"
    b2 = breaker(min_requests=4, failure_rate=0.5, consecutive_failures=100)
    succeed(b2, 6, 0.0)
    fail(b2, 4, 9.5)  # 4 of 10: closed; the 6 successes then age out
    succeed(b2, 1, 10.5)  # 4 of 5 failed in the window, but a success never opens
    assert b2.state(10.5) == "closed"


# -- open -------------------------------------------------------------------------------------


def test_rejects_while_open_and_reports_when_it_retries() -> None:
    b = opened(now=100.0, open_s=5.0)
    for now in (100.0, 101.0, 102.0):
        assert not b.allow(now)
    snap = b.snapshot(102.0)
    assert snap["state"] == "open"
    assert snap["opened_at"] == 100.0
    assert snap["retry_in_s"] == pytest.approx(3.0)
    assert snap["consecutive_failures"] == 5
    assert not b.allow(104.999)


def test_half_open_exactly_after_open_s() -> None:
    b = opened(now=0.1, open_s=5.0)
    assert b.state(5.0999999) == "open"
    assert b.state(0.1 + 5.0) == "half_open"
    assert b.transitions == 2
    assert b.state(6.0) == "half_open"  # reading it again is not a transition
    assert b.transitions == 2


def test_zero_cool_down_goes_half_open_at_once() -> None:
    b = breaker(open_s=0.0)
    fail(b, 5, 1.0)
    assert b.state(1.0) == "half_open"
    assert b.snapshot(1.0)["opened_at"] == 1.0
    assert b.transitions == 2


def test_late_outcomes_while_open_change_nothing() -> None:
    b = breaker()
    for _ in range(8):
        assert b.allow(0.0)  # in flight when the breaker opens
    fail(b, 5, 0.0)
    before = b.snapshot(1.0)
    for ok in (True, False, True, True):
        b.record(ok, 1.0)
    b.release(1.0)
    assert b.snapshot(1.0) == before
    assert b.transitions == 1
    assert b.state(5.0) == "half_open"  # no fresh cool-down from the late failure


# -- half-open --------------------------------------------------------------------------------


def test_only_half_open_probes_at_once() -> None:
    b = opened(half_open_probes=2, successes_to_close=3)
    assert b.allow(5.0)
    assert b.allow(5.0)
    assert not b.allow(5.0)
    assert b.snapshot(5.0)["probes_in_flight"] == 2
    b.record(True, 5.5)  # frees one slot, 1 of 3 successes
    assert b.state(5.5) == "half_open"
    assert b.allow(5.5)
    assert not b.allow(5.5)


def test_release_frees_a_probe_slot_without_an_outcome() -> None:
    b = opened(successes_to_close=1)
    assert b.allow(5.0)
    assert not b.allow(5.0)
    b.release(5.0)
    assert b.state(5.0) == "half_open"
    assert b.allow(5.0)
    b.record(True, 5.1)
    assert b.state(5.1) == "closed"


def test_probe_failure_reopens_with_a_fresh_cool_down() -> None:
    b = opened(now=0.0, open_s=5.0)
    assert b.allow(7.0)
    b.record(False, 8.0)
    assert b.state(8.0) == "open"
    assert b.snapshot(8.0)["opened_at"] == 8.0
    assert not b.allow(12.9)
    assert b.state(13.0) == "half_open"
    assert b.transitions == 4  # closed→open→half_open→open→half_open


def test_successes_close_and_reset_the_window() -> None:
    b = breaker(successes_to_close=2, half_open_probes=1, consecutive_failures=3, min_requests=100)
    succeed(b, 1, 0.0)
    fail(b, 3, 0.0)
    assert b.state(5.0) == "half_open"
    assert b.allow(5.0)
    b.record(True, 5.1)
    assert b.state(5.1) == "half_open"  # one of two
    assert b.allow(5.2)
    b.record(True, 5.3)
    assert b.snapshot(5.3) == {"state": "closed", "failures": 0, "requests": 0, "consecutive_failures": 0}
    fail(b, 2, 5.4)  # the 3 failures before opening are forgotten: 2 of 2 is not 3 in a row
    assert b.state(5.4) == "closed"
    fail(b, 1, 5.4)
    assert b.state(5.4) == "open"


def test_the_window_after_closing_holds_only_new_outcomes() -> None:
    b = breaker(consecutive_failures=3, min_requests=4)
    succeed(b, 1, 0.0)
    fail(b, 3, 2.0)
    succeed(b, 1, 7.0)  # the probe closes it
    fail(b, 1, 7.0)
    fail(b, 1, 12.5)  # the failures at 2.0 have left the window by now in any case
    assert b.snapshot(12.5) == {"state": "closed", "failures": 2, "requests": 2, "consecutive_failures": 2}
    assert b.snapshot(17.0) == {"state": "closed", "failures": 1, "requests": 1, "consecutive_failures": 2}
    assert b.snapshot(30.0) == {"state": "closed", "failures": 0, "requests": 0, "consecutive_failures": 2}


def test_an_outcome_in_half_open_with_no_probe_out_is_ignored() -> None:
    b = opened(successes_to_close=1)
    b.record(True, 5.0)  # a late answer: no probe is out
    b.record(False, 5.0)
    assert b.state(5.0) == "half_open"
    assert b.snapshot(5.0)["probes_in_flight"] == 0


def test_probes_out_when_a_probe_fails_answer_into_open() -> None:
    b = opened(half_open_probes=2)
    assert b.allow(5.0)
    assert b.allow(5.0)
    b.record(False, 5.0)  # reopened
    b.record(True, 5.1)  # the other probe: ignored
    assert b.state(5.1) == "open"
    assert b.state(10.0) == "half_open"
    assert b.snapshot(10.0)["probes_in_flight"] == 0


def test_time_going_backwards_counts_as_the_latest_time() -> None:
    b = opened(now=10.0)
    assert b.state(15.0) == "half_open"
    assert b.state(1.0) == "half_open"
    assert b.allow(1.0)


# -- random sequences ---------------------------------------------------------------------------


CONFIG = BreakerConfig(window_s=10.0, min_requests=4, failure_rate=0.5, consecutive_failures=3, open_s=5.0,
                       half_open_probes=2, successes_to_close=2)


class BreakerRules(RuleBasedStateMachine):
    """Requests the breaker allowed are outstanding until recorded or released
    (the caller's contract); the test keeps them, tagged with the state they
    were allowed in, and answers them in any order, also late."""

    def __init__(self) -> None:
        super().__init__()
        self.breaker = CircuitBreaker(CONFIG)
        self.now = 1000.0
        self.outstanding: list[str] = []  # the state each outstanding request was allowed in
        self.grants_this_half_open = 0  # allows granted since the breaker last went half-open
        self.frees_this_half_open = 0  # outcomes or releases since then
        self.last_state = "closed"
        self.last_transitions = 0

    def _observe(self) -> str:
        """The state now; resets the half-open tallies on a new half-open episode."""
        state = self.breaker.state(self.now)
        if self.breaker.transitions != self.last_transitions and state == "half_open":
            self.grants_this_half_open = self.frees_this_half_open = 0
        self.last_state, self.last_transitions = state, self.breaker.transitions
        return state

    @rule(dt=st.one_of(st.sampled_from([0.0, 0.001, 1.0, CONFIG.open_s, CONFIG.window_s]),
                       st.floats(0.0, 20.0, allow_nan=False)))
    def advance(self, dt: float) -> None:
        before = self.breaker.state(self.now)
        opened_at = self.breaker.snapshot(self.now).get("opened_at")
        self.now += dt
        after = self._observe()
        if before == "open":
            assert after == ("half_open" if self.now >= opened_at + CONFIG.open_s else "open")
        else:
            assert after == before  # only open changes with time alone

    @rule()
    def allow(self) -> None:
        state = self._observe()
        allowed = self.breaker.allow(self.now)
        if state == "closed":
            assert allowed
        elif state == "open":
            assert not allowed
        if allowed:
            self.outstanding.append(state)
            if state == "half_open":
                self.grants_this_half_open += 1

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), ok=st.booleans(), release=st.booleans())
    def finish(self, data: st.DataObject, ok: bool, release: bool) -> None:
        index = data.draw(st.integers(0, len(self.outstanding) - 1))
        self.outstanding.pop(index)
        state = self._observe()
        transitions = self.breaker.transitions
        if state == "half_open":
            self.frees_this_half_open += 1
        if release:
            self.breaker.release(self.now)
            assert self.breaker.transitions == transitions  # a release never changes the state
        else:
            self.breaker.record(ok, self.now)
            if state == "open":
                assert self.breaker.transitions == transitions  # late outcomes are ignored
            if state == "closed" and ok:
                assert self.breaker.transitions == transitions  # a success never opens
        self._observe()

    @invariant()
    def state_is_one_of_three(self) -> None:
        assert self.breaker.state(self.now) in ("closed", "open", "half_open")

    @invariant()
    def open_allows_nothing(self) -> None:
        if self.breaker.state(self.now) == "open":
            assert not self.breaker.allow(self.now)  # and, refused, takes nothing

    @invariant()
    def half_open_bounds_its_probes(self) -> None:
        self._observe()
        if self.last_state == "half_open":
            snap = self.breaker.snapshot(self.now)
            assert 0 <= snap["probes_in_flight"] <= CONFIG.half_open_probes
            # Without tickets a freed slot may belong to a late answer, so what the
            # caller can observe is: each grant needs a slot that nobody holds.
            assert self.grants_this_half_open <= CONFIG.half_open_probes + self.frees_this_half_open

    @invariant()
    def closed_never_holds_a_tripping_run(self) -> None:
        snap = self.breaker.snapshot(self.now)
        if snap["state"] == "closed":
            assert snap["consecutive_failures"] < CONFIG.consecutive_failures
            assert 0 <= snap["failures"] <= snap["requests"]


BreakerRules.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBreakerRules = BreakerRules.TestCase
