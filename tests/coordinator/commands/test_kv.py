"""The kv commands: one parse for the API and for apply, naming the field it refuses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.base import MAX_TOKEN
from coordinator.commands.kv import Fence, KvCas, KvDelete, KvPut
from tests.coordinator.commands.refusals import refused_alike

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
                min_size=1, max_size=12)
fences = st.none() | st.builds(Fence, names, st.integers(0, MAX_TOKEN))
kv_commands = st.one_of(
    st.builds(KvPut, names, json_values, fences),
    st.builds(KvCas, names, json_values, json_values, st.none(), fences),
    st.builds(KvCas, names, json_values, st.none(), st.integers(0, MAX_TOKEN), fences),
    st.builds(KvDelete, names, fences),
)


@given(kv_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    assert type(command).parse(command.to_args()) == command
    assert COMMANDS[command.op] is type(command)


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    """The dicts the API proposed before the command types: the same bytes in the log."""
    fence = Fence("L", 7)
    assert list(KvPut("k", 1, fence).to_args().items()) == [("key", "k"), ("value", 1),
                                                             ("fence", {"lock": "L", "token": 7})]
    assert list(KvPut("k", None).to_args()) == ["key", "value"]
    assert list(KvCas("k", 2, expected=None).to_args().items()) == [("key", "k"), ("value", 2), ("expected", None)]
    assert list(KvCas("k", 2, expected_revision=0, fence=fence).to_args()) == ["key", "value", "expected_revision",
                                                                              "fence"]
    assert KvDelete("k").to_args() == {"key": "k"}
    assert list(KvDelete("k", fence).to_args()) == ["key", "fence"]


def test_parse_ignores_fields_it_does_not_know_as_the_handlers_did() -> None:
    assert KvPut.parse({"key": "k", "value": 1, "extra": 2}) == KvPut("k", 1)
    assert KvCas.parse({"key": "k", "value": 1, "expected": None, "fence": None}) == KvCas("k", 1)


# (op, args, the refusal now, the state machine's refusal before the command types
# when it differed: the API's answer was kept, and the API never logged such args)
BAD: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("kv.put", {"value": 1}, "key: must be a string", None),
    ("kv.put", {"key": 7, "value": 1}, "key: must be a string", None),
    ("kv.put", {"key": "", "value": 1}, "key: must have 1 to 1024 characters", None),
    ("kv.put", {"key": "k" * 1025, "value": 1}, "key: must have 1 to 1024 characters", None),
    ("kv.put", {"key": "a\n", "value": 1}, "key: must not contain control characters", None),
    ("kv.put", {"key": "a"}, "value: is required", None),
    ("kv.put", {"key": "a", "value": 1, "fence": "L1"}, "fence: must be an object",
     "fence: must be an object with string keys"),
    ("kv.put", {"key": "a", "value": 1, "fence": {1: "L1"}}, "fence: must be an object with string keys", None),
    ("kv.put", {"key": "a", "value": 1, "fence": {"lock": "L1"}}, "fence.token: must be an integer",
     "token: must be an integer"),
    ("kv.put", {"key": "a", "value": 1, "fence": {"lock": "L1", "token": "1"}}, "fence.token: must be an integer",
     "token: must be an integer"),
    ("kv.put", {"key": "a", "value": 1, "fence": {"lock": "", "token": 1}},
     "fence.lock: must have 1 to 256 characters", "lock: must have 1 to 256 characters"),
    ("kv.put", {"key": "a", "value": 1, "fence": {"lock": "L1", "token": 1, "x": 0}}, "fence.x: unknown field",
     "(accepted: the fence's other fields were ignored)"),
    ("kv.delete", {"key": "a", "fence": {"lock": "L1", "token": -1}},
     f"fence.token: must be between 0 and {MAX_TOKEN}", f"token: must be between 0 and {MAX_TOKEN}"),
    ("kv.delete", {"key": None}, "key: must be a string", None),
    ("kv.cas", {"key": "a", "value": 1}, "expected: give exactly one of expected and expected_revision", None),
    ("kv.cas", {"key": "a", "value": 1, "expected": 1, "expected_revision": 0},
     "expected: give exactly one of expected and expected_revision", None),
    ("kv.cas", {"key": "a", "value": 1, "expected_revision": -1},
     f"expected_revision: must be between 0 and {MAX_TOKEN}", None),
    ("kv.cas", {"key": "a", "value": 1, "expected_revision": True}, "expected_revision: must be an integer", None),
    ("kv.cas", {"key": "a", "value": 1, "expected": 1, "expected_revision": None},
     "expected_revision: must be an integer", "(accepted: a null expected_revision counted as left out)"),
    ("kv.cas", {"key": "a", "expected": None}, "value: is required", None),
]


@pytest.mark.parametrize(("op", "args", "message", "before"), BAD, ids=[f"{op} {m[:40]}" for op, _, m, _ in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], message: str,
                                                        before: str | None) -> None:
    """``before``: what the state answered before the parse was the one check."""
    assert refused_alike(op, args) == message
