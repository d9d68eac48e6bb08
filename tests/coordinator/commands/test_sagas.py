"""The saga commands: one parse for the API (start, cancel), the leader's
orchestrator (outcome, retry, resumed) and apply, naming the field it refuses.

The definitions' own refusals (every field of a step, cycles, defaults) are
in tests/coordinator/state/test_sagas.py, which drives them through apply.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.base import Rejected
from coordinator.commands.sagas import (
    MAX_COMPENSATION_ATTEMPTS,
    MAX_ERROR_LEN,
    MAX_STEP_ID_LEN,
    PHASES,
    SagaCancel,
    SagaOutcome,
    SagaResumed,
    SagaRetry,
    SagaStart,
    normalize_definition,
)
from coordinator.state import StateMachine
from coordinator.types import Command
from tests.coordinator.commands.refusals import refused_alike

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
                min_size=1, max_size=12)
topics = st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,2}", fullmatch=True)
paths = st.from_regex(r"/[a-z]{0,8}", fullmatch=True)
actions = st.one_of(
    st.fixed_dictionaries({"kind": st.just("agent"), "agent_type": names},
                          optional={"path": paths, "payload": json_values}),
    st.fixed_dictionaries({"kind": st.just("agent"), "agent_id": names},
                          optional={"path": paths, "payload": json_values}),
    st.fixed_dictionaries({"kind": st.just("topic"), "topic": topics},
                          optional={"reply": st.booleans(), "payload": json_values}),
)
retries = st.fixed_dictionaries({}, optional={"max_attempts": st.integers(1, 100), "backoff_s": st.just(0.5),
                                              "multiplier": st.floats(1.0, 10.0)})


@st.composite
def definitions(draw: st.DrawFn) -> dict[str, Any]:
    """A valid definition: steps in a list (each after the one before), some
    with a compensation, a timeout, a retry; the optional fields at random."""
    ids = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    steps = []
    for step_id in ids:
        step = draw(st.fixed_dictionaries({"id": st.just(step_id), "action": actions},
                                          optional={"compensation": actions, "timeout_s": st.floats(0.01, 3600.0),
                                                    "retry": retries}))
        steps.append(step)
    return draw(st.fixed_dictionaries({"steps": st.just(steps)},
                                      optional={"id": names.filter(lambda n: not n.startswith("saga-")),
                                                "name": names, "input": json_values,
                                                "compensation_retry": retries}))


attempts = st.tuples(names, names, st.sampled_from(PHASES), st.integers(1, MAX_COMPENSATION_ATTEMPTS))
errors = st.none() | st.text(max_size=MAX_ERROR_LEN)
saga_commands = st.one_of(
    st.builds(SagaStart.of, definitions()),
    st.builds(lambda key, result: SagaOutcome(*key, ok=True, result=result), attempts, json_values),
    st.builds(lambda key, error, permanent: SagaOutcome(*key, ok=False, error=error, permanent=permanent),
              attempts, errors, st.booleans()),
    st.builds(lambda key: SagaRetry(*key), attempts),
    st.builds(lambda key, node: SagaResumed(*key, node=node), attempts, names),
    st.builds(SagaCancel, names, st.none() | names),
)


@given(saga_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    parsed = type(command).parse(command.to_args())
    assert parsed == command
    assert COMMANDS[command.op] is type(command)
    if isinstance(command, SagaStart):  # left out of ==: it follows from the definition
        assert parsed.normalized == command.normalized == normalize_definition(command.definition)


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    """The dicts the API and the orchestrator proposed before the command types."""
    definition = {"steps": [{"id": "a", "action": {"kind": "agent", "agent_type": "w"}}]}
    assert SagaStart.of(definition).to_args() == {"definition": definition}
    assert SagaStart.of(definition).to_args()["definition"] is definition  # as given, not with its defaults
    key = ("s", "a", "action", 1)
    assert list(SagaOutcome(*key, ok=True, result={"x": 1}).to_args().items()) == [
        ("saga", "s"), ("step", "a"), ("phase", "action"), ("attempt", 1), ("ok", True), ("result", {"x": 1})]
    assert list(SagaOutcome(*key, ok=False, error="boom").to_args().items()) == [
        ("saga", "s"), ("step", "a"), ("phase", "action"), ("attempt", 1), ("ok", False), ("error", "boom"),
        ("permanent", False)]
    assert list(SagaRetry(*key).to_args()) == ["saga", "step", "phase", "attempt"]
    assert list(SagaResumed(*key, node="n2").to_args().items())[-1] == ("node", "n2")
    assert SagaCancel("s").to_args() == {"saga": "s"}
    assert list(SagaCancel("s", "no longer needed").to_args().items()) == [("saga", "s"),
                                                                          ("reason", "no longer needed")]


def test_an_outcome_keeps_only_what_its_ok_says_matters() -> None:
    """ok: the result (error and permanent change nothing); not ok: the error
    and permanent (the result changes nothing). Both are still checked."""
    key = {"saga": "s", "step": "a", "phase": "action", "attempt": 1}
    assert SagaOutcome.parse({**key, "ok": True, "result": 3, "error": "x", "permanent": True}) == SagaOutcome(
        "s", "a", "action", 1, ok=True, result=3)
    assert SagaOutcome.parse({**key, "ok": False, "result": 3, "error": 5}) == SagaOutcome(
        "s", "a", "action", 1, ok=False, error="5")
    with pytest.raises(Rejected, match=r"^permanent: must be true or false$"):
        SagaOutcome.parse({**key, "ok": True, "permanent": "no"})


def test_the_orchestrator_logs_a_long_error_whole_and_the_parse_cuts_it() -> None:
    long = "e" * (MAX_ERROR_LEN + 10)
    command = SagaOutcome("s", "a", "action", 1, ok=False, error=long)
    assert command.to_args()["error"] == long  # the log's bytes, as before the command types
    assert SagaOutcome.parse(command.to_args()).error == long[:MAX_ERROR_LEN]


def test_a_cancellation_without_a_reason_logs_none_and_a_null_reason_is_refused() -> None:
    assert SagaCancel.parse({"saga": "s"}) == SagaCancel("s", None)
    with pytest.raises(Rejected, match=r"^reason: must be a string$"):
        SagaCancel.parse({"saga": "s", "reason": None})


GOOD_ATTEMPT = {"saga": "s", "step": "a", "phase": "action", "attempt": 1}
# (op, args, the refusal): the same messages as the handlers' before the command types
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("saga.start", {}, "definition: must be an object with string keys"),
    ("saga.start", {"definition": {"steps": []}}, "steps: must be a non-empty list"),
    ("saga.start", {"definition": {"steps": [{"id": "a"}]}}, "steps[0].action: is required"),
    ("saga.start", {"definition": {"id": "saga-7", "steps": [{"id": "a", "action": {"kind": "topic",
                                                                                    "topic": "t"}}]}},
     "id: names of the form saga-<number> are reserved for generated ids"),
    ("saga.start", {"definition": {"steps": [{"id": "a", "action": {"kind": "topic", "topic": "t"}}],
                                   "colour": "red"}},
     "definition.colour: unknown field (allowed: id, name, steps, input, compensation_retry)"),
    ("saga.outcome", {**GOOD_ATTEMPT, "saga": None, "ok": True}, "saga: must be a string"),
    ("saga.outcome", {**GOOD_ATTEMPT, "saga": "s" * (MAX_STEP_ID_LEN + 1), "ok": True},
     f"saga: must have 1 to {MAX_STEP_ID_LEN} characters"),
    ("saga.outcome", {**GOOD_ATTEMPT, "step": None, "ok": True}, "step: must be a string"),
    ("saga.outcome", {**GOOD_ATTEMPT, "phase": "undo", "ok": True}, "phase: must be one of action, compensation"),
    ("saga.outcome", {**GOOD_ATTEMPT, "attempt": 0, "ok": True},
     f"attempt: must be between 1 and {MAX_COMPENSATION_ATTEMPTS}"),
    ("saga.outcome", {**GOOD_ATTEMPT, "attempt": "1", "ok": True}, "attempt: must be an integer"),
    ("saga.outcome", GOOD_ATTEMPT, "ok: must be true or false"),
    ("saga.outcome", {**GOOD_ATTEMPT, "ok": "yes"}, "ok: must be true or false"),
    ("saga.outcome", {**GOOD_ATTEMPT, "ok": False, "permanent": 1}, "permanent: must be true or false"),
    ("saga.retry", {**GOOD_ATTEMPT, "attempt": True}, "attempt: must be an integer"),
    ("saga.retry", {**GOOD_ATTEMPT, "phase": None}, "phase: must be one of action, compensation"),
    ("saga.resumed", {**GOOD_ATTEMPT, "node": ""}, "node: must have 1 to 256 characters"),
    ("saga.resumed", GOOD_ATTEMPT, "node: must be a string"),
    ("saga.cancel", {}, "saga: must be a string"),
    ("saga.cancel", {"saga": "a\nb"}, "saga: must not contain control characters"),
    ("saga.cancel", {"saga": "s", "reason": ""}, f"reason: must have 1 to {MAX_ERROR_LEN} characters"),
    ("saga.cancel", {"saga": "s", "reason": "r" * (MAX_ERROR_LEN + 1)},
     f"reason: must have 1 to {MAX_ERROR_LEN} characters"),
]


@pytest.mark.parametrize(("op", "args", "message"), BAD, ids=[f"{op} {m[:40]}" for op, _, m in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], message: str) -> None:
    assert refused_alike(op, args) == message


def test_what_the_state_decides_is_not_the_parses() -> None:
    """A saga or a step that does not exist passes the parse; apply refuses it."""
    command = SagaOutcome.parse({**GOOD_ATTEMPT, "saga": "nope", "ok": True})
    assert command.saga == "nope"
    result = StateMachine().apply(1, Command(op=command.op, args=command.to_args(), now_ms=1_000))
    assert result.error == ("not_found", "saga 'nope' does not exist")
