"""What every domain of the state machine shares: the apply context and the
charging of bytes to principals. Sizes, JSON equality, deterministic
rejections and argument validation live in ``coordinator.commands.base``
(the API parses commands with them too) and are re-exported here for the
domains that still validate dict arguments.

A handler validates all of its arguments before it mutates anything, so a
rejected command leaves the state exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.commands.base import (  # noqa: F401  re-exported for the state's domains
    MAX_KEY_LEN,
    MAX_NAME_LEN,
    Rejected,
    approx_size,
    check_int,
    check_known,
    check_number,
    check_object,
    check_resource_name,
    check_str,
    invalid,
    json_equal,
    over_quota,
    require_dict,
    require_int,
    require_number,
    require_str,
    too_large,
)
from coordinator.types import Event, KvChange


def charge(owned: dict[str, int], owner: str | None, size: int) -> None:
    """Add ``size`` bytes (negative: release) to what ``owner`` holds in one
    domain (``owned``: principal -> bytes). Only agents are charged."""
    if owner is None or not owner.startswith("agent:"):
        return
    held = owned.get(owner, 0) + size
    if held > 0:
        owned[owner] = held
    else:
        owned.pop(owner, None)


@dataclass(slots=True)
class ApplyContext:
    """Carries one command's index and time, and collects what it emits."""

    index: int
    now_ms: int
    principal: str | None = None  # who proposed the command (``Command.principal``)
    events: list[Event] = field(default_factory=list)
    changes: list[KvChange] = field(default_factory=list)
    derived: list[Any] = field(default_factory=list)  # stream processors' emissions, carried out after the command
