"""Validation shared by every command type and by the state machine's
domains: deterministic refusals (``Rejected``) and the checks of argument
values, each naming its field.

Pure (stdlib only): ``coordinator.commands`` sits between the state machine
and the codec, and both the API (before proposing) and ``StateMachine.apply``
(the bytes in the log are untrusted) run these checks, so every replica and
the API reach the same verdict.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

MAX_TOKEN = 2**63 - 1  # fencing tokens, lease ids, revisions: int64
MIN_TTL_MS = 1_000  # leases of agents and locks
MAX_TTL_MS = 86_400_000


class Rejected(Exception):
    """A command refused: by its parse (``code`` "invalid", the message
    "<field>: <why>") or by the current state.

    In ``StateMachine.apply`` it becomes ``Result.error`` and never escapes;
    before proposing, the API turns it into the same HTTP error
    (``services.proposals.state_error``).
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


MAX_NAME_LEN = 256
MAX_KEY_LEN = 1024
_CONTROL = re.compile("[\x00-\x1f\x7f]")  # what check_str refuses
_SURROGATE = re.compile("[\ud800-\udfff]")  # not UTF-8: msgpack cannot carry it (codec.check_value)


def check_str(value: Any, field: str, max_len: int = MAX_NAME_LEN) -> str:
    if not isinstance(value, str):
        raise invalid(field, "must be a string")
    if not value or len(value) > max_len:
        raise invalid(field, f"must have 1 to {max_len} characters")
    # isprintable() is False for every control character (and for some other
    # characters, e.g. U+00A0): the exact check runs only for those strings.
    if not value.isprintable():
        if _CONTROL.search(value) is not None:
            raise invalid(field, "must not contain control characters")
        if _SURROGATE.search(value) is not None:  # an HTTP path or header may carry one; the log cannot
            raise invalid(field, "must be valid Unicode (no lone surrogates)")
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


def require_str(args: Mapping[str, Any], name: str, max_len: int = MAX_NAME_LEN, *, optional: bool = False) -> Any:
    value = args.get(name)
    return None if value is None and optional else check_str(value, name, max_len)


def require_int(args: Mapping[str, Any], name: str, low: int, high: int, *, optional: bool = False) -> Any:
    value = args.get(name)
    return None if value is None and optional else check_int(value, name, low, high)


def require_number(args: Mapping[str, Any], name: str, low: float, high: float, *, optional: bool = False) -> Any:
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


def require_dict(args: Mapping[str, Any], name: str, *, optional: bool = False) -> Any:
    value = args.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise invalid(name, "must be an object with string keys")
    return value


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


class DomainCommand:
    """A domain's typed command: what a ``coordinator.types.Command`` carries
    as ``op`` and ``args``, with every argument checked.

    Subclasses are frozen dataclasses (slots) with a class-level ``op``.
    ``parse(args)`` is the one validation of that op: it raises
    ``Rejected("invalid", "<field>: <why>")`` naming the first bad field, and
    it is deterministic (the same args give the same verdict on every replica
    and in the API). ``to_args()`` gives the args dict that goes in the log,
    with the keys in the order the log has always had them (the log's bytes
    and the state digest chain depend on it); ``parse(c.to_args()) == c``.

    Checks against the state (a lock held by another, a quota) are not part
    of the parse: they belong to the state machine's handler.
    """

    __slots__ = ()
    op: ClassVar[str]

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        raise NotImplementedError

    def to_args(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class NamedCommand(DomainCommand):
    """A command whose one argument is the ``name`` of what it acts on (a
    delete, a rebuild). A subclass sets ``op`` and ``check_name``, the
    domain's check of a name (its limits, its messages)."""

    check_name: ClassVar[Any]  # staticmethod: (value) -> str, raising Rejected naming "name"
    name: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(cls.check_name(args.get("name")))

    def to_args(self) -> dict[str, Any]:
        return {"name": self.name}


@dataclass(frozen=True, slots=True)
class ArglessCommand(DomainCommand):
    """A command with no arguments (a tick, a barrier). Its args are not
    read: entries older than a type may carry some, and they mean nothing."""

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls()

    def to_args(self) -> dict[str, Any]:
        return {}
