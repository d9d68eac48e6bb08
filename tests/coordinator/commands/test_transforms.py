"""The transform commands: the rule is parsed once, by the parse the API and apply share."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.transforms import MAX_RULE_LEN, RuleError, TransformDelete, TransformPut, parse
from tests.coordinator.commands.refusals import refused_alike

names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f/"),
                min_size=1, max_size=12)
patterns = st.lists(st.sampled_from(["a", "b1", "*", "x-y"]), min_size=1, max_size=3).map(".".join)
rules = st.sampled_from(["drop payload.password", "set header.v = \"2\"", "route users.v2",
                         "when type == \"event\"\nrename payload.a to payload.b\ncopy payload.b to header.b"])
transform_commands = st.one_of(
    st.builds(lambda n, t, r: TransformPut(n, t, r, parse(r)), names, patterns, rules),
    st.builds(TransformDelete, names),
)


@given(transform_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    assert type(command).parse(command.to_args()) == command
    assert COMMANDS[command.op] is type(command)


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    put = TransformPut.parse({"name": "v2", "topic": "users.>", "rule": "route users.v2"})
    assert list(put.to_args().items()) == [("name", "v2"), ("topic", "users.>"), ("rule", "route users.v2")]
    assert put.program.statements[0].target == "users.v2"
    assert TransformDelete("v2").to_args() == {"name": "v2"}


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("transform.put", {"topic": "a", "rule": "drop payload.x"}, "name: must be a string"),
    ("transform.put", {"name": "a/b", "topic": "a", "rule": "drop payload.x"}, "name: must not contain '/'"),
    ("transform.put", {"name": "n", "topic": "a..b", "rule": "drop payload.x"},
     "topic: token 2 ('') is not valid in a pattern"),
    ("transform.put", {"name": "n", "topic": "a", "rule": ""},
     f"rule: must be a text of 1 to {MAX_RULE_LEN} characters"),
    ("transform.put", {"name": "n", "topic": "a", "rule": "drop payload.x\nfly away"},
     "rule: line 2, column 1: unknown statement 'fly' (when, rename, move, copy, drop, set, route)"),
    ("transform.put", {"name": "n", "topic": "a", "rule": "route system.x"},
     "rule: line 1, column 7: 'system.x' is reserved for the cluster's own events"),
    ("transform.delete", {"name": ""}, "name: must have 1 to 128 characters"),
]


@pytest.mark.parametrize(("op", "args", "message"), BAD, ids=[m for _, _, m in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], message: str) -> None:
    assert refused_alike(op, args) == message


def test_a_syntax_error_carries_its_line_and_column() -> None:
    with pytest.raises(RuleError) as refused:
        TransformPut.parse({"name": "n", "topic": "a", "rule": "drop payload.x\nfly away"})
    assert (refused.value.line, refused.value.column) == (2, 1)
