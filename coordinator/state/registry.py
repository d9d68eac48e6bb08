"""The agent registry and the cluster's member table.

Heartbeats are not stored here: they never enter the log (DESIGN rule 5).
Only registration, expiry, health changes and the leader's liveness
verdicts (``liveness``: alive or suspect) do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coordinator.state.base import approx_size


@dataclass(slots=True)
class Agent:
    id: str
    type: str
    metadata: dict[str, Any]
    ttl_ms: int
    endpoint: str | None
    weight: int
    lease_id: int
    health: str
    registered_ms: int
    public_key: str | None = None  # Ed25519, base64: the agent signs its requests with it
    # "alive" or "suspect": the leader's failure detector's committed verdict
    # (agent.suspect / agent.alive), not the agent's own health
    liveness: str = "alive"

    def to_data(self) -> list[Any]:
        """A snapshot row; ``liveness`` only when not "alive", so the rows of
        every agent that was never suspected stay what they always were."""
        row = [self.id, self.type, self.metadata, self.ttl_ms, self.endpoint, self.weight,
               self.lease_id, self.health, self.registered_ms, self.public_key]
        if self.liveness != "alive":
            row.append(self.liveness)
        return row

    @classmethod
    def from_data(cls, row: list[Any]) -> Agent:
        return cls(*row)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "metadata": self.metadata,
            "ttl_s": self.ttl_ms / 1000,
            "endpoint": self.endpoint,
            "weight": self.weight,
            "lease_id": self.lease_id,
            "health": self.health,
            "registered_ms": self.registered_ms,
            "public_key": self.public_key,
        }


def agent_size(agent: Agent) -> int:
    """What an agent makes every replica hold, about (``approx_size``)."""
    return (approx_size(agent.metadata) + len(agent.id) + len(agent.type) + len(agent.endpoint or "")
            + len(agent.public_key or "") + 64)


class Registry:
    def __init__(self) -> None:
        self.agents: dict[str, Agent] = {}
        self.bytes = 0  # agent_size of every agent
        self._by_lease: dict[int, str] = {}  # lease id -> agent id (derived: not in snapshots)
        self._by_type: dict[str, set[str]] = {}  # type -> agent ids (derived: not in snapshots)

    def put(self, agent: Agent) -> None:
        """Add or replace an agent (its id's previous record)."""
        old = self.agents.get(agent.id)
        if old is not None:
            self.bytes -= agent_size(old)
            self._by_lease.pop(old.lease_id, None)
            self._untype(old)
        self.agents[agent.id] = agent
        self._by_lease[agent.lease_id] = agent.id
        self._by_type.setdefault(agent.type, set()).add(agent.id)
        self.bytes += agent_size(agent)

    def remove(self, agent_id: str) -> Agent:
        agent = self.agents.pop(agent_id)
        self.bytes -= agent_size(agent)
        self._by_lease.pop(agent.lease_id, None)
        self._untype(agent)
        return agent

    def _untype(self, agent: Agent) -> None:
        ids = self._by_type.get(agent.type)
        if ids is not None:
            ids.discard(agent.id)
            if not ids:
                del self._by_type[agent.type]

    def by_lease(self, lease_id: int) -> Agent | None:
        """The agent whose current lease is ``lease_id`` (a heartbeat datagram names only the lease)."""
        agent_id = self._by_lease.get(lease_id)
        return self.agents.get(agent_id) if agent_id is not None else None

    def by_type(self, agent_type: str | None) -> list[Agent]:
        """Sorted by id; every agent when ``agent_type`` is None."""
        return sorted(self.agents.values() if agent_type is None else self.of_type(agent_type), key=lambda a: a.id)

    def of_type(self, agent_type: str) -> list[Agent]:
        """The agents of one type, in no order: as many steps as there are such agents, not all agents."""
        return [self.agents[i] for i in self._by_type.get(agent_type, ())]

    def to_data(self) -> list[Any]:
        return [a.to_data() for a in self.agents.values()]

    @classmethod
    def from_data(cls, rows: list[Any]) -> Registry:
        registry = cls()
        for row in rows:
            registry.put(Agent.from_data(row))
        return registry


@dataclass(slots=True)
class Member:
    id: str
    raft: str
    http: str

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "raft": self.raft, "http": self.http}


class Members:
    def __init__(self) -> None:
        self.members: dict[str, Member] = {}

    def by_raft(self, raft: str) -> Member | None:
        for member in self.members.values():
            if member.raft == raft:
                return member
        return None

    def to_data(self) -> list[Any]:
        return [[m.id, m.raft, m.http] for m in self.members.values()]

    @classmethod
    def from_data(cls, rows: list[Any]) -> Members:
        members = cls()
        for node_id, raft, http in rows:
            members.members[node_id] = Member(node_id, raft, http)
        return members
