"""Who was heard when: the table of agents' heartbeats every node keeps, and
the phi-accrual detector that turns its gaps into suspicion. Pure: times are
seconds on the caller's monotonic clock, passed in; nothing here reads a
clock, sleeps or sends.

A node records each heartbeat it answers (``HeardTable.heard_here``) and
merges what its peers heard (``HeardTable.merge``, from gossip: an *age*,
since clocks differ between machines and ages do not). The merged table is
the same on every node, up to a gossip round, so a new leader starts with it
warm.

The detector (after Hayashibara et al., "The phi accrual failure detector",
2004, as Akka and Cassandra use it) keeps, per agent, the mean and variance
of the intervals between merged heartbeats (exponentially weighted, so an
agent costs three numbers, not a window of samples). ``phi`` after a silence
of ``t`` is ``-log10(P(an interval > t))`` for a normal distribution of
intervals, its mean shifted by an acceptable pause (``pause_intervals`` whole
mean intervals: that many lost heartbeats in a row are not suspicious) and
its standard deviation at least ``min_std_ratio`` of the mean (a perfectly
regular agent would otherwise be suspected a moment after it is late).
Since ``phi`` only grows with the silence, the moment it crosses the
threshold is computed once per heartbeat (``suspect_at``): a leader keeps
those moments in a heap instead of evaluating 100,000 detectors each tick.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist


@dataclass(frozen=True, slots=True)
class PhiSettings:
    threshold: float = 8.0  # phi at which an agent is suspected (1e-8: one false suspicion in 10^8 intervals)
    pause_intervals: float = 3.0  # lost heartbeats in a row that are not suspicious
    min_std_ratio: float = 0.1  # the standard deviation is at least this share of the mean interval
    samples_min: int = 3  # intervals seen before any suspicion
    weight: float = 1 / 16  # of a new interval in the moving mean and variance
    _z: float = field(init=False, repr=False, compare=False, default=0.0)

    def __post_init__(self) -> None:
        if not 1.0 <= self.threshold <= 12.0:
            raise ValueError("threshold: must be between 1 and 12")
        if self.pause_intervals < 0 or self.min_std_ratio <= 0 or self.samples_min < 1 or not 0 < self.weight <= 1:
            raise ValueError("pause_intervals >= 0, min_std_ratio > 0, samples_min >= 1, 0 < weight <= 1")
        object.__setattr__(self, "_z", NormalDist().inv_cdf(1.0 - 10.0 ** -self.threshold))

    @property
    def z(self) -> float:
        """Standard deviations past the (paused) mean where phi reaches the threshold."""
        return self._z

    def bound_intervals(self) -> float:
        """A regular agent's silence before suspicion, in mean intervals
        (``1 + pause_intervals + z * min_std_ratio``): 4.56 with the defaults."""
        return 1.0 + self.pause_intervals + self._z * self.min_std_ratio


class PhiAccrual:
    """One agent's detector. ``heard`` with increasing times; a time not
    after the last one is ignored (a late gossip entry)."""

    __slots__ = ("last_s", "mean_s", "samples", "var_s2")

    def __init__(self) -> None:
        self.last_s: float | None = None
        self.mean_s = 0.0
        self.var_s2 = 0.0
        self.samples = 0

    def heard(self, at_s: float, settings: PhiSettings) -> bool:
        """Record a heartbeat heard at ``at_s``; False when it is not newer."""
        last = self.last_s
        if last is not None and at_s <= last:
            return False
        self.last_s = at_s
        if last is None:
            return True
        interval = at_s - last
        if self.samples == 0:
            self.mean_s, self.var_s2 = interval, 0.0
        else:
            diff = interval - self.mean_s
            incr = settings.weight * diff
            self.mean_s += incr
            self.var_s2 = (1 - settings.weight) * (self.var_s2 + diff * incr)
        self.samples += 1
        return True

    def _shape(self, settings: PhiSettings) -> tuple[float, float]:
        mean = self.mean_s
        return mean * (1 + settings.pause_intervals), max(math.sqrt(self.var_s2), mean * settings.min_std_ratio)

    def phi(self, now_s: float, settings: PhiSettings) -> float:
        """Suspicion after the silence since the last heartbeat; 0 before
        ``samples_min`` intervals (too little to judge)."""
        if self.last_s is None or self.samples < settings.samples_min:
            return 0.0
        mean, std = self._shape(settings)
        if std <= 0:
            return math.inf if now_s - self.last_s > mean else 0.0
        tail = 0.5 * math.erfc((now_s - self.last_s - mean) / (std * math.sqrt(2)))
        return math.inf if tail <= 0 else -math.log10(tail)

    def suspect_at(self, settings: PhiSettings) -> float:
        """When ``phi`` reaches the threshold if nothing is heard (``inf``
        before ``samples_min`` intervals)."""
        if self.last_s is None or self.samples < settings.samples_min:
            return math.inf
        mean, std = self._shape(settings)
        return self.last_s + mean + settings.z * std


@dataclass(slots=True)
class Heard:
    """One agent in the table: its lease as the hearing node knew it, when it
    was last heard anywhere (this node's clock), how many heartbeats this node
    answered itself, and its detector."""

    lease_id: int
    at_s: float
    count: int = 0
    detector: PhiAccrual = field(default_factory=PhiAccrual)
    counter: int = 0  # the highest heartbeat datagram counter of this lease seen (here or by gossip)


class HeardTable:
    """The merged table of one node. Loop thread only.

    ``on_heard(agent_id, heard)`` is called whenever an agent's last-heard time
    moves forward (here or by gossip): the leader's ``LeaseKeeper`` listens.
    ``entries_max`` bounds the table; a new agent past it is not recorded
    (counted in ``refused``). Entries of agents that left are ``forget``-ed by
    the node when the log says so.
    """

    def __init__(self, settings: PhiSettings | None = None, *, entries_max: int = 1_000_000) -> None:
        self.settings = settings or PhiSettings()
        self.entries_max = entries_max
        self.entries: dict[str, Heard] = {}
        self.refused = 0
        self.heard_local = 0  # heartbeats this node answered
        self.heard_gossip = 0  # newer heard times merged from peers
        self._dirty: dict[str, Heard] = {}  # heard here since the last take_dirty
        self.on_heard: Callable[[str, Heard], None] | None = None

    def heard_here(self, agent_id: str, lease_id: int, now_s: float, counter: int = 0) -> Heard | None:
        """This node answered a heartbeat of ``agent_id`` (lease ``lease_id``)
        at ``now_s``; ``counter``: a datagram's (0 for HTTP)."""
        heard = self._update(agent_id, lease_id, now_s)
        if heard is not None:
            heard.count += 1
            self.heard_local += 1
            self._dirty[agent_id] = heard
        self.note_counter(agent_id, lease_id, counter)
        return heard

    def merge(self, agent_id: str, lease_id: int, age_s: float, now_s: float, counter: int = 0) -> bool:
        """A peer heard ``agent_id`` ``age_s`` ago (``counter``: the highest
        datagram counter it saw of that lease). True when that is newer
        than anything this node knew (an older lease's entry never is)."""
        heard = self._update(agent_id, lease_id, now_s - max(0.0, age_s))
        self.note_counter(agent_id, lease_id, counter)
        if heard is None:
            return False
        self.heard_gossip += 1
        return True

    def counter_fresh(self, agent_id: str, lease_id: int, counter: int) -> bool:
        """Whether a heartbeat datagram's ``counter`` is above every one seen
        of that lease (False: a replay, or a reordered older datagram)."""
        heard = self.entries.get(agent_id)
        return heard is None or heard.lease_id != lease_id or counter > heard.counter

    def note_counter(self, agent_id: str, lease_id: int, counter: int) -> None:
        """Remember ``counter`` as seen for the lease (when its entry is of that lease)."""
        heard = self.entries.get(agent_id)
        if heard is not None and heard.lease_id == lease_id and counter > heard.counter:
            heard.counter = counter

    def _update(self, agent_id: str, lease_id: int, at_s: float) -> Heard | None:
        heard = self.entries.get(agent_id)
        if heard is None or lease_id > heard.lease_id:
            if heard is None and len(self.entries) >= self.entries_max:
                self.refused += 1
                return None
            heard = Heard(lease_id, at_s)
            heard.detector.heard(at_s, self.settings)
            self.entries[agent_id] = heard
        elif lease_id < heard.lease_id or not heard.detector.heard(at_s, self.settings):
            return None  # a heartbeat of a replaced lease, or not newer than what is known
        else:
            heard.at_s = at_s
        if self.on_heard is not None:
            self.on_heard(agent_id, heard)
        return heard

    def lease_started(self, agent_id: str, lease_id: int, now_s: float) -> None:
        """This replica applied the registration of lease ``lease_id`` at
        ``now_s``: a lease counts from its registration, as on the leader
        (no heartbeat is recorded, and the detector starts empty)."""
        heard = self.entries.get(agent_id)
        if heard is not None and heard.lease_id >= lease_id:
            return
        if heard is None and len(self.entries) >= self.entries_max:
            self.refused += 1
            return
        self.entries[agent_id] = Heard(lease_id, now_s)

    def take_dirty(self) -> dict[str, Heard]:
        """What this node heard itself since the last call (for the next gossip round)."""
        dirty, self._dirty = self._dirty, {}
        return dirty

    def forget(self, agent_id: str) -> None:
        self.entries.pop(agent_id, None)
        self._dirty.pop(agent_id, None)
