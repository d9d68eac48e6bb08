"""The commands of the balancer's replicated config (service.configure,
service.remove): one parse for the API and for apply, naming the field it refuses.

Every check of a policy's fields, with its defaults, is in
tests/coordinator/state/test_balancing.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.balancer import (
    DEFAULT_POLICY,
    HEALTH_CHECK_KINDS,
    MAX_TIMEOUT_S,
    MIN_TIMEOUT_S,
    POLICY_FIELDS,
    STRATEGY_NAMES,
    ServiceConfigure,
    ServiceRemove,
    normalize_policy,
)
from coordinator.state import StateMachine
from coordinator.types import Command
from tests.coordinator.commands.refusals import refused_alike

names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
                min_size=1, max_size=12)
buckets = st.none() | st.fixed_dictionaries({"rate": st.floats(0.001, 1000.0)},
                                            optional={"burst": st.floats(1000.0, 1_000_000.0)})
policies = st.none() | st.fixed_dictionaries({}, optional={
    "strategy": st.sampled_from(STRATEGY_NAMES),
    "path": st.from_regex(r"/[a-z]{0,8}", fullmatch=True),
    "timeout_s": st.floats(MIN_TIMEOUT_S, MAX_TIMEOUT_S),
    "health_check": st.fixed_dictionaries({}, optional={"kind": st.sampled_from(HEALTH_CHECK_KINDS),
                                                        "healthy_after": st.integers(1, 100)}),
    "breaker": st.fixed_dictionaries({}, optional={"failure_rate": st.floats(0.01, 1.0)}),
    "rate_limit": st.fixed_dictionaries({}, optional={"per_caller": buckets, "per_type": buckets}),
    "retry": st.fixed_dictionaries({}, optional={"max_attempts": st.integers(1, 10)}),
})
balancer_commands = st.one_of(
    st.builds(ServiceConfigure.of, names, policies),
    st.builds(ServiceRemove, names),
)


@given(balancer_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    parsed = type(command).parse(command.to_args())
    assert parsed == command
    assert COMMANDS[command.op] is type(command)
    if isinstance(command, ServiceConfigure):  # left out of ==: it follows from the policy
        assert parsed.normalized == command.normalized == normalize_policy(command.policy)


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    """The dicts the API proposed before the command types: the policy as the caller wrote it."""
    policy = {"strategy": "least_connections"}
    assert list(ServiceConfigure.of("worker", policy).to_args().items()) == [("type", "worker"),
                                                                             ("policy", policy)]
    assert ServiceConfigure.of("worker", {}).normalized == DEFAULT_POLICY
    assert ServiceRemove("worker").to_args() == {"type": "worker"}


# (op, args, the refusal): the same messages as the handlers' before the command types
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("service.configure", {"policy": {}}, "type: must be a string"),
    ("service.configure", {"type": "", "policy": {}}, "type: must have 1 to 256 characters"),
    ("service.configure", {"type": "t" * 257, "policy": {}}, "type: must have 1 to 256 characters"),
    ("service.configure", {"type": "w", "policy": 3}, "policy: must be an object with string keys"),
    ("service.configure", {"type": "w", "policy": {"strategy": "x"}},
     f"strategy: must be one of {', '.join(STRATEGY_NAMES)}"),
    ("service.configure", {"type": "w", "policy": {"colour": "red"}},
     f"colour: unknown field (allowed: {', '.join(POLICY_FIELDS)})"),
    ("service.configure", {"type": "w", "policy": {"timeout_s": MAX_TIMEOUT_S + 1}},
     f"timeout_s: must be between {MIN_TIMEOUT_S} and {MAX_TIMEOUT_S}"),
    ("service.configure", {"type": "w", "policy": {"breaker": {"open_s": -1}}},
     "breaker.open_s: must be between 0.01 and 3600.0"),
    ("service.configure", {"type": "w", "policy": {"health_check": {"kind": "udp"}}},
     "health_check.kind: must be one of none, http, tcp"),
    ("service.configure", {"type": "w", "policy": {"rate_limit": {"per_caller": {"burst": 2}}}},
     "rate_limit.per_caller.rate: must be a finite number"),
    ("service.remove", {}, "type: must be a string"),
    ("service.remove", {"type": "a\x00b"}, "type: must not contain control characters"),
]


@pytest.mark.parametrize(("op", "args", "message"), BAD, ids=[f"{op} {m[:40]}" for op, _, m in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], message: str) -> None:
    assert refused_alike(op, args) == message


def test_removing_a_type_without_a_policy_is_the_states_refusal() -> None:
    command = ServiceRemove.parse({"type": "worker"})
    result = StateMachine().apply(1, Command(op=command.op, args=command.to_args(), now_ms=1_000))
    assert result.error == ("not_found", "agent type 'worker' has no policy")
