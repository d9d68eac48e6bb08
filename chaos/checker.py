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
and never bound anything. They are candidates once invoked (invoke time <=
the boundary's time). The search succeeds as soon as every ``ok`` operation
is linearized: the unknown operations left over simply did not take effect.
To keep many unknown operations from multiplying the search:

1. ``ok`` candidates are tried first, unknown ones after them.
2. Unknown operations with the same ``model.effect`` are interchangeable once
   invoked (a group), so only the earliest unused one of a group is tried.
3. Two nodes with the same ``ok`` set and state differ only in which unknown
   operations they used up; one that used up a superset of the other's is
   dominated (it can do nothing the other cannot).
4. The run rule: in a run of unknown operations (no ``ok`` operation since
   the run's start), an operation, unknown or ``ok``, is skipped if applying
   it at the run's start gives the same result: that node is reached from
   the start with fewer unknown operations used up. So a ``blind`` unknown
   operation (a register write) never follows another in a run, and a run
   must be observed by the ``ok`` operation after it.

The exact search can still blow up when the history is illegal and many
unknown operations can each explain part of it: proving that no combination
works is exponential in general. So past a node budget the exact search
pauses for a *relaxed* search in which an unknown operation may take effect
any number of times. Its nodes are only (``ok`` set, state), so it is
exhaustive quickly; as every exact linearization is a relaxed one, its
failure proves the history illegal. If it finds a relaxed linearization the
exact search resumes, until the deadline (then ``unknown``).

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
# The exact search first gets this many nodes (plus so many per operation); a
# linearizable history rarely needs more. Past that, the relaxed search tries to
# prove the history illegal, then the exact search resumes until the deadline.
EXACT_BUDGET_NODES = 50_000
EXACT_BUDGET_NODES_PER_OP = 20
RELAXED_SHARE = 0.5  # of the time left, for the relaxed search
# A search keeps every node it visited (a bitset of the sub-history's ok
# operations each): past this estimate of their size it gives up (unknown).
CACHE_BYTES_MAX = 4 * 1024 * 1024 * 1024  # long per-key histories with many unknown ops need it
NODE_BYTES_FIXED = 200  # the cache's tuple, list and dict slot per node, roughly


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
    relaxed: bool = False  # found by the relaxed search (unknown operations reusable)
    unknown_states: tuple[str, ...] = ()  # further states, left by operations of unknown outcome

    def explanation(self) -> str:
        states = ", ".join(self.states) or "nothing"
        text = (f"{self.texts[self.op.index]} cannot be linearized: with every operation that returned before it "
                f"applied, the state can only be {states}")
        if self.unknown_states:
            more = ", ".join(self.unknown_states)
            text += f" (or, after operations of unknown outcome, {more})"
        if self.relaxed:
            text += " (even if operations of unknown outcome could take effect any number of times)"
        return text

    def to_json(self) -> dict[str, Any]:
        def op_json(op: Operation) -> dict[str, Any]:
            return {**op.to_json(), "text": self.texts[op.index]}

        return {"key": self.key, "explanation": self.explanation(), "op": op_json(self.op),
                "states": list(self.states), "unknown_states": list(self.unknown_states),
                "linearized": [op_json(op) for op in self.linearized],
                "window": [op_json(op) for op in self.window], "relaxed": self.relaxed}


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
    reason: str | None = None  # why the verdict is unknown: timeout, memory limit or skipped

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
        outcome, relaxed = _decide(model, part, deadline, clock)
        elapsed = clock() - began
        anomaly = _anomaly(model, key, part, outcome, relaxed) if outcome.verdict == "illegal" else None
        illegal = illegal or outcome.verdict == "illegal"
        results.append(KeyResult(key, outcome.verdict, len(part), unknown_count, outcome.visited, elapsed,
                                 anomaly=anomaly, reason=outcome.reason if outcome.verdict == "unknown" else None))
    verdicts = {r.verdict for r in results}
    verdict: Verdict = "illegal" if "illegal" in verdicts else "unknown" if "unknown" in verdicts else "ok"
    return Result(verdict, tuple(results), clock() - started)


def _decide(model: Model, ops: Sequence[Operation], deadline: float, clock: Callable[[], float]
            ) -> tuple[_Outcome, bool]:
    """Search one sub-history; return the outcome and whether the relaxed
    search decided it.

    The exact search runs until decided or the deadline. If it visits more
    than a budget of nodes (most linearizable histories need far fewer) and
    there are unknown operations, it pauses once for the relaxed search
    (unknown operations reusable), which gets a share of the time left: if
    that fails, the history is illegal and the exact search is abandoned;
    else the exact search resumes.
    """
    budget = EXACT_BUDGET_NODES + EXACT_BUDGET_NODES_PER_OP * len(ops)
    relaxed: list[_Outcome] = []

    def at_budget() -> bool:
        now = clock()
        relaxed_deadline = now + max(0.0, deadline - now) * RELAXED_SHARE
        relaxed.append(_Search(model, ops, reuse=True).run(relaxed_deadline, clock))
        return relaxed[0].verdict == "illegal"

    if any(op.status == "info" for op in ops):
        outcome = _Search(model, ops).run(deadline, clock, budget, at_budget)
    else:  # without unknown operations the relaxed search is the exact one
        outcome = _Search(model, ops).run(deadline, clock)
    if relaxed:
        outcome.visited += relaxed[0].visited
        if relaxed[0].verdict == "illegal":
            relaxed[0].visited = outcome.visited
            return relaxed[0], True
    return outcome, False


# -- the search -------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Outcome:
    verdict: Verdict
    visited: int
    culprit: Operation | None = None
    reason: str | None = None
    stuck_states: list[Hashable] = field(default_factory=list)  # reached by ok operations
    run_states: list[Hashable] = field(default_factory=list)  # reached through unknown ones
    path_in_run: bool = False
    path: list[tuple[Operation, Hashable]] = field(default_factory=list)  # (op, state before it)
    final_state: Hashable = None


NIL = -1


class _Search:
    """One search over one sub-history. Build it, call ``run`` once.

    ``reuse=True`` relaxes the search: an unknown operation may take effect
    any number of times (after its invoke) instead of at most once. Every
    exact linearization is also a relaxed one, so a relaxed search that fails
    proves the history illegal; one that succeeds proves nothing. It has no
    set of used operations, so its nodes are just (ok set, state).
    """

    def __init__(self, model: Model, ops: Sequence[Operation], *, reuse: bool = False) -> None:
        self.model = model
        self.reuse = reuse
        self.done = [op for op in ops if op.status == "ok"]
        self.pending = sorted((op for op in ops if op.status == "info"), key=lambda op: op.invoke_time)
        if len(self.done) + len(self.pending) != len(ops):
            raise CheckerError("the search takes ok and info operations only")
        # Entries 1..E in time order (a call before a return at the same time); 0 is the list's head.
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
        # Unknown operations grouped by effect, each group in invoke order, the
        # groups in order of their first invoke. Within a group only the earliest
        # unused operation is ever tried.
        groups: dict[Hashable, list[int]] = {}
        for j, op in enumerate(self.pending):
            groups.setdefault(model.effect(op), []).append(j)
        self.groups = list(groups.values())
        self.blind = [model.blind(self.pending[g[0]]) for g in self.groups]

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

    def run(self, deadline: float, clock: Callable[[], float], budget: int | None = None,
            at_budget: Callable[[], bool] | None = None) -> _Outcome:
        """Search until decided, past ``deadline`` (``unknown``, reason
        ``timeout``) or past ``CACHE_BYTES_MAX`` of visited nodes (reason
        ``memory limit``). On visiting ``budget`` nodes, call ``at_budget``
        and stop (reason ``budget``) if it returns true or is missing."""
        step = self.model.step
        done, pending, groups = self.done, self.pending, self.groups
        e_call, e_op, e_time = self.e_call, self.e_op, self.e_time
        nxt = self.nxt
        reuse = self.reuse
        u_time = [op.invoke_time for op in pending]
        n_groups = len(groups)
        g_used = [0] * n_groups  # used operations per group: always its earliest ones
        group_steps: dict[tuple[int, Hashable], tuple[bool, Hashable]] = {}  # the model is pure: memoise

        blind = self.blind
        blind_after = [step(self.model.init(), pending[groups[g][0]])[1] if blind[g] else None
                       for g in range(n_groups)]
        candidates_in: dict[tuple[Hashable, bool], list[tuple[int, Hashable]]] = {}

        def group_step(g: int, state: Hashable) -> tuple[bool, Hashable]:
            key = (g, state)
            found = group_steps.get(key)
            if found is None:
                found = group_steps[key] = step(state, pending[groups[g][0]])
            return found

        def candidates(state: Hashable, in_run: bool) -> list[tuple[int, Hashable]]:
            """The groups that can take effect in ``state``, with the state after, in
            group order. In a run, not the blind ones: the run rule drops them all."""
            key = (state, in_run)
            found = candidates_in.get(key)
            if found is None:
                found = []
                for g in range(n_groups):
                    if blind[g]:
                        if not in_run:
                            found.append((g, blind_after[g]))
                        continue
                    legal, after = group_step(g, state)
                    if legal:
                        found.append((g, after))
                candidates_in[key] = found
            return found

        state = self.model.init()
        done_bits = 0  # linearized ok operations
        used_bits = 0  # unknown operations used (always none when reusing)
        remaining = len(done)
        if not remaining:
            return _Outcome("ok", 1)
        if clock() > deadline:
            return _Outcome("unknown", 0, reason="timeout")
        cache: dict[tuple[int, Hashable], list[int]] = {(0, state): [0]}
        # A frame: (entry or unknown op, is_ok, state, run start, in a run, boundary, group)
        stack: list[tuple[int, bool, Hashable, Hashable, bool, int, int]] = []
        run_start, in_run = state, False
        scanning_ok = True
        e = nxt[0]
        boundary = NIL
        g = 0  # the next candidate to try in the unknown phase
        cands: list[tuple[int, Hashable]] = []
        visited = 1
        limit = budget if budget is not None else -1
        nodes_max = CACHE_BYTES_MAX // (len(done) // 8 + NODE_BYTES_FIXED)
        best = NIL  # the furthest boundary at which a node got stuck
        outcome = _Outcome("illegal", 0)
        steps = 0

        while remaining:
            steps += 1
            if steps % CLOCK_CHECK_EVERY == 0:
                if clock() > deadline:
                    return _Outcome("unknown", visited, reason="timeout")
                if visited > nodes_max:
                    return _Outcome("unknown", visited, reason="memory limit")
            if visited == limit:
                limit = -1
                if at_budget is None or at_budget():
                    return _Outcome("unknown", visited, reason="budget")
            if scanning_ok:
                if e_call[e]:  # a call before the first return entry: a candidate
                    i = e_op[e]
                    op = done[i]
                    legal, after = step(state, op)
                    if legal and not (in_run and step(run_start, op) == (True, after)):
                        bits = done_bits | (1 << i)
                        if _fresh(cache, bits, after, used_bits):
                            stack.append((e, True, state, run_start, in_run, boundary, 0))
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
                    g = 0
                    cands = candidates(state, in_run) if n_groups else cands
                continue
            if g < len(cands):
                group, after = cands[g]
                g += 1
                g_ops = groups[group]
                k = 0 if reuse else g_used[group]
                if k == len(g_ops):
                    continue
                j = g_ops[k]  # the group's earliest unused operation
                if u_time[j] > e_time[boundary]:
                    continue  # not invoked yet
                if not (in_run and group_step(group, run_start) == (True, after)):
                    bits = used_bits if reuse else used_bits | (1 << j)
                    if _fresh(cache, done_bits, after, bits):
                        stack.append((j, False, state, run_start, in_run, boundary, g))
                        if not in_run:
                            run_start, in_run = state, True
                        state, used_bits = after, bits
                        if not reuse:
                            g_used[group] += 1
                        scanning_ok = True
                        e = nxt[0]
                        visited += 1
                continue
            # Stuck: no candidate works here. Remember the furthest such boundary, and
            # the states there: first those reached by ok operations (not in a run).
            if boundary > best or (boundary == best and outcome.path_in_run and not in_run):
                if boundary > best:
                    outcome.stuck_states, outcome.run_states = [], []
                best = boundary
                outcome.path = self._path(stack)
                outcome.path_in_run = in_run
                outcome.final_state = state
            if boundary == best:
                states = outcome.run_states if in_run else outcome.stuck_states
                if len(states) < STUCK_STATES_MAX and state not in states:
                    states.append(state)
            if not stack:
                outcome.visited = visited
                outcome.culprit = done[e_op[best]]
                return outcome
            x, was_ok, state, run_start, in_run, boundary, g = stack.pop()
            if was_ok:
                self._unlift(x)
                done_bits &= ~(1 << e_op[x])
                remaining += 1
                scanning_ok = True
                e = nxt[x]
            else:
                cands = candidates(state, in_run)
                if not reuse:
                    used_bits &= ~(1 << x)
                    g_used[cands[g - 1][0]] -= 1
                scanning_ok = False
        return _Outcome("ok", visited)

    def _path(self, stack: list[tuple[int, bool, Hashable, Hashable, bool, int, int]]
              ) -> list[tuple[Operation, Hashable]]:
        tail = stack[-PATH_TAIL_MAX:]
        return [(self.done[self.e_op[x]] if was_ok else self.pending[x], before)
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


def _anomaly(model: Model, key: str, ops: Sequence[Operation], outcome: _Outcome, relaxed: bool) -> Anomaly:
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
    run_states = tuple(model.describe_state(s) for s in outcome.run_states if s not in outcome.stuck_states)
    return Anomaly(key=key, op=culprit, states=states, linearized=linearized, window=tuple(window), texts=texts,
                   relaxed=relaxed, unknown_states=run_states)
