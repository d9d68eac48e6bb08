"""Sagas: multi-step work across agents with compensations, every
transition a committed command (pure).

A saga is a set of steps with dependencies (by default each step depends on
the one before it, so a plain list runs in order; ``depends_on`` makes
parallel branches). Each step has an action and may have a compensation.
The leader's orchestrator (``coordinator.services.sagas``) invokes what this
module says is in flight and proposes the outcomes; this module alone
decides what happens next, so every replica computes the same saga.

Life of a step::

    pending ─► running(a) ─ok─► succeeded ─(saga compensating)─► compensating(c) ─ok─► compensated
                  │  ▲                                                │  ▲
                  │  └─ retry due ── waiting                         │  └─ retry due ── waiting
                  └─ failed, attempts left ─┘                        └─ failed, attempts left ─┘
                  └─ failed for good ─► failed                       └─ failed for good ─► stuck

``running`` and ``compensating`` are an attempt in flight: started by a
committed command, finished by the first committed outcome that names the
same attempt (later ones, say from a deposed leader, change nothing).

A saga runs until every step succeeded (``completed``) or one failed for
good or it was cancelled. Then it stops starting steps, waits for the
attempts in flight, and compensates the steps that succeeded, one at a
time in the reverse order of their success (a step finishing late is the
first compensated). It ends ``compensated``, or ``failed-stuck`` when a
compensation failed for good (an alert event names it; the others are
still compensated).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.commands.sagas import (
    FINAL_STATES,
    SAGA_STATES,
    SagaCancel,
    SagaOutcome,
    SagaResumed,
    SagaRetry,
    SagaStart,
)
from coordinator.state.base import ApplyContext, Rejected, approx_size, invalid, over_quota
from coordinator.state.events import EventLog

Shown = Callable[["Saga"], bool]  # which sagas a listing shows (its caller's view)


@dataclass(frozen=True, slots=True)
class SagaLimits:
    live_max: int = 10_000       # sagas not yet final
    finished_retained: int = 10_000  # final sagas kept for GET, oldest dropped first
    bytes_max: int = 128 << 20   # definitions and step results of every saga kept (finished ones go first)
    result_bytes_max: int = 64 << 10  # one step's result; a larger one is kept as a note of its size


# -- retries (a definition is checked by the parse of saga.start: coordinator.commands.sagas) --


def backoff_ms(retry: dict[str, Any], key: str, attempt: int) -> int:
    """The wait before attempt ``attempt + 1``: exponential, capped, with a
    jitter in [50%, 100%] drawn from the attempt's key, so every replica
    computes the same wait without any randomness in the state machine."""
    # Grown by multiplication, not ``multiplier ** (attempt - 1)``: that leaves the
    # float range (10.0 ** 309, and compensations retry up to 1000 times), and
    # libm's pow() need not round alike on every replica where ``*`` does.
    grown_s = retry["backoff_s"]
    for _ in range(attempt - 1):
        if grown_s >= retry["backoff_max_s"]:
            break
        grown_s *= retry["multiplier"]
    base = min(grown_s, retry["backoff_max_s"])
    draw = int.from_bytes(hashlib.sha256(f"{key}/{attempt}".encode()).digest()[:4], "big") / 2**32
    return int(base * 1000 * (0.5 + draw / 2))


# -- runtime -------------------------------------------------------------------------------


@dataclass(slots=True)
class StepRun:
    """One step's progress. ``attempt`` counts action attempts,
    ``comp_attempt`` compensation attempts; ``retry_at_ms`` is set while
    waiting for the next attempt of the current phase."""

    status: str = "pending"  # pending running waiting succeeded failed abandoned compensating compensated stuck
    attempt: int = 0
    comp_attempt: int = 0
    retry_at_ms: int | None = None
    result: Any = None
    error: str | None = None
    succeeded_seq: int = 0  # order of success among the saga's steps (compensation goes backwards)
    started_index: int = 0  # log index that started the current attempt

    @property
    def phase(self) -> str | None:
        """The phase of the attempt in flight or waiting, if any."""
        if self.status in ("running", "waiting") and self.comp_attempt == 0:
            return "action"
        if self.status in ("compensating", "waiting") and self.comp_attempt > 0:
            return "compensation"
        return None

    @property
    def in_flight(self) -> tuple[str, int] | None:
        if self.status == "running":
            return "action", self.attempt
        if self.status == "compensating":
            return "compensation", self.comp_attempt
        return None

    def to_data(self) -> list[Any]:
        return [self.status, self.attempt, self.comp_attempt, self.retry_at_ms, self.result, self.error,
                self.succeeded_seq, self.started_index]

    @classmethod
    def from_data(cls, data: list[Any]) -> StepRun:
        return cls(*data)


@dataclass(slots=True)
class Saga:
    id: str
    definition: dict[str, Any]
    created_ms: int
    created_index: int
    state: str = "running"
    steps: dict[str, StepRun] = field(default_factory=dict)
    history: list[list[Any]] = field(default_factory=list)  # [index, time_ms, event, step, phase, attempt, detail]
    successes: int = 0
    reason: str | None = None  # why it compensates: the failed step or the cancellation
    updated_ms: int = 0
    finished_ms: int | None = None

    @property
    def size(self) -> int:
        """What it makes every replica hold, about: its definition and step results."""
        return approx_size(self.definition) + sum(approx_size(r.result) for r in self.steps.values())

    def step_def(self, step_id: str) -> dict[str, Any]:
        return next(s for s in self.definition["steps"] if s["id"] == step_id)

    def in_flight(self) -> list[tuple[str, str, int]]:
        """Every attempt started and without an outcome: (step, phase, attempt);
        ``steps[step].started_index`` is the entry that started it."""
        out = []
        for step_id, run in self.steps.items():
            flight = run.in_flight
            if flight is not None:
                out.append((step_id, *flight))
        return out

    def waiting(self) -> list[tuple[str, str, int, int]]:
        """Every retry that waits: (step, phase, next attempt, due ms)."""
        out = []
        for step_id, run in self.steps.items():
            if run.status == "waiting" and run.retry_at_ms is not None:
                phase = run.phase or "action"
                attempt = (run.comp_attempt if phase == "compensation" else run.attempt) + 1
                out.append((step_id, phase, attempt, run.retry_at_ms))
        return out

    def describe(self, *, history: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.definition["name"],
            "state": self.state,
            "reason": self.reason,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
            "finished_ms": self.finished_ms,
            "created_index": self.created_index,
            "steps": [
                {"id": s["id"], "status": self.steps[s["id"]].status, "attempts": self.steps[s["id"]].attempt,
                 "compensation_attempts": self.steps[s["id"]].comp_attempt,
                 "retry_at_ms": self.steps[s["id"]].retry_at_ms, "result": self.steps[s["id"]].result,
                 "error": self.steps[s["id"]].error, "depends_on": s["depends_on"],
                 "has_compensation": s["compensation"] is not None}
                for s in self.definition["steps"]
            ],
        }
        if history:
            out["definition"] = self.definition
            out["history"] = [
                {"index": h[0], "time_ms": h[1], "event": h[2], "step": h[3], "phase": h[4], "attempt": h[5],
                 "detail": h[6]}
                for h in self.history
            ]
        return out

    def to_data(self) -> list[Any]:
        return [self.id, self.definition, self.created_ms, self.created_index, self.state,
                {k: v.to_data() for k, v in self.steps.items()}, self.history, self.successes, self.reason,
                self.updated_ms, self.finished_ms]

    @classmethod
    def from_data(cls, data: list[Any]) -> Saga:
        (saga_id, definition, created_ms, created_index, state, steps, history, successes, reason, updated_ms,
         finished_ms) = data
        return cls(saga_id, definition, created_ms, created_index, state,
                   {k: StepRun.from_data(v) for k, v in steps.items()}, history, successes, reason, updated_ms,
                   finished_ms)


def idempotency_key(saga_id: str, step_id: str, phase: str, attempt: int) -> str:
    """What an agent may use to recognise a repeated invocation of one attempt."""
    return f"{saga_id}/{step_id}/{phase}/{attempt}"


class Sagas:
    """Every saga of the cluster; transitions take the apply context."""

    def __init__(self, limits: SagaLimits | None = None) -> None:
        self.limits = limits or SagaLimits()
        self.sagas: dict[str, Saga] = {}
        self.live: dict[str, None] = {}  # ids not final, in creation order (the orchestrator's work list)
        self.finished: OrderedDict[str, None] = OrderedDict()  # final ids, oldest first (for eviction)
        self.bytes = 0  # Saga.size of every saga kept
        self.finished_bytes = 0  # of the final ones (a start may evict them)

    # -- commands ----------------------------------------------------------------------------

    def start(self, ctx: ApplyContext, events: EventLog, command: SagaStart) -> dict[str, Any]:
        saga_id = command.normalized["id"] or f"saga-{ctx.index}"
        if saga_id in self.sagas:
            raise Rejected("conflict", f"saga {saga_id!r} already exists")
        if len(self.live) >= self.limits.live_max:
            raise Rejected("unavailable", f"too many sagas in progress ({self.limits.live_max})")
        definition = {**command.normalized, "id": saga_id}  # "id" keeps its place: the snapshot's bytes
        saga = Saga(saga_id, definition, ctx.now_ms, ctx.index,
                    steps={s["id"]: StepRun() for s in definition["steps"]}, updated_ms=ctx.now_ms)
        size = saga.size
        if self.bytes + size - self.finished_bytes > self.limits.bytes_max:
            raise over_quota("saga_bytes_max", f"sagas in progress hold about {self.bytes} bytes (at most "
                                               f"{self.limits.bytes_max}) and this one {size}")
        while self.bytes + size > self.limits.bytes_max and self.finished:
            self._drop_oldest_finished()
        self.sagas[saga_id] = saga
        self.bytes += size
        self.live[saga_id] = None
        self._record(ctx, events, saga, "saga.started", detail={"name": definition["name"]})
        self._advance(ctx, events, saga)
        return {"id": saga_id, "state": saga.state}

    def outcome(self, ctx: ApplyContext, events: EventLog, command: SagaOutcome) -> dict[str, Any]:
        """The outcome of one attempt. Applied only if that attempt is the one
        in flight; a late or repeated outcome changes nothing."""
        saga, step_id, phase, attempt = self._attempt(command)
        ok, permanent, error = command.ok, command.permanent, command.error
        run = saga.steps[step_id]
        if run.in_flight != (phase, attempt):
            return {"applied": False, "state": saga.state}
        step = saga.step_def(step_id)
        if phase == "action":
            if ok:
                saga.successes += 1
                result = self._kept_result(command.result)
                self.bytes += approx_size(result) - approx_size(run.result)
                run.status, run.result, run.error, run.succeeded_seq = "succeeded", result, None, saga.successes
                self._record(ctx, events, saga, "saga.step.succeeded", step_id, phase, attempt)
            else:
                self._failed(ctx, events, saga, step_id, run, phase, attempt, step["retry"], permanent, error)
        elif ok:
            run.status, run.retry_at_ms = "compensated", None
            self._record(ctx, events, saga, "saga.step.compensated", step_id, phase, attempt)
        else:
            self._failed(ctx, events, saga, step_id, run, phase, attempt, saga.definition["compensation_retry"],
                         False, error)
        self._advance(ctx, events, saga)
        return {"applied": True, "state": saga.state}

    def retry(self, ctx: ApplyContext, events: EventLog, command: SagaRetry) -> dict[str, Any]:
        """Start the next attempt of a waiting step, once its time came (by
        the proposer's clock, which is in the command)."""
        saga, step_id, phase, attempt = self._attempt(command)
        run = saga.steps[step_id]
        due = [w for w in saga.waiting() if w[0] == step_id]
        if not due or due[0][1] != phase or due[0][2] != attempt or saga.state in FINAL_STATES:
            return {"applied": False, "state": saga.state}
        if ctx.now_ms < due[0][3]:
            return {"applied": False, "state": saga.state, "due_ms": due[0][3]}
        run.retry_at_ms, run.started_index = None, ctx.index
        if phase == "action":
            run.status, run.attempt = "running", attempt
        else:
            run.status, run.comp_attempt = "compensating", attempt
        self._record(ctx, events, saga, "saga.step.started", step_id, phase, attempt)
        return {"applied": True, "state": saga.state}

    def resumed(self, ctx: ApplyContext, events: EventLog, command: SagaResumed) -> dict[str, Any]:
        """A new leader re-drives an attempt in flight whose outcome was never
        committed (same attempt, same idempotency key): history only."""
        saga, step_id, phase, attempt = self._attempt(command)
        if saga.steps[step_id].in_flight != (phase, attempt):
            return {"applied": False, "state": saga.state}
        self._record(ctx, events, saga, "saga.step.resumed", step_id, phase, attempt, {"node": command.node})
        return {"applied": True, "state": saga.state}

    def cancel(self, ctx: ApplyContext, events: EventLog, command: SagaCancel) -> dict[str, Any]:
        saga = self._saga(command.saga)
        reason = "cancelled" if command.reason is None else command.reason
        if saga.state in FINAL_STATES:
            raise Rejected("conflict", f"saga {saga.id!r} is already {saga.state}")
        if saga.state == "running":
            self._record(ctx, events, saga, "saga.cancelled", detail={"reason": reason})
            self._compensate(ctx, events, saga, f"cancelled: {reason}")
            self._advance(ctx, events, saga)
        return {"id": saga.id, "state": saga.state}

    # -- reads --------------------------------------------------------------------------------

    def list(self, state: str | None, limit: int, after: int = 0, shown: Shown | None = None) -> list[Saga]:
        """Up to ``limit`` sagas created after log index ``after``, oldest
        first (a cursor that stays valid when sagas are dropped meanwhile);
        only those ``shown`` accepts, when given."""
        out = []
        for saga in self.sagas.values():  # in creation order
            if saga.created_index > after and (state is None or saga.state == state) \
                    and (shown is None or shown(saga)):
                out.append(saga)
                if len(out) >= limit:
                    break
        return out

    def newest(self, limit: int, shown: Shown | None = None) -> list[Saga]:
        """The ``limit`` most recently created sagas (that ``shown`` accepts), newest first."""
        out = []
        for saga in reversed(self.sagas.values()):
            if shown is None or shown(saga):
                out.append(saga)
                if len(out) >= limit:
                    break
        return out

    def counts(self, shown: Shown | None = None) -> dict[str, int]:
        out = dict.fromkeys(SAGA_STATES, 0)
        for saga in self.sagas.values():
            if shown is None or shown(saga):
                out[saga.state] += 1
        return out

    # -- snapshots ------------------------------------------------------------------------------

    def to_data(self) -> dict[str, Any]:
        return {"sagas": [s.to_data() for s in self.sagas.values()], "finished": list(self.finished)}

    @classmethod
    def from_data(cls, data: dict[str, Any], limits: SagaLimits | None = None) -> Sagas:
        sagas = cls(limits)
        for row in data["sagas"]:
            saga = Saga.from_data(row)
            sagas.sagas[saga.id] = saga
            if saga.state not in FINAL_STATES:
                sagas.live[saga.id] = None
        sagas.finished = OrderedDict.fromkeys(data["finished"])
        sagas.bytes = sum(s.size for s in sagas.sagas.values())
        sagas.finished_bytes = sum(sagas.sagas[s].size for s in sagas.finished if s in sagas.sagas)
        return sagas

    # -- inside ---------------------------------------------------------------------------------

    def _saga(self, saga_id: str) -> Saga:
        saga = self.sagas.get(saga_id)
        if saga is None:
            raise Rejected("not_found", f"saga {saga_id!r} does not exist")
        return saga

    def _attempt(self, command: SagaOutcome | SagaRetry | SagaResumed) -> tuple[Saga, str, str, int]:
        """The saga and the attempt a command names; refused when the saga or its step does not exist."""
        saga = self._saga(command.saga)
        if command.step not in saga.steps:
            raise invalid("step", f"saga {saga.id!r} has no step {command.step!r}")
        return saga, command.step, command.phase, command.attempt

    def _record(self, ctx: ApplyContext, events: EventLog, saga: Saga, event: str, step: str | None = None,
                phase: str | None = None, attempt: int | None = None, detail: dict[str, Any] | None = None) -> None:
        saga.history.append([ctx.index, ctx.now_ms, event, step, phase, attempt, detail])
        saga.updated_ms = ctx.now_ms
        data: dict[str, Any] = {"sagaId": saga.id, "name": saga.definition["name"]}
        if step is not None:
            data.update(step=step, phase=phase, attempt=attempt)
        if detail:
            data.update(detail)
        events.emit(ctx, event, data)

    def _failed(self, ctx: ApplyContext, events: EventLog, saga: Saga, step_id: str, run: StepRun, phase: str,
                attempt: int, retry: dict[str, Any], permanent: bool, error: str | None) -> None:
        run.error = error
        retries = phase == "compensation" or saga.state == "running"  # a stopping saga starts no new action
        if retries and not permanent and attempt < retry["max_attempts"]:
            run.status = "waiting"
            run.retry_at_ms = ctx.now_ms + backoff_ms(retry, idempotency_key(saga.id, step_id, phase, attempt),
                                                      attempt)
            self._record(ctx, events, saga, "saga.step.failed", step_id, phase, attempt,
                         {"error": error, "retry_at_ms": run.retry_at_ms})
            return
        run.retry_at_ms = None
        if phase == "action":
            run.status = "failed"
            self._record(ctx, events, saga, "saga.step.failed", step_id, phase, attempt,
                         {"error": error, "retry_at_ms": None, "permanent": permanent})
            if saga.state == "running":
                self._compensate(ctx, events, saga, f"step {step_id!r} failed: {error}")
        else:
            run.status = "stuck"
            self._record(ctx, events, saga, "saga.step.stuck", step_id, phase, attempt, {"error": error})

    def _compensate(self, ctx: ApplyContext, events: EventLog, saga: Saga, reason: str) -> None:
        """Stop the saga: nothing new starts; steps not started or waiting for
        a retry are abandoned (they did not succeed, so nothing to undo)."""
        saga.state, saga.reason = "compensating", reason
        for step_id, run in saga.steps.items():
            if run.status == "pending" or (run.status == "waiting" and run.phase == "action"):
                run.status, run.retry_at_ms = "abandoned", None
                self._record(ctx, events, saga, "saga.step.abandoned", step_id)
        self._record(ctx, events, saga, "saga.compensating", detail={"reason": reason})

    def _advance(self, ctx: ApplyContext, events: EventLog, saga: Saga) -> None:
        """Start what can start now; finish the saga when nothing is left."""
        if saga.state == "running":
            done = {k for k, r in saga.steps.items() if r.status == "succeeded"}
            if len(done) == len(saga.steps):
                self._finish(ctx, events, saga, "completed")
                return
            for step in saga.definition["steps"]:
                run = saga.steps[step["id"]]
                if run.status == "pending" and all(d in done for d in step["depends_on"]):
                    run.status, run.attempt, run.started_index = "running", 1, ctx.index
                    self._record(ctx, events, saga, "saga.step.started", step["id"], "action", 1)
            return
        if saga.state != "compensating":
            return
        if any(r.status in ("running", "compensating", "waiting") for r in saga.steps.values()):
            return  # an attempt in flight or a compensation waiting: its outcome comes first
        to_undo = [(r.succeeded_seq, k) for k, r in saga.steps.items()
                   if r.status == "succeeded" and saga.step_def(k)["compensation"] is not None]
        if to_undo:
            _, step_id = max(to_undo)
            run = saga.steps[step_id]
            run.status, run.comp_attempt, run.started_index = "compensating", 1, ctx.index
            self._record(ctx, events, saga, "saga.step.started", step_id, "compensation", 1)
            return
        stuck = any(r.status == "stuck" for r in saga.steps.values())
        self._finish(ctx, events, saga, "failed-stuck" if stuck else "compensated")

    def _finish(self, ctx: ApplyContext, events: EventLog, saga: Saga, state: str) -> None:
        saga.state, saga.finished_ms = state, ctx.now_ms
        self.live.pop(saga.id, None)
        self.finished[saga.id] = None
        self.finished_bytes += saga.size
        name = {"completed": "saga.completed", "compensated": "saga.compensated", "failed-stuck": "saga.failed"}
        self._record(ctx, events, saga, name[state], detail={"state": state, "reason": saga.reason})
        while len(self.finished) > self.limits.finished_retained:
            self._drop_oldest_finished()

    def _drop_oldest_finished(self) -> None:
        old, _ = self.finished.popitem(last=False)
        gone = self.sagas.pop(old, None)
        if gone is not None:
            self.bytes -= gone.size
            self.finished_bytes -= gone.size

    def _kept_result(self, result: Any) -> Any:
        """A step's result as kept: itself, or over ``result_bytes_max`` a note
        of its size (the saga goes on; the agent's answer is not stored)."""
        size = approx_size(result)
        if size <= self.limits.result_bytes_max:
            return result
        return {"truncated": True, "bytes": size, "limit": "saga_result_bytes_max"}
