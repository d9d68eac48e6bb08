"""Bus message validation: defaults filled in, every bad field named."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.commands.messages import GUARANTEES, TYPES, normalize
from coordinator.state.base import Rejected

NOW = 1_700_000_000_000
GOOD = {"id": "m-1", "type": "event", "source": "agent-7", "payload": {"n": 1}}


def test_defaults() -> None:
    message = normalize(GOOD, NOW)
    assert message["timestamp"] == NOW and message["priority"] == 5 and message["destination"] == []
    assert message["deliveryOptions"] == {
        "guarantee": "at-least-once", "timeout": 30_000, "persistent": True,
        "retry": {"max_attempts": 5, "backoff_ms": 1000, "backoff_multiplier": 2.0, "max_backoff_ms": 60_000}}
    assert normalize(message, NOW + 5) == message  # normalising twice changes nothing


def test_everything_given() -> None:
    raw = {**GOOD, "type": "request", "destination": ["a1", "a2"], "timestamp": 5, "correlationId": "c-9",
           "replyTo": "replies.agent-7", "priority": "critical", "ttl": 60_000, "headers": {"region": "eu"},
           "deliveryOptions": {"guarantee": "exactly-once", "retry": {"max_attempts": 3, "backoff_ms": 10},
                               "timeout": 500}}
    message = normalize(raw, NOW)
    assert message["priority"] == 9 and message["timestamp"] == 5 and message["ttl"] == 60_000
    assert message["deliveryOptions"]["guarantee"] == "exactly-once"
    assert message["deliveryOptions"]["retry"]["max_attempts"] == 3


def _with(path: str, value: object) -> dict:
    raw = copy.deepcopy(GOOD)
    target = raw
    *parents, last = path.split(".")
    for name in parents:
        target = target.setdefault(name, {})
    target[last] = value
    return raw


@pytest.mark.parametrize(("raw", "field"), [
    ([], "message"),
    ({"type": "event", "source": "a"}, "id"),
    (_with("id", ""), "id"),
    (_with("id", 7), "id"),
    (_with("type", "shout"), "type"),
    (_with("source", None), "source"),
    (_with("destination", "a1"), "destination"),
    (_with("destination", ["ok", 3]), "destination[1]"),
    (_with("priority", 10), "priority"),
    (_with("priority", "urgent"), "priority"),
    (_with("priority", True), "priority"),
    (_with("ttl", 0), "ttl"),
    (_with("ttl", "1m"), "ttl"),
    (_with("headers", {"region": 3}), "headers.region"),
    (_with("headers", ["x"]), "headers"),
    (_with("replyTo", "bad topic"), "replyTo"),
    (_with("type", "request"), "replyTo"),
    (_with("type", "response"), "correlationId"),
    (_with("timestamp", -1), "timestamp"),
    (_with("surprise", 1), "surprise"),
    (_with("deliveryOptions.guarantee", "twice"), "deliveryOptions.guarantee"),
    (_with("deliveryOptions.timeout", 5), "deliveryOptions.timeout"),
    (_with("deliveryOptions.persistent", "yes"), "deliveryOptions.persistent"),
    (_with("deliveryOptions.persistent", False), "deliveryOptions.persistent"),
    (_with("deliveryOptions.retry.max_attempts", 0), "deliveryOptions.retry.max_attempts"),
    (_with("deliveryOptions.retry.backoff_multiplier", 0.5), "deliveryOptions.retry.backoff_multiplier"),
    (_with("deliveryOptions.retry.extra", 1), "deliveryOptions.retry.extra"),
])
def test_a_bad_field_is_named(raw: object, field: str) -> None:
    with pytest.raises(Rejected) as refused:
        normalize(raw, NOW)
    assert refused.value.code == "invalid"
    assert refused.value.message.split(":")[0] == field


def test_at_most_once_may_be_transient() -> None:
    message = normalize(_with("deliveryOptions.guarantee", "at-most-once"), NOW)
    assert message["deliveryOptions"]["persistent"] is False


messages = st.fixed_dictionaries(
    {"id": st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
     "type": st.sampled_from([t for t in TYPES if t not in ("request", "response")]),
     "source": st.sampled_from(["a", "agent-1"])},
    optional={"priority": st.integers(0, 9), "ttl": st.integers(1, 10_000),
              "headers": st.dictionaries(st.sampled_from(["k", "region"]), st.text(max_size=5), max_size=2),
              "payload": st.recursive(st.none() | st.integers() | st.text(max_size=5),
                                      lambda inner: st.lists(inner, max_size=3), max_leaves=5),
              "deliveryOptions": st.fixed_dictionaries({}, optional={"guarantee": st.sampled_from(GUARANTEES)})})


@settings(max_examples=300, deadline=None)
@given(messages)
def test_valid_messages_are_accepted_and_normal_forms_are_fixed_points(raw: dict) -> None:
    message = normalize(raw, NOW)
    assert normalize(message, NOW) == message
    assert message["payload"] == raw.get("payload")


def test_a_message_without_delivery_options_gets_the_same_defaults_as_an_empty_object() -> None:
    """The defaults are filled in without checking them one by one; they
    must be what checking ``{}`` gives, in the same order (the log's bytes)."""
    bare = normalize({"id": "m", "type": "event", "source": "s"}, 1)
    empty = normalize({"id": "m", "type": "event", "source": "s", "deliveryOptions": {}}, 1)
    assert list(bare["deliveryOptions"].items()) == list(empty["deliveryOptions"].items())
    assert list(bare["deliveryOptions"]["retry"].items()) == list(empty["deliveryOptions"]["retry"].items())
    assert type(bare["deliveryOptions"]["retry"]["backoff_multiplier"]) is float
    assert bare["deliveryOptions"] is not normalize({"id": "n", "type": "event", "source": "s"}, 1)["deliveryOptions"]
