"""The bus commands: one parse for the API and for apply, naming the field it refuses."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.commands import COMMANDS
from coordinator.commands.base import Rejected
from coordinator.commands.bus import (
    MAX_ACK_IDS,
    MAX_BACKLOG,
    MAX_BATCH,
    MAX_DELAY_MS,
    MAX_FETCH,
    MAX_OFFSET,
    MAX_RETAINED_AGE_MS,
    MAX_RETAINED_MESSAGES,
    MIN_RETAINED_AGE_MS,
    START_KINDS,
    URL_HINT,
    BusAck,
    BusBind,
    BusCursor,
    BusDeliver,
    BusDlqPurge,
    BusDlqRedrive,
    BusGroupDelete,
    BusNack,
    BusPublish,
    BusSubscribe,
    BusTick,
    BusTopicConfigure,
    BusTransportAck,
    BusTransportCheckpoint,
    BusTransportConfigure,
    BusUnbind,
    BusUnsubscribe,
    check_publication,
)
from coordinator.commands.messages import GUARANTEES, normalize
from coordinator.state import StateMachine
from coordinator.types import Command
from tests.coordinator.commands.refusals import refused_alike

tokens = st.text("abcXYZ019-_:@", min_size=1, max_size=6)
topics = st.lists(tokens, min_size=1, max_size=3).map(".".join).filter(lambda t: not t.startswith("task."))
patterns = st.lists(tokens | st.just("*"), min_size=1, max_size=3).map(".".join)
names = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
                min_size=1, max_size=12)
ids = st.text("abc.123", min_size=1, max_size=10)
maybe = st.none().__or__
payloads = st.none() | st.integers() | st.text(max_size=5) | st.dictionaries(st.text(max_size=3), st.integers(),
                                                                           max_size=2)
messages = st.builds(
    lambda id_, type_, ts, prio, payload, guarantee: normalize(
        {"id": id_, "type": type_, "source": "s", "timestamp": ts, "priority": prio, "payload": payload,
         "deliveryOptions": {"guarantee": guarantee}}, 0),
    names, st.sampled_from(["event", "command", "notification"]), st.integers(0, 2**53), st.integers(0, 9),
    payloads, st.sampled_from(["at-least-once", "exactly-once"]))
selectors = st.one_of(st.tuples(names, st.none()), st.tuples(st.none(), names))
id_lists = st.lists(ids, min_size=1, max_size=4).map(tuple)

bus_commands = st.one_of(
    st.builds(BusPublish, topics, st.lists(messages, min_size=1, max_size=3)),
    st.builds(BusTopicConfigure, topics, maybe(st.integers(0, MAX_RETAINED_MESSAGES)),
              maybe(st.integers(MIN_RETAINED_AGE_MS, MAX_RETAINED_AGE_MS))),
    st.builds(BusSubscribe, patterns.filter(lambda p: "*" not in p), maybe(st.just("payload.k")), maybe(names),
              maybe(st.just("payload.n > 1")), st.sampled_from(GUARANTEES), maybe(st.integers(100, MAX_DELAY_MS)),
              maybe(st.integers(1, 100)), maybe(names), st.sampled_from(START_KINDS),
              maybe(st.integers(0, MAX_OFFSET))),
    st.builds(BusUnsubscribe, names),
    st.builds(BusGroupDelete, names),
    selectors.flatmap(lambda sel: st.builds(BusDeliver, st.just(sel[0]), st.just(sel[1]), st.integers(1, MAX_FETCH))),
    selectors.flatmap(lambda sel: st.builds(BusAck, st.just(sel[0]), st.just(sel[1]), id_lists)),
    selectors.flatmap(lambda sel: st.builds(BusNack, st.just(sel[0]), st.just(sel[1]), id_lists,
                                            maybe(st.integers(0, MAX_DELAY_MS)), maybe(st.booleans()))),
    selectors.flatmap(lambda sel: st.builds(BusDlqRedrive, st.just(sel[0]), st.just(sel[1]), maybe(id_lists))),
    selectors.flatmap(lambda sel: st.builds(BusDlqPurge, st.just(sel[0]), st.just(sel[1]), maybe(id_lists))),
    st.builds(BusBind, topics, st.text("abc", min_size=1, max_size=8), maybe(st.integers(1, MAX_BACKLOG)),
              maybe(st.just("direct"))),
    st.builds(BusUnbind, topics, maybe(st.booleans())),
    st.builds(BusCursor, topics, st.integers(0, MAX_OFFSET), maybe(st.integers(0, MAX_OFFSET))),
    selectors.flatmap(lambda sel: st.builds(BusTransportAck, st.just(sel[0]), st.just(sel[1]), id_lists)),
    selectors.flatmap(lambda sel: st.builds(BusTransportCheckpoint, st.just(sel[0]), st.just(sel[1]),
                                            st.integers(0, 2**31 - 1), maybe(st.integers(0, MAX_OFFSET)))),
    st.builds(BusTransportConfigure, st.text("abc", min_size=1, max_size=8),
              maybe(st.text("abc:/", min_size=1, max_size=8).map(lambda t: "redis://" + t))),
    st.just(BusTick()),
)


@given(bus_commands)
def test_parse_of_to_args_gives_the_command_back(command: Any) -> None:
    assert type(command).parse(command.to_args()) == command
    assert COMMANDS[command.op] is type(command)


def test_a_filter_is_parsed_once_with_its_subscription() -> None:
    command = BusSubscribe.parse({"topic": "a.b", "filter": "payload.n > 1"})
    assert command.filter_tree is not None


def test_to_args_keeps_the_logs_keys_and_their_order() -> None:
    """The dicts the API and the services proposed before the command types: the same bytes in the log."""
    message = normalize({"id": "m", "type": "event", "source": "s"}, 5)
    assert list(BusPublish("t", [message]).to_args().items()) == [("topic", "t"), ("messages", [message])]
    assert list(BusTopicConfigure("t", 3, 5000).to_args()) == ["topic", "max_messages", "max_age_ms"]
    assert BusTopicConfigure("t", None, 5000).to_args() == {"topic": "t", "max_age_ms": 5000}
    full = BusSubscribe("t", "payload.k", "g", "payload.n > 1", "exactly-once", 100, 3, "a1", "offset", 4)
    assert list(full.to_args()) == ["topic", "key", "group", "filter", "guarantee", "ack_timeout_ms",
                                    "max_attempts", "agent", "start", "start_value"]
    assert BusSubscribe("t").to_args() == {"topic": "t", "guarantee": "at-least-once", "start": "new"}
    assert BusDeliver("sub-1", None, 5).to_args() == {"sub": "sub-1", "max": 5}
    assert BusDeliver(None, "a1", 5).to_args() == {"agent": "a1", "max": 5}
    assert BusAck("sub-1", None, ("1.1",)).to_args() == {"sub": "sub-1", "delivery_ids": ["1.1"]}
    assert list(BusNack("s", None, ("1.1",), 0, False).to_args()) == ["sub", "delivery_ids", "delay_ms",
                                                                      "dead_letter"]
    assert BusNack("s", None, ("1.1",)).to_args() == {"sub": "s", "delivery_ids": ["1.1"]}
    assert BusDlqRedrive(None, "a", None).to_args() == {"agent": "a"}
    assert list(BusBind("t", "redis", 5).to_args()) == ["topic", "transport", "backlog_max"]
    assert BusBind.parse({"topic": "t", "transport": "k", "mode": "log"}).to_args() == {"topic": "t", "transport": "k"}
    assert BusBind("t", "k", None, "direct").to_args() == {"topic": "t", "transport": "k", "mode": "direct"}
    assert BusTransportCheckpoint("s", None, 3).to_args() == {"sub": "s", "acked": 3}
    assert BusUnbind("t").to_args() == {"topic": "t"}
    assert list(BusCursor("t", 3, 2).to_args().items()) == [("topic", "t"), ("offset", 3), ("created_index", 2)]
    assert BusTransportAck("s", None, ("k",)).to_args() == {"sub": "s", "keys": ["k"]}
    assert BusTransportConfigure("redis", None).to_args() == {"name": "redis", "url": None}
    assert BusTick().to_args() == {}


def test_a_message_without_a_timestamp_is_stamped_when_applied() -> None:
    command = BusPublish.parse({"topic": "t", "messages": [{"id": "m", "type": "event", "source": "s"}]})
    assert command.messages[0]["timestamp"] is None
    assert "timestamp" not in command.to_args()["messages"][0]
    assert command.stamped(7)[0]["timestamp"] == 7
    sm = StateMachine()
    sm.apply(1, Command(op="bus.subscribe", args={"topic": "t"}, now_ms=9_000))
    assert sm.apply(2, Command(op="bus.publish", args=command.to_args(), now_ms=9_000)).error is None
    assert sm.bus.bodies[("t", 1)].message["timestamp"] == 9_000


def test_the_transport_url_is_not_in_the_repr() -> None:
    assert "secret" not in repr(BusTransportConfigure("redis", "redis://u:secret@h"))


def test_the_api_check_of_a_publication_takes_volatile_messages() -> None:
    [message] = check_publication("t", [{"id": "m", "type": "event", "source": "s",
                                         "deliveryOptions": {"guarantee": "at-most-once"}}], 5)
    assert message["timestamp"] == 5 and not message["deliveryOptions"]["persistent"]
    with pytest.raises(Rejected) as refused:
        BusPublish.parse({"topic": "t", "messages": [message]})
    assert refused.value.message.startswith("deliveryOptions.persistent: ")


M = {"id": "m", "type": "event", "source": "s"}
# (op, args, the refusal now, the state machine's refusal before the command types
# when it differed: the API's answer was kept, and the API never logged such args)
BAD: list[tuple[str, dict[str, Any], str, str | None]] = [
    ("bus.publish", {"messages": [M]}, "topic: must be a string", None),
    ("bus.publish", {"topic": "a..b", "messages": [M]}, "topic: token 2 ('') is not valid in a topic (no wildcards)",
     None),
    ("bus.publish", {"topic": "t", "messages": []}, f"messages: must be a list of 1 to {MAX_BATCH} messages", None),
    ("bus.publish", {"topic": "system.x", "messages": [M]},
     "topic: 'system.x' is reserved for the cluster's own events", None),
    ("bus.publish", {"topic": "t", "messages": [{"type": "event", "source": "s"}]}, "id: is required", None),
    ("bus.publish", {"topic": "t", "messages": [M, {**M, "priority": 11}]},
     "messages[1].priority: must be between 0 and 9", None),
    ("bus.publish", {"topic": "t", "messages": [{**M, "timestamp": None}]}, "timestamp: must be an integer", None),
    ("bus.publish", {"topic": "t", "messages": [{**M, "deliveryOptions": {"guarantee": "at-most-once"}}]},
     "deliveryOptions.persistent: a message that is not persistent is routed by the leader, not logged", None),
    ("bus.publish", {"topic": "task.started", "messages": [M]},
     "payload: a task event's payload is an object with taskId", None),
    ("bus.publish", {"topic": "task.nope", "messages": [M]},
     "topic: task events go to task.<status>, status one of started, progress, completed, failed, cancelled", None),
    ("bus.topic.configure", {"topic": "t", "max_messages": -1},
     f"max_messages: must be between 0 and {MAX_RETAINED_MESSAGES}", None),
    ("bus.topic.configure", {"topic": "t", "max_age_ms": 10},
     f"max_age_ms: must be between {MIN_RETAINED_AGE_MS} and {MAX_RETAINED_AGE_MS}", None),
    ("bus.subscribe", {"topic": "a.>.b"}, "topic: '>' may only be the last token", None),
    ("bus.subscribe", {"topic": "t", "group": ""}, "group: must have 1 to 128 characters", None),
    ("bus.subscribe", {"topic": "t", "filter": 3}, "filter: must be a string", None),
    ("bus.subscribe", {"topic": "t", "guarantee": "maybe"},
     "guarantee: must be one of at-most-once, at-least-once, exactly-once", None),
    ("bus.subscribe", {"topic": "t", "guarantee": None},
     "guarantee: must be one of at-most-once, at-least-once, exactly-once", None),
    ("bus.subscribe", {"topic": "t", "ack_timeout_ms": 5}, f"ack_timeout_ms: must be between 100 and {MAX_DELAY_MS}",
     None),
    ("bus.subscribe", {"topic": "t", "max_attempts": 0}, "max_attempts: must be between 1 and 100", None),
    ("bus.subscribe", {"topic": "t", "key": "body.k"}, "key: must be payload.NAME[.NAME...] or headers.NAME", None),
    ("bus.subscribe", {"topic": "t", "agent": 5}, "agent: must be a string", None),
    ("bus.subscribe", {"topic": "t", "start": "middle"}, "start: must be one of new, beginning, offset, time", None),
    ("bus.subscribe", {"topic": "t", "start": "offset", "start_value": -1},
     f"start_value: must be between 0 and {MAX_OFFSET}", None),
    ("bus.subscribe", {"topic": "t.*", "start": "offset", "start_value": 1},
     "start_offset: an offset names a position in one topic; use a topic without wildcards", None),
    ("bus.unsubscribe", {}, "sub: must be a string", None),
    ("bus.group.delete", {"group": ""}, "group: must have 1 to 256 characters", None),
    ("bus.deliver", {"sub": "s"}, "max: must be an integer", "sub: (not_found first: the subscription was looked up)"),
    ("bus.deliver", {"sub": "s", "max": MAX_FETCH + 1}, f"max: must be between 1 and {MAX_FETCH}",
     "(not_found first)"),
    ("bus.deliver", {"agent": 7, "max": 1}, "agent: must be a string", None),
    ("bus.deliver", {"max": 1}, "sub: must be a string", None),
    ("bus.ack", {"sub": "s", "delivery_ids": []}, f"delivery_ids: must be a list of 1 to {MAX_ACK_IDS} delivery ids",
     "(not_found first)"),
    ("bus.ack", {"sub": "s", "delivery_ids": ["1.1", 5]}, "delivery_ids[1]: must be a delivery id string",
     "(not_found first)"),
    ("bus.nack", {"sub": "s", "delivery_ids": ["1.1"], "delay_ms": -1},
     f"delay_ms: must be between 0 and {MAX_DELAY_MS}", "(not_found first)"),
    ("bus.nack", {"sub": "s", "delivery_ids": ["1.1"], "dead_letter": None}, "dead_letter: must be true or false",
     "(not_found first)"),
    ("bus.dlq.redrive", {"agent": "a", "delivery_ids": "1.1"},
     f"delivery_ids: must be a list of 1 to {MAX_ACK_IDS} delivery ids", "(not_found first)"),
    ("bus.dlq.purge", {"sub": "s", "delivery_ids": [""]}, "delivery_ids[0]: must be a delivery id string",
     "(not_found first)"),
    ("bus.bind", {"topic": "lock.x", "transport": "redis"}, "topic: 'lock.x' is reserved for the cluster's own events",
     None),
    ("bus.bind", {"topic": "t", "transport": "x" * 65}, "transport: must have 1 to 64 characters", None),
    ("bus.bind", {"topic": "t", "transport": "redis", "backlog_max": 0},
     f"backlog_max: must be between 1 and {MAX_BACKLOG}", None),
    ("bus.bind", {"topic": "t", "transport": "redis", "backlog_max": None}, "backlog_max: must be an integer", None),
    ("bus.bind", {"topic": "t", "transport": "redis", "mode": "fast"}, 'mode: must be "log" (the default) or '
     '"direct"', None),
    ("bus.transport.checkpoint", {"sub": "s", "acked": -1}, "acked: must be between 0 and 2147483647",
     "(not_found first)"),
    ("bus.transport.checkpoint", {"sub": "s", "acked": 1, "position": "x"}, "position: must be an integer", None),
    ("bus.unbind", {"topic": "t", "drop_backlog": "yes"}, "drop_backlog: must be true or false", None),
    ("bus.cursor", {"topic": "t", "offset": -1}, f"offset: must be between 0 and {MAX_OFFSET}", None),
    ("bus.cursor", {"topic": "t", "offset": 1, "created_index": "2"}, "created_index: must be an integer",
     "(not_found: the created_index was compared with the binding's only)"),
    ("bus.transport.ack", {"sub": "s", "keys": []}, f"keys: must be a list of 1 to {MAX_ACK_IDS} message keys",
     "(not_found first)"),
    ("bus.transport.configure", {"url": "redis://h"}, "name: must be a string", None),
    ("bus.transport.configure", {"name": "redis", "url": 5}, f"url: {URL_HINT}", "url: must be a string"),
    ("bus.transport.configure", {"name": "redis", "url": "redis-host"}, f"url: {URL_HINT}", None),
    ("bus.transport.configure", {"name": "redis", "url": "redis://h\n"}, "url: must not contain control characters",
     None),
]


@pytest.mark.parametrize(("op", "args", "message", "before"), BAD, ids=[f"{op} {m[:40]}" for op, _, m, _ in BAD])
def test_every_refusal_names_its_field_and_apply_agrees(op: str, args: dict[str, Any], message: str,
                                                        before: str | None) -> None:
    """``before``: what the state answered before the parse was the one check."""
    assert refused_alike(op, args) == message
