"""Commands of the agent registry: ``agent.register``, ``agent.update``,
``agent.deregister``, ``agent.expire``, ``agent.health`` and the leader's
liveness verdicts ``agent.suspect`` and ``agent.alive``, and the limits
and values the API, the state and other domains' parses share.

An endpoint's shape here is what the log always accepted (1 to
``MAX_ENDPOINT_LEN`` characters, no control characters): whether the leader
may call it (``host:port`` or an http(s) URL, the admin's allow-list) is
the API's to check before proposing (``coordinator.commands.endpoints``),
since it depends on the node's configuration. Whether an agent exists, the
registry's size and an agent's metadata bytes are the state's to check.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from coordinator.commands.access import MAX_PUBLIC_KEY_LEN, check_public_key
from coordinator.commands.base import (
    MAX_TOKEN,
    MAX_TTL_MS,
    MIN_TTL_MS,
    DomainCommand,
    check_int,
    check_str,
    invalid,
    require_int,
    require_str,
)

HEALTH_STATES = ("healthy", "unhealthy", "unknown")
MAX_WEIGHT = 1_000_000  # an agent's load-balancing weight
MAX_ENDPOINT_LEN = 2048  # an agent's endpoint URL, in characters
MAX_HEALTH_REASON_LEN = 512


def check_agent_id(value: Any) -> str:
    """An agent's id (``id``): 1 to 256 characters, no control characters."""
    return check_str(value, "id")


def check_agent_type(value: Any) -> str:
    return check_str(value, "type")


def check_metadata(value: Any) -> dict[str, Any]:
    """An agent's metadata: a JSON object (its size is the state's to check)."""
    if not isinstance(value, dict):
        raise invalid("metadata", "must be an object")
    if not all(isinstance(k, str) for k in value):  # the log may carry other keys; JSON cannot
        raise invalid("metadata", "must be an object with string keys")
    return value


def check_endpoint(value: Any) -> str:
    """An endpoint as the log takes it (see the module docstring)."""
    return check_str(value, "endpoint", MAX_ENDPOINT_LEN)


def check_weight(value: Any) -> int:
    return check_int(value, "weight", 1, MAX_WEIGHT)


def _optional(args: Mapping[str, Any], name: str, check: Any) -> Any:
    """``args[name]`` checked, or None when it is absent or null (not given)."""
    value = args.get(name)
    return None if value is None else check(value)


def _public_key(value: Any) -> str:
    return check_public_key(check_str(value, "public_key", MAX_PUBLIC_KEY_LEN))


@dataclass(frozen=True, slots=True)
class AgentRegister(DomainCommand):
    """Register agent ``id`` (a new lease: this command's log index), or
    register it again with new values (its health and, without a new
    ``public_key``, its key are kept). ``weight`` None means 1; ``endpoint``,
    ``weight`` and ``public_key`` go in the log only when given."""

    op: ClassVar[str] = "agent.register"
    id: str
    type: str
    ttl_ms: int
    metadata: dict[str, Any] = field(default_factory=dict)
    endpoint: str | None = None
    weight: int | None = None
    public_key: str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        agent_id = check_agent_id(args.get("id"))
        agent_type = check_agent_type(args.get("type"))
        metadata = check_metadata(args["metadata"]) if "metadata" in args else {}
        ttl_ms = require_int(args, "ttl_ms", MIN_TTL_MS, MAX_TTL_MS)
        return cls(agent_id, agent_type, ttl_ms, metadata, _optional(args, "endpoint", check_endpoint),
                   _optional(args, "weight", check_weight), _optional(args, "public_key", _public_key))

    def to_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"id": self.id, "type": self.type, "metadata": self.metadata, "ttl_ms": self.ttl_ms}
        if self.endpoint is not None:
            args["endpoint"] = self.endpoint
        if self.weight is not None:
            args["weight"] = self.weight
        if self.public_key is not None:
            args["public_key"] = self.public_key
        return args


@dataclass(frozen=True, slots=True)
class AgentUpdate(DomainCommand):
    """Change an agent's weight, endpoint or metadata (those given, at least
    one), keeping its lease."""

    op: ClassVar[str] = "agent.update"
    id: str
    weight: int | None = None
    endpoint: str | None = None
    metadata: dict[str, Any] | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        command = cls(check_agent_id(args.get("id")), _optional(args, "weight", check_weight),
                      _optional(args, "endpoint", check_endpoint), _optional(args, "metadata", check_metadata))
        if command.weight is None and command.endpoint is None and command.metadata is None:
            raise invalid("body", "give at least one of weight, endpoint and metadata")
        return command

    def to_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"id": self.id}
        if self.weight is not None:
            args["weight"] = self.weight
        if self.endpoint is not None:
            args["endpoint"] = self.endpoint
        if self.metadata is not None:
            args["metadata"] = self.metadata
        return args


@dataclass(frozen=True, slots=True)
class AgentDeregister(DomainCommand):
    """Agent ``id`` leaves (refused by the state when it is not registered)."""

    op: ClassVar[str] = "agent.deregister"
    id: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(check_agent_id(args.get("id")))

    def to_args(self) -> dict[str, Any]:
        return {"id": self.id}


@dataclass(frozen=True, slots=True)
class LeaseVerdict(DomainCommand):
    """A verdict of the leader about one agent's lease (``id``, ``lease_id``):
    naming the lease, so a verdict about an old lease cannot touch a new one."""

    id: str
    lease_id: int

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(check_agent_id(args.get("id")), require_int(args, "lease_id", 0, MAX_TOKEN))

    def to_args(self) -> dict[str, Any]:
        return {"id": self.id, "lease_id": self.lease_id}


@dataclass(frozen=True, slots=True)
class AgentExpire(LeaseVerdict):
    """Proposed by the leader when a lease ran out. Names the lease, so an
    expiry decided before a re-registration cannot remove the new lease."""

    op: ClassVar[str] = "agent.expire"


@dataclass(frozen=True, slots=True)
class AgentSuspect(LeaseVerdict):
    """Proposed by the leader when its failure detector's phi for the agent
    crossed the threshold (``coordinator.services.liveness``). Names the
    lease, so a verdict about an old lease cannot touch a new one."""

    op: ClassVar[str] = "agent.suspect"


@dataclass(frozen=True, slots=True)
class AgentAlive(LeaseVerdict):
    """Proposed by the leader when a suspected agent is heard again (same lease)."""

    op: ClassVar[str] = "agent.alive"


@dataclass(frozen=True, slots=True)
class AgentHealth(DomainCommand):
    """Set an agent's health (reported by the agent, or by the leader's
    health checks, with a ``reason``)."""

    op: ClassVar[str] = "agent.health"
    id: str
    health: str
    reason: str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        agent_id = check_agent_id(args.get("id"))
        health = require_str(args, "health", 16)
        if health not in HEALTH_STATES:
            raise invalid("health", f"must be one of {', '.join(HEALTH_STATES)}")
        return cls(agent_id, health, require_str(args, "reason", MAX_HEALTH_REASON_LEN, optional=True))

    def to_args(self) -> dict[str, Any]:
        args = {"id": self.id, "health": self.health}
        if self.reason is not None:
            args["reason"] = self.reason
        return args
