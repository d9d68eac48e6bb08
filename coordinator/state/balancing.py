"""How requests to each agent type are balanced: a replicated policy per
type (pure). Every node reads the same policy; what it measures (load,
latency, circuit breakers, rate buckets) stays on the node.

What a policy holds, its defaults and its checks: ``coordinator.commands.balancer``.
"""

from __future__ import annotations

from typing import Any

from coordinator.commands.balancer import DEFAULT_POLICY, ServiceConfigure, ServiceRemove
from coordinator.state.base import Rejected


class Policies:
    """The policy of each agent type that has one (others use ``DEFAULT_POLICY``)."""

    def __init__(self) -> None:
        self.policies: dict[str, dict[str, Any]] = {}

    def of(self, agent_type: str) -> dict[str, Any]:
        return self.policies.get(agent_type, DEFAULT_POLICY)

    def configure(self, command: ServiceConfigure) -> dict[str, Any]:
        self.policies[command.type] = command.normalized
        return {"type": command.type, "policy": command.normalized}

    def remove(self, command: ServiceRemove) -> dict[str, Any]:
        agent_type = command.type
        if self.policies.pop(agent_type, None) is None:
            raise Rejected("not_found", f"agent type {agent_type!r} has no policy")
        return {"type": agent_type, "policy": DEFAULT_POLICY}

    def to_data(self) -> dict[str, Any]:
        return dict(self.policies)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Policies:
        policies = cls()
        policies.policies = dict(data)
        return policies
