"""The cluster's commands (noop, barrier, the member table, the leader's
system reports): one parse for the API and for apply, naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.cluster import (
    SYSTEM_EVENTS,
    Barrier,
    MemberRegister,
    MemberRemove,
    Noop,
    SystemReport,
)
from coordinator.state import StateMachine
from coordinator.types import Command
from tests.coordinator.commands.refusals import refused_alike

names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
                min_size=1, max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
cluster_commands = st.one_of(
    st.just(Noop()),
    st.just(Barrier()),
    st.builds(MemberRegister, names, names, names),
    st.builds(MemberRemove, names),
    st.builds(SystemReport, st.sampled_from(SYSTEM_EVENTS), st.dictionaries(names, json_values, max_size=4)),
)


@given(cluster_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    assert type(command).parse(command.to_args()) == command
    assert COMMANDS[command.op] is type(command)


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    """The dicts the node and the leader's duties proposed before the command types."""
    assert Noop().to_args() == {} and Barrier().to_args() == {}
    assert list(MemberRegister("n1", "h:1", "h:2").to_args().items()) == [("id", "n1"), ("raft", "h:1"),
                                                                         ("http", "h:2")]
    assert MemberRemove("n1").to_args() == {"id": "n1"}
    assert list(SystemReport("system.failure", {"member": "n2"}).to_args().items()) == [
        ("type", "system.failure"), ("data", {"member": "n2"})]


def test_noop_and_barrier_ignore_their_args_as_the_handlers_did() -> None:
    assert Noop.parse({"x": 1}) == Noop() and Barrier.parse({"x": 1}) == Barrier()
    sm = StateMachine()
    assert sm.apply(1, Command(op="barrier", args={"x": 1}, now_ms=1)).value == {"index": 1}


# (op, args, the refusal): the same as the handlers' before the command types
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("member.register", {"raft": "h:1", "http": "h:2"}, "id: must be a string"),
    ("member.register", {"id": "n" * 65, "raft": "h:1", "http": "h:2"}, "id: must have 1 to 64 characters"),
    ("member.register", {"id": "n1", "raft": "", "http": "h:2"}, "raft: must have 1 to 256 characters"),
    ("member.register", {"id": "n1", "raft": "h:1", "http": 2}, "http: must be a string"),
    ("member.register", {"id": "n1", "raft": "h:1", "http": "h\n2"}, "http: must not contain control characters"),
    ("member.remove", {}, "id: must be a string"),
    ("member.remove", {"id": "n\x00"}, "id: must not contain control characters"),
    ("system.report", {"type": "system.other", "data": {}},
     "type: must be one of system.failure, system.recovered, system.leader.elected"),
    ("system.report", {"type": "x" * 65, "data": {}}, "type: must have 1 to 64 characters"),
    ("system.report", {"data": {}}, "type: must be a string"),
    ("system.report", {"type": "system.failure"}, "data: must be an object with string keys"),
    ("system.report", {"type": "system.failure", "data": [1]}, "data: must be an object with string keys"),
    ("system.report", {"type": "system.failure", "data": {1: 2}}, "data: must be an object with string keys"),
]


@pytest.mark.parametrize(("op", "args", "message"), BAD, ids=[f"{op} {m[:40]}" for op, _, m in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], message: str) -> None:
    assert refused_alike(op, args) == message
