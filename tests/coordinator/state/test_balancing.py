"""Balancing policies (coordinator/commands/balancer.py, kept by
coordinator/state/balancing.py) and the ``agent.update``
operation of the state machine: defaults, every validation error with the
field it names, configure/remove/of, snapshots, and refusals that change nothing.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from coordinator.codec import decode_snapshot, encode_snapshot
from coordinator.commands.balancer import (
    DEFAULT_POLICY,
    STRATEGY_NAMES,
    ServiceConfigure,
    ServiceRemove,
    normalize_policy,
)
from coordinator.commands.base import Rejected
from coordinator.state import StateMachine
from coordinator.state.balancing import Policies
from coordinator.types import Command, Result

DEFAULTS = {
    "strategy": "round_robin",
    "path": "/invoke",
    "timeout_s": 30.0,
    "health_check": {"kind": "none", "path": "/health", "interval_s": 5.0, "timeout_s": 2.0,
                     "healthy_after": 2, "unhealthy_after": 3},
    "breaker": {"window_s": 10.0, "min_requests": 10, "failure_rate": 0.5, "consecutive_failures": 5,
                "open_s": 5.0, "half_open_probes": 1, "successes_to_close": 1},
    "rate_limit": {"per_caller": None, "per_type": None},
    "retry": {"max_attempts": 2, "backoff_s": 0.05, "backoff_max_s": 1.0, "budget_ratio": 0.2},
}


def refusal(value: Any) -> Rejected:
    with pytest.raises(Rejected) as caught:
        normalize_policy(value)
    assert caught.value.code == "invalid"
    return caught.value


# -- normalize_policy ---------------------------------------------------------------------------


@pytest.mark.parametrize("empty", [None, {}])
def test_an_empty_policy_is_every_default(empty: Any) -> None:
    assert normalize_policy(empty) == DEFAULTS
    assert DEFAULT_POLICY == DEFAULTS


def test_given_fields_are_kept_and_the_rest_defaulted() -> None:
    policy = normalize_policy({
        "strategy": "consistent_hash", "path": "/run", "timeout_s": 1.5,
        "health_check": {"kind": "http", "interval_s": 1, "timeout_s": 0.5},
        "breaker": {"open_s": 0.01},
        "rate_limit": {"per_caller": {"rate": 0.5}, "per_type": {"rate": 10, "burst": 20}},
        "retry": {"max_attempts": 3, "budget_ratio": 0},
    })
    assert (policy["strategy"], policy["path"], policy["timeout_s"]) == ("consistent_hash", "/run", 1.5)
    assert policy["health_check"] == {**DEFAULTS["health_check"], "kind": "http", "interval_s": 1, "timeout_s": 0.5}
    assert policy["breaker"] == {**DEFAULTS["breaker"], "open_s": 0.01}
    # A burst defaults to the rate, and never below one token.
    assert policy["rate_limit"] == {"per_caller": {"rate": 0.5, "burst": 1.0}, "per_type": {"rate": 10, "burst": 20}}
    assert policy["retry"] == {**DEFAULTS["retry"], "max_attempts": 3, "budget_ratio": 0}


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_strategy_is_accepted_and_normalizing_is_idempotent(strategy: str) -> None:
    policy = normalize_policy({"strategy": strategy, "health_check": {"kind": "tcp", "timeout_s": 5, "interval_s": 5},
                               "rate_limit": {"per_type": {"rate": 2}}})
    assert policy["strategy"] == strategy
    assert normalize_policy(copy.deepcopy(policy)) == policy


def test_bounds_are_inclusive() -> None:
    low = normalize_policy({"timeout_s": 0.01, "retry": {"max_attempts": 1, "backoff_s": 0, "backoff_max_s": 0},
                            "health_check": {"interval_s": 0.1, "timeout_s": 0.01, "healthy_after": 1}})
    high = normalize_policy({"timeout_s": 300, "retry": {"max_attempts": 10, "budget_ratio": 1},
                             "breaker": {"failure_rate": 1, "half_open_probes": 1000}})
    assert low["retry"]["max_attempts"] == 1 and high["retry"]["max_attempts"] == 10
    assert low["timeout_s"] == 0.01 and high["timeout_s"] == 300


BAD_POLICIES: list[tuple[Any, str]] = [
    ([], "policy"),
    ("round_robin", "policy"),
    ({1: "x"}, "policy"),
    ({"strategy": "random"}, "strategy"),
    ({"strategy": None}, "strategy"),
    ({"strategy": ["round_robin"]}, "strategy"),
    ({"strategi": "round_robin"}, "strategi"),
    ({"path": "invoke"}, "path"),
    ({"path": ""}, "path"),
    ({"path": "/" + "p" * 512}, "path"),
    ({"path": "/a\nb"}, "path"),
    ({"path": 5}, "path"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": 300.5}, "timeout_s"),
    ({"timeout_s": "5"}, "timeout_s"),
    ({"timeout_s": True}, "timeout_s"),
    ({"timeout_s": float("nan")}, "timeout_s"),
    ({"timeout_s": float("inf")}, "timeout_s"),
    ({"health_check": 5}, "health_check"),
    ({"health_check": []}, "health_check"),
    ({"health_check": {"kind": "udp"}}, "health_check.kind"),
    ({"health_check": {"kind": None}}, "health_check.kind"),
    ({"health_check": {"every_s": 1}}, "health_check.every_s"),
    ({"health_check": {"path": "health"}}, "health_check.path"),
    ({"health_check": {"interval_s": 0.05, "timeout_s": 0.01}}, "health_check.interval_s"),
    ({"health_check": {"interval_s": 3601}}, "health_check.interval_s"),
    ({"health_check": {"timeout_s": 0}}, "health_check.timeout_s"),
    ({"health_check": {"interval_s": 1, "timeout_s": 1.5}}, "health_check.timeout_s"),
    ({"health_check": {"healthy_after": 0}}, "health_check.healthy_after"),
    ({"health_check": {"healthy_after": 2.0}}, "health_check.healthy_after"),
    ({"health_check": {"unhealthy_after": 101}}, "health_check.unhealthy_after"),
    ({"breaker": "on"}, "breaker"),
    ({"breaker": {"threshold": 3}}, "breaker.threshold"),
    ({"breaker": {"window_s": 0}}, "breaker.window_s"),
    ({"breaker": {"min_requests": 0}}, "breaker.min_requests"),
    ({"breaker": {"failure_rate": 0}}, "breaker.failure_rate"),
    ({"breaker": {"failure_rate": 1.5}}, "breaker.failure_rate"),
    ({"breaker": {"consecutive_failures": 0}}, "breaker.consecutive_failures"),
    ({"breaker": {"consecutive_failures": True}}, "breaker.consecutive_failures"),
    ({"breaker": {"open_s": 0}}, "breaker.open_s"),
    ({"breaker": {"half_open_probes": 0}}, "breaker.half_open_probes"),
    ({"breaker": {"successes_to_close": 1001}}, "breaker.successes_to_close"),
    ({"rate_limit": []}, "rate_limit"),
    ({"rate_limit": False}, "rate_limit"),
    ({"rate_limit": {"global": {"rate": 1}}}, "rate_limit.global"),
    ({"rate_limit": {"per_caller": 5}}, "rate_limit.per_caller"),
    ({"rate_limit": {"per_caller": {}}}, "rate_limit.per_caller.rate"),
    ({"rate_limit": {"per_caller": {"rate": 0}}}, "rate_limit.per_caller.rate"),
    ({"rate_limit": {"per_type": {"rate": 1_000_001}}}, "rate_limit.per_type.rate"),
    ({"rate_limit": {"per_type": {"rate": 1, "burst": 0.5}}}, "rate_limit.per_type.burst"),
    ({"rate_limit": {"per_type": {"rate": 1, "burst": "2"}}}, "rate_limit.per_type.burst"),
    ({"rate_limit": {"per_type": {"rate": 1, "size": 2}}}, "rate_limit.per_type.size"),
    ({"retry": None, "timeout_s": -1}, "timeout_s"),
    ({"retry": 2}, "retry"),
    ({"retry": {"attempts": 2}}, "retry.attempts"),
    ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
    ({"retry": {"max_attempts": 11}}, "retry.max_attempts"),
    ({"retry": {"backoff_s": -0.1}}, "retry.backoff_s"),
    ({"retry": {"backoff_s": 61, "backoff_max_s": 100}}, "retry.backoff_s"),
    ({"retry": {"backoff_max_s": 601}}, "retry.backoff_max_s"),
    ({"retry": {"backoff_s": 2, "backoff_max_s": 1}}, "retry.backoff_max_s"),
    ({"retry": {"budget_ratio": 1.01}}, "retry.budget_ratio"),
]


@pytest.mark.parametrize(("policy", "field"), BAD_POLICIES, ids=[f for _, f in BAD_POLICIES])
def test_a_bad_policy_is_refused_naming_its_field(policy: Any, field: str) -> None:
    assert refusal(policy).message.startswith(f"{field}: "), refusal(policy).message


def test_a_health_timeout_equal_to_the_interval_is_accepted() -> None:
    check = normalize_policy({"health_check": {"interval_s": 1, "timeout_s": 1}})["health_check"]
    assert (check["interval_s"], check["timeout_s"]) == (1, 1)
    assert normalize_policy({"health_check": {"timeout_s": 3}})["health_check"]["timeout_s"] == 3


# -- Policies -------------------------------------------------------------------------------------


def test_policies_configure_of_and_remove() -> None:
    policies = Policies()
    assert policies.of("worker") == DEFAULTS
    answer = policies.configure(ServiceConfigure.of("worker", {"strategy": "least_connections"}))
    assert answer == {"type": "worker", "policy": {**DEFAULTS, "strategy": "least_connections"}}
    assert policies.of("worker")["strategy"] == "least_connections"
    assert policies.of("planner") == DEFAULTS  # other types keep the defaults
    # Configuring again replaces the whole policy: fields not given go back to defaults.
    policies.configure(ServiceConfigure.of("worker", {"path": "/run"}))
    assert policies.of("worker") == {**DEFAULTS, "path": "/run"}
    assert policies.remove(ServiceRemove("worker")) == {"type": "worker", "policy": DEFAULTS}
    assert policies.of("worker") == DEFAULTS
    with pytest.raises(Rejected) as caught:
        policies.remove(ServiceRemove("worker"))
    assert caught.value.code == "not_found" and "worker" in caught.value.message


@pytest.mark.parametrize(("args", "field"), [
    ({"policy": {}}, "type"),
    ({"type": "", "policy": {}}, "type"),
    ({"type": 5, "policy": {}}, "type"),
    ({"type": "t" * 257, "policy": {}}, "type"),
    ({"type": "worker", "policy": {"strategy": "x"}}, "strategy"),
    ({"type": "worker", "policy": 3}, "policy"),
])
def test_policies_configure_refuses_bad_arguments_and_keeps_the_old_policy(args: dict[str, Any], field: str) -> None:
    policies = Policies()
    policies.configure(ServiceConfigure.of("worker", {"strategy": "consistent_hash"}))
    before = copy.deepcopy(policies.to_data())
    with pytest.raises(Rejected) as caught:
        policies.configure(ServiceConfigure.parse(args))
    assert caught.value.code == "invalid" and caught.value.message.startswith(f"{field}: ")
    assert policies.to_data() == before


def test_policies_remove_needs_a_type() -> None:
    with pytest.raises(Rejected) as caught:
        Policies().remove(ServiceRemove.parse({}))
    assert caught.value.message.startswith("type: ")


# -- through the state machine ------------------------------------------------------------------


class Driver:
    """Applies commands at growing indexes with ``now_ms`` = 1000 x index."""

    def __init__(self) -> None:
        self.sm = StateMachine()
        self.last = 0

    def __call__(self, op: str, **args: Any) -> Result:
        self.last += 1
        return self.sm.apply(self.last, Command(op=op, args=args, now_ms=1_000 * self.last))

    def ok(self, op: str, **args: Any) -> Any:
        result = self(op, **args)
        assert result.error is None, result.error
        return result.value

    def refused(self, code: str, field: str | None, op: str, **args: Any) -> Result:
        before = self.state()
        result = self(op, **args)
        assert result.error is not None and result.error[0] == code, result
        if field is not None:
            assert result.error[1].startswith(f"{field}: "), result.error
        assert result.events == () and result.changes == ()
        assert self.state() == before
        return result

    def state(self) -> bytes:
        data = self.sm.snapshot_data()
        return encode_snapshot({k: v for k, v in data.items() if k not in ("applied_index", "now_ms")})


@pytest.fixture
def drive() -> Driver:
    return Driver()


def test_service_ops_through_the_machine(drive: Driver) -> None:
    value = drive.ok("service.configure", type="worker", policy={"strategy": "weighted_round_robin"})
    assert value == {"type": "worker", "policy": {**DEFAULTS, "strategy": "weighted_round_robin"}}
    assert drive.sm.policies.of("worker")["strategy"] == "weighted_round_robin"
    drive.refused("invalid", "breaker.open_s", "service.configure", type="worker", policy={"breaker": {"open_s": -1}})
    drive.refused("invalid", "type", "service.configure", policy={})
    assert drive.ok("service.remove", type="worker") == {"type": "worker", "policy": DEFAULTS}
    drive.refused("not_found", None, "service.remove", type="worker")
    drive.refused("invalid", "type", "service.remove")


def test_snapshot_round_trip_keeps_policies(drive: Driver) -> None:
    drive.ok("service.configure", type="worker", policy={
        "strategy": "consistent_hash", "rate_limit": {"per_caller": {"rate": 2, "burst": 4}},
        "health_check": {"kind": "http", "interval_s": 1, "timeout_s": 0.5}})
    drive.ok("service.configure", type="planner", policy={"retry": {"max_attempts": 5}})
    data = drive.sm.snapshot_data()
    restored = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(data)))
    assert restored.policies.to_data() == drive.sm.policies.to_data()
    assert restored.policies.of("worker") == drive.sm.policies.of("worker")
    assert restored.policies.of("other") == DEFAULTS
    assert encode_snapshot(restored.snapshot_data()) == encode_snapshot(data)
    # The same commands after the snapshot give the same results on both.
    command = Command(op="service.remove", args={"type": "planner"}, now_ms=9_000)
    assert restored.apply(drive.last + 1, command) == drive.sm.apply(drive.last + 1, command)
    assert restored.policies.to_data() == drive.sm.policies.to_data()


def test_a_snapshot_from_before_policies_restores_with_defaults(drive: Driver) -> None:
    drive.ok("kv.put", key="k", value=1)
    data = drive.sm.snapshot_data()
    del data["policies"]
    restored = StateMachine.from_snapshot_data(data)
    assert restored.policies.policies == {} and restored.policies.of("worker") == DEFAULTS


# -- agent.update ---------------------------------------------------------------------------------


def register(drive: Driver, agent_id: str = "w1") -> dict[str, Any]:
    drive.ok("agent.register", id=agent_id, type="worker", ttl_ms=5_000, metadata={"v": 1},
             endpoint="http://127.0.0.1:1", weight=2)
    drive.ok("agent.health", id=agent_id, health="healthy")
    return drive.sm.registry.agents[agent_id].describe()


@pytest.mark.parametrize("change", [
    {"weight": 7},
    {"endpoint": "http://10.0.0.1:8080"},
    {"metadata": {"v": 2, "zone": "b"}},
    {"metadata": {}},
    {"weight": 1_000_000, "endpoint": "h:1", "metadata": {"x": [1]}},
])
def test_agent_update_changes_only_what_is_given_and_keeps_the_lease(drive: Driver, change: dict[str, Any]) -> None:
    before = register(drive)
    result = drive("agent.update", id="w1", **change)
    assert result.error is None, result.error
    after = drive.sm.registry.agents["w1"].describe()
    assert after == {**before, **change}
    assert result.value == after
    assert after["lease_id"] == before["lease_id"] and after["health"] == "healthy"
    assert [(e.type, e.data) for e in result.events] == [("agent.updated", {
        "agentId": "w1", "agentType": "worker", "metadata": after["metadata"], "lease_id": before["lease_id"],
        "weight": after["weight"]})]
    assert result.changes == ()


def test_agent_update_survives_a_snapshot(drive: Driver) -> None:
    register(drive)
    drive.ok("agent.update", id="w1", weight=9, endpoint="h:2")
    restored = StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(drive.sm.snapshot_data())))
    agent = restored.registry.agents["w1"]
    assert (agent.weight, agent.endpoint) == (9, "h:2")


@pytest.mark.parametrize(("args", "field"), [
    # nothing to change: names the body, as the API always answered (the state named weight before the commands)
    ({"id": "w1"}, "body"),
    ({"id": "w1", "weight": None, "endpoint": None, "metadata": None}, "body"),
    ({}, "id"),
    ({"id": ""}, "id"),
    ({"id": 7, "weight": 1}, "id"),
    ({"id": "w1", "weight": 0}, "weight"),
    ({"id": "w1", "weight": -1}, "weight"),
    ({"id": "w1", "weight": 1_000_001}, "weight"),
    ({"id": "w1", "weight": 1.5}, "weight"),
    ({"id": "w1", "weight": "3"}, "weight"),
    ({"id": "w1", "weight": True}, "weight"),
    ({"id": "w1", "endpoint": ""}, "endpoint"),
    ({"id": "w1", "endpoint": 80}, "endpoint"),
    ({"id": "w1", "endpoint": "h" * 2049}, "endpoint"),
    ({"id": "w1", "endpoint": "h:1\n"}, "endpoint"),
    ({"id": "w1", "metadata": [1]}, "metadata"),
    ({"id": "w1", "metadata": "x"}, "metadata"),
    ({"id": "w1", "metadata": {1: "x"}}, "metadata"),
    # One bad field refuses the whole update: the good one is not applied either.
    ({"id": "w1", "weight": 3, "endpoint": ""}, "endpoint"),
    ({"id": "w1", "endpoint": "h:9", "metadata": 1}, "metadata"),
    ({"id": "w1", "metadata": {"ok": 1}, "weight": 0}, "weight"),
])
def test_agent_update_refuses_bad_values_naming_the_field(drive: Driver, args: dict[str, Any], field: str) -> None:
    register(drive)
    drive.refused("invalid", field, "agent.update", **args)


def test_agent_update_of_an_unknown_agent_is_not_found(drive: Driver) -> None:
    register(drive)
    result = drive.refused("not_found", None, "agent.update", id="ghost", weight=2)
    assert "ghost" in result.error[1]
    # Bad values are refused as invalid before the agent is looked up.
    drive.refused("invalid", "weight", "agent.update", id="ghost", weight=0)
