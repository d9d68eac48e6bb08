"""What every domain of the state machine shares: the apply context, sizes
and JSON equality. Deterministic rejections and argument validation live in
``coordinator.commands.base`` (the API parses commands with them too) and
are re-exported here for the domains that still validate dict arguments.

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
    check_int,
    check_known,
    check_number,
    check_object,
    check_resource_name,
    check_str,
    invalid,
    over_quota,
    require_dict,
    require_int,
    require_number,
    require_str,
    too_large,
)
from coordinator.types import Event, KvChange


def approx_size(value: Any) -> int:
    """A deterministic size of a JSON value in bytes (close to its JSON
    text): strings by their length, numbers 8, containers their parts.
    Iterative, so deep nesting cannot overflow the stack."""
    if type(value) is str:  # most values and keys
        return len(value) + 2
    size = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += len(item) + 2
        elif isinstance(item, dict):
            size += 2
            for key, inner in item.items():
                size += len(key) + 3
                stack.append(inner)
        elif isinstance(item, list):
            size += 2 + len(item)
            stack.extend(item)
        else:
            size += 8
    return size


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


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values that, unlike ``==``, tells ``true`` from ``1``.

    Iterative, not recursive: a value nested as deep as the codec carries must
    not raise ``RecursionError`` out of ``apply``.
    """
    pending = [(a, b)]
    while pending:
        a, b = pending.pop()
        if isinstance(a, bool) or isinstance(b, bool):
            if not (isinstance(a, bool) and isinstance(b, bool) and a is b):
                return False
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            if a != b:
                return False
        elif type(a) is not type(b):
            return False
        elif isinstance(a, list):
            if len(a) != len(b):
                return False
            pending.extend(zip(a, b, strict=True))
        elif isinstance(a, dict):
            if a.keys() != b.keys():
                return False
            pending.extend((a[k], b[k]) for k in a)
        elif a != b:
            return False
    return True
