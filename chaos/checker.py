"""Linearizability checking: Wing & Gong's search with Lowe's memoisation, as
Porcupine does it, per independent sub-history (P-compositionality).

The search, for one sub-history:

- Every ``ok`` operation has a call entry and a return entry, sorted by time
  (a call before a return at the same time, so operations that touch are
  concurrent) in a doubly linked list. A node of the search is the set of
  operations linearized so far and the model state they lead to.
- At a node, the candidates are the calls before the first return entry
  still in the list (the *boundary*): any of them may take effect next.
  Linearizing one lifts its call and return out of the list; backtracking
  puts them back (``unlift``). If no candidate works the node is *stuck*.
- A node already visited, or *dominated* by one (see below), is not visited
  again: the cache maps (linearized ``ok`` operations as a bitset, state) to
  the sets of unknown operations used on the way there.
- The search is iterative: an explicit stack of frames, no recursion.

Unknown (``info``) operations return at +infinity: they have no return entry
and never bound anything. They sit in a second list, sorted by invoke time,
and are candidates once invoked (invoke time <= the boundary's time). The
search succeeds as soon as every ``ok`` operation is linearized: the unknown
operations left over simply did not take effect. To keep many unknown
operations from multiplying the search:

1. ``ok`` candidates are tried first, unknown ones after them.
2. Unknown operations with the same ``model.effect`` are interchangeable once
   invoked, so only the earliest unused one of each effect is tried.
3. Two nodes with the same ``ok`` set and state differ only in which unknown
   operations they used up; one that used up a superset of the other's is
   dominated (it can do nothing the other cannot).
4. In a run of unknown operations (no ``ok`` operation between), an unknown
   operation is skipped if applying it at the start of the run leads to the
   same state: that node is reached from the run's start with fewer unknown
   operations used up (a write after a write, for a register).

When the search fails, the boundary furthest in time at which it got stuck
names the operation that cannot be linearized: every operation that returned
before it can be (that node was reached), and no order lets it take effect.
That is the earliest point where the history stops being linearizable, and the
window reported around it is where a human should look.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from chaos.history import Operation
from chaos.models import Model

Verdict = Literal["ok", "illegal", "unknown"]

CLOCK_CHECK_EVERY = 1024  # search steps between two looks at the clock
STUCK_STATES_MAX = 8  # states reported as possible just before the anomaly
PATH_TAIL_MAX = 64  # linearized operations remembered for the report
WINDOW_MAX = 40  # operations shown in an anomaly's window


class CheckerError(Exception):
    """A broken invariant of the checker itself (a bug, not a verdict)."""


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Why a sub-history is not linearizable.

    ``op`` could not be linearized: every operation that returned before it
    could be, in an order that left the state in one of ``states``, and from
    none of them can ``op`` take effect. ``linearized`` is the tail of one
    such order; ``window`` the operations around ``op``, by invoke time.
    ``texts`` holds the model's description of each operation by index.
    """

    key: str
    op: Operation
    states: tuple[str, ...]
    linearized: tuple[Operation, ...]
    window: tuple[Operation, ...]
    texts: dict[int, str] = field(repr=False)

    def explanation(self) -> str:
        states = ", ".join(self.states)
        return (f"{self.texts[self.op.index]} cannot be linearized: with every operation that returned before it "
                f"applied, the state can only be {states}")

    def to_json(self) -> dict[str, Any]:
        def op_json(op: Operation) -> dict[str, Any]:
            return {**op.to_json(), "text": self.texts[op.index]}

        return {"key": self.key, "explanation": self.explanation(), "op": op_json(self.op),
                "states": list(self.states), "linearized": [op_json(op) for op in self.linearized],
                "window": [op_json(op) for op in self.window]}


@dataclass(frozen=True, slots=True)
class KeyResult:
    """The verdict on one independent sub-history."""

    key: str
    verdict: Verdict
    operations: int  # operations checked (ok and info; fail and unknown reads are dropped)
    unknown_operations: int
    visited: int  # search nodes visited
    elapsed_s: float
    anomaly: Anomaly | None = None
    reason: str | None = None  # why the verdict is unknown

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "verdict": self.verdict, "operations": self.operations,
                "unknown_operations": self.unknown_operations, "visited": self.visited,
                "elapsed_s": round(self.elapsed_s, 6), "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Result:
    """``illegal`` if any sub-history is, else ``unknown`` if any could not be
    decided in time, else ``ok``."""

    verdict: Verdict
    keys: tuple[KeyResult, ...]
    elapsed_s: float

    @property
    def anomaly(self) -> Anomaly | None:
        return next((k.anomaly for k in self.keys if k.anomaly is not None), None)

    @property
    def reason(self) -> str | None:
        return next((k.reason for k in self.keys if k.verdict == "unknown"), None)


def check(model: Model, operations: Sequence[Operation], timeout_s: float = 60.0, *,
          clock: Callable[[], float] = time.monotonic) -> Result:
    """Decide whether ``operations`` (from ``history.pair``) are linearizable under ``model``.

    Pure apart from reading ``clock`` to honour ``timeout_s``, a budget shared
    by all sub-histories: a sub-history not decided in time is ``unknown``.
    Once one sub-history is illegal the others are not searched (they are
    reported ``unknown``, reason ``skipped``): the verdict cannot change.
    """
    started = clock()
    deadline = started + timeout_s
    live = [op for op in operations if op.status != "fail"]  # fail: certainly no effect
    results: list[KeyResult] = []
    illegal = False
    for part in model.partition(live):
        if not part:
            continue
        key = ", ".join(sorted({op.key for op in part}))
        unknown_count = sum(1 for op in part if op.status == "info")
        if illegal:
            results.append(KeyResult(key, "unknown", len(part), unknown_count, 0, 0.0, reason="skipped"))
            continue
        began = clock()
        outcome = _Search(model, part, deadline, clock).run()
        elapsed = clock() - began
        anomaly = _anomaly(model, key, part, outcome) if outcome.verdict == "illegal" else None
        illegal = illegal or outcome.verdict == "illegal"
        results.append(KeyResult(key, outcome.verdict, len(part), unknown_count, outcome.visited, elapsed,
                                 anomaly=anomaly, reason="timeout" if outcome.verdict == "unknown" else None))
    verdicts = {r.verdict for r in results}
    verdict: Verdict = "illegal" if "illegal" in verdicts else "unknown" if "unknown" in verdicts else "ok"
    return Result(verdict, tuple(results), clock() - started)


# -- the search -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Outcome:
    verdict: Verdict
    visited: int
    culprit: Operation | None = None
    stuck_states: list[Hashable] = field(default_factory=list)
    path: list[tuple[Operation, Hashable]] = field(default_factory=list)  # (op, state before it)
    final_state: Hashable = None


NIL = -1


class _Search:
    """One sub-history's search. Build it and call ``run`` once."""

    def __init__(self, model: Model, ops: Sequence[Operation], deadline: float,
                 clock: Callable[[], float]) -> None:
        self.model = model
        self.deadline = deadline
        self.clock = clock
        self.done = [op for op in ops if op.status == "ok"]
        self.pending = sorted((op for op in ops if op.status == "info"), key=lambda op: op.invoke_time)
        if len(self.done) + len(self.pending) != len(ops):
            raise CheckerError("the search takes ok and info operations only")
        # Entries 1..E in time order; 0 is the list's head.
        raw = sorted([(op.invoke_time, 0, i) for i, op in enumerate(self.done)]
                     + [(op.complete_time, 1, i) for i, op in enumerate(self.done)])  # type: ignore[misc]
        size = len(raw) + 1
        self.e_time = [0] * size
        self.e_call = [False] * size
        self.e_op = [NIL] * size
        self.e_match = [NIL] * size
        call_of: dict[int, int] = {}
        for position, (at, kind, i) in enumerate(raw, start=1):
            self.e_time[position] = at
            self.e_op[position] = i
            if kind == 0:
                self.e_call[position] = True
                call_of[i] = position
            else:
                self.e_match[call_of[i]] = position
        self.nxt = [*range(1, size), NIL]
        self.prv = [NIL, *range(0, size - 1)]
        # Unknown operations 1..U by invoke time; 0 is the head.
        usize = len(self.pending) + 1
        self.u_time = [0] + [op.invoke_time for op in self.pending]
        self.u_class: list[Hashable] = [None] + [model.effect(op) for op in self.pending]
        self.unxt = [*range(1, usize), NIL]
        self.uprv = [NIL, *range(0, usize - 1)]

    def _lift(self, call: int) -> None:
        nxt, prv = self.nxt, self.prv
        nxt[prv[call]] = nxt[call]
        prv[nxt[call]] = prv[call]  # a call always has its return after it
        ret = self.e_match[call]
        nxt[prv[ret]] = nxt[ret]
        if nxt[ret] != NIL:
            prv[nxt[ret]] = prv[ret]

    def _unlift(self, call: int) -> None:
        nxt, prv = self.nxt, self.prv
        ret = self.e_match[call]
        nxt[prv[ret]] = ret
        if nxt[ret] != NIL:
            prv[nxt[ret]] = ret
        nxt[prv[call]] = call
        prv[nxt[call]] = call

    def _ulift(self, u: int) -> None:
        self.unxt[self.uprv[u]] = self.unxt[u]
        if self.unxt[u] != NIL:
            self.uprv[self.unxt[u]] = self.uprv[u]

    def _uunlift(self, u: int) -> None:
        self.unxt[self.uprv[u]] = u
        if self.unxt[u] != NIL:
            self.uprv[self.unxt[u]] = u

    def run(self) -> _Outcome:
        step = self.model.step
        done, pending = self.done, self.pending
        e_call, e_op, e_time = self.e_call, self.e_op, self.e_time
        nxt, unxt, u_time, u_class = self.nxt, self.unxt, self.u_time, self.u_class
        clock, deadline = self.clock, self.deadline

        state = self.model.init()
        done_bits = 0  # linearized ok operations
        used_bits = 0  # linearized unknown operations
        remaining = len(done)
        cache: dict[tuple[int, Hashable], list[int]] = {(0, state): [0]}
        # A frame: (entry or unknown slot, is_ok, state before, run start, in a run, boundary, tried effects)
        stack: list[tuple[int, bool, Hashable, Hashable, bool, int, set[Hashable] | None]] = []
        run_start, in_run = state, False
        scanning_ok = True
        e = nxt[0]
        u = NIL
        boundary = NIL
        tried: set[Hashable] | None = None
        visited = 1
        best = NIL  # the furthest boundary at which a node got stuck
        outcome = _Outcome("illegal", 0)
        steps = 0
        if clock() > deadline:
            return _Outcome("unknown", 0)

        while remaining:
            steps += 1
            if steps % CLOCK_CHECK_EVERY == 0 and clock() > deadline:
                return _Outcome("unknown", visited)
            if scanning_ok:
                if e_call[e]:
                    i = e_op[e]
                    legal, after = step(state, done[i])
                    if legal:
                        bits = done_bits | (1 << i)
                        if _fresh(cache, bits, after, used_bits):
                            stack.append((e, True, state, run_start, in_run, boundary, tried))
                            state, done_bits = after, bits
                            self._lift(e)
                            remaining -= 1
                            run_start, in_run = state, False
                            e = nxt[0]
                            visited += 1
                            continue
                    e = nxt[e]
                else:  # the first return entry: the boundary; now the unknown candidates
                    boundary = e
                    scanning_ok = False
                    tried = set()
                    u = unxt[0]
                continue
            if u != NIL and u_time[u] <= e_time[boundary]:
                effect = u_class[u]
                if effect not in tried:  # type: ignore[operator]
                    tried.add(effect)  # type: ignore[union-attr]
                    op = pending[u - 1]
                    legal, after = step(state, op)
                    if legal and not (in_run and step(run_start, op) == (True, after)):
                        bits = used_bits | (1 << (u - 1))
                        if _fresh(cache, done_bits, after, bits):
                            stack.append((u, False, state, run_start, in_run, boundary, tried))
                            if not in_run:
                                run_start, in_run = state, True
                            state, used_bits = after, bits
                            self._ulift(u)
                            scanning_ok = True
                            e = nxt[0]
                            visited += 1
                            continue
                u = unxt[u]
                continue
            # Stuck: no candidate works here.
            if boundary > best:
                best = boundary
                outcome.stuck_states = [state]
                outcome.path = self._path(stack)
                outcome.final_state = state
            elif boundary == best and len(outcome.stuck_states) < STUCK_STATES_MAX \
                    and state not in outcome.stuck_states:
                outcome.stuck_states.append(state)
            if not stack:
                outcome.visited = visited
                outcome.culprit = done[e_op[best]]
                return outcome
            x, was_ok, state, run_start, in_run, boundary, tried = stack.pop()
            if was_ok:
                self._unlift(x)
                done_bits &= ~(1 << e_op[x])
                remaining += 1
                scanning_ok = True
                e = nxt[x]
            else:
                self._uunlift(x)
                used_bits &= ~(1 << (x - 1))
                scanning_ok = False
                u = unxt[x]
        return _Outcome("ok", visited)

    def _path(self, stack: list[tuple[int, bool, Hashable, Hashable, bool, int, set[Hashable] | None]]
              ) -> list[tuple[Operation, Hashable]]:
        tail = stack[-PATH_TAIL_MAX:]
        return [(self.done[self.e_op[x]] if was_ok else self.pending[x - 1], before)
                for x, was_ok, before, *_ in tail]


def _fresh(cache: dict[tuple[int, Hashable], list[int]], done_bits: int, state: Hashable, used_bits: int) -> bool:
    """Record the node (done_bits, state, used_bits) unless it was visited or is
    dominated: visited with the same ok set and state and a subset of these
    unknown operations used up."""
    key = (done_bits, state)
    seen = cache.get(key)
    if seen is None:
        cache[key] = [used_bits]
        return True
    for other in seen:
        if other | used_bits == used_bits:
            return False
    seen.append(used_bits)
    return True


# -- the report of an illegal sub-history ----------------------------------------------------------------


def _anomaly(model: Model, key: str, ops: Sequence[Operation], outcome: _Outcome) -> Anomaly:
    culprit = outcome.culprit
    if culprit is None or culprit.complete_time is None:
        raise CheckerError("an illegal outcome names a completed operation")
    path = outcome.path
    # Keep the tail of the attempted order from its second-to-last change of state
    # (for a register: the write of the value the culprit contradicts, and the one after).
    afters = [before for _, before in path[1:]] + [outcome.final_state] if path else []
    changes = [i for i, ((_, before), after) in enumerate(zip(path, afters, strict=True)) if before != after]
    start = changes[-2] if len(changes) >= 2 else changes[-1] if changes else max(0, len(path) - 3)
    linearized = tuple(op for op, _ in path[start:][-PATH_TAIL_MAX:])
    on_path = {op.index for op in linearized}
    window_start = min([culprit.invoke_time, *(op.invoke_time for op in linearized)])
    window_end = culprit.complete_time

    def near(op: Operation) -> bool:
        if op.invoke_time > window_end:
            return False
        if op.status == "info":  # pending from its invoke on: only the recent ones and those used
            return op.invoke_time >= window_start or op.index in on_path
        return op.complete_time is not None and op.complete_time >= window_start

    window = [op for op in ops if near(op)]
    if len(window) > WINDOW_MAX:
        keep = on_path | {culprit.index}
        keep |= {op.index for op in window
                 if op.invoke_time <= window_end and (op.complete_time or window_end) >= culprit.invoke_time}
        rest = sorted((op for op in window if op.index not in keep),
                      key=lambda op: -(op.complete_time or op.invoke_time))
        keep |= {op.index for op in rest[:max(0, WINDOW_MAX - len(keep))]}
        window = [op for op in window if op.index in keep]
    window.sort(key=lambda op: (op.invoke_time, op.index))
    texts = {op.index: model.describe(op) for op in [*window, *linearized, culprit]}
    states = tuple(model.describe_state(s) for s in outcome.stuck_states)
    return Anomaly(key=key, op=culprit, states=states, linearized=linearized, window=tuple(window), texts=texts)
