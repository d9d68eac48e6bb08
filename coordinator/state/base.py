"""What every domain of the state machine shares: the apply context,
deterministic rejections and argument validation.

A handler validates all of its arguments before it mutates anything, so a
rejected command leaves the state exactly as it was.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from coordinator.types import Event, KvChange


class Rejected(Exception):
    """A command that is valid to log but refused by the current state.

    It becomes ``Result.error``; it never escapes ``StateMachine.apply``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field_name: str, message: str) -> Rejected:
    return Rejected("invalid", f"{field_name}: {message}")


def over_quota(limit: str, message: str) -> Rejected:
    """A store or a principal would hold more bytes than ``limit`` allows
    (HTTP 507, naming the limit)."""
    return Rejected("quota", f"{limit}: {message}")


def too_large(field_name: str, size: int, limit: str, limit_bytes: int) -> Rejected:
    """One item over its own cap (HTTP 413, naming the field and the limit)."""
    return Rejected("too_large", f"{field_name}: about {size} bytes, more than {limit} ({limit_bytes})")


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


MAX_NAME_LEN = 256
MAX_KEY_LEN = 1024
_CONTROL = re.compile("[\x00-\x1f\x7f]")  # what check_str refuses


def check_str(value: Any, field: str, max_len: int = MAX_NAME_LEN) -> str:
    if not isinstance(value, str):
        raise invalid(field, "must be a string")
    if not value or len(value) > max_len:
        raise invalid(field, f"must have 1 to {max_len} characters")
    # isprintable() is False for every control character (and for some other
    # characters, e.g. U+00A0): the exact check runs only for those strings.
    if not value.isprintable() and _CONTROL.search(value) is not None:
        raise invalid(field, "must not contain control characters")
    return value


def check_resource_name(value: Any, field: str = "name", max_len: int = 128) -> str:
    """The name of something addressed as one URL path segment (a projection,
    a transform, a stream processor): a string without control characters or ``/``."""
    name = check_str(value, field, max_len)
    if "/" in name:
        raise invalid(field, "must not contain '/'")
    return name


def check_int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, "must be an integer")
    if not low <= value <= high:
        raise invalid(field, f"must be between {low} and {high}")
    return value


def check_number(value: Any, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(field, "must be a finite number")
    if not low <= value <= high:
        raise invalid(field, f"must be between {low} and {high}")
    return value


def require_str(args: dict[str, Any], name: str, max_len: int = MAX_NAME_LEN, *, optional: bool = False) -> Any:
    value = args.get(name)
    return None if value is None and optional else check_str(value, name, max_len)


def require_int(args: dict[str, Any], name: str, low: int, high: int, *, optional: bool = False) -> Any:
    value = args.get(name)
    return None if value is None and optional else check_int(value, name, low, high)


def require_number(args: dict[str, Any], name: str, low: float, high: float, *, optional: bool = False) -> Any:
    value = args.get(name)
    return None if value is None and optional else check_number(value, name, low, high)


def check_object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise invalid(field, "must be an object with string keys")
    return value


def check_known(value: dict[str, Any], field: str, allowed: Any) -> None:
    """Refuse a field outside ``allowed`` (a typo must not pass as a default)."""
    for key in value:
        if key not in allowed:
            raise invalid(f"{field}.{key}" if field else key, f"unknown field (allowed: {', '.join(allowed)})")


def require_dict(args: dict[str, Any], name: str, *, optional: bool = False) -> Any:
    value = args.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise invalid(name, "must be an object with string keys")
    return value


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
