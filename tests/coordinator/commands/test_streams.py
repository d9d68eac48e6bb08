"""The stream processors' commands: one parse for the API and for apply,
naming the field it refuses; the log carries a definition as the client
sent it, the state keeps it normalized."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.agents import HEALTH_STATES
from coordinator.commands.projections import FOLDS, NUMERIC_FOLDS
from coordinator.commands.streams import (
    MAX_LATENESS_S,
    MAX_WINDOWS_PER_EVENT,
    PATTERN_KINDS,
    WINDOW_KINDS,
    ProcessorDelete,
    ProcessorPut,
    StreamsTick,
    normalize_processor,
)
from tests.coordinator.commands.refusals import refused_alike
from tests.coordinator.commands.test_projections import paths, resource_names, tokens, topics

seconds = st.integers(1, 3600).map(lambda n: n / 10)


@st.composite
def definitions(draw: st.DrawFn) -> dict[str, Any]:
    """A valid definition as a client may send it, its fields in any order."""
    topic_source = draw(st.booleans())
    fields: dict[str, Any] = {"source": {"topic": draw(topics)} if topic_source else {"category": "order"}}
    if draw(st.booleans()):
        fields["group_by"] = draw(paths)
    emit = draw(tokens.filter(lambda t: t not in ("agent", "lock", "system")))
    if draw(st.booleans()):
        fold = draw(st.sampled_from(FOLDS))
        fields |= {"fold": fold, "emit": emit, "lateness_s": draw(st.integers(0, 60))}
        if fold in (*NUMERIC_FOLDS, "set"):
            fields["field"] = draw(paths)
        size = draw(st.integers(1, 60))
        if draw(st.booleans()):
            fields["window"] = {"kind": "tumbling", "size_s": size}
        else:
            fields["window"] = {"kind": "sliding", "size_s": size * 2, "slide_s": size}
    else:
        name = topics if topic_source else st.just("E")
        kind = draw(st.sampled_from(PATTERN_KINDS))
        pattern: dict[str, Any] = {"kind": kind, "within_s": draw(seconds)}
        if kind == "count":
            pattern |= {"event": draw(name), "count": draw(st.integers(2, 1000))}
        else:
            pattern |= {"first": draw(name), "then" if kind == "sequence" else "missing": draw(name)}
        fields["pattern"] = pattern
        if "group_by" in fields and draw(st.booleans()):
            fields["action"] = {"agent_health": draw(st.sampled_from(HEALTH_STATES))}
        if "action" not in fields or draw(st.booleans()):
            fields["emit"] = emit
    return dict(draw(st.permutations(list(fields.items()))))


stream_commands = st.one_of(
    st.builds(lambda name, definition: ProcessorPut(name, definition, normalize_processor(definition)),
              resource_names, definitions()),
    st.builds(ProcessorDelete, resource_names),
    st.builds(StreamsTick),
)


@given(stream_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    assert type(command).parse(command.to_args()) == command
    assert COMMANDS[command.op] is type(command)


@given(definitions())
def test_the_log_carries_the_definition_as_the_client_sent_it(definition: dict[str, Any]) -> None:
    command = ProcessorPut.parse({"name": "p", "definition": definition})
    assert command.to_args()["definition"] is definition
    assert command.spec == normalize_processor(definition)


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    definition = {"emit": "x", "source": {"category": "o"}, "window": {"size_s": 1, "kind": "tumbling"},
                  "fold": "count"}
    command = ProcessorPut.parse({"name": "p", "definition": definition})
    assert list(command.to_args().items()) == [("name", "p"), ("definition", definition)]
    assert command.spec["window"] == {"kind": "tumbling", "size_ms": 1000, "slide_ms": 1000}
    assert ProcessorDelete("p").to_args() == {"name": "p"}
    assert StreamsTick().to_args() == {}
    assert StreamsTick.parse({"anything": 1}) == StreamsTick()  # the handler never read its args


WINDOW = {"source": {"category": "o"}, "window": {"kind": "tumbling", "size_s": 60}, "fold": "count", "emit": "x"}
COUNT = {"source": {"category": "o"}, "emit": "x", "pattern": {"kind": "count", "event": "E", "count": 3,
                                                                  "within_s": 60}}


def put(definition: Any, name: Any = "p") -> dict[str, Any]:
    return {"name": name, "definition": definition}


# (op, args, the refusal): the same words the state machine and the API used before the command types
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("processor.put", put(WINDOW, "a/b"), "name: must not contain '/'"),
    ("processor.put", put(None, "a/b"), "name: must not contain '/'"),  # the name first
    ("processor.put", put([]), "definition: must be an object with string keys"),
    ("processor.put", put({**WINDOW, "x": 1}),
     "x: unknown field (allowed: source, types, group_by, window, pattern, fold, field, lateness_s, emit, action)"),
    ("processor.put", put({"source": {"category": "o"}, "emit": "x"}),
     "window: give a window or a pattern (one of them)"),
    ("processor.put", put({**WINDOW, "window": {"kind": "hopping", "size_s": 1}}),
     f"window.kind: must be one of {', '.join(WINDOW_KINDS)}"),
    ("processor.put", put({**WINDOW, "window": {"kind": "tumbling", "size_s": 0}}),
     "window.size_s: must be between 0.001 and 604800.0"),
    ("processor.put", put({**WINDOW, "window": {"kind": "tumbling", "size_s": 1, "slide_s": 1}}),
     "window.slide_s: applies to sliding windows"),
    ("processor.put", put({**WINDOW, "window": {"kind": "sliding", "size_s": 10, "slide_s": 3}}),
     f"window.slide_s: size_s must be a multiple of slide_s, at most {MAX_WINDOWS_PER_EVENT} times it"),
    ("processor.put", put({**WINDOW, "emit": "agent.fake"}),
     "emit: 'agent.fake' is reserved for the cluster's own events"),
    ("processor.put", put({**WINDOW, "emit": None}), "emit: a window emits its results on a topic: name it"),
    ("processor.put", put({**WINDOW, "fold": "sum"}), "field: is required for the sum fold"),
    ("processor.put", put({**WINDOW, "lateness_s": -1}), f"lateness_s: must be between 0 and {MAX_LATENESS_S}"),
    ("processor.put", put({**WINDOW, "action": {"agent_health": "unhealthy"}}), "action: applies to patterns"),
    ("processor.put", put({**COUNT, "fold": "count"}), "fold: applies to windows"),
    ("processor.put", put({**COUNT, "pattern": {"kind": "never", "within_s": 1}}),
     f"pattern.kind: must be one of {', '.join(PATTERN_KINDS)}"),
    ("processor.put", put({**COUNT, "pattern": {"kind": "count", "event": "E", "count": 1, "within_s": 1}}),
     "pattern.count: must be between 2 and 1000"),
    ("processor.put", put({**COUNT, "pattern": {"kind": "count", "event": "E", "count": 2, "within_s": 1, "x": 1}}),
     "pattern.x: unknown field (allowed: kind, within_s, event, count)"),
    ("processor.put", put({**COUNT, "action": {"agent_health": "unhealthy"}}),
     "group_by: the agent_health action names the agent by the group_by value"),
    ("processor.put", put({**COUNT, "group_by": "a", "action": {"agent_health": "sick"}}),
     f"action.agent_health: must be one of {', '.join(HEALTH_STATES)}"),
    ("processor.put", put({**COUNT, "emit": None}),
     "emit: a pattern emits on a topic, acts, or both: give emit or action"),
    ("processor.delete", {"name": 7}, "name: must be a string"),
]


@pytest.mark.parametrize(("op", "args", "message"), BAD, ids=[f"{op} {m[:40]}" for op, _, m in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], message: str) -> None:
    assert refused_alike(op, args) == message
