"""The agent commands: one parse for the API and for apply, naming the field it refuses."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.agents import (
    HEALTH_STATES,
    MAX_ENDPOINT_LEN,
    MAX_WEIGHT,
    AgentAlive,
    AgentDeregister,
    AgentExpire,
    AgentHealth,
    AgentRegister,
    AgentSuspect,
    AgentUpdate,
)
from coordinator.commands.base import MAX_TOKEN, MAX_TTL_MS, MIN_TTL_MS
from coordinator.state import StateMachine
from coordinator.types import Command
from tests.coordinator.commands.refusals import refused_alike

KEY = base64.b64encode(b"k" * 32).decode()
names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
                min_size=1, max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
metadata = st.dictionaries(st.text(max_size=6), json_values, max_size=3)
weights = st.integers(1, MAX_WEIGHT)
keys = st.binary(min_size=32, max_size=32).map(lambda raw: base64.b64encode(raw).decode())
agent_commands = st.one_of(
    st.builds(AgentRegister, names, names, st.integers(MIN_TTL_MS, MAX_TTL_MS), metadata, st.none() | names,
              st.none() | weights, st.none() | keys),
    st.builds(AgentUpdate, names, weights, st.none() | names, st.none() | metadata),
    st.builds(AgentUpdate, names, st.none(), names, st.none() | metadata),
    st.builds(AgentUpdate, names, st.none(), st.none(), metadata),
    st.builds(AgentDeregister, names),
    st.builds(AgentExpire, names, st.integers(0, MAX_TOKEN)),
    st.builds(AgentSuspect, names, st.integers(0, MAX_TOKEN)),
    st.builds(AgentAlive, names, st.integers(0, MAX_TOKEN)),
    st.builds(AgentHealth, names, st.sampled_from(HEALTH_STATES), st.none() | names),
)


@given(agent_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    assert type(command).parse(command.to_args()) == command
    assert COMMANDS[command.op] is type(command)


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    """The dicts the API and the leader proposed before the command types: the
    optional fields only when given."""
    full = AgentRegister("w1", "worker", 5_000, {"z": 1}, "h:1", 3, KEY)
    assert list(full.to_args().items()) == [("id", "w1"), ("type", "worker"), ("metadata", {"z": 1}),
                                            ("ttl_ms", 5_000), ("endpoint", "h:1"), ("weight", 3),
                                            ("public_key", KEY)]
    assert list(AgentRegister("w1", "worker", 5_000).to_args()) == ["id", "type", "metadata", "ttl_ms"]
    assert list(AgentUpdate("w1", 2, "h:1", {}).to_args()) == ["id", "weight", "endpoint", "metadata"]
    assert AgentUpdate("w1", metadata={}).to_args() == {"id": "w1", "metadata": {}}
    assert AgentDeregister("w1").to_args() == {"id": "w1"}
    assert list(AgentExpire("w1", 7).to_args().items()) == [("id", "w1"), ("lease_id", 7)]
    assert list(AgentHealth("w1", "healthy", "reported by the agent").to_args()) == ["id", "health", "reason"]
    assert AgentHealth("w1", "unknown").to_args() == {"id": "w1", "health": "unknown"}


def test_absent_and_null_optional_fields_are_not_given() -> None:
    assert AgentRegister.parse({"id": "w1", "type": "t", "ttl_ms": 1_000, "endpoint": None, "weight": None,
                                "public_key": None}) == AgentRegister("w1", "t", 1_000)
    assert AgentUpdate.parse({"id": "w1", "weight": None, "metadata": {}}) == AgentUpdate("w1", metadata={})
    assert AgentHealth.parse({"id": "w1", "health": "healthy", "reason": None}) == AgentHealth("w1", "healthy")


# (op, args, the refusal now, the state machine's refusal before the command types
# when it differed: the API's answer was kept, and the API never logged such args)
BAD: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("agent.register", {"type": "t", "ttl_ms": 5_000}, "id: must be a string", None),
    ("agent.register", {"id": "", "type": "t", "ttl_ms": 5_000}, "id: must have 1 to 256 characters", None),
    ("agent.register", {"id": "w1", "ttl_ms": 5_000}, "type: must be a string", None),
    ("agent.register", {"id": "w1", "type": "t\n", "ttl_ms": 5_000}, "type: must not contain control characters",
     None),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000, "metadata": [1]}, "metadata: must be an object",
     "metadata: must be an object with string keys"),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000, "metadata": None}, "metadata: must be an object",
     "accepted as {}"),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000, "metadata": {1: 2}},
     "metadata: must be an object with string keys", None),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 999}, "ttl_ms: must be between 1000 and 86400000", None),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000.0}, "ttl_ms: must be an integer", None),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000, "endpoint": ""},
     f"endpoint: must have 1 to {MAX_ENDPOINT_LEN} characters", None),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000, "endpoint": "h" * (MAX_ENDPOINT_LEN + 1)},
     f"endpoint: must have 1 to {MAX_ENDPOINT_LEN} characters", None),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000, "weight": 0},
     f"weight: must be between 1 and {MAX_WEIGHT}", None),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000, "weight": True}, "weight: must be an integer", None),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000, "public_key": "not base64!"},
     "public_key: must be base64", None),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000, "public_key": "k" * 65},
     "public_key: must have 1 to 64 characters", None),
    ("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000, "public_key": base64.b64encode(b"k").decode()},
     "public_key: must be an Ed25519 public key (32 bytes)", None),
    # the first bad field, in the order the state always checked them
    ("agent.register", {"id": "w1", "type": 1, "ttl_ms": 1, "weight": 0}, "type: must be a string", None),
    ("agent.update", {"id": "w1"}, "body: give at least one of weight, endpoint and metadata",
     "weight: give at least one of weight, endpoint and metadata"),
    ("agent.update", {"id": "w1", "weight": None, "endpoint": None, "metadata": None},
     "body: give at least one of weight, endpoint and metadata",
     "weight: give at least one of weight, endpoint and metadata"),
    ("agent.update", {"weight": 2}, "id: must be a string", None),
    ("agent.update", {"id": "w1", "weight": MAX_WEIGHT + 1}, f"weight: must be between 1 and {MAX_WEIGHT}", None),
    ("agent.update", {"id": "w1", "endpoint": 80}, "endpoint: must be a string", None),
    ("agent.update", {"id": "w1", "metadata": "x"}, "metadata: must be an object",
     "metadata: must be an object with string keys"),
    ("agent.update", {"id": "w1", "weight": 0, "metadata": "x"}, f"weight: must be between 1 and {MAX_WEIGHT}", None),
    ("agent.deregister", {"id": 1}, "id: must be a string", None),
    ("agent.expire", {"id": "w1"}, "lease_id: must be an integer", None),
    ("agent.expire", {"id": "w1", "lease_id": "3"}, "lease_id: must be an integer", None),
    ("agent.expire", {"id": "w1", "lease_id": -1}, f"lease_id: must be between 0 and {MAX_TOKEN}", None),
    ("agent.suspect", {"id": "w1"}, "lease_id: must be an integer", None),
    ("agent.suspect", {"lease_id": 1}, "id: must be a string", None),
    ("agent.alive", {"id": "w1", "lease_id": -1}, f"lease_id: must be between 0 and {MAX_TOKEN}", None),
    ("agent.alive", {"id": "w1", "lease_id": True}, "lease_id: must be an integer", None),
    ("agent.health", {"id": "w1", "health": "sick"}, "health: must be one of healthy, unhealthy, unknown", None),
    ("agent.health", {"id": "w1"}, "health: must be a string", None),
    ("agent.health", {"id": "w1", "health": "h" * 17}, "health: must have 1 to 16 characters", None),
    ("agent.health", {"id": "w1", "health": "healthy", "reason": ""}, "reason: must have 1 to 512 characters", None),
]


@pytest.mark.parametrize(("op", "args", "message", "before"), BAD, ids=[f"{op} {m[:40]}" for op, _, m, _ in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], message: str,
                                                        before: str | None) -> None:
    """``before``: what the state answered before the parse was the one check."""
    assert refused_alike(op, args, setup=[("agent.register", {"id": "w1", "type": "t", "ttl_ms": 5_000})]) == message


def test_the_states_checks_stay_in_the_handlers() -> None:
    """Not the parse's: an unknown agent, the registry's and the metadata's limits."""
    sm = StateMachine()
    assert AgentDeregister.parse({"id": "nobody"}) == AgentDeregister("nobody")
    result = sm.apply(1, Command(op="agent.deregister", args={"id": "nobody"}, now_ms=1_000))
    assert result.error == ("not_found", "agent 'nobody' is not registered")
    result = sm.apply(2, Command(op="agent.register", now_ms=1_000, args={
        "id": "w1", "type": "t", "ttl_ms": 5_000, "metadata": {"x": "y" * (sm.limits.agent_metadata_bytes_max + 1)}}))
    assert result.error is not None and result.error[0] == "too_large"


def test_suspect_and_alive_change_only_the_lease_they_name_and_only_on_change() -> None:
    sm = StateMachine()
    register = {"id": "w1", "type": "t", "ttl_ms": 5_000}
    assert sm.apply(1, Command(op="agent.register", args=register, now_ms=1_000)).error is None
    stale = sm.apply(2, Command(op="agent.suspect", args={"id": "w1", "lease_id": 99}, now_ms=1_000))
    assert stale.value == {"changed": False} and stale.events == ()
    suspected = sm.apply(3, Command(op="agent.suspect", args={"id": "w1", "lease_id": 1}, now_ms=1_000))
    assert suspected.value == {"changed": True, "liveness": "suspect"}
    assert [e.type for e in suspected.events] == ["agent.suspected"]
    assert sm.registry.agents["w1"].liveness == "suspect"
    again = sm.apply(4, Command(op="agent.suspect", args={"id": "w1", "lease_id": 1}, now_ms=1_000))
    assert again.value == {"changed": False} and again.events == ()
    restored = StateMachine.from_snapshot_data(sm.snapshot_data())
    assert restored.registry.agents["w1"].liveness == "suspect"
    recovered = sm.apply(5, Command(op="agent.alive", args={"id": "w1", "lease_id": 1}, now_ms=1_000))
    assert [e.type for e in recovered.events] == ["agent.recovered"]
    assert sm.registry.agents["w1"].liveness == "alive"
    assert sm.registry.agents["w1"].to_data()[-1] is None  # an alive agent's row is the row it always was
    sm.apply(6, Command(op="agent.suspect", args={"id": "w1", "lease_id": 1}, now_ms=1_000))
    sm.apply(7, Command(op="agent.register", args=register, now_ms=1_000))  # a new lease starts alive
    assert sm.registry.agents["w1"].liveness == "alive"
    late = sm.apply(8, Command(op="agent.alive", args={"id": "w1", "lease_id": 1}, now_ms=1_000))
    assert late.value == {"changed": False}
    gone = sm.apply(9, Command(op="agent.suspect", args={"id": "nobody", "lease_id": 1}, now_ms=1_000))
    assert gone.value == {"changed": False}
