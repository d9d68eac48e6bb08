"""Commands of access control: ``role.put``, ``role.delete``, ``role.grant``,
``security.configure`` and ``access.unpin`` (the admin's), and the checks
of what they carry: permissions, public keys, the endpoint allow-list
(``coordinator.commands.endpoints``).

What a permission means, and which roles exist, is the state's
(``coordinator.state.access``): a grant naming a role that does not exist
is refused there, as is a role beyond the state's ``MAX_ROLES``.

The log keeps a request's own form of a role's permissions and of the
security settings (the order of their keys, the allow-list as the admin
wrote it): the commands carry that form for ``to_args`` and give the
normalized values to the state.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from coordinator.commands.base import DomainCommand, NamedCommand, check_int, check_object, check_str, invalid
from coordinator.commands.endpoints import check_allow_list
from coordinator.commands.topics import check_pattern

TOPIC_ACTIONS = ("send", "receive", "subscribe")
TOKEN_ACTIONS = (*TOPIC_ACTIONS, "invoke", "serve", "saga")
PREFIX_ACTIONS = ("kv", "lock", "stream")
ACTIONS = (*TOKEN_ACTIONS, *PREFIX_ACTIONS)
MAX_PERMISSIONS = 256  # in one role
MAX_ROLES_PER_AGENT = 64
MAX_PREFIX_PATTERN_LEN = 1024  # a kv, lock or stream pattern (a key is at most 1024 characters)
MAX_POW_DIFFICULTY = 32  # leading zero bits
SETTINGS = ("pow_difficulty", "endpoint_allow")
MAX_PUBLIC_KEY_LEN = 64  # base64 of 32 bytes is 44


def check_public_key(value: str, field: str = "public_key") -> str:
    """An Ed25519 public key: 32 bytes, standard base64 (``value`` a string)."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise invalid(field, "must be base64") from None
    if len(raw) != 32:
        raise invalid(field, "must be an Ed25519 public key (32 bytes)")
    return value


def check_role_name(value: Any) -> str:
    """A role's name (``name``): 1 to 256 characters, no control characters.
    The API checks a path's name with it before reading the body."""
    return check_str(value, "name")


def _agent(args: Mapping[str, Any]) -> str:
    return check_str(args.get("agent"), "agent")


@dataclass(frozen=True, slots=True)
class Permission:
    """``action`` on the names ``pattern`` covers: a NATS-style token pattern
    for the topic, type and saga actions, an exact name or a prefix ending in
    ``*`` for ``kv``, ``lock`` and ``stream``."""

    action: str
    pattern: str
    pattern_first: bool = False  # the request gave "pattern" before "action" (the log keeps its order)

    @classmethod
    def parse(cls, value: Any, field: str) -> Permission:
        permission = check_object(value, field)
        for key in permission:
            if key not in ("action", "pattern"):
                raise invalid(f"{field}.{key}", "unknown field (allowed: action, pattern)")
        action = permission.get("action")
        if action not in ACTIONS:
            raise invalid(f"{field}.action", f"must be one of {', '.join(ACTIONS)}")
        if action in PREFIX_ACTIONS:
            pattern = check_str(permission.get("pattern"), f"{field}.pattern", MAX_PREFIX_PATTERN_LEN)
        else:
            pattern = check_pattern(permission.get("pattern"), f"{field}.pattern")
        return cls(action, pattern, next(iter(permission)) == "pattern")

    def to_data(self) -> dict[str, str]:
        """As the state keeps and shows it."""
        return {"action": self.action, "pattern": self.pattern}

    def to_args(self) -> dict[str, str]:
        """As the request gave it."""
        return {"pattern": self.pattern, "action": self.action} if self.pattern_first else self.to_data()


@dataclass(frozen=True, slots=True)
class RolePut(DomainCommand):
    """Define role ``name`` (or replace its permissions)."""

    op: ClassVar[str] = "role.put"
    name: str
    permissions: tuple[Permission, ...] = ()

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        name = check_role_name(args.get("name"))
        raw = args.get("permissions")
        if not isinstance(raw, list) or len(raw) > MAX_PERMISSIONS:
            raise invalid("permissions", f"must be a list of at most {MAX_PERMISSIONS} permissions")
        return cls(name, tuple(Permission.parse(p, f"permissions[{i}]") for i, p in enumerate(raw)))

    def to_args(self) -> dict[str, Any]:
        return {"name": self.name, "permissions": [p.to_args() for p in self.permissions]}


@dataclass(frozen=True, slots=True)
class RoleDelete(NamedCommand):
    """Delete role ``name``, and take it from every agent that holds it."""

    op: ClassVar[str] = "role.delete"
    check_name = staticmethod(check_role_name)


@dataclass(frozen=True, slots=True)
class RoleGrant(DomainCommand):
    """Set the roles ``agent`` holds (the whole list; empty takes them all).
    Every role must exist when it applies (the state's check)."""

    op: ClassVar[str] = "role.grant"
    agent: str
    roles: tuple[str, ...] = ()

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        agent = _agent(args)
        roles = args.get("roles")
        if not isinstance(roles, list) or len(roles) > MAX_ROLES_PER_AGENT:
            raise invalid("roles", f"must be a list of at most {MAX_ROLES_PER_AGENT} role names")
        return cls(agent, tuple(check_str(r, f"roles[{i}]") for i, r in enumerate(roles)))

    def to_args(self) -> dict[str, Any]:
        return {"agent": self.agent, "roles": list(self.roles)}


@dataclass(frozen=True, slots=True)
class SecurityConfigure(DomainCommand):
    """Set the security settings given (``SETTINGS``); the others keep their
    value. ``endpoint_allow`` is the whole list, as the admin wrote it
    (``allow_list`` normalizes it)."""

    op: ClassVar[str] = "security.configure"
    pow_difficulty: int | None = None
    endpoint_allow: tuple[str, ...] | None = None
    allow_first: bool = False  # endpoint_allow came before pow_difficulty (the log keeps the order)

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        for key in args:
            if key not in SETTINGS:
                raise invalid(key, f"unknown setting (allowed: {', '.join(SETTINGS)})")
        difficulty = None
        if "pow_difficulty" in args:
            difficulty = check_int(args["pow_difficulty"], "pow_difficulty", 0, MAX_POW_DIFFICULTY)
        allow = None
        if "endpoint_allow" in args:
            check_allow_list(args["endpoint_allow"])
            allow = tuple(args["endpoint_allow"])
        return cls(difficulty, allow, next(iter(args), None) == "endpoint_allow" and difficulty is not None)

    def allow_list(self) -> list[str]:
        """``endpoint_allow`` normalized (sorted, without duplicates); [] when not given."""
        return check_allow_list(list(self.endpoint_allow or ()))

    def to_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.endpoint_allow is not None and self.allow_first:
            args["endpoint_allow"] = list(self.endpoint_allow)
        if self.pow_difficulty is not None:
            args["pow_difficulty"] = self.pow_difficulty
        if self.endpoint_allow is not None and not self.allow_first:
            args["endpoint_allow"] = list(self.endpoint_allow)
        return args


@dataclass(frozen=True, slots=True)
class AccessUnpin(DomainCommand):
    """Forget the public key kept for ``agent`` (an id that left), so another
    key may join under it."""

    op: ClassVar[str] = "access.unpin"
    agent: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(_agent(args))

    def to_args(self) -> dict[str, Any]:
        return {"agent": self.agent}
