"""Load balancing strategies and LoadStats: the fairness of each rotation, the
load-aware picks against exact minima, and the hash ring's spread and key
movement, measured over 100 000 keys."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.commands.balancer import STRATEGY_NAMES
from coordinator.errors import InvalidInput, InvariantError
from coordinator.services.balancer.strategies import (
    RING_POINTS_MAX,
    STRATEGIES,
    Candidate,
    ConsistentHash,
    LoadStats,
    NeedsKey,
    Strategy,
    make_strategy,
)

KEYS = [f"key-{i}" for i in range(100_000)]


def agents(*ids: str, weight: int = 1) -> list[Candidate]:
    return [Candidate(agent_id, weight) for agent_id in ids]


def pick_ids(strategy: Strategy, candidates: Sequence[Candidate], n: int, stats: LoadStats | None = None,
             key: str | None = None) -> list[str]:
    stats = stats or LoadStats()
    return [strategy.pick(candidates, stats, key).id for _ in range(n)]


def seeded(name: str, seed: int = 0) -> Strategy:
    return make_strategy(name, random.Random(seed))


# -- the registry of strategies ----------------------------------------------------------------


def test_every_policy_strategy_exists_under_its_name() -> None:
    assert set(STRATEGIES) == set(STRATEGY_NAMES)
    for name in STRATEGIES:
        assert make_strategy(name, random.Random(0)).name == name


def test_an_unknown_strategy_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="fastest"):
        make_strategy("fastest", random.Random(0))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_no_candidates_or_a_duplicate_id_is_a_bug(name: str) -> None:
    strategy = seeded(name)
    with pytest.raises(InvariantError):
        strategy.pick([], LoadStats(), "k")
    with pytest.raises(InvariantError):
        strategy.pick([Candidate("a", 1), Candidate("b", 1), Candidate("a", 2)], LoadStats(), "k")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("weight", [0, -1, True, 1.5, "1"])
def test_a_weight_is_an_integer_of_at_least_one(name: str, weight: object) -> None:
    strategy = make_strategy(name, random.Random(1))
    with pytest.raises(InvariantError):
        strategy.pick([Candidate("a", weight)], LoadStats(), "k")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@given(seed=st.integers(0, 2**32 - 1))
@settings(max_examples=20, deadline=None)
def test_picks_depend_on_the_rng_and_the_loads_not_on_the_candidates_order(name: str, seed: int) -> None:
    """Two nodes with equal rngs and equal stats pick alike, however their
    candidate lists happen to be ordered."""
    shuffler = random.Random(seed)
    candidates = [Candidate(f"agent-{i}", 1 + i % 3) for i in range(6)]
    runs = []
    for _ in range(2):
        strategy, stats = seeded(name, seed), LoadStats()
        run = []
        for i in range(60):
            shuffler.shuffle(candidates)
            chosen = strategy.pick(candidates, stats, f"k{i}").id
            stats.started(chosen)
            if i % 3 == 0:
                stats.finished(chosen, latency_s=0.01 * (i % 7), now=float(i))
            run.append(chosen)
        runs.append(run)
    assert runs[0] == runs[1], f"seed={seed}"


# -- round robin ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_round_robin_gives_each_exactly_its_share(n: int) -> None:
    candidates = agents(*(f"a{i}" for i in range(n)))
    picks = pick_ids(seeded("round_robin"), list(reversed(candidates)), 5 * n)
    assert Counter(picks) == {c.id: 5 for c in candidates}
    assert picks[:n] == sorted(c.id for c in candidates)  # rotates in id order


def test_round_robin_goes_on_after_the_last_pick_when_agents_come_and_go() -> None:
    strategy = seeded("round_robin")
    assert pick_ids(strategy, agents("a", "b", "c", "d"), 2) == ["a", "b"]
    # a leaves: c is next (the third pick modulo 3 agents would be d, skipping c)
    assert pick_ids(strategy, agents("b", "c", "d"), 4) == ["c", "d", "b", "c"]
    # bb joins between b and c in id order
    assert pick_ids(strategy, agents("b", "bb", "c", "d"), 4) == ["d", "b", "bb", "c"]
    # the agent picked last leaves: the rotation goes on from its place
    assert pick_ids(strategy, agents("b", "bb", "d"), 3) == ["d", "b", "bb"]


@given(
    initial=st.sets(st.sampled_from("abcdefgh"), min_size=1),
    steps=st.lists(st.tuples(st.sampled_from(["pick", "join", "leave"]), st.sampled_from("abcdefgh")), max_size=80),
)
def test_round_robin_is_fair_to_the_agents_present_all_along(initial: set[str], steps: list[tuple[str, str]]) -> None:
    strategy, present, counts, always = seeded("round_robin"), set(initial), Counter[str](), set(initial)
    for op, agent_id in steps:
        if op == "join":
            present.add(agent_id)
        elif op == "leave" and len(present) > 1:
            present.discard(agent_id)
        always &= present
        if op == "pick":
            counts[strategy.pick(agents(*present), LoadStats(), None).id] += 1
    shares = [counts[agent_id] for agent_id in always]
    assert not shares or max(shares) - min(shares) <= 1, (counts, always)


# -- smooth weighted round robin -----------------------------------------------------------------


def test_swrr_gives_nginx_sequence_for_5_1_1() -> None:
    candidates = [Candidate("c", 1), Candidate("a", 5), Candidate("b", 1)]
    assert "".join(pick_ids(seeded("weighted_round_robin"), candidates, 21)) == "aabacaa" * 3


@given(weights=st.lists(st.integers(1, 8), min_size=1, max_size=8))
def test_swrr_gives_each_agent_its_weight_in_every_cycle(weights: list[int]) -> None:
    candidates = [Candidate(f"a{i}", w) for i, w in enumerate(weights)]
    total = sum(weights)
    picks = pick_ids(seeded("weighted_round_robin"), candidates, 3 * total)
    expected = {c.id: c.weight for c in candidates}
    # every window of one cycle, not only the aligned ones: the sequence has period sum(weights)
    for start in range(2 * total + 1):
        assert Counter(picks[start:start + total]) == expected


def test_swrr_weight_change_takes_effect() -> None:
    strategy = seeded("weighted_round_robin")
    assert Counter(pick_ids(strategy, agents("a", "b"), 11)) == {"a": 6, "b": 5}
    changed = [Candidate("a", 1), Candidate("b", 3)]
    picks = pick_ids(strategy, changed, 400)
    assert abs(picks.count("b") - 300) <= 1
    # after the first cycle the old state has washed out: exact per cycle again
    assert all(Counter(picks[i:i + 4]) == {"a": 1, "b": 3} for i in range(4, 396, 4))


def test_swrr_never_picks_a_removed_agent_and_starts_a_new_one_at_zero() -> None:
    strategy = seeded("weighted_round_robin")
    pick_ids(strategy, [Candidate("a", 5), Candidate("b", 1), Candidate("c", 1)], 3)
    picks = pick_ids(strategy, [Candidate("a", 5), Candidate("c", 1)], 60)
    assert "b" not in picks
    assert abs(picks.count("a") - 50) <= 1
    assert set(strategy._current) == {"a", "c"}  # type: ignore[attr-defined]  # b's state is dropped
    pick_ids(strategy, [Candidate("a", 5), Candidate("c", 1), Candidate("d", 2)], 1)
    assert strategy._current["d"] == 2  # type: ignore[attr-defined]  # 0 + its weight, not picked yet


# -- least connections ---------------------------------------------------------------------------


@given(loads=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 12)), min_size=1, max_size=8),
       seed=st.integers(0, 2**32 - 1))
def test_least_connections_picks_a_minimum_of_inflight_per_weight(loads: list[tuple[int, int]], seed: int) -> None:
    candidates = [Candidate(f"a{i}", weight) for i, (weight, _) in enumerate(loads)]
    stats = LoadStats()
    for candidate, (_, inflight) in zip(candidates, loads, strict=True):
        for _ in range(inflight):
            stats.started(candidate.id)
    ratio = {c.id: Fraction(stats.inflight(c.id), c.weight) for c in candidates}
    chosen = make_strategy("least_connections", random.Random(seed)).pick(candidates, stats, None)
    assert ratio[chosen.id] == min(ratio.values()), f"seed={seed}"


def test_least_connections_spreads_ties_with_the_rng() -> None:
    stats = LoadStats()
    for agent_id, inflight in (("a", 2), ("b", 1), ("c", 2)):
        for _ in range(inflight):
            stats.started(agent_id)
    # a: 2/2, b: 1/1 tie; c: 2/1 is worse
    candidates = [Candidate("a", 2), Candidate("b", 1), Candidate("c", 1)]
    counts = Counter(pick_ids(seeded("least_connections", 7), candidates, 1000, stats))
    assert set(counts) == {"a", "b"}
    assert 400 <= counts["a"] <= 600, counts


def test_least_connections_follows_the_load_in_proportion_to_weight() -> None:
    strategy, stats = seeded("least_connections", 3), LoadStats()
    candidates = [Candidate("a", 1), Candidate("b", 2), Candidate("c", 3)]
    for _ in range(60):
        stats.started(strategy.pick(candidates, stats, None).id)
    assert [stats.inflight(agent_id) for agent_id in "abc"] == [10, 20, 30]
    for _ in range(20):
        stats.finished("c", 0.1, now=1.0)
    assert pick_ids(strategy, candidates, 3, stats) == ["c", "c", "c"]


# -- response time (power of two choices) ---------------------------------------------------------


def _simulate(seed: int, latencies_s: dict[str, float], requests: int = 10_000, gap_s: float = 0.02) -> Counter[str]:
    """Requests every ``gap_s`` to agents answering in fixed times; every pick
    is started and finished at its virtual time."""
    strategy, stats = make_strategy("response_time", random.Random(seed)), LoadStats()
    candidates = agents(*latencies_s)
    pending: list[tuple[float, str]] = []
    counts: Counter[str] = Counter()
    for i in range(requests):
        now = i * gap_s
        while pending and pending[0][0] <= now:
            done_at, agent_id = heapq.heappop(pending)
            stats.finished(agent_id, latencies_s[agent_id], now=done_at)
        chosen = strategy.pick(candidates, stats, None).id
        stats.started(chosen)
        heapq.heappush(pending, (now + latencies_s[chosen], chosen))
        counts[chosen] += 1
    return counts


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_response_time_sends_little_to_a_ten_times_slower_agent(seed: int) -> None:
    counts = _simulate(seed, {"a": 0.1, "b": 0.1, "c": 0.1, "d": 0.1, "slow": 1.0})
    # fair share would be 20%; it is probed again whenever its estimate has decayed
    assert counts["slow"] < 0.02 * 10_000, f"seed={seed}: {counts}"
    assert all(0.2 * 10_000 <= counts[a] <= 0.3 * 10_000 for a in "abcd"), f"seed={seed}: {counts}"


def test_response_time_explores_an_agent_without_samples_once_then_waits_for_it() -> None:
    for seed in range(50):
        strategy, stats = make_strategy("response_time", random.Random(seed)), LoadStats()
        for agent_id in "abcd":
            stats.started(agent_id)
            stats.finished(agent_id, 0.01, now=0.0)
        candidates = agents("a", "b", "c", "d", "new")
        picks = []
        for _ in range(40):
            chosen = strategy.pick(candidates, stats, None).id
            stats.started(chosen)  # nothing finishes: "new" has a request in flight and no sample
            picks.append(chosen)
        assert "new" in picks[:15], f"seed={seed}: {picks}"
        assert picks.count("new") == 1, f"seed={seed}: {picks}"


def test_response_time_weighs_latency_by_inflight() -> None:
    stats = LoadStats()
    stats.started("fast")
    stats.finished("fast", 0.1, now=0.0)
    stats.started("slow")
    stats.finished("slow", 0.5, now=0.0)
    candidates = agents("fast", "slow")
    strategy = seeded("response_time")
    assert set(pick_ids(strategy, candidates, 20, stats)) == {"fast"}  # 0.1 x 1 < 0.5 x 1
    for _ in range(5):
        stats.started("fast")
    assert set(pick_ids(strategy, candidates, 20, stats)) == {"slow"}  # 0.1 x 6 > 0.5 x 1
    for _ in range(2):
        stats.finished("fast", 0.1, now=0.0)
    assert set(pick_ids(strategy, candidates, 20, stats)) == {"fast"}  # 0.1 x 4 < 0.5 x 1


def test_response_time_spreads_equal_scores_and_needs_no_draw_for_one() -> None:
    counts = Counter(pick_ids(seeded("response_time", 5), agents("a", "b", "c"), 3000))
    assert all(800 <= counts[a] <= 1200 for a in "abc"), counts
    rng = random.Random(9)
    state = rng.getstate()
    assert make_strategy("response_time", rng).pick(agents("only"), LoadStats(), None).id == "only"
    assert rng.getstate() == state


# -- consistent hash -----------------------------------------------------------------------------

TEN = [f"agent-{i}" for i in range(10)]


@cache
def _owners(members: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    strategy, stats = ConsistentHash(), LoadStats()
    candidates = [Candidate(agent_id, weight) for agent_id, weight in members]
    return tuple(strategy.pick(candidates, stats, key).id for key in KEYS)


def owners(ids: Sequence[str], weights: dict[str, int] | None = None) -> tuple[str, ...]:
    weights = weights or {}
    return _owners(tuple((agent_id, weights.get(agent_id, 1)) for agent_id in ids))


def test_consistent_hash_maps_a_key_alike_on_every_node() -> None:
    node_1, node_2 = ConsistentHash(), make_strategy("consistent_hash", random.Random(99))
    candidates = agents(*TEN)
    shuffled = random.Random(4).sample(candidates, len(candidates))
    for key in KEYS[:2000]:
        assert node_1.pick(candidates, LoadStats(), key) == node_2.pick(shuffled, LoadStats(), key)


def test_consistent_hash_is_pinned() -> None:
    """A change of hash or point naming would send keys elsewhere during a
    rolling upgrade; this pins both."""
    strategy = ConsistentHash()
    keys = ("", "user-1", "user-2", "ключ", "\ud800")
    assert {key: strategy.pick(agents(*TEN), LoadStats(), key).id for key in keys} == {
        "": "agent-2", "user-1": "agent-9", "user-2": "agent-4", "ключ": "agent-3", "\ud800": "agent-2",
    }


def test_consistent_hash_spreads_keys_evenly() -> None:
    counts = Counter(owners(TEN))
    shares = {agent_id: counts[agent_id] / len(KEYS) for agent_id in TEN}
    assert all(0.07 <= share <= 0.13 for share in shares.values()), shares


def test_consistent_hash_moves_only_the_keys_of_an_agent_that_leaves() -> None:
    before, after = owners(TEN), owners([a for a in TEN if a != "agent-3"])
    moved = [i for i, (old, new) in enumerate(zip(before, after, strict=True)) if old != new]
    assert 0.07 <= len(moved) / len(KEYS) <= 0.13, len(moved)
    assert {before[i] for i in moved} == {"agent-3"}
    assert len(moved) == before.count("agent-3")  # and all of them


def test_consistent_hash_moves_only_keys_to_an_agent_that_joins() -> None:
    before, after = owners(TEN), owners([*TEN, "agent-10"])
    moved = [i for i, (old, new) in enumerate(zip(before, after, strict=True)) if old != new]
    assert 0.06 <= len(moved) / len(KEYS) <= 0.12, len(moved)  # 1/11 = 9.1%
    assert {after[i] for i in moved} == {"agent-10"}


def test_consistent_hash_gives_weight_two_about_twice_the_keys() -> None:
    counts = Counter(owners(TEN, {"agent-0": 2}))
    mean_single = sum(counts[a] for a in TEN[1:]) / 9
    assert 1.6 <= counts["agent-0"] / mean_single <= 2.4, counts  # measured 1.80
    # raising a weight only moves keys to that agent
    before = owners(TEN)
    after = owners(TEN, {"agent-0": 2})
    assert {new for old, new in zip(before, after, strict=True) if old != new} == {"agent-0"}


def test_consistent_hash_rebuilds_its_ring_only_when_the_candidates_change() -> None:
    strategy, stats = ConsistentHash(), LoadStats()
    candidates = agents(*TEN)
    for i in range(100):
        strategy.pick(random.Random(i).sample(candidates, 10), stats, f"k{i}")
    assert strategy.ring_builds == 1
    strategy.pick([*candidates[1:], Candidate("agent-0", 3)], stats, "k")
    strategy.pick(candidates[1:], stats, "k")
    strategy.pick(candidates[1:], stats, "k")
    assert strategy.ring_builds == 3


def test_consistent_hash_keeps_a_ring_of_huge_weights_small_and_proportional() -> None:
    strategy = ConsistentHash()
    candidates = [Candidate("big", 1_000_000), Candidate("small", 1), Candidate("mid", 500_000)]
    counts = Counter(strategy.pick(candidates, LoadStats(), key).id for key in KEYS[:30_000])
    assert len(strategy._points) <= RING_POINTS_MAX  # type: ignore[attr-defined]
    assert counts["small"] < 100 <= counts["mid"]
    assert 1.7 <= counts["big"] / counts["mid"] <= 2.3, counts


def test_consistent_hash_needs_a_key() -> None:
    with pytest.raises(NeedsKey) as caught:
        seeded("consistent_hash").pick(agents("a"), LoadStats(), None)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, InvalidInput)
    assert caught.value.field == "key"


# -- LoadStats -----------------------------------------------------------------------------------


def test_inflight_counts_started_minus_finished() -> None:
    stats = LoadStats()
    for _ in range(3):
        stats.started("a")
    stats.started("b")
    stats.finished("a", 0.1, now=1.0)
    assert (stats.inflight("a"), stats.inflight("b"), stats.inflight("nobody")) == (2, 1, 0)
    for _ in range(4):
        stats.finished("b", 0.1, now=1.0)  # more than started (it was forgotten meanwhile): stays at 0
    assert stats.inflight("b") == 0


def test_latency_is_none_until_the_first_sample_then_follows_a_peak_ewma() -> None:
    stats = LoadStats(decay_s=10.0)
    stats.started("a")
    assert stats.latency("a") is None
    stats.finished("a", 0.1, now=0.0)
    assert stats.latency("a") == 0.1
    stats.finished("a", 1.0, now=1.0)
    assert stats.latency("a") == 1.0  # a peak is believed at once
    stats.finished("a", 0.1, now=2.0)
    assert stats.latency("a") == pytest.approx(1.0 * 0.904837 + 0.1 * 0.095163, rel=1e-5)  # exp(-1/10)
    for t in range(3, 53):
        stats.finished("a", 0.1, now=float(t))
    assert 0.1 < stats.latency("a") < 0.11  # five decay times of fast answers (0.1 + 0.9 e^-5)


def test_latency_forgets_at_the_same_speed_whatever_the_rate() -> None:
    sparse, dense = LoadStats(), LoadStats()
    for stats, step in ((sparse, 1.0), (dense, 0.01)):
        stats.finished("a", 1.0, now=0.0)
        for i in range(1, int(10 / step) + 1):
            stats.finished("a", 0.1, now=i * step)
    assert sparse.latency("a") == pytest.approx(dense.latency("a"), rel=1e-9)


def test_samples_at_the_same_time_or_out_of_order_only_count_as_peaks() -> None:
    stats = LoadStats()
    stats.finished("a", 0.5, now=5.0)
    stats.finished("a", 0.1, now=5.0)
    stats.finished("a", 0.1, now=4.0)
    assert stats.latency("a") == 0.5
    stats.finished("a", 0.7, now=3.0)
    assert stats.latency("a") == 0.7


def test_latency_decays_while_the_agent_goes_unsampled() -> None:
    stats = LoadStats(decay_s=10.0)
    stats.finished("a", 2.0, now=0.0)
    stats.finished("b", 0.1, now=10.0)  # time is what this object has been told
    assert stats.latency("a") == pytest.approx(2.0 * 0.367879, rel=1e-5)
    assert stats.latency("b") == 0.1


def test_forget_drops_every_agent_not_kept() -> None:
    stats = LoadStats()
    for agent_id in "abc":
        stats.started(agent_id)
        stats.started(agent_id)
        stats.finished(agent_id, 0.2, now=1.0)
    stats.forget({"b", "zzz"})
    assert [(stats.inflight(a), stats.latency(a)) for a in "abc"] == [(0, None), (1, 0.2), (0, None)]


@pytest.mark.parametrize("latency_s", [-0.1, float("nan"), float("inf")])
def test_a_bad_sample_is_a_bug_but_the_request_still_ends(latency_s: float) -> None:
    stats = LoadStats()
    stats.started("a")
    with pytest.raises(InvariantError):
        stats.finished("a", latency_s, now=1.0)
    assert stats.inflight("a") == 0
    assert stats.latency("a") is None


@pytest.mark.parametrize("decay_s", [0.0, -1.0, float("nan")])
def test_decay_must_be_positive(decay_s: float) -> None:
    with pytest.raises(InvariantError):
        LoadStats(decay_s)
