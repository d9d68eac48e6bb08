"""Sagas in the replicated state machine: definitions, transitions, snapshots.

Every test drives ``StateMachine.apply`` as the log would (through the bus
tests' ``Driver``, which checks a refused command leaves the encoded state
byte for byte as it was, and that restored copies answer the same). Time is
the command's ``now_ms``, so a retry is due exactly where the test says.

The hypothesis machine at the end answers, retries, resumes and cancels a
random saga in any order and checks the committed history of the saga
against the rules of the module docstring after every command.
"""

from __future__ import annotations

import itertools
import random
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from coordinator.codec import decode_snapshot, encode_snapshot
from coordinator.commands.base import Rejected
from coordinator.commands.sagas import FINAL_STATES, MAX_PATH_LEN, MAX_STEPS, PHASES, normalize_definition
from coordinator.state import Limits, StateMachine
from coordinator.state.sagas import Saga, SagaLimits, backoff_ms, idempotency_key
from tests.coordinator.state.test_bus import Driver, state_bytes

AGENT = {"kind": "agent", "agent_type": "worker"}
UNDO = {"kind": "agent", "agent_type": "worker", "path": "/undo"}
NO_BACKOFF = {"max_attempts": 1, "backoff_s": 0, "backoff_max_s": 0}


def step(step_id: str, *, undo: bool = True, **fields: Any) -> dict[str, Any]:
    """A step calling a worker agent, with a compensation unless ``undo=False``."""
    out: dict[str, Any] = {"id": step_id, "action": AGENT, **fields}
    if undo:
        out["compensation"] = UNDO
    return out


class SagaDriver(Driver):
    """The bus tests' driver over a machine with saga limits, plus saga shorthands."""

    def __init__(self, **saga_limits: Any) -> None:
        super().__init__()
        self.machines = [StateMachine(Limits(sagas=SagaLimits(**saga_limits)))]

    def start(self, *steps: dict[str, Any], saga_id: str = "s", **definition: Any) -> dict[str, Any]:
        return self.ok("saga.start", definition={"id": saga_id, "steps": list(steps), **definition})

    def saga(self, saga_id: str = "s") -> Saga:
        return self.sm.sagas.sagas[saga_id]

    def flight(self, saga_id: str = "s") -> list[tuple[str, str, int]]:
        return sorted(self.saga(saga_id).in_flight())

    def statuses(self, saga_id: str = "s") -> dict[str, str]:
        return {step_id: run.status for step_id, run in self.saga(saga_id).steps.items()}

    def answer(self, step_id: str, ok: bool = True, *, saga_id: str = "s", **args: Any) -> dict[str, Any]:
        """The outcome of the attempt of ``step_id`` in flight (there must be one)."""
        (flight,) = [f for f in self.saga(saga_id).in_flight() if f[0] == step_id]
        _, phase, attempt = flight
        value = self.ok("saga.outcome", saga=saga_id, step=step_id, phase=phase, attempt=attempt, ok=ok, **args)
        assert value["applied"] is True
        return value

    def saga_events(self, saga_id: str = "s") -> list[tuple[Any, ...]]:
        """(type, step, phase, attempt) of the committed events of one saga, oldest first."""
        return [(e.type, e.data.get("step"), e.data.get("phase"), e.data.get("attempt"))
                for e in self.sm.events.since(1, 100_000) if e.data.get("sagaId") == saga_id]

    def unchanged(self, op: str, **args: Any) -> dict[str, Any]:
        """Apply a command that must be accepted and change nothing (a late outcome, an early retry)."""
        before = state_bytes(self.sm)
        result = self(op, **args)
        assert result.error is None and result.events == (), (op, result)
        assert result.value["applied"] is False
        assert state_bytes(self.sm) == before, f"{op} changed the state"
        return result.value


# -- definitions ------------------------------------------------------------------------------


def one(**fields: Any) -> dict[str, Any]:
    """A definition of one step ``a`` with ``fields`` added or replaced."""
    return {"steps": [{"id": "a", "action": AGENT, **fields}]}


def action(**fields: Any) -> dict[str, Any]:
    return one(action=fields)


INVALID = [
    ("definition not an object", [step("a")], "definition"),
    ("no steps", {"name": "x"}, "steps"),
    ("empty steps", {"steps": []}, "steps"),
    ("steps not a list", {"steps": {"a": step("a")}}, "steps"),
    ("too many steps", {"steps": [step(f"s{i}") for i in range(MAX_STEPS + 1)]}, "steps"),
    ("saga id not a string", {**one(), "id": 7}, "id"),
    ("step not an object", {"steps": ["a"]}, "steps[0]"),
    ("step without id", {"steps": [{"action": AGENT}]}, "steps[0].id"),
    ("step without action", {"steps": [{"id": "a"}]}, "steps[0].action"),
    ("unknown action kind", action(kind="http", url="http://x"), "steps[0].action.kind"),
    ("agent type and id", action(kind="agent", agent_type="w", agent_id="w-1"), "steps[0].action"),
    ("agent neither type nor id", action(kind="agent", path="/x"), "steps[0].action"),
    ("agent id not a string", action(kind="agent", agent_id=5), "steps[0].action.agent_id"),
    ("path without slash", action(kind="agent", agent_type="w", path="run"), "steps[0].action.path"),
    ("empty path", action(kind="agent", agent_type="w", path=""), "steps[0].action.path"),
    ("path too long", action(kind="agent", agent_type="w", path="/" + "x" * MAX_PATH_LEN), "steps[0].action.path"),
    ("topic with wildcard", action(kind="topic", topic="tasks.*"), "steps[0].action.topic"),
    ("topic with space", action(kind="topic", topic="bad topic"), "steps[0].action.topic"),
    ("topic with empty token", action(kind="topic", topic="a..b"), "steps[0].action.topic"),
    ("topic missing", action(kind="topic"), "steps[0].action.topic"),
    ("reply not a bool", action(kind="topic", topic="jobs", reply="yes"), "steps[0].action.reply"),
    ("bad compensation", one(compensation={"kind": "agent"}), "steps[0].compensation"),
    ("typo in definition", {**one(), "step": []}, "definition.step"),
    ("typo in step", one(depends=["x"]), "steps[0].depends"),
    ("typo in step timeout", one(timeout=5), "steps[0].timeout"),
    ("typo in agent action", action(kind="agent", agent_type="w", paht="/x"), "steps[0].action.paht"),
    ("typo in topic action", action(kind="topic", topic="jobs", replyTo="x"), "steps[0].action.replyTo"),
    ("typo in compensation", one(compensation={**UNDO, "payloads": 1}), "steps[0].compensation.payloads"),
    ("typo in retry", one(retry={"max_attempt": 3}), "steps[0].retry.max_attempt"),
    ("typo in compensation_retry", {**one(), "compensation_retry": {"backof_s": 1}}, "compensation_retry.backof_s"),
    ("retry not an object", one(retry=3), "steps[0].retry"),
    ("duplicate step id", {"steps": [step("a"), step("b"), step("a")]}, "steps[2].id"),
    ("unknown dependency", {"steps": [step("a"), step("b", depends_on=["a", "c"])]}, "steps[1].depends_on"),
    ("depends_on not a list", {"steps": [step("a"), step("b", depends_on="a")]}, "steps[1].depends_on"),
    ("depends_on not ids", {"steps": [step("a"), step("b", depends_on=[1])]}, "steps[1].depends_on"),
    ("timeout zero", one(timeout_s=0), "steps[0].timeout_s"),
    ("timeout negative", one(timeout_s=-1), "steps[0].timeout_s"),
    ("timeout over an hour", one(timeout_s=3600.5), "steps[0].timeout_s"),
    ("timeout infinite", one(timeout_s=float("inf")), "steps[0].timeout_s"),
    ("timeout a string", one(timeout_s="30"), "steps[0].timeout_s"),
    ("timeout a bool", one(timeout_s=True), "steps[0].timeout_s"),
    ("no attempt", one(retry={"max_attempts": 0}), "steps[0].retry.max_attempts"),
    ("too many attempts", one(retry={"max_attempts": 101}), "steps[0].retry.max_attempts"),
    ("fractional attempts", one(retry={"max_attempts": 2.5}), "steps[0].retry.max_attempts"),
    ("attempts a string", one(retry={"max_attempts": "3"}), "steps[0].retry.max_attempts"),
    ("too many compensation attempts", {**one(), "compensation_retry": {"max_attempts": 1001}},
     "compensation_retry.max_attempts"),
    ("negative backoff", one(retry={"backoff_s": -1}), "steps[0].retry.backoff_s"),
    ("backoff over an hour", one(retry={"backoff_s": 3601, "backoff_max_s": 3601}), "steps[0].retry.backoff_s"),
    ("multiplier below 1", one(retry={"multiplier": 0.5}), "steps[0].retry.multiplier"),
    ("multiplier over 10", one(retry={"multiplier": 11}), "steps[0].retry.multiplier"),
    ("backoff_max below backoff", one(retry={"backoff_s": 5, "backoff_max_s": 1}), "steps[0].retry.backoff_max_s"),
    ("compensation backoff_max below backoff", {**one(), "compensation_retry": {"backoff_s": 90}},
     "compensation_retry.backoff_max_s"),
]


@pytest.mark.parametrize(("definition", "field"), [pytest.param(d, f, id=name) for name, d, f in INVALID])
def test_a_bad_definition_is_refused_naming_the_field_and_changes_nothing(definition: Any, field: str) -> None:
    with pytest.raises(Rejected) as refused:
        normalize_definition(definition)
    assert refused.value.code == "invalid"
    assert refused.value.message.startswith(f"{field}: "), refused.value.message
    sagas = SagaDriver()
    assert sagas.refused("invalid", "saga.start", definition=definition).startswith(f"{field}: ")
    assert sagas.sm.sagas.sagas == {} and sagas.sm.sagas.live == {}
    assert sagas.sm.events.last_seq == 0


def test_a_missing_definition_is_refused() -> None:
    assert SagaDriver().refused("invalid", "saga.start").startswith("definition: ")


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_a_timeout_that_is_not_a_finite_number_is_refused(bad: float) -> None:
    with pytest.raises(Rejected, match=r"^steps\[0\]\.timeout_s: must be a finite number"):
        normalize_definition(one(timeout_s=bad))


def cycle_of(message: str) -> list[str]:
    prefix = "steps: dependency cycle: "
    assert message.startswith(prefix), message
    return message[len(prefix):].split(" -> ")


@pytest.mark.parametrize(("steps", "members"), [
    pytest.param([step("a", depends_on=["a"])], {"a"}, id="self"),
    pytest.param([step("a", depends_on=["b"]), step("b")], {"a", "b"}, id="through a default dependency"),
    pytest.param([step("a", depends_on=[]), step("b", depends_on=["a", "d"]), step("c", depends_on=["b"]),
                  step("d", depends_on=["c"]), step("e", depends_on=["a"])], {"b", "c", "d"}, id="three"),
])
def test_a_dependency_cycle_is_refused_and_the_message_walks_it(steps: list[dict[str, Any]],
                                                                   members: set[str]) -> None:
    message = SagaDriver().refused("invalid", "saga.start", definition={"steps": steps})
    cycle = cycle_of(message)
    assert cycle[0] == cycle[-1] and set(cycle) == members
    depends = {s["id"]: s.get("depends_on", [steps[i - 1]["id"]] if i else []) for i, s in enumerate(steps)}
    for here, there in itertools.pairwise(cycle):  # each link is a dependency, explicit or the default one
        assert there in depends[here], (here, there)


def test_defaults_are_filled_and_a_plain_list_runs_in_order() -> None:
    definition = normalize_definition({"steps": [
        {"id": "a", "action": {"kind": "agent", "agent_id": "w-1"}},
        {"id": "b", "action": {"kind": "topic", "topic": "jobs.run"}},
        {"id": "c", "action": AGENT, "depends_on": ["b", "a", "b"]},
        {"id": "d", "action": AGENT, "depends_on": []},
    ]})
    assert (definition["id"], definition["name"], definition["input"]) == (None, "saga", None)
    assert [s["depends_on"] for s in definition["steps"]] == [[], ["a"], ["a", "b"], []]
    first, second = definition["steps"][0], definition["steps"][1]
    assert first["action"] == {"kind": "agent", "agent_id": "w-1", "path": "/saga", "payload": None}
    assert second["action"] == {"kind": "topic", "topic": "jobs.run", "reply": False, "payload": None}
    assert first["compensation"] is None and first["timeout_s"] == 30.0
    assert first["retry"] == {"max_attempts": 1, "backoff_s": 1.0, "backoff_max_s": 60.0, "multiplier": 2.0}
    assert definition["compensation_retry"]["max_attempts"] == 10


def test_the_bounds_themselves_are_accepted() -> None:
    definition = normalize_definition({
        "steps": [step(f"s{i}", timeout_s=0.01 if i else 3600, retry={"max_attempts": 100, "backoff_s": 2,
                                                                        "backoff_max_s": 2, "multiplier": 10})
                  for i in range(MAX_STEPS)],
        "compensation_retry": {"max_attempts": 1000, "multiplier": 1},
    })
    assert len(definition["steps"]) == MAX_STEPS


def test_a_saga_id_in_use_is_a_conflict() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"))
    assert "already exists" in sagas.refused("conflict", "saga.start", definition={"id": "s", "steps": [step("b")]})
    assert sagas.flight() == [("a", "action", 1)]


def test_an_unnamed_saga_is_named_after_its_log_index() -> None:
    sagas = SagaDriver()
    sagas.ok("noop")
    assert sagas.ok("saga.start", definition={"steps": [step("a")]}) == {"id": "saga-2", "state": "running"}


def test_too_many_live_sagas_is_unavailable_until_one_finishes() -> None:
    sagas = SagaDriver(live_max=2)
    sagas.start(step("a"), saga_id="one")
    sagas.start(step("a"), saga_id="two")
    sagas.refused("unavailable", "saga.start", definition={"id": "three", "steps": [step("a")]})
    sagas.answer("a", saga_id="one")
    assert sagas.start(step("a"), saga_id="three")["state"] == "running"


# -- running -------------------------------------------------------------------------------


def test_steps_run_one_after_the_other_and_complete_with_their_results() -> None:
    sagas = SagaDriver()
    started = sagas("saga.start", definition={"id": "s", "name": "order", "steps": [step("a"), step("b"),
                                                                                     step("c")]})
    assert started.value == {"id": "s", "state": "running"}
    assert [e.type for e in started.events] == ["saga.started", "saga.step.started"]
    assert sagas.flight() == [("a", "action", 1)]
    sagas.answer("a", result={"reserved": 3})
    assert sagas.flight() == [("b", "action", 1)]
    sagas.answer("b", result=[1, 2])
    assert sagas.answer("c", result="done") == {"applied": True, "state": "completed"}
    described = sagas.saga().describe()
    assert described["state"] == "completed" and described["finished_ms"] == sagas.now_ms
    assert [(s["status"], s["result"]) for s in described["steps"]] == [
        ("succeeded", {"reserved": 3}), ("succeeded", [1, 2]), ("succeeded", "done")]
    assert sagas.saga_events() == [
        ("saga.started", None, None, None),
        ("saga.step.started", "a", "action", 1), ("saga.step.succeeded", "a", "action", 1),
        ("saga.step.started", "b", "action", 1), ("saga.step.succeeded", "b", "action", 1),
        ("saga.step.started", "c", "action", 1), ("saga.step.succeeded", "c", "action", 1),
        ("saga.completed", None, None, None),
    ]
    assert sagas.sm.sagas.live == {} and list(sagas.sm.sagas.finished) == ["s"]
    last = sagas.sm.events.since(sagas.sm.events.last_seq, 1)[0]
    assert last.data == {"sagaId": "s", "name": "order", "state": "completed", "reason": None}


def test_parallel_branches_start_together_and_a_join_waits_for_both() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"), step("b", depends_on=["a"]), step("c", depends_on=["a"]), step("d", depends_on=["c", "b"]),
                step("e", depends_on=[]))
    assert sagas.flight() == [("a", "action", 1), ("e", "action", 1)]
    sagas.answer("a")
    assert sagas.flight() == [("b", "action", 1), ("c", "action", 1), ("e", "action", 1)]
    assert sagas.saga().steps["b"].started_index == sagas.saga().steps["c"].started_index == sagas.index
    sagas.answer("c")
    assert sagas.statuses()["d"] == "pending"
    sagas.answer("b")
    assert sagas.flight() == [("d", "action", 1), ("e", "action", 1)]
    sagas.answer("d")
    assert sagas.answer("e")["state"] == "completed"


def test_a_failure_compensates_what_succeeded_in_reverse_order_skipping_steps_without_compensation() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"), step("b", undo=False), step("c"), step("d"), step("e"))
    for step_id in "abc":
        sagas.answer(step_id)
    assert sagas.answer("d", False, error="out of stock") == {"applied": True, "state": "compensating"}
    saga = sagas.saga()
    assert saga.reason == "step 'd' failed: out of stock"
    assert sagas.statuses() == {"a": "succeeded", "b": "succeeded", "c": "compensating", "d": "failed",
                                "e": "abandoned"}
    assert sagas.flight() == [("c", "compensation", 1)]
    sagas.answer("c")
    assert sagas.flight() == [("a", "compensation", 1)]
    assert sagas.answer("a") == {"applied": True, "state": "compensated"}
    assert sagas.statuses() == {"a": "compensated", "b": "succeeded", "c": "compensated", "d": "failed",
                                "e": "abandoned"}
    assert sagas.saga_events()[-8:] == [
        ("saga.step.failed", "d", "action", 1),
        ("saga.step.abandoned", "e", None, None),
        ("saga.compensating", None, None, None),
        ("saga.step.started", "c", "compensation", 1), ("saga.step.compensated", "c", "compensation", 1),
        ("saga.step.started", "a", "compensation", 1), ("saga.step.compensated", "a", "compensation", 1),
        ("saga.compensated", None, None, None),
    ]


def test_compensation_follows_the_order_of_success_not_of_definition() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"), step("b", depends_on=["a"]), step("c", depends_on=["a"]), step("d", depends_on=["b", "c"]))
    sagas.answer("a")
    sagas.answer("c")  # c succeeds before b
    sagas.answer("b")
    sagas.answer("d", False)
    order = []
    while sagas.saga().state == "compensating":
        (flight,) = sagas.flight()
        order.append(flight[0])
        sagas.answer(flight[0])
    assert order == ["b", "c", "a"]
    assert sagas.saga().state == "compensated"


def test_a_failed_attempt_with_attempts_left_waits_for_its_retry() -> None:
    retry = {"max_attempts": 3, "backoff_s": 2, "backoff_max_s": 30, "multiplier": 3}
    sagas = SagaDriver()
    sagas.start(step("a", retry=retry), step("b"))
    failed = sagas("saga.outcome", saga="s", step="a", phase="action", attempt=1, ok=False, error="busy")
    wait_ms = backoff_ms(retry, idempotency_key("s", "a", "action", 1), 1)
    assert 1_000 <= wait_ms <= 2_000
    run = sagas.saga().steps["a"]
    assert (run.status, run.retry_at_ms, run.error) == ("waiting", sagas.now_ms + wait_ms, "busy")
    assert sagas.saga().waiting() == [("a", "action", 2, sagas.now_ms + wait_ms)]
    assert sagas.flight() == [] and sagas.saga().state == "running"
    assert [(e.type, e.data["retry_at_ms"]) for e in failed.events] == [("saga.step.failed", run.retry_at_ms)]

    due_ms = run.retry_at_ms
    sagas.now_ms = due_ms - 1
    assert sagas.unchanged("saga.retry", saga="s", step="a", phase="action", attempt=2)["due_ms"] == due_ms
    sagas.now_ms = due_ms
    sagas.unchanged("saga.retry", saga="s", step="a", phase="action", attempt=3)  # not the next attempt
    sagas.unchanged("saga.retry", saga="s", step="a", phase="compensation", attempt=2)
    sagas.unchanged("saga.retry", saga="s", step="b", phase="action", attempt=2)
    assert sagas.ok("saga.retry", saga="s", step="a", phase="action", attempt=2)["applied"] is True
    assert sagas.flight() == [("a", "action", 2)] and sagas.saga().steps["a"].retry_at_ms is None
    sagas.unchanged("saga.retry", saga="s", step="a", phase="action", attempt=2)  # a repeated retry
    sagas.unchanged("saga.outcome", saga="s", step="a", phase="action", attempt=1, ok=True)  # the old attempt

    sagas.answer("a", False)
    second_wait = sagas.saga().steps["a"].retry_at_ms - sagas.now_ms
    assert 3_000 <= second_wait <= 6_000  # 2 s * 3, jittered
    sagas.now_ms += second_wait
    sagas.ok("saga.retry", saga="s", step="a", phase="action", attempt=3)
    assert sagas.answer("a", False, error="still busy") == {"applied": True, "state": "compensated"}
    assert sagas.statuses() == {"a": "failed", "b": "abandoned"}
    assert sagas.saga().steps["a"].attempt == 3


def test_a_permanent_failure_does_not_retry() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"), step("b", retry={"max_attempts": 5}))
    sagas.answer("a")
    sagas.answer("b", False, permanent=True, error="bad card")
    assert sagas.statuses()["b"] == "failed" and sagas.saga().waiting() == []
    assert sagas.flight() == [("a", "compensation", 1)]
    (failed,) = [h for h in sagas.saga().history if h[2:4] == ["saga.step.failed", "b"]]
    assert failed[6] == {"error": "bad card", "retry_at_ms": None, "permanent": True}


def test_a_compensation_failing_for_good_is_stuck_and_the_others_still_run() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"), step("b"), step("c"), step("d"),
                compensation_retry={"max_attempts": 2, "backoff_s": 1, "backoff_max_s": 1})
    for step_id in "abc":
        sagas.answer(step_id)
    sagas.answer("d", False)
    sagas.answer("c")
    sagas.answer("b", False, permanent=True)  # a compensation is retried even when told permanent
    assert sagas.statuses()["b"] == "waiting" and sagas.flight() == []
    (_, phase, attempt, due_ms), = sagas.saga().waiting()
    assert (phase, attempt) == ("compensation", 2)
    sagas.now_ms = due_ms
    sagas.ok("saga.retry", saga="s", step="b", phase="compensation", attempt=2)
    stuck = sagas("saga.outcome", saga="s", step="b", phase="compensation", attempt=2, ok=False, error="gone")
    assert [e.type for e in stuck.events] == ["saga.step.stuck", "saga.step.started"]
    assert stuck.events[0].data["error"] == "gone"
    assert sagas.statuses()["b"] == "stuck" and sagas.flight() == [("a", "compensation", 1)]
    done = sagas("saga.outcome", saga="s", step="a", phase="compensation", attempt=1, ok=True)
    assert done.value == {"applied": True, "state": "failed-stuck"}
    assert [e.type for e in done.events] == ["saga.step.compensated", "saga.failed"]
    assert done.events[-1].data["state"] == "failed-stuck"
    assert sagas.statuses() == {"a": "compensated", "b": "stuck", "c": "compensated", "d": "failed"}


def test_a_late_or_repeated_outcome_changes_nothing() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"), step("b"))
    sagas.answer("a", result=1)
    attempt = {"saga": "s", "phase": "action", "attempt": 1}
    sagas.unchanged("saga.outcome", step="a", ok=True, result=2, **attempt)  # a repeat, say from a deposed leader
    sagas.unchanged("saga.outcome", step="a", ok=False, **attempt)
    sagas.unchanged("saga.outcome", saga="s", step="a", phase="compensation", attempt=1, ok=True)
    sagas.unchanged("saga.outcome", saga="s", step="b", phase="action", attempt=2, ok=True)  # not started
    sagas.unchanged("saga.resumed", saga="s", step="a", phase="action", attempt=1, node="n2")
    assert sagas.saga().steps["a"].result == 1
    sagas.answer("b")
    sagas.unchanged("saga.outcome", step="b", ok=True, **attempt)  # after the saga finished


def test_outcome_arguments_are_checked_before_anything_changes() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"))
    good = {"saga": "s", "step": "a", "phase": "action", "attempt": 1, "ok": True}
    sagas.refused("not_found", "saga.outcome", **{**good, "saga": "nope"})
    for field, bad in [("step", "z"), ("step", None), ("phase", "undo"), ("attempt", 0), ("attempt", "1"),
                       ("ok", "yes"), ("permanent", 1)]:
        assert sagas.refused("invalid", "saga.outcome", **{**good, field: bad}).startswith(f"{field}: ")
    sagas.refused("invalid", "saga.resumed", **{**good, "node": ""})
    sagas.refused("not_found", "saga.retry", saga="nope", step="a", phase="action", attempt=2)
    assert sagas.flight() == [("a", "action", 1)]


def test_resumed_records_the_new_leader_for_the_attempt_in_flight() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"))
    resumed = sagas("saga.resumed", saga="s", step="a", phase="action", attempt=1, node="n2")
    assert resumed.value == {"applied": True, "state": "running"}
    assert resumed.events[0].type == "saga.step.resumed" and resumed.events[0].data["node"] == "n2"
    assert sagas.saga().history[-1][2:] == ["saga.step.resumed", "a", "action", 1, {"node": "n2"}]
    assert sagas.flight() == [("a", "action", 1)]


def test_cancelling_a_running_saga_waits_for_the_attempt_in_flight_then_compensates() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"), step("b"), step("c"))
    sagas.answer("a")
    cancelled = sagas("saga.cancel", saga="s", reason="customer changed their mind")
    assert cancelled.value == {"id": "s", "state": "compensating"}
    assert [e.type for e in cancelled.events] == ["saga.cancelled", "saga.step.abandoned", "saga.compensating"]
    assert sagas.saga().reason == "cancelled: customer changed their mind"
    assert sagas.flight() == [("b", "action", 1)]  # no compensation while b may still be running
    assert sagas.ok("saga.cancel", saga="s") == {"id": "s", "state": "compensating"}  # again: nothing new
    sagas.answer("b")  # b finished late: it is undone first
    assert sagas.flight() == [("b", "compensation", 1)]
    sagas.answer("b")
    assert sagas.answer("a")["state"] == "compensated"
    assert sagas.statuses() == {"a": "compensated", "b": "compensated", "c": "abandoned"}
    assert "already compensated" in sagas.refused("conflict", "saga.cancel", saga="s")
    sagas.refused("not_found", "saga.cancel", saga="other")


def test_cancelling_abandons_a_waiting_retry() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"), step("b", retry={"max_attempts": 2}))
    sagas.answer("a")
    sagas.answer("b", False)
    assert sagas.statuses()["b"] == "waiting"
    sagas.ok("saga.cancel", saga="s")
    assert sagas.statuses()["b"] == "abandoned" and sagas.saga().waiting() == []
    sagas.now_ms += 3_600_000
    sagas.unchanged("saga.retry", saga="s", step="b", phase="action", attempt=2)
    assert sagas.flight() == [("a", "compensation", 1)]


def test_a_completed_saga_cannot_be_cancelled() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"))
    sagas.answer("a")
    assert "already completed" in sagas.refused("conflict", "saga.cancel", saga="s", reason="late")


def test_a_parallel_step_finishing_after_a_failure_is_compensated_first_and_none_retries() -> None:
    sagas = SagaDriver()
    sagas.start(step("a"), step("b", depends_on=["a"]), step("c", depends_on=["a"]),
                step("d", depends_on=["a"], retry={"max_attempts": 3}), step("e", depends_on=["b", "c", "d"]))
    sagas.answer("a")
    sagas.answer("b", False)
    assert sagas.saga().state == "compensating"
    assert sagas.flight() == [("c", "action", 1), ("d", "action", 1)]
    sagas.answer("d", False)  # attempts left, but a stopping saga starts no new action
    assert sagas.statuses()["d"] == "failed" and sagas.saga().waiting() == []
    assert sagas.flight() == [("c", "action", 1)]
    sagas.answer("c")
    assert sagas.flight() == [("c", "compensation", 1)]
    sagas.answer("c")
    assert sagas.flight() == [("a", "compensation", 1)]


# -- backoff, eviction, snapshots -------------------------------------------------------------


def capped_ms(retry: dict[str, Any], attempt: int) -> float:
    """``min(backoff * multiplier ** (attempt - 1), max)`` in exact arithmetic (no overflow, no rounding)."""
    grown = Fraction(retry["backoff_s"]) * Fraction(retry["multiplier"]) ** (attempt - 1)
    return float(min(grown, Fraction(retry["backoff_max_s"])) * 1000)


@settings(max_examples=300, deadline=None)
@given(backoff_s=st.one_of(st.integers(0, 3600), st.floats(0, 3600)), extra_s=st.floats(0, 3600),
       multiplier=st.one_of(st.integers(1, 10), st.floats(1, 10)), attempt=st.integers(1, 1000),
       key=st.text(max_size=20))
def test_backoff_is_deterministic_capped_exponential_jittered_down_to_half(
        backoff_s: float, extra_s: float, multiplier: float, attempt: int, key: str) -> None:
    retry = {"max_attempts": 1000, "backoff_s": backoff_s, "backoff_max_s": min(backoff_s + extra_s, 3600),
             "multiplier": multiplier}
    wait_ms = backoff_ms(retry, key, attempt)
    assert isinstance(wait_ms, int) and wait_ms == backoff_ms(dict(retry), key, attempt)
    full_ms = capped_ms(retry, attempt)
    assert full_ms / 2 - 1 <= wait_ms <= full_ms * (1 + 1e-9)


def test_backoff_doubles_by_default_and_the_jitter_depends_on_the_attempt() -> None:
    retry = normalize_definition(one())["steps"][0]["retry"]
    for attempt, full_ms in [(1, 1_000), (2, 2_000), (3, 4_000), (6, 32_000), (7, 60_000), (40, 60_000)]:
        assert full_ms / 2 <= backoff_ms(retry, "s/a/action/1", attempt) <= full_ms
    assert len({backoff_ms(retry, f"s/a/action/{n}", 1) for n in range(20)}) > 10


def test_a_compensation_may_fail_a_thousand_times_with_a_steep_backoff() -> None:
    # multiplier ** (attempt - 1) leaves the float range at 10.0 ** 309; apply must not raise.
    sagas = SagaDriver()
    sagas.start(step("a"), step("b"),
                compensation_retry={"max_attempts": 1000, "multiplier": 10, "backoff_s": 0.5, "backoff_max_s": 2})
    sagas.answer("a")
    sagas.answer("b", False)
    for attempt in range(1, 1000):
        sagas.answer("a", False)
        wait_ms = sagas.saga().steps["a"].retry_at_ms - sagas.now_ms
        full_ms = 500 if attempt == 1 else 2_000  # 0.5 s, then capped at 2 s
        assert full_ms // 2 <= wait_ms <= full_ms
        sagas.now_ms += wait_ms
        sagas.ok("saga.retry", saga="s", step="a", phase="compensation", attempt=attempt + 1)
    assert sagas.answer("a", False) == {"applied": True, "state": "failed-stuck"}


def test_finished_sagas_beyond_the_limit_are_evicted_oldest_finished_first() -> None:
    sagas = SagaDriver(finished_retained=2)
    for saga_id in ("one", "two", "three", "four"):
        sagas.start(step("a"), saga_id=saga_id)
    sagas.answer("a", saga_id="two")
    sagas.answer("a", saga_id="one")
    sagas.answer("a", saga_id="three")
    assert list(sagas.sm.sagas.finished) == ["one", "three"]
    assert set(sagas.sm.sagas.sagas) == {"one", "three", "four"}  # a live saga is never evicted
    sagas.refused("not_found", "saga.cancel", saga="two")
    sagas.ok("saga.cancel", saga="four")
    assert list(sagas.sm.sagas.finished) == ["one", "three"]  # four waits for its step in flight
    sagas.answer("a", False, saga_id="four")
    assert list(sagas.sm.sagas.finished) == ["three", "four"]
    assert sagas.sm.sagas.counts()["completed"] == 1 and sagas.sm.sagas.counts()["compensated"] == 1
    assert sagas.start(step("a"), saga_id="one")["state"] == "running"  # the id is free again


def test_a_snapshot_restores_every_saga_and_the_copy_goes_on_the_same() -> None:
    sagas = SagaDriver(finished_retained=3)
    slow = {"max_attempts": 3, "backoff_s": 5, "backoff_max_s": 5}
    sagas.start(step("a"), step("b"), saga_id="stuck", compensation_retry=NO_BACKOFF)
    sagas.answer("a", saga_id="stuck")
    sagas.answer("b", False, saga_id="stuck")
    sagas.answer("a", False, saga_id="stuck", error="x" * 2_000)
    sagas.start(step("a"), saga_id="completed", input={"order": 7}, name="order")
    sagas.answer("a", saga_id="completed", result={"n": [1, 2.5, None, True]})
    sagas.start(step("a", retry=slow), step("b"), saga_id="waiting")
    sagas.answer("a", False, saga_id="waiting")
    sagas.start(step("a"), step("b", depends_on=[]), step("c", depends_on=[]), saga_id="compensating")
    sagas.answer("a", saga_id="compensating")
    sagas.answer("b", False, saga_id="compensating", permanent=True)
    assert sagas.ok("saga.resumed", saga="compensating", step="c", phase="action", attempt=1, node="n3")["applied"]
    assert len(sagas.saga("stuck").steps["a"].error) == 1024

    copy = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(sagas.sm.snapshot_data())),
                                           sagas.sm.limits)
    assert set(copy.sagas.sagas) == set(sagas.sm.sagas.sagas) == {"completed", "stuck", "waiting", "compensating"}
    for saga_id, saga in sagas.sm.sagas.sagas.items():
        assert copy.sagas.sagas[saga_id].describe() == saga.describe()
    assert list(copy.sagas.live) == list(sagas.sm.sagas.live) == ["waiting", "compensating"]
    assert list(copy.sagas.finished) == ["stuck", "completed"]  # the order of finishing, which eviction follows
    assert copy.sagas.limits == SagaLimits(finished_retained=3)

    sagas.restore()  # from here every command goes to both and must answer the same
    sagas.now_ms += 10_000
    sagas.ok("saga.retry", saga="waiting", step="a", phase="action", attempt=2)
    sagas.answer("a", saga_id="waiting")
    sagas.answer("b", saga_id="waiting")
    sagas.answer("c", saga_id="compensating")
    sagas.answer("c", saga_id="compensating")
    sagas.answer("a", saga_id="compensating")
    sagas.same_everywhere()
    assert [list(m.sagas.finished) for m in sagas.machines] == [["completed", "waiting", "compensating"]] * 2


def test_a_snapshot_from_before_sagas_restores_with_none() -> None:
    data = StateMachine().snapshot_data()
    del data["sagas"]
    assert StateMachine.from_snapshot_data(data).sagas.sagas == {}


def test_replaying_the_same_commands_gives_the_same_bytes() -> None:
    def run() -> bytes:
        sagas = SagaDriver()
        sagas.start(step("a", retry={"max_attempts": 2}), step("b"))
        sagas.answer("a", False)
        sagas.now_ms = sagas.saga().steps["a"].retry_at_ms
        sagas.ok("saga.retry", saga="s", step="a", phase="action", attempt=2)
        sagas.answer("a")
        sagas.answer("b", False)
        sagas.answer("a")
        return encode_snapshot(sagas.sm.snapshot_data())

    assert run() == run()


# -- any interleaving --------------------------------------------------------------------------

STEP_OUTCOMES = frozenset({"saga.step.succeeded", "saga.step.failed", "saga.step.compensated", "saga.step.stuck"})
SAGA_ENDS = {"saga.completed": "completed", "saga.compensated": "compensated", "saga.failed": "failed-stuck"}


def check_history(saga: Saga, *, ended: bool = False) -> None:
    """The rules of the module docstring, read from the committed history
    alone (deliberately dumb: no use of the step statuses it checks)."""
    definition = {s["id"]: s for s in saga.definition["steps"]}
    started: dict[tuple[str, str, int], int] = {}  # (step, phase, attempt) -> position in the history
    outcomes: dict[tuple[str, str, int], tuple[str, Any]] = {}
    succeeded: dict[str, int] = {}  # step -> position of its success
    undo_order: list[str] = []  # steps in the order their compensation started
    undo_ends: dict[str, list[str]] = {}  # step -> its compensation's terminal records
    compensating_at: int | None = None
    ends: list[str] = []
    for position, (_, time_ms, event, step_id, phase, attempt, detail) in enumerate(saga.history):
        key = (step_id, phase, attempt)
        assert not ends, f"{event} after the saga ended"
        if event == "saga.step.started":
            assert key not in started, f"{key} started twice"
            if attempt > 1:
                previous = outcomes.get((step_id, phase, attempt - 1))
                assert previous is not None and previous[0] == "saga.step.failed", f"{key} without a failed attempt"
                assert previous[1]["retry_at_ms"] is not None and time_ms >= previous[1]["retry_at_ms"], key
            if phase == "action":
                assert compensating_at is None, f"{key} started after the saga began compensating"
                missing = [d for d in definition[step_id]["depends_on"] if d not in succeeded]
                assert not missing, f"{key} started before {missing} succeeded"
            else:
                assert step_id in succeeded and definition[step_id]["compensation"] is not None, key
                assert compensating_at is not None, f"{key} while the saga runs"
                assert all(k in outcomes for k in started), f"{key} with another attempt in flight"
                if attempt == 1:
                    assert all(undo_ends.get(s) for s in undo_order), f"{key} before the last compensation ended"
                    undo_order.append(step_id)
            started[key] = position
        elif event in STEP_OUTCOMES:
            assert key in started and key not in outcomes, f"{event} for {key}"
            outcomes[key] = (event, detail)
            assert event != ("saga.step.succeeded" if phase == "compensation" else "saga.step.compensated")
            assert phase == "compensation" or event != "saga.step.stuck", (event, phase)
            if event == "saga.step.succeeded":
                succeeded[step_id] = position
            elif event in ("saga.step.compensated", "saga.step.stuck"):
                undo_ends.setdefault(step_id, []).append(event)
        elif event == "saga.compensating":
            assert compensating_at is None
            compensating_at = position
        elif event in SAGA_ENDS:
            ends.append(SAGA_ENDS[event])
    assert undo_order == sorted(undo_order, key=succeeded.__getitem__, reverse=True), "not in reverse order"
    assert all(len(records) == 1 for records in undo_ends.values())
    open_attempts = {k for k in started if k not in outcomes}
    assert open_attempts == set(saga.in_flight())
    if saga.state not in FINAL_STATES:
        assert not ends and (saga.state == "compensating") == (compensating_at is not None)
        assert saga.in_flight() or saga.waiting(), "a live saga with nothing in flight and nothing waiting"
        assert not ended, f"the saga did not end: {saga.state}"
        return
    assert ends == [saga.state] and not open_attempts and not saga.waiting()
    if saga.state == "completed":
        assert set(succeeded) == set(definition) and not undo_order and compensating_at is None
        return
    to_undo = [s for s in succeeded if definition[s]["compensation"] is not None]
    assert sorted(undo_order) == sorted(to_undo) == sorted(undo_ends)
    stuck = [s for s, records in undo_ends.items() if records == ["saga.step.stuck"]]
    assert (saga.state == "failed-stuck") == bool(stuck)
    abandoned = {h[3] for h in saga.history if h[2] == "saga.step.abandoned"}
    ran = {k[0] for k in started}
    for step_id, run in saga.steps.items():  # what each step ended as, by its records alone
        if step_id in undo_ends:
            expected = {"saga.step.compensated": "compensated", "saga.step.stuck": "stuck"}[undo_ends[step_id][0]]
        elif step_id in succeeded:
            expected = "succeeded"
        else:
            assert step_id in ran or step_id in abandoned, f"{step_id} neither ran nor was abandoned"
            expected = "abandoned" if step_id in abandoned else "failed"
        assert run.status == expected, (step_id, run.status, expected)


@st.composite
def definitions(draw: st.DrawFn) -> dict[str, Any]:
    """1 to 6 steps in a random definition order over a random DAG (a step
    depends only on steps of lower rank; the default, the step before it,
    only where that one ranks lower)."""
    n = draw(st.integers(1, 6))
    ranks = draw(st.permutations(range(n)))
    ids = [f"s{rank}" for rank in ranks]
    steps = []
    for position, rank in enumerate(ranks):
        fields: dict[str, Any] = {"retry": {"max_attempts": draw(st.integers(1, 3)),
                                            "backoff_s": draw(st.sampled_from((0, 0.05, 0.5))), "backoff_max_s": 1}}
        lower = [f"s{r}" for r in range(rank)]
        default_ok = position == 0 or ranks[position - 1] < rank
        if not default_ok or draw(st.booleans()):
            fields["depends_on"] = draw(st.lists(st.sampled_from(lower), unique=True)) if lower else []
        steps.append(step(ids[position], undo=draw(st.booleans()), **fields))
    compensation_retry = {"max_attempts": draw(st.integers(1, 3)), "backoff_s": 0.05, "backoff_max_s": 0.5}
    return {"id": "saga", "steps": steps, "compensation_retry": compensation_retry}


class SagaRules(RuleBasedStateMachine):
    """One random saga against any interleaving of outcomes (fresh or stale),
    retries at random times, resumes, cancels and snapshot restores. At the
    end every attempt in flight is answered and every retry made due, so the
    saga must end."""

    def __init__(self) -> None:
        super().__init__()
        self.log = SagaDriver()
        self.step_ids: list[str] = []
        self.finish_seed = 0
        self.rules_run = self.rules_checked = 0

    @property
    def saga(self) -> Saga:
        return self.log.saga("saga")

    def attempt(self, step_id: str, phase: str, attempt: int) -> dict[str, Any]:
        return {"saga": "saga", "step": step_id, "phase": phase, "attempt": attempt}

    def answer(self, key: tuple[str, str, int], answer: str) -> None:
        """Answer an attempt in flight; a failure waits for a retry exactly when attempts are left (an
        action's only while the saga runs and unless permanent; a compensation's even if permanent)."""
        step_id, phase, attempt = key
        if phase == "action":
            retries = self.saga.state == "running" and answer == "fail"
            attempts = self.saga.step_def(step_id)["retry"]["max_attempts"]
        else:
            retries, attempts = True, self.saga.definition["compensation_retry"]["max_attempts"]
        value = self.log.ok("saga.outcome", **self.attempt(*key), ok=answer == "ok",
                            permanent=answer == "permanent", result=answer, error=answer)
        assert value["applied"] is True
        waits = answer != "ok" and retries and attempt < attempts
        assert [w[:3] for w in self.saga.waiting() if w[0] == step_id] == ([(step_id, phase, attempt + 1)] if waits
                                                                           else [])

    @initialize(definition=definitions(), finish_seed=st.integers(0, 2**32 - 1))
    def start(self, definition: dict[str, Any], finish_seed: int) -> None:
        self.rules_run += 1
        self.step_ids = [s["id"] for s in definition["steps"]]
        self.finish_seed = finish_seed
        assert self.log.ok("saga.start", definition=definition)["state"] == "running"

    @precondition(lambda self: self.saga.in_flight())
    @rule(data=st.data(), answer=st.sampled_from(("ok", "ok", "fail", "permanent")))
    def answer_in_flight(self, data: st.DataObject, answer: str) -> None:
        self.rules_run += 1
        self.answer(data.draw(st.sampled_from(sorted(self.saga.in_flight()))), answer)

    @rule(pick=st.integers(0, 5), phase=st.sampled_from(PHASES), attempt=st.integers(1, 4), ok=st.booleans(),
          resumed=st.booleans())
    def stale_outcome(self, pick: int, phase: str, attempt: int, ok: bool, resumed: bool) -> None:
        """An outcome (or a resume) for any attempt, most often one no longer in flight."""
        self.rules_run += 1
        key = (self.step_ids[pick % len(self.step_ids)], phase, attempt)
        if key in self.saga.in_flight():
            self.answer(key, "ok" if ok else "fail")
        elif resumed:
            self.log.unchanged("saga.resumed", **self.attempt(*key), node="n9")
        else:
            self.log.unchanged("saga.outcome", **self.attempt(*key), ok=ok)

    @rule(ms=st.sampled_from((0, 20, 100, 400, 1_000)))
    def advance_time(self, ms: int) -> None:
        self.rules_run += 1
        self.log.now_ms += ms

    @precondition(lambda self: self.saga.waiting())
    @rule(data=st.data(), early_ms=st.sampled_from((0, 1)))
    def retry_when_due(self, data: st.DataObject, early_ms: int) -> None:
        """Move time to a retry's due time, or 1 ms before it, and propose it."""
        self.rules_run += 1
        step_id, phase, attempt, due_ms = data.draw(st.sampled_from(self.saga.waiting()))
        self.log.now_ms = max(self.log.now_ms, due_ms - early_ms)
        if self.log.now_ms >= due_ms:
            assert self.log.ok("saga.retry", **self.attempt(step_id, phase, attempt))["applied"] is True
        else:
            self.log.unchanged("saga.retry", **self.attempt(step_id, phase, attempt))

    @rule(data=st.data(), pick=st.integers(0, 5), phase=st.sampled_from(PHASES), attempt=st.integers(1, 4))
    def propose_retry(self, data: st.DataObject, pick: int, phase: str, attempt: int) -> None:
        self.rules_run += 1
        waiting = self.saga.waiting()
        if waiting and data.draw(st.booleans()):
            step_id, phase, attempt, _ = data.draw(st.sampled_from(waiting))
        else:
            step_id = self.step_ids[pick % len(self.step_ids)]
        due = [w[3] for w in waiting if w[:3] == (step_id, phase, attempt)]
        if due and self.log.now_ms >= due[0]:
            assert self.log.ok("saga.retry", **self.attempt(step_id, phase, attempt))["applied"] is True
            assert (step_id, phase, attempt) in self.saga.in_flight()
        else:
            self.log.unchanged("saga.retry", **self.attempt(step_id, phase, attempt))

    @precondition(lambda self: self.saga.in_flight())
    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        self.rules_run += 1
        key = data.draw(st.sampled_from(sorted(self.saga.in_flight())))
        assert self.log.ok("saga.resumed", **self.attempt(*key), node="n2")["applied"] is True
        assert self.saga.history[-1][2:6] == ["saga.step.resumed", *key]

    @rule()
    def cancel(self) -> None:
        self.rules_run += 1
        state = self.saga.state
        if state in FINAL_STATES:
            self.log.refused("conflict", "saga.cancel", saga="saga")
        elif state == "compensating":
            before = state_bytes(self.log.sm)
            assert self.log.ok("saga.cancel", saga="saga")["state"] == "compensating"
            assert state_bytes(self.log.sm) == before
        else:
            assert self.log.ok("saga.cancel", saga="saga")["state"] in ("compensating", "compensated")
            assert self.saga.reason == "cancelled: cancelled"

    @precondition(lambda self: len(self.log.machines) < 3)
    @rule()
    def restore(self) -> None:
        self.rules_run += 1
        self.log.restore()

    @invariant()
    def history_keeps_the_rules(self) -> None:
        if self.step_ids:
            check_history(self.saga)
            events = [e.type for e in self.log.sm.events.since(1, 100_000)]
            assert events == [h[2] for h in self.saga.history], "the events are not the history"
            for copy in self.log.machines[1:]:
                assert list(copy.sagas.live) == list(self.log.sm.sagas.live)
                assert list(copy.sagas.finished) == list(self.log.sm.sagas.finished)
        self.rules_checked = self.rules_run

    def teardown(self) -> None:
        if not self.step_ids or self.rules_checked != self.rules_run:
            return  # the run already failed; keep its error
        rng = random.Random(self.finish_seed)
        for _ in range(500):
            saga = self.saga
            if saga.state in FINAL_STATES:
                break
            flight = sorted(saga.in_flight())
            if flight:
                self.answer(rng.choice(flight), rng.choice(("ok", "ok", "fail", "permanent")))
            else:
                step_id, phase, attempt, due_ms = min(saga.waiting(), key=lambda w: w[3])
                self.log.now_ms = max(self.log.now_ms, due_ms)
                assert self.log.ok("saga.retry", **self.attempt(step_id, phase, attempt))["applied"] is True
            check_history(self.saga)
        check_history(self.saga, ended=True)
        self.log.same_everywhere()


SagaRules.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSagaRules = SagaRules.TestCase


# -- byte bounds (issue 20, item 6) ---------------------------------------------------------------

def test_sagas_are_bounded_in_bytes_finished_ones_make_room_and_big_results_are_noted() -> None:
    d = SagaDriver(bytes_max=6_000, result_bytes_max=500)
    blob = "x" * 2_000
    d.start(step("a", action={**AGENT, "payload": blob}), saga_id="one")
    d.start(step("a", action={**AGENT, "payload": blob}), saga_id="two")
    refused = d("saga.start", definition={"id": "three", "steps": [step("a", action={**AGENT, "payload": blob})]})
    assert refused.error is not None and refused.error[0] == "quota"
    assert refused.error[1].startswith("saga_bytes_max:") and "three" not in d.sm.sagas.sagas
    # a result over result_bytes_max is kept as a note of its size; the saga goes on
    d.answer("a", saga_id="one", result={"big": "y" * 1_000})
    assert d.saga("one").state == "completed"
    assert d.saga("one").steps["a"].result == {"truncated": True, "bytes": 1_010, "limit": "saga_result_bytes_max"}
    # finished sagas are dropped, oldest first, to make room for a new one
    d.start(step("a", action={**AGENT, "payload": blob}), saga_id="three")
    assert "one" not in d.sm.sagas.sagas and "three" in d.sm.sagas.sagas
    assert d.sm.sagas.bytes == sum(s.size for s in d.sm.sagas.sagas.values()) <= 6_000
    restored = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(d.sm.snapshot_data())),
                                               d.sm.limits)
    assert (restored.sagas.bytes, restored.sagas.finished_bytes) == (d.sm.sagas.bytes, d.sm.sagas.finished_bytes)
