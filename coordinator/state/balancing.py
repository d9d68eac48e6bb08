"""How requests to each agent type are balanced: a replicated policy per
type (pure). Every node reads the same policy; what it measures (load,
latency, circuit breakers, rate buckets) stays on the node.

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
"""

from __future__ import annotations

from typing import Any

from coordinator.state.base import Rejected, check_int, check_known, check_number, check_object, check_str, invalid

STRATEGY_NAMES = ("round_robin", "weighted_round_robin", "least_connections", "response_time", "consistent_hash")
HEALTH_CHECK_KINDS = ("none", "http", "tcp")
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
    check_known(policy, "", ("strategy", "path", "timeout_s", "health_check", "breaker", "rate_limit", "retry"))
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
        "timeout_s": check_number(policy.get("timeout_s", 30.0), "timeout_s", 0.01, MAX_TIMEOUT_S),
        "health_check": health,
        "breaker": breaker,
        "rate_limit": {"per_caller": _bucket(limits.get("per_caller"), "rate_limit.per_caller"),
                       "per_type": _bucket(limits.get("per_type"), "rate_limit.per_type")},
        "retry": retry,
    }


DEFAULT_POLICY = normalize_policy({})


class Policies:
    """The policy of each agent type that has one (others use ``DEFAULT_POLICY``)."""

    def __init__(self) -> None:
        self.policies: dict[str, dict[str, Any]] = {}

    def of(self, agent_type: str) -> dict[str, Any]:
        return self.policies.get(agent_type, DEFAULT_POLICY)

    def configure(self, args: dict[str, Any]) -> dict[str, Any]:
        agent_type = check_str(args.get("type"), "type")
        policy = normalize_policy(args.get("policy"))
        self.policies[agent_type] = policy
        return {"type": agent_type, "policy": policy}

    def remove(self, args: dict[str, Any]) -> dict[str, Any]:
        agent_type = check_str(args.get("type"), "type")
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
