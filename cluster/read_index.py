"""ReadIndex rounds for the raft engine (Raft thesis §6.4), without pysyncobj.

A linearizable read needs an index that every write acknowledged before the
read began is at or below, and proof that no other leader could have
committed anything past it. A leader has both once:

1. it has committed an entry of its current term (pysyncobj's no-op after
   election): its commit index then covers everything committed before;
2. it recorded its commit index (the read index) *after* the read began;
3. a majority (itself counted) answered an append_entries of that same term
   sent *after* the read index was recorded: none of them had seen a higher
   term when it answered, so no other leader existed when the index was taken.

pysyncobj's append_entries carry no request id, and its answer
(``next_node_idx``) carries neither the term nor what it answers. So the
engine's transport stamps every append_entries it sends with the number of
the latest round (``stamp()``) and a follower's transport copies the stamp
and the message's term into the answer it sends while handling that message
(pysyncobj answers inside its handler, at most once per message; see
cluster/design.md). An answer stamped with a round's number or more is then
an answer to a message sent after that round began, whatever happened to the
connections in between (an answer to an older message, even one arriving on
a new connection, carries an older number).

Concurrent reads share rounds: reads that arrive while a round is in flight
wait for the next one (never one already sent before they began), which
starts as soon as the current one settles. A round that gets no majority
within ``timeout_s`` fails its reads as unavailable; a leader that lost its
role or its term fails them as refused (the caller may use a log barrier,
which goes to whoever leads now).

Threads: ``request`` from any thread; everything else on the engine's tick
thread. Waiters are called on the tick thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

REFUSED = "refused"  # this node cannot answer a ReadIndex read now; a log barrier may
UNAVAILABLE = "unavailable"  # no majority confirmed the leader in time: the read fails

# finish(index, None, None) once confirmed; finish(None, REFUSED | UNAVAILABLE, why) otherwise
Waiter = Callable[[int | None, str | None, str | None], None]


@dataclass(frozen=True, slots=True)
class LeaderView:
    """What a round needs of the engine, read on the tick thread."""

    leader: bool
    term: int
    commit_index: int
    term_committed: bool  # an entry of ``term`` is committed (the leader's no-op)
    voters: frozenset[str]  # the other voting members


@dataclass(slots=True)
class _Round:
    seq: int
    term: int
    read_index: int
    deadline: float
    waiters: list[Waiter]


class ReadRounds:
    """One node's ReadIndex rounds; outlives SyncObj rebuilds, so its round
    numbers never repeat in a process (an answer from before a rebuild
    carries an older number)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.seq = 0  # the latest round started
        self.rounds = 0  # rounds started (metrics)
        self._waiting: list[Waiter] = []
        self._lock = threading.Lock()
        self._acked: dict[str, tuple[int, int]] = {}  # node -> (term, highest stamp it answered in that term)
        self._round: _Round | None = None

    # -- any thread --

    def request(self, waiter: Waiter) -> None:
        """A read began: it joins the next round to start."""
        with self._lock:
            self._waiting.append(waiter)

    # -- tick thread --

    def take_waiting(self) -> list[Waiter]:
        with self._lock:
            waiting, self._waiting = self._waiting, []
        return waiting

    def stamp(self) -> int:
        """The number an append_entries sent now carries."""
        return self.seq

    def on_answer(self, node: str, term: int, seq: int) -> None:
        """``node`` answered an append_entries of ``term`` stamped ``seq``."""
        known = self._acked.get(node)
        if known is None or term > known[0] or (term == known[0] and seq > known[1]):
            self._acked[node] = (term, seq)

    def in_flight(self) -> bool:
        return self._round is not None

    def has_waiting(self) -> bool:
        return bool(self._waiting)  # a glance without the lock: a read added meanwhile is seen next tick

    def on_tick(self, view: LeaderView, now: float) -> bool:
        """Settle the round in flight and start the next one when reads wait.
        Returns True when a round started: the caller sends append_entries
        to every follower now (they carry the new stamp)."""
        current = self._round
        if current is not None:
            if not view.leader or view.term != current.term:
                self._settle(None, REFUSED, f"leadership changed during the read (term {current.term})")
            elif self._confirmed(current, view.voters):
                self._settle(current.read_index, None, None)
            elif now > current.deadline:
                self._settle(None, UNAVAILABLE,
                             f"no majority confirmed this leader within {self.timeout_s:g} s")
            else:
                return False
        waiting = self.take_waiting()
        if not waiting:
            return False
        if not view.leader:
            _fail(waiting, REFUSED, "not the leader")
            return False
        if not view.term_committed:
            _fail(waiting, REFUSED, "the leader has not committed an entry of its term yet")
            return False
        self.seq += 1
        self.rounds += 1
        self._round = _Round(self.seq, view.term, view.commit_index, now + self.timeout_s, waiting)
        if self._confirmed(self._round, view.voters):  # a cluster of one
            self._settle(view.commit_index, None, None)
            return False
        return True

    def step_down(self, why: str = "not the leader") -> None:
        """This node no longer leads: the round in flight fails as refused."""
        if self._round is not None:
            self._settle(None, REFUSED, why)

    def _confirmed(self, current: _Round, voters: frozenset[str]) -> bool:
        answered = 1  # the leader itself
        for node in voters:
            term, seq = self._acked.get(node, (-1, -1))
            if term == current.term and seq >= current.seq:
                answered += 1
        return 2 * answered > len(voters) + 1

    def _settle(self, index: int | None, kind: str | None, why: str | None) -> None:
        current, self._round = self._round, None
        if current is not None:
            for waiter in current.waiters:
                waiter(index, kind, why)


def _fail(waiters: list[Waiter], kind: str, why: str) -> None:
    for waiter in waiters:
        waiter(None, kind, why)
