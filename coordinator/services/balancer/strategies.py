"""Which instance of an agent type gets a request: the selection strategies.

Pure: no I/O, no clock, no global randomness. Time enters as the ``now``
given to ``LoadStats.finished``; randomness only through the
``random.Random`` a strategy is made with. Given the same rng state, the same
calls give the same picks, whatever the order of the candidates (every
strategy orders them by id before it chooses).

Ownership: a node keeps one strategy per agent type and one ``LoadStats``
for all its agents, and calls them on the event loop thread only. A
strategy's state (rotation position, smooth weights, hash ring) and the load
figures are this node's own and are never replicated; only
``consistent_hash`` answers the same on every node, because it depends on
nothing but the candidates and the key.

Candidates come already filtered to the allowed ones (registered, healthy,
breaker closed). An empty list or two candidates with one id is a caller bug
(``InvariantError``).
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from coordinator.errors import InvalidInput, InvariantError
from coordinator.ports import LoadView, Strategy
from coordinator.types import Candidate

# Ring points per unit of weight (consistent_hash). With 100 points an agent's
# share of the keys is within about 10% (relative) of its fair share.
VNODES_PER_WEIGHT = 100
# A ring holds at most this many points (unless there are more agents): weights
# go up to 1_000_000, and a rebuild runs on the event loop (measured for 8 000
# points: ~11 ms the first time, ~4 ms when only the sort is redone).
RING_POINTS_MAX = 10_000


class NeedsKey(InvalidInput, ValueError):
    """``consistent_hash`` was asked to pick without a key. An ``InvalidInput``
    naming the field ``key``, so the HTTP layer answers 400 without a special
    case; still a ``ValueError`` as the interface promises."""

    def __init__(self, message: str = "the consistent_hash strategy needs a key") -> None:
        super().__init__(message, field="key")


# -- load figures --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Load:
    inflight: int = 0
    latency_s: float | None = None  # the peak EWMA, as of ``stamp``
    stamp: float = 0.0  # ``now`` of the newest sample


class LoadStats:
    """Per-agent load this node observes: requests in flight and a peak EWMA
    of response latency, as in Finagle's ``PeakEwma``:

    - a sample above the average replaces it at once (slow is believed at once);
    - a sample below it is blended in with weight ``1 - exp(-dt / decay_s)``,
      ``dt`` being the time since the agent's previous sample, so the average
      forgets at the same speed whatever the request rate (a plain alpha would
      forget faster under load). Samples that arrive out of order (``dt < 0``)
      count as ``dt = 0``: peaks still count, lower ones do not;
    - ``latency`` decays toward 0 while the agent goes unsampled, measured on
      the newest ``now`` this object has been given (as Finagle decays on every
      read). An agent once slow, then avoided, is thus tried again after a few
      ``decay_s`` instead of never.

    Loop thread only. ``finished`` of an agent that was never started, or
    was forgotten meanwhile, records the sample and leaves its count at 0.
    Memory holds one entry per agent seen since the last ``forget``.
    """

    def __init__(self, decay_s: float = 10.0) -> None:
        if not (math.isfinite(decay_s) and decay_s > 0):
            raise InvariantError(f"decay_s must be a positive number, not {decay_s!r}")
        self.decay_s = decay_s
        self._loads: dict[str, _Load] = {}
        self._now = -math.inf  # the newest ``now`` given to ``finished``

    def started(self, agent_id: str) -> None:
        """A request to ``agent_id`` began; pair it with exactly one ``finished``."""
        self._load(agent_id).inflight += 1

    def finished(self, agent_id: str, latency_s: float, now: float) -> None:
        """A request to ``agent_id`` ended, whatever the outcome, after
        ``latency_s`` seconds; ``now`` is the caller's monotonic clock."""
        load = self._load(agent_id)
        load.inflight = max(load.inflight - 1, 0)
        if not (math.isfinite(latency_s) and latency_s >= 0 and math.isfinite(now)):
            raise InvariantError(f"bad latency sample for {agent_id!r}: {latency_s!r} s at {now!r}")
        if load.latency_s is None:
            load.latency_s, load.stamp = latency_s, now
        else:
            if latency_s >= load.latency_s:
                load.latency_s = latency_s
            else:
                kept = math.exp(-max(now - load.stamp, 0.0) / self.decay_s)
                load.latency_s = load.latency_s * kept + latency_s * (1.0 - kept)
            load.stamp = max(load.stamp, now)
        self._now = max(self._now, now)

    def inflight(self, agent_id: str) -> int:
        load = self._loads.get(agent_id)
        return 0 if load is None else load.inflight

    def latency(self, agent_id: str) -> float | None:
        """The agent's latency estimate in seconds; None before its first sample."""
        load = self._loads.get(agent_id)
        if load is None or load.latency_s is None:
            return None
        idle_s = self._now - load.stamp
        return load.latency_s * math.exp(-idle_s / self.decay_s) if idle_s > 0 else load.latency_s

    def forget(self, keep: set[str]) -> None:
        """Drop every agent not in ``keep`` (those no longer registered)."""
        for agent_id in [a for a in self._loads if a not in keep]:
            del self._loads[agent_id]

    def _load(self, agent_id: str) -> _Load:
        load = self._loads.get(agent_id)
        if load is None:
            load = self._loads[agent_id] = _Load()
        return load


# -- strategies ----------------------------------------------------------------------------------


def _by_id(candidates: Sequence[Candidate]) -> list[Candidate]:
    ordered = sorted(candidates, key=lambda c: c.id)
    if not ordered:
        raise InvariantError("no candidates to pick from")
    for before, after in pairwise(ordered):
        if before.id == after.id:
            raise InvariantError(f"agent {after.id!r} is a candidate twice")
    for candidate in ordered:
        weight = candidate.weight
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise InvariantError(f"candidate {candidate.id!r}: weight must be an integer >= 1, not {weight!r}")
    return ordered


class RoundRobin:
    """Each candidate in turn, in id order.

    It remembers the id it picked last, not a position: the next pick is the
    first id after it (wrapping around), so when agents come or go the
    rotation goes on where it was. Agents present all along are picked
    equally often (within one), which a position modulo a changing count does
    not give.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def pick(self, candidates: Sequence[Candidate], stats: LoadView, key: str | None) -> Candidate:
        ordered = _by_id(candidates)
        if self._last is None:
            chosen = ordered[0]
        else:
            at = bisect_right(ordered, self._last, key=lambda c: c.id)
            chosen = ordered[at % len(ordered)]
        self._last = chosen.id
        return chosen


class WeightedRoundRobin:
    """nginx's smooth weighted round robin: every candidate's current weight
    grows by its weight, the largest (first in id order on ties) is picked and
    loses the total. Over every ``sum(weights)`` picks each agent is picked
    exactly ``weight`` times, spread out (5, 1, 1 gives a a b a c a a).

    Current weights are kept per agent id: an agent that is no longer a
    candidate loses its own, a new one starts at 0, and a changed weight
    counts from the next pick.
    """

    name = "weighted_round_robin"

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[Candidate], stats: LoadView, key: str | None) -> Candidate:
        ordered = _by_id(candidates)
        current = {c.id: self._current.get(c.id, 0) + c.weight for c in ordered}
        chosen = ordered[0]
        for candidate in ordered[1:]:
            if current[candidate.id] > current[chosen.id]:
                chosen = candidate
        current[chosen.id] -= sum(c.weight for c in ordered)
        self._current = current
        return chosen


class LeastConnections:
    """The fewest requests in flight per unit of weight (``inflight / weight``,
    compared exactly); ties are broken with the rng."""

    name = "least_connections"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Candidate], stats: LoadView, key: str | None) -> Candidate:
        ordered = _by_id(candidates)
        best = [ordered[0]]
        best_inflight, best_weight = stats.inflight(ordered[0].id), ordered[0].weight
        for candidate in ordered[1:]:
            inflight = stats.inflight(candidate.id)
            # inflight / weight against best_inflight / best_weight, in integers
            lhs, rhs = inflight * best_weight, best_inflight * candidate.weight
            if lhs < rhs:
                best, best_inflight, best_weight = [candidate], inflight, candidate.weight
            elif lhs == rhs:
                best.append(candidate)
        return best[0] if len(best) == 1 else self._rng.choice(best)


class ResponseTime:
    """Power of two choices over a latency score, as Envoy's least-request and
    Finagle's P2C with peak EWMA: two distinct candidates drawn with the rng,
    the lower score wins, score = latency EWMA x (inflight + 1).

    An agent without a latency sample scores 0 while it has nothing in flight,
    so it is explored at once; with a request in flight it scores worst until
    that first answer comes back (Finagle's penalty), so a cold agent is not
    sent everything before anyone knows how fast it is. Equal scores go to the
    one with fewer requests in flight, then to the first drawn.
    """

    name = "response_time"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def pick(self, candidates: Sequence[Candidate], stats: LoadView, key: str | None) -> Candidate:
        ordered = _by_id(candidates)
        if len(ordered) == 1:
            return ordered[0]
        first, second = self._rng.sample(ordered, 2)
        return second if _score(second, stats) < _score(first, stats) else first


def _score(candidate: Candidate, stats: LoadView) -> tuple[float, int]:
    inflight = stats.inflight(candidate.id)
    latency_s = stats.latency(candidate.id)
    if latency_s is None:
        return (0.0 if inflight == 0 else math.inf), inflight
    return latency_s * (inflight + 1), inflight


def _hash64(text: str) -> int:
    # surrogatepass: any str is a key, even one with lone surrogates
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ConsistentHash:
    """A hash ring: each agent owns ``VNODES_PER_WEIGHT x weight`` points
    (blake2b-64 of ``f"{id}#{i}"``, i = 0, 1, ...), and a key goes to the owner
    of the first point at or after the key's hash, wrapping around. No rng:
    every node with the same candidates maps a key to the same agent.

    When an agent leaves only its keys move; when one joins it takes only
    keys; either way about 1/N of them. A ring that would exceed
    ``RING_POINTS_MAX`` points has every agent's count divided by the same
    power of two (rounded up, so each keeps a point). The divisor changes only
    when the total weight crosses a power of two; such a change moves more
    keys than the agent that came or left.

    The ring is rebuilt only when the set of candidates or their weights
    changes (``ring_builds`` counts rebuilds), and only new points are hashed
    then. ``NeedsKey`` without a key.
    """

    name = "consistent_hash"

    def __init__(self) -> None:
        self.ring_builds = 0
        self._members: frozenset[Candidate] = frozenset()
        self._points: list[int] = []
        self._owners: list[Candidate] = []
        self._hashes: dict[str, list[int]] = {}  # each member's point hashes, by index

    def pick(self, candidates: Sequence[Candidate], stats: LoadView, key: str | None) -> Candidate:
        if key is None:
            raise NeedsKey()
        members = frozenset(candidates)
        if members != self._members or not self._points:
            self._build(members)
        at = bisect_left(self._points, _hash64(key))
        return self._owners[at % len(self._owners)]

    def _build(self, members: frozenset[Candidate]) -> None:
        ordered = _by_id(list(members))
        by_id = {c.id: c for c in ordered}
        hashes = {c.id: self._hashes.get(c.id, []) for c in ordered}
        ring: list[tuple[int, str]] = []
        for candidate, count in zip(ordered, _point_counts(ordered), strict=True):
            own = hashes[candidate.id]
            own.extend(_hash64(f"{candidate.id}#{i}") for i in range(len(own), count))
            ring.extend((point, candidate.id) for point in own[:count])
        ring.sort()  # equal hashes are ordered by id, the same on every node
        self._points = [point for point, _ in ring]
        self._owners = [by_id[agent_id] for _, agent_id in ring]
        self._hashes = hashes  # agents gone are dropped, so this stays as large as the ring
        self._members = members
        self.ring_builds += 1


def _point_counts(ordered: list[Candidate]) -> list[int]:
    counts = [VNODES_PER_WEIGHT * c.weight for c in ordered]
    shift = 0
    while sum(counts) > RING_POINTS_MAX and any(count > 1 for count in counts):
        shift += 1
        counts = [-(-VNODES_PER_WEIGHT * c.weight >> shift) for c in ordered]  # ceil(x / 2**shift)
    return counts


# Every strategy by policy name (coordinator.commands.balancer.STRATEGY_NAMES).
STRATEGIES: dict[str, Callable[[random.Random], Strategy]] = {
    RoundRobin.name: lambda rng: RoundRobin(),
    WeightedRoundRobin.name: lambda rng: WeightedRoundRobin(),
    LeastConnections.name: LeastConnections,
    ResponseTime.name: ResponseTime,
    ConsistentHash.name: lambda rng: ConsistentHash(),
}


def make_strategy(name: str, rng: random.Random) -> Strategy:
    """A new strategy called ``name``, drawing from ``rng``; ValueError for an unknown name."""
    factory = STRATEGIES.get(name)
    if factory is None:
        raise ValueError(f"unknown balancing strategy {name!r} (known: {', '.join(STRATEGIES)})")
    return factory(rng)
