"""The projections' commands: one parse for the API and for apply, naming the
field it refuses; the log carries a definition normalized."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.projections import (
    FOLDS,
    MAX_TYPES,
    NUMERIC_FOLDS,
    ProjectionDelete,
    ProjectionPut,
    ProjectionRebuild,
    normalize_definition,
)
from tests.coordinator.commands.refusals import refused_alike
from tests.coordinator.commands.test_kv import names

resource_names = names.filter(lambda name: "/" not in name)
tokens = st.text("abcxyz019_-:@", min_size=1, max_size=6)
paths = st.lists(st.text("abcxyz", min_size=1, max_size=5), min_size=1, max_size=3).map(".".join)
topics = st.lists(tokens | st.just("*"), min_size=1, max_size=3).map(".".join)


@st.composite
def definitions(draw: st.DrawFn) -> dict[str, Any]:
    """A definition as a client may send it (any order of its fields, optional ones left out or null)."""
    fold = draw(st.sampled_from(FOLDS))
    fields: dict[str, Any] = {"fold": fold}
    if draw(st.booleans()):
        fields["source"] = {"topic": draw(topics)}
    else:
        fields["source"] = {"category": draw(st.text("abcxyz019_", min_size=1, max_size=8))}
        if draw(st.booleans()):
            fields["types"] = draw(st.lists(names, min_size=1, max_size=4))
    if fold in (*NUMERIC_FOLDS, "set") or draw(st.booleans()):
        fields["field"] = draw(paths)
    if draw(st.booleans()):
        fields["group_by"] = draw(st.none() | paths)
    return dict(draw(st.permutations(list(fields.items()))))


projection_commands = st.one_of(
    st.builds(ProjectionPut, resource_names, definitions().map(normalize_definition)),
    st.builds(ProjectionRebuild, resource_names),
    st.builds(ProjectionDelete, resource_names),
)


@given(projection_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    assert type(command).parse(command.to_args()) == command
    assert COMMANDS[command.op] is type(command)


@given(definitions())
def test_a_definition_is_normalized_once(definition: dict[str, Any]) -> None:
    """The API proposes the normalized definition; apply's parse leaves it as it is."""
    command = ProjectionPut.parse({"name": "p", "definition": definition})
    assert list(command.definition) == ["source", "types", "fold", "field", "group_by"]
    assert normalize_definition(command.definition) == command.definition
    assert command.definition["types"] is None or command.definition["types"] == sorted(set(definition["types"]))


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    command = ProjectionPut.parse({"name": "p", "definition": {"fold": "count", "source": {"category": "o"}}})
    assert list(command.to_args().items()) == [("name", "p"), ("definition", {
        "source": {"category": "o"}, "types": None, "fold": "count", "field": None, "group_by": None})]
    assert ProjectionRebuild("p").to_args() == {"name": "p"}
    assert ProjectionDelete("p").to_args() == {"name": "p"}


def put(definition: Any, name: Any = "p") -> dict[str, Any]:
    return {"name": name, "definition": definition}


COUNT = {"source": {"category": "o"}, "fold": "count"}
# (op, args, the refusal): the same words the state machine and the API used before the command types
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("projection.put", put(None), "definition: must be an object with string keys"),
    ("projection.put", put({**COUNT, "bogus": 1}),
     "bogus: unknown field (allowed: source, types, fold, field, group_by)"),
    ("projection.put", put({"fold": "count"}), "source: must be an object with string keys"),
    ("projection.put", put({"source": {"stream": "o"}, "fold": "count"}),
     'source: must be {"category": NAME} or {"topic": PATTERN}'),
    ("projection.put", put({"source": {"category": "o-1"}, "fold": "count"}),
     "source.category: must not contain '-' (a category is the stream id before its first '-')"),
    ("projection.put", put({"source": {"topic": "a..b"}, "fold": "count"}),
     "source.topic: token 2 ('') is not valid in a pattern"),
    ("projection.put", put({"source": {"topic": "a"}, "fold": "count", "types": ["X"]}),
     "types: applies to category sources (a topic source is filtered by its pattern)"),
    ("projection.put", put({**COUNT, "types": []}), f"types: must be a list of 1 to {MAX_TYPES} event types"),
    ("projection.put", put({**COUNT, "types": ["A", 1]}), "types[1]: must be a string"),
    ("projection.put", put({**COUNT, "fold": "median"}), f"fold: must be one of {', '.join(FOLDS)}"),
    ("projection.put", put({**COUNT, "fold": "sum"}), "field: is required for the sum fold"),
    ("projection.put", put({**COUNT, "group_by": "a..b"}),
     "group_by: must be names separated by single dots, at most 16 deep"),
    ("projection.put", put(COUNT, "a/b"), "name: must not contain '/'"),
    ("projection.put", put({"fold": "count"}, "a/b"), "source: must be an object with string keys"),  # definition first
    ("projection.put", put(COUNT, "n" * 129), "name: must have 1 to 128 characters"),
    ("projection.rebuild", {}, "name: must be a string"),
    ("projection.delete", {"name": ""}, "name: must have 1 to 128 characters"),
]


@pytest.mark.parametrize(("op", "args", "message"), BAD, ids=[f"{op} {m[:40]}" for op, _, m in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], message: str) -> None:
    assert refused_alike(op, args) == message
