"""Role-based access control, replicated (pure): roles are lists of
permissions, agents hold roles. The API asks ``can`` at every entry point.

A permission is ``{"action", "pattern"}``:

- ``send`` / ``receive`` / ``subscribe`` on topics, with NATS-style patterns
  (``orders.*``, ``orders.>``, ``>``). Subscribing to a pattern needs a
  permission pattern that covers every topic it can match.
- ``invoke`` on agent types, ``serve`` on agent types (register as one:
  receive its invocations and saga steps), and ``saga`` (start sagas) on
  saga names, with the same token patterns (``>`` is every one).
- ``kv`` and ``lock`` on keys and lock names, ``stream`` on event store
  stream ids (append, read, snapshot, delete; reading a category needs it on
  ``<category>-*``): exact, or a prefix ending in ``*`` (``jobs/*``,
  ``order-*``), or ``*`` for all.

Grants are kept by agent id, apart from registrations, so an agent that
re-registers keeps its roles; removing a role removes it from every grant.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coordinator.commands.access import (
    PREFIX_ACTIONS,
    AccessUnpin,
    RoleDelete,
    RoleGrant,
    RolePut,
    SecurityConfigure,
)
from coordinator.state.base import Rejected, invalid

MAX_ROLES = 10_000
MAX_PINNED = 100_000


def covers(grant: str, wanted: str) -> bool:
    """Does the token pattern ``grant`` match every name ``wanted`` (a name or
    a pattern) can match? ``*`` is one token, ``>`` one or more at the end."""
    g, w = grant.split("."), wanted.split(".")
    for i, token in enumerate(g):
        if token == ">":
            return len(w) > i  # one or more tokens left, whatever they are (also ">")
        if i >= len(w):
            return False
        if token == "*":
            if w[i] == ">":
                return False
            continue
        if w[i] != token:
            return False
    return len(w) == len(g)


def _prefix_covers(grant: str, wanted: str, listing: bool = False) -> bool:
    """Does the kv/lock ``grant`` cover the name ``wanted``, or with ``listing``
    every key that starts with ``wanted``? Keys may hold ``*`` themselves, so a
    listing is checked by its prefix and the flag, never as the name ``<prefix>*``:
    the grant ``a**`` (keys starting with ``a*``) covers the key ``a*`` but not
    the listing of ``a``."""
    if grant.endswith("*"):
        return wanted.startswith(grant[:-1])
    return wanted == grant and not listing


class Access:
    def __init__(self) -> None:
        self.roles: dict[str, list[dict[str, str]]] = {}
        self.grants: dict[str, list[str]] = {}  # agent id -> role names
        self.pow_difficulty = 0  # leading zero bits a join's proof of work needs (0: none)
        # networks and host names agent endpoints may use (coordinator.commands.endpoints)
        self.endpoint_allow: list[str] = []
        # agent id -> the public key it last registered: kept after the agent
        # leaves or expires, so nobody else can join under its id (and roles)
        self.keys: dict[str, str] = {}

    # -- commands (parsed: coordinator.commands.access) ----------------------------------------

    def put_role(self, cmd: RolePut) -> dict[str, Any]:
        if cmd.name not in self.roles and len(self.roles) >= MAX_ROLES:
            raise Rejected("unavailable", f"too many roles ({MAX_ROLES})")
        permissions = [p.to_data() for p in cmd.permissions]
        self.roles[cmd.name] = permissions
        return {"name": cmd.name, "permissions": permissions}

    def delete_role(self, cmd: RoleDelete) -> dict[str, Any]:
        name = cmd.name
        if self.roles.pop(name, None) is None:
            raise Rejected("not_found", f"role {name!r} does not exist")
        for agent_id in list(self.grants):
            self.grants[agent_id] = [r for r in self.grants[agent_id] if r != name]
            if not self.grants[agent_id]:
                del self.grants[agent_id]
        return {"name": name}

    def check_roles(self, names: Iterable[str]) -> None:
        """Refuse (``invalid``, naming ``roles[i]``) a grant of a role that does not exist."""
        for i, name in enumerate(names):
            if name not in self.roles:
                raise invalid(f"roles[{i}]", f"role {name!r} does not exist")

    def grant(self, cmd: RoleGrant) -> dict[str, Any]:
        """Set an agent's roles (the whole list; empty removes them all)."""
        self.check_roles(cmd.roles)
        if cmd.roles:
            self.grants[cmd.agent] = sorted(set(cmd.roles))
        else:
            self.grants.pop(cmd.agent, None)
        return {"agent": cmd.agent, "roles": self.grants.get(cmd.agent, [])}

    def configure(self, cmd: SecurityConfigure) -> dict[str, Any]:
        """Security settings the admin sets: ``pow_difficulty`` (leading zero
        bits), ``endpoint_allow`` (the whole list; ``coordinator.commands.endpoints``);
        those not given keep their value."""
        if cmd.pow_difficulty is not None:
            self.pow_difficulty = cmd.pow_difficulty
        if cmd.endpoint_allow is not None:
            self.endpoint_allow = cmd.allow_list()
        return self.settings()

    def settings(self) -> dict[str, Any]:
        return {"pow_difficulty": self.pow_difficulty, "endpoint_allow": list(self.endpoint_allow)}

    def pin(self, agent_id: str, public_key: str, registered: Any) -> None:
        """Remember ``agent_id``'s key. Beyond ``MAX_PINNED`` keys, the oldest
        of agents that are gone and hold no roles are forgotten first."""
        self.keys.pop(agent_id, None)
        self.keys[agent_id] = public_key
        if len(self.keys) > MAX_PINNED:
            for old in [a for a in self.keys if a not in registered and a not in self.grants][:len(self.keys)
                                                                                             - MAX_PINNED]:
                del self.keys[old]

    def unpin(self, cmd: AccessUnpin) -> dict[str, Any]:
        """Forget an agent id's key (the admin's), so another key may join under it."""
        if self.keys.pop(cmd.agent, None) is None:
            raise Rejected("not_found", f"no key is kept for agent {cmd.agent!r}")
        return {"agent": cmd.agent}

    # -- checks ------------------------------------------------------------------------------

    def can(self, agent_id: str, action: str, resource: str, *, listing: bool = False) -> bool:
        """Whether ``agent_id`` holds ``action`` on ``resource`` (a topic or
        pattern, a type, a saga name, a key or lock name); with ``listing``
        (kv only), on every key that starts with ``resource``."""
        prefix = action in PREFIX_ACTIONS
        for role in self.grants.get(agent_id, ()):
            for permission in self.roles.get(role, ()):
                if permission["action"] != action:
                    continue
                if _prefix_covers(permission["pattern"], resource, listing) if prefix else \
                        covers(permission["pattern"], resource):
                    return True
        return False

    def describe(self) -> dict[str, Any]:
        return {"roles": [{"name": n, "permissions": p} for n, p in sorted(self.roles.items())],
                "grants": [{"agent": a, "roles": r} for a, r in sorted(self.grants.items())]}

    # -- snapshots -----------------------------------------------------------------------------

    def to_data(self) -> dict[str, Any]:
        return {"roles": self.roles, "grants": self.grants, "pow_difficulty": self.pow_difficulty, "keys": self.keys,
                "endpoint_allow": self.endpoint_allow}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Access:
        access = cls()
        access.roles = {k: list(v) for k, v in data["roles"].items()}
        access.grants = {k: list(v) for k, v in data["grants"].items()}
        access.pow_difficulty = data.get("pow_difficulty", 0)
        access.keys = dict(data.get("keys", {}))
        access.endpoint_allow = list(data.get("endpoint_allow", []))
        return access
