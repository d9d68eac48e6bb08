"""The shared checks of coordinator.commands.base and the registry of command types."""

from __future__ import annotations

import pytest

from coordinator.commands import COMMANDS
from coordinator.commands.base import Rejected, check_str
from coordinator.state import base as state_base
from coordinator.state.machine import OPERATIONS


@pytest.mark.parametrize(("value", "message"), [
    (7, "name: must be a string"),
    ("", "name: must have 1 to 256 characters"),
    ("a\n", "name: must not contain control characters"),
    ("a\ud800", "name: must be valid Unicode (no lone surrogates)"),  # the log cannot carry it
])
def test_check_str_names_the_field(value: object, message: str) -> None:
    with pytest.raises(Rejected) as refused:
        check_str(value, "name")
    assert (refused.value.code, refused.value.message) == ("invalid", message)


def test_check_str_passes_printable_and_other_non_printable_text() -> None:
    assert check_str("ключ 😀", "name") == "ключ 😀"
    assert check_str("a\u00a0b", "name") == "a\u00a0b"  # not printable, but neither control nor surrogate


def test_the_state_re_exports_the_same_checks() -> None:
    """The domains not migrated yet import them from coordinator.state.base."""
    assert state_base.Rejected is Rejected
    assert state_base.check_str is check_str


def test_every_command_type_has_a_handler_and_names_its_op() -> None:
    assert set(COMMANDS) <= OPERATIONS
    for op, command_type in COMMANDS.items():
        assert command_type.op == op
