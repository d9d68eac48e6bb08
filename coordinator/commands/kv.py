"""Commands of the key/value store: ``kv.put``, ``kv.cas``, ``kv.delete``.

A write may carry a fence (a lock and its fencing token): the state machine
refuses it unless the token is the lock's current grant. The parse checks its
shape only; whether it is current is the state's to say.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from coordinator.commands.base import (
    MAX_KEY_LEN,
    MAX_TOKEN,
    DomainCommand,
    check_int,
    check_str,
    invalid,
)

_FENCE_FIELDS = ("lock", "token")


@dataclass(frozen=True, slots=True)
class Fence:
    """A write guarded by ``lock``: valid only while ``token`` is its current grant."""

    lock: str
    token: int

    @classmethod
    def parse(cls, value: Any) -> Fence | None:
        """``None`` (no fence) or ``{"lock", "token"}``; fields are named ``fence.<name>``."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise invalid("fence", "must be an object")
        if not all(isinstance(k, str) for k in value):  # the log may carry other keys; JSON cannot
            raise invalid("fence", "must be an object with string keys")
        unknown = sorted(k for k in value if k not in _FENCE_FIELDS)
        if unknown:
            raise invalid(f"fence.{unknown[0]}", "unknown field")
        return cls(check_str(value.get("lock"), "fence.lock"),
                   check_int(value.get("token"), "fence.token", 0, MAX_TOKEN))

    def to_args(self) -> dict[str, Any]:
        return {"lock": self.lock, "token": self.token}


def check_key(value: Any) -> str:
    """A key: 1 to ``MAX_KEY_LEN`` characters, no control characters. The API
    checks a path's key with it before reading the body, then parse again."""
    return check_str(value, "key", MAX_KEY_LEN)


def _key(args: Mapping[str, Any]) -> str:
    return check_key(args.get("key"))


def _value(args: Mapping[str, Any]) -> Any:
    """Any JSON value, null included; its size is the state's to check (``kv_value_bytes_max``)."""
    if "value" not in args:
        raise invalid("value", "is required")
    return args["value"]


def _with_fence(args: dict[str, Any], fence: Fence | None) -> dict[str, Any]:
    if fence is not None:
        args["fence"] = fence.to_args()
    return args


@dataclass(frozen=True, slots=True)
class KvPut(DomainCommand):
    """Store ``value`` under ``key``."""

    op: ClassVar[str] = "kv.put"
    key: str
    value: Any
    fence: Fence | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        # Every replica parses every put: the checks are inlined, and the
        # command is built without the frozen dataclass's __init__ (it sets
        # each field through object.__setattr__), which together saved about
        # 4k of the 7k instructions per entry the parse first added
        # (python -m bench.apply --instructions).
        key = check_str(args.get("key"), "key", MAX_KEY_LEN)
        if "value" not in args:
            raise invalid("value", "is required")
        fence = args.get("fence")
        command = _new(cls)
        _set_key(command, key)
        _set_value(command, args["value"])
        _set_fence(command, None if fence is None else Fence.parse(fence))
        return command

    def to_args(self) -> dict[str, Any]:
        return _with_fence({"key": self.key, "value": self.value}, self.fence)


_new = object.__new__
# The slots' own setters: what a frozen dataclass's __setattr__ refuses, they do.
_set_key, _set_value, _set_fence = (KvPut.__dict__[name].__set__ for name in ("key", "value", "fence"))


@dataclass(frozen=True, slots=True)
class KvCas(DomainCommand):
    """Compare-and-set: store ``value`` if the current value is ``expected``
    (a missing key compares as null), or, when ``expected_revision`` is given,
    if the key's revision is that (0: absent). Exactly one of the two."""

    op: ClassVar[str] = "kv.cas"
    key: str
    value: Any
    expected: Any = None  # compared when expected_revision is None
    expected_revision: int | None = None
    fence: Fence | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        key, value = _key(args), _value(args)
        expected_revision = None
        if "expected_revision" in args:  # null too: "absent" is leaving it out
            expected_revision = check_int(args["expected_revision"], "expected_revision", 0, MAX_TOKEN)
        if ("expected" in args) == (expected_revision is not None):
            raise invalid("expected", "give exactly one of expected and expected_revision")
        return cls(key, value, args.get("expected"), expected_revision, Fence.parse(args.get("fence")))

    def to_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"key": self.key, "value": self.value}
        if self.expected_revision is not None:
            args["expected_revision"] = self.expected_revision
        else:
            args["expected"] = self.expected
        return _with_fence(args, self.fence)


@dataclass(frozen=True, slots=True)
class KvDelete(DomainCommand):
    """Delete ``key`` (refused by the state when it does not exist)."""

    op: ClassVar[str] = "kv.delete"
    key: str
    fence: Fence | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(_key(args), Fence.parse(args.get("fence")))

    def to_args(self) -> dict[str, Any]:
        return _with_fence({"key": self.key}, self.fence)
