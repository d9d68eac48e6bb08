"""Commands of the load balancer's replicated config: ``service.configure``
(an agent type's policy) and ``service.remove`` (back to the default).

A policy, with its defaults::

    {"strategy": "round_robin",   # weighted_round_robin least_connections response_time consistent_hash
     "path": "/invoke",           # where the agent serves invocations
     "timeout_s": 30,             # a request's default timeout (a caller may ask for less or more, up to 300)
     "health_check": {"kind": "none", "path": "/health", "interval_s": 5, "timeout_s": 2,
                      "healthy_after": 2, "unhealthy_after": 3},        # kind: none | http | tcp
     "breaker": {"window_s": 10, "min_requests": 10, "failure_rate": 0.5, "consecutive_failures": 5,
                 "open_s": 5, "half_open_probes": 1, "successes_to_close": 1},
     "rate_limit": {"per_caller": null, "per_type": null},              # each {"rate": per s, "burst"}
     "retry": {"max_attempts": 2, "backoff_s": 0.05, "backoff_max_s": 1.0, "budget_ratio": 0.2}}

Where the policies are kept and who reads them: ``coordinator.state.balancing``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from coordinator.commands.base import (
    DomainCommand,
    check_int,
    check_known,
    check_number,
    check_object,
    check_str,
    invalid,
)

STRATEGY_NAMES = ("round_robin", "weighted_round_robin", "least_connections", "response_time", "consistent_hash")
HEALTH_CHECK_KINDS = ("none", "http", "tcp")
POLICY_FIELDS = ("strategy", "path", "timeout_s", "health_check", "breaker", "rate_limit", "retry")
MIN_TIMEOUT_S = 0.01  # a request's timeout: the policy's default, or what a caller asks for
MAX_TIMEOUT_S = 300.0
MAX_PATH_LEN = 512
MAX_RATE = 1_000_000.0

_SECTIONS: dict[str, dict[str, tuple[str, float, float, Any]]] = {
    # field: (kind, low, high, default); kind "int" | "number"
    "health_check": {
        "interval_s": ("number", 0.1, 3600.0, 5.0),
        "timeout_s": ("number", 0.01, 60.0, 2.0),
        "healthy_after": ("int", 1, 100, 2),
        "unhealthy_after": ("int", 1, 100, 3),
    },
    "breaker": {
        "window_s": ("number", 0.1, 3600.0, 10.0),
        "min_requests": ("int", 1, 1_000_000, 10),
        "failure_rate": ("number", 0.01, 1.0, 0.5),
        "consecutive_failures": ("int", 1, 1_000_000, 5),
        "open_s": ("number", 0.01, 3600.0, 5.0),
        "half_open_probes": ("int", 1, 1000, 1),
        "successes_to_close": ("int", 1, 1000, 1),
    },
    "retry": {
        "max_attempts": ("int", 1, 10, 2),
        "backoff_s": ("number", 0.0, 60.0, 0.05),
        "backoff_max_s": ("number", 0.0, 600.0, 1.0),
        "budget_ratio": ("number", 0.0, 1.0, 0.2),
    },
}


def _section(value: Any, name: str) -> dict[str, Any]:
    raw = check_object({} if value is None else value, name)
    spec = _SECTIONS[name]
    extra = ("kind", "path") if name == "health_check" else ()
    check_known(raw, name, (*extra, *spec))
    out: dict[str, Any] = {}
    for field, (kind, low, high, default) in spec.items():
        given = raw.get(field, default)
        where = f"{name}.{field}"
        out[field] = check_int(given, where, int(low), int(high)) if kind == "int" else \
            check_number(given, where, low, high)
    return out


def _path(value: Any, field: str) -> str:
    path = check_str(value, field, MAX_PATH_LEN)
    if not path.startswith("/"):
        raise invalid(field, "must start with /")
    return path


def _bucket(value: Any, field: str) -> dict[str, float] | None:
    if value is None:
        return None
    bucket = check_object(value, field)
    check_known(bucket, field, ("rate", "burst"))
    rate = check_number(bucket.get("rate"), f"{field}.rate", 0.001, MAX_RATE)
    burst = check_number(bucket.get("burst", max(1.0, rate)), f"{field}.burst", 1.0, MAX_RATE)
    return {"rate": rate, "burst": burst}


def normalize_policy(value: Any) -> dict[str, Any]:
    """A checked policy with every default filled; ``Rejected`` naming the field."""
    policy = check_object({} if value is None else value, "policy")
    check_known(policy, "", POLICY_FIELDS)
    strategy = policy.get("strategy", "round_robin")
    if strategy not in STRATEGY_NAMES:
        raise invalid("strategy", f"must be one of {', '.join(STRATEGY_NAMES)}")
    health = _section(policy.get("health_check"), "health_check")
    raw_health = policy.get("health_check") or {}
    kind = raw_health.get("kind", "none")
    if kind not in HEALTH_CHECK_KINDS:
        raise invalid("health_check.kind", f"must be one of {', '.join(HEALTH_CHECK_KINDS)}")
    health["kind"] = kind
    health["path"] = _path(raw_health.get("path", "/health"), "health_check.path")
    if health["timeout_s"] > health["interval_s"]:
        raise invalid("health_check.timeout_s", "must not exceed interval_s")
    retry = _section(policy.get("retry"), "retry")
    if retry["backoff_max_s"] < retry["backoff_s"]:
        raise invalid("retry.backoff_max_s", "must not be below backoff_s")
    breaker = _section(policy.get("breaker"), "breaker")
    limits = check_object({} if policy.get("rate_limit") is None else policy["rate_limit"], "rate_limit")
    check_known(limits, "rate_limit", ("per_caller", "per_type"))
    return {
        "strategy": strategy,
        "path": _path(policy.get("path", "/invoke"), "path"),
        "timeout_s": check_number(policy.get("timeout_s", 30.0), "timeout_s", MIN_TIMEOUT_S, MAX_TIMEOUT_S),
        "health_check": health,
        "breaker": breaker,
        "rate_limit": {"per_caller": _bucket(limits.get("per_caller"), "rate_limit.per_caller"),
                       "per_type": _bucket(limits.get("per_type"), "rate_limit.per_type")},
        "retry": retry,
    }


DEFAULT_POLICY = normalize_policy({})


def check_type(value: Any) -> str:
    """An agent type, named ``type``. The API checks a path's type with it
    before reading the body (and for reads), then the parse checks it again."""
    return check_str(value, "type")


@dataclass(frozen=True, slots=True)
class ServiceConfigure(DomainCommand):
    """Commit the balancing policy of agent type ``type``. The log carries the
    policy as the caller wrote it (``policy``); the state keeps it checked,
    with its defaults filled (``normalized``, which follows from it and is
    left out of ``==``)."""

    op: ClassVar[str] = "service.configure"
    type: str
    policy: dict[str, Any] | None  # None: every default
    normalized: dict[str, Any] = dataclasses.field(compare=False, repr=False)

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        agent_type = check_type(args.get("type"))
        policy = args.get("policy")
        return cls(agent_type, policy, normalize_policy(policy))

    @classmethod
    def of(cls, agent_type: Any, policy: Any) -> Self:
        """The command configuring ``policy``; ``Rejected`` naming its first bad field."""
        return cls.parse({"type": agent_type, "policy": policy})

    def to_args(self) -> dict[str, Any]:
        return {"type": self.type, "policy": self.policy}


@dataclass(frozen=True, slots=True)
class ServiceRemove(DomainCommand):
    """Drop the policy of agent type ``type`` (refused by the state when it has none)."""

    op: ClassVar[str] = "service.remove"
    type: str

    @classmethod
    def parse(cls, args: Mapping[str, Any]) -> Self:
        return cls(check_type(args.get("type")))

    def to_args(self) -> dict[str, Any]:
        return {"type": self.type}
