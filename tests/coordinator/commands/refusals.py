"""What every domain's table of refused arguments is checked for: the parse
refuses them naming the field, and a replica applying them from the log (the
bytes in the log are untrusted) reaches the same verdict and changes nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from coordinator.commands import COMMANDS
from coordinator.commands.base import Rejected
from coordinator.state import StateMachine
from coordinator.types import Command


def _state(sm: StateMachine) -> dict[str, Any]:
    data = sm.snapshot_data()
    del data["applied_index"], data["now_ms"]  # a refused entry is still applied: these move
    return data


def refused_alike(op: str, args: dict[str, Any], *, code: str = "invalid",
                  setup: Sequence[tuple[str, dict[str, Any]]] = ()) -> str:
    """The message with which ``op``'s parse refuses ``args`` (as ``code``),
    after checking that a state machine holding the ``setup`` commands
    refuses the entry with the same code and message, emits nothing and
    keeps its state."""
    with pytest.raises(Rejected) as refused:
        COMMANDS[op].parse(args)
    assert refused.value.code == code, refused.value.message
    sm = StateMachine()
    for index, (setup_op, setup_args) in enumerate(setup, 1):
        assert sm.apply(index, Command(op=setup_op, args=setup_args, now_ms=1_000)).error is None
    before = _state(sm)
    result = sm.apply(len(setup) + 1, Command(op=op, args=args, now_ms=1_000))
    assert result.error == (code, refused.value.message)
    assert result.events == () and result.changes == ()
    assert _state(sm) == before
    return refused.value.message
