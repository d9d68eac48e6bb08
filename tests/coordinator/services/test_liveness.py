"""The phi-accrual detector and the heard table, with times given (no clock)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.services.liveness import HeardTable, PhiAccrual, PhiSettings

S = PhiSettings()


def regular(interval_s: float, beats: int, start_s: float = 100.0, jitter: list[float] | None = None) -> PhiAccrual:
    d = PhiAccrual()
    t = start_s
    for i in range(beats):
        d.heard(t + (jitter[i % len(jitter)] if jitter else 0.0), S)
        t += interval_s
    return d


def test_no_suspicion_before_enough_intervals():
    d = regular(1.0, S.samples_min)  # samples_min heartbeats: one interval short
    assert d.phi(1e9, S) == 0.0
    assert d.suspect_at(S) == math.inf
    d.heard(200.0, S)
    assert d.suspect_at(S) < math.inf


def test_a_regular_agent_is_suspected_after_the_stated_bound_and_not_before():
    d = regular(1.0, 20)
    last = d.last_s
    bound = S.bound_intervals()
    assert 4.5 < bound < 4.6  # 1 + 3 lost heartbeats + z(phi 8) * 0.1
    assert d.suspect_at(S) == pytest.approx(last + bound)
    assert d.phi(last + 1.0, S) < 1e-6
    assert d.phi(last + 3.9, S) < 1.0  # three lost heartbeats in a row: not suspicious
    assert d.phi(last + bound - 0.01, S) < S.threshold
    assert d.phi(last + bound + 0.01, S) >= S.threshold


@settings(max_examples=200, deadline=None)
@given(st.floats(0.05, 30.0), st.lists(st.floats(0.0, 0.5), min_size=1, max_size=8), st.integers(3, 40),
       st.floats(0.0, 10.0))
def test_phi_crosses_the_threshold_exactly_at_suspect_at(interval_s, jitter, beats, extra):
    d = regular(interval_s, beats, jitter=[j * interval_s for j in jitter])
    at = d.suspect_at(S)
    if at == math.inf:
        return
    assert at > d.last_s
    eps = 1e-6 * max(1.0, at)
    assert d.phi(at - max(eps, 1e-3 * (at - d.last_s)), S) < S.threshold
    assert d.phi(at + eps + extra, S) >= S.threshold - 1e-6


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1000.0), max_size=30))
def test_phi_never_falls_while_silent(times):
    d = regular(1.0, 10)
    phis = [d.phi(d.last_s + t, S) for t in sorted(times)]
    assert phis == sorted(phis)


def test_older_or_equal_times_are_ignored():
    d = regular(1.0, 5)
    last, mean = d.last_s, d.mean_s
    assert not d.heard(last, S)
    assert not d.heard(last - 3, S)
    assert (d.last_s, d.mean_s) == (last, mean)


def test_settings_refuse_nonsense():
    with pytest.raises(ValueError):
        PhiSettings(threshold=0.5)
    with pytest.raises(ValueError):
        PhiSettings(weight=0)


def test_table_merges_ages_and_keeps_the_newest():
    table = HeardTable()
    seen: list[tuple[str, float]] = []
    table.on_heard = lambda agent, heard: seen.append((agent, heard.at_s))
    table.heard_here("a", 7, now_s=10.0)
    assert not table.merge("a", 7, age_s=0.5, now_s=10.2)  # heard at 9.7 by a peer: older than 10.0
    assert seen == [("a", 10.0)]
    assert not table.merge("a", 7, age_s=2.0, now_s=11.0)  # heard at 9.0: older
    assert table.merge("a", 7, age_s=0.2, now_s=11.0)  # heard at 10.8
    assert table.entries["a"].at_s == pytest.approx(10.8)
    assert seen[-1] == ("a", pytest.approx(10.8))
    assert table.entries["a"].count == 1  # heartbeats answered here


def test_table_an_older_lease_never_moves_a_newer_one_and_a_newer_lease_replaces():
    table = HeardTable()
    table.heard_here("a", 7, now_s=10.0)
    table.merge("a", 9, age_s=0.0, now_s=10.5)  # re-registered: lease 9
    assert table.entries["a"].lease_id == 9
    assert not table.merge("a", 7, age_s=0.0, now_s=20.0)
    assert table.entries["a"].at_s == 10.5


def test_table_dirty_is_what_was_heard_here_since_the_last_take():
    table = HeardTable()
    table.heard_here("a", 1, 1.0)
    table.merge("b", 1, 0.0, 1.0)
    table.heard_here("c", 1, 1.0)
    assert sorted(table.take_dirty()) == ["a", "c"]
    assert table.take_dirty() == {}
    table.heard_here("a", 1, 2.0)
    table.forget("a")
    assert table.take_dirty() == {} and "a" not in table.entries


def test_table_is_bounded():
    table = HeardTable(entries_max=2)
    table.heard_here("a", 1, 1.0)
    table.heard_here("b", 1, 1.0)
    assert table.heard_here("c", 1, 1.0) is None and not table.merge("d", 1, 0.0, 1.0)
    assert table.refused == 2 and sorted(table.entries) == ["a", "b"]
    assert table.heard_here("a", 1, 2.0) is not None  # known agents still move


def test_a_lease_counts_from_its_registration_without_a_heartbeat():
    table = HeardTable()
    heard: list[str] = []
    table.on_heard = lambda agent, _: heard.append(agent)
    table.lease_started("a", 5, 10.0)
    assert table.entries["a"].at_s == 10.0 and table.entries["a"].detector.last_s is None
    assert heard == [] and table.take_dirty() == {}  # nothing was heard: nothing to gossip
    table.lease_started("a", 4, 11.0)  # an older lease's registration changes nothing
    assert table.entries["a"].lease_id == 5
    table.heard_here("a", 5, 12.0)
    assert table.entries["a"].detector.samples == 0  # the registration is not an interval
    table.lease_started("a", 9, 13.0)  # registered again: a new lease, a new detector
    assert (table.entries["a"].lease_id, table.entries["a"].at_s, table.entries["a"].count) == (9, 13.0, 0)
