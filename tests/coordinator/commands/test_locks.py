"""The lock commands (locks and elections): one parse for the API and for apply."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.base import MAX_TOKEN, MAX_TTL_MS, MIN_TTL_MS
from coordinator.commands.locks import LockAcquire, LockExpire, LockRelease
from tests.coordinator.commands.refusals import refused_alike

names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
                min_size=1, max_size=12)
lock_commands = st.one_of(
    st.builds(LockAcquire, names, names, st.integers(MIN_TTL_MS, MAX_TTL_MS)),
    st.builds(LockRelease, names, names),
    st.builds(LockExpire, names, st.integers(0, MAX_TOKEN)),
)


@given(lock_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    assert type(command).parse(command.to_args()) == command
    assert COMMANDS[command.op] is type(command)


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    """The dicts the API (and the leader's lease keeper) proposed before the command types."""
    assert list(LockAcquire("L", "w1", 5_000).to_args().items()) == [("name", "L"), ("holder", "w1"),
                                                                     ("ttl_ms", 5_000)]
    assert list(LockRelease("L", "w1").to_args().items()) == [("name", "L"), ("holder", "w1")]
    assert list(LockExpire("L", 7).to_args().items()) == [("name", "L"), ("token", 7)]


def test_parse_ignores_fields_it_does_not_know_as_the_handlers_did() -> None:
    assert LockRelease.parse({"name": "L", "holder": "w1", "ttl_ms": "x"}) == LockRelease("L", "w1")


# (op, args, the refusal): the same as the handlers' before the command types
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("lock.acquire", {"name": "L1", "holder": "w1", "ttl_ms": 999}, "ttl_ms: must be between 1000 and 86400000"),
    ("lock.acquire", {"name": "L1", "holder": "w1", "ttl_ms": 86_400_001},
     "ttl_ms: must be between 1000 and 86400000"),
    ("lock.acquire", {"name": "L1", "holder": "w1", "ttl_ms": 5_000.0}, "ttl_ms: must be an integer"),
    ("lock.acquire", {"name": "L1", "holder": "w1"}, "ttl_ms: must be an integer"),
    ("lock.acquire", {"name": "L1", "holder": "", "ttl_ms": 5_000}, "holder: must have 1 to 256 characters"),
    ("lock.acquire", {"name": None, "holder": "w1", "ttl_ms": 5_000}, "name: must be a string"),
    ("lock.acquire", {"name": "n" * 257, "holder": "w1", "ttl_ms": 5_000}, "name: must have 1 to 256 characters"),
    ("lock.acquire", {"name": "a\nb", "holder": "w1", "ttl_ms": 5_000}, "name: must not contain control characters"),
    ("lock.release", {"name": "L1"}, "holder: must be a string"),
    ("lock.release", {"holder": "w1"}, "name: must be a string"),
    ("lock.release", {"name": "L1", "holder": "w\x7f"}, "holder: must not contain control characters"),
    ("lock.expire", {"name": "L1", "token": None}, "token: must be an integer"),
    ("lock.expire", {"name": "L1", "token": True}, "token: must be an integer"),
    ("lock.expire", {"name": "L1", "token": -1}, f"token: must be between 0 and {MAX_TOKEN}"),
    ("lock.expire", {"name": 3, "token": 1}, "name: must be a string"),
]


@pytest.mark.parametrize(("op", "args", "message"), BAD, ids=[f"{op} {m[:40]}" for op, _, m in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], message: str) -> None:
    assert refused_alike(op, args) == message
