"""What a caller may see in listings and event streams.

The routes' rules (``auth.RULES``) decide whether a request may be made at
all; a listing that any authenticated caller may ask for still shows an
agent only the items its roles reach, as a Consul ACL token filters the
catalog:

- a topic (and its binding to a broker): when it may ``send``, ``receive``
  or ``subscribe`` on it;
- a subscription or group: its own, or one whose pattern it may ``receive``;
- a saga: when it may start sagas of that name (``saga``);
- a cluster event: ``saga.*`` events as their saga, ``lock.*`` events when it
  holds ``lock`` on the name; agent and system events are everyone's
  (finding each other is what the registry is for);
- roles: the ones it holds, and its own grant (not who else holds what);
- a projection or stream processor: when it may read its source (``stream``
  on the whole category, ``<category>-*``; ``receive`` on the topic
  pattern), since its values are folded from that source;
- a transform: when its topic pattern is visible as a topic is.

The admin, and every caller of a node in development mode
(``--allow-anonymous``), sees everything. Counts that go with a listing
(sagas by state) are counted over what is shown, so a total never tells
of items the caller cannot see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from aiohttp import web

from coordinator.api.auth import AUTH, principal_of
from coordinator.api.keys import NODE
from coordinator.commands.access import TOPIC_ACTIONS
from coordinator.errors import Forbidden
from coordinator.services.view import StateView


@dataclass(frozen=True, slots=True)
class Visibility:
    """One caller's view of ``state`` (the local replica, read without a
    barrier: a listing's own barrier has already run). ``agent`` is None for
    a caller who sees everything."""

    state: StateView
    agent: str | None

    @property
    def everything(self) -> bool:
        return self.agent is None

    def topic(self, topic: str) -> bool:
        return self.agent is None or any(self.state.can(self.agent, a, topic) for a in TOPIC_ACTIONS)

    def consumer(self, owner: str | None, pattern: str | None) -> bool:
        """A subscription (``owner`` the agent that made it) or group over ``pattern``."""
        if self.agent is None or owner == self.agent:
            return True
        return pattern is not None and self.state.can(self.agent, "receive", pattern)

    def refuse(self, request: web.Request, permission: str, resource: str, why: str) -> NoReturn:
        """A 403 for one item the caller asked for by name and may not see,
        counted with the other denials."""
        request.app[AUTH].denied[permission] += 1
        raise Forbidden(f"agent {self.agent!r} may not see it: {why}", permission=permission, resource=resource)

    def roles(self) -> dict[str, Any]:
        """``GET /v1/roles``: every role and grant, or for an agent its own."""
        described = self.state.roles_and_grants()
        if self.agent is None:
            return described
        held = set(self.state.roles_held(self.agent))
        return {"roles": [r for r in described["roles"] if r["name"] in held],
                "grants": [g for g in described["grants"] if g["agent"] == self.agent]}

    def source(self, source: dict[str, Any]) -> bool:
        """A projection's or processor's ``{"category": C}`` or ``{"topic": PATTERN}``."""
        if self.agent is None:
            return True
        if "category" in source:
            return self.state.can(self.agent, "stream", f"{source['category']}-", listing=True)
        return self.state.can(self.agent, "receive", source["topic"])

    def check_source(self, request: web.Request, what: str, source: dict[str, Any]) -> None:
        """A 403 unless it may read ``source``, the source ``what`` folds."""
        if self.source(source):
            return
        if "category" in source:
            self.refuse(request, "stream", f"{source['category']}-*",
                        f"{what} folds the category {source['category']!r}, which it may not read")
        self.refuse(request, "receive", source["topic"], f"{what} folds topic {source['topic']!r}, "
                    "where it may not receive")

    def readable(self, items: Mapping[str, Any]) -> list[Any]:
        """Of named projections or processors, those whose source it may read, in name order."""
        return [items[name] for name in sorted(items) if self.source(items[name].definition["source"])]

    def saga(self, name: str) -> bool:
        return self.agent is None or self.state.can(self.agent, "saga", name)

    def event(self, event_type: str, data: Any) -> bool:
        if self.agent is None:
            return True
        name = data.get("name") if isinstance(data, dict) else None
        if event_type.startswith("saga."):
            return isinstance(name, str) and self.saga(name)
        if event_type.startswith("lock."):
            return isinstance(name, str) and self.state.can(self.agent, "lock", name)
        return True


def visibility(request: web.Request) -> Visibility:
    """The view of this request's caller (after the auth middleware ran)."""
    state = request.app[NODE].local_view
    principal = principal_of(request)
    if principal is None or principal.kind != "agent" or request.app[AUTH].settings.allow_anonymous:
        return Visibility(state, None)
    return Visibility(state, principal.agent_id)
