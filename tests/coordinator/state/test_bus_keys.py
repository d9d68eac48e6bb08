"""Keyed consumers (per-key order): the messages of one key go to one member
of the group while it lives, in publish order (priorities do not reorder
them), one in flight at a time (a redelivery or a delayed retry keeps the
key waiting), and carry ``key_seq`` so a consumer can see a gap; every
delivery carries the consumer's ``seq``."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.coordinator.state.test_bus import Driver, msg

_n = iter(range(1, 10**9))


def keyed(key: str, **fields: Any) -> dict[str, Any]:
    return msg(f"m{next(_n)}", payload={"order": key, **fields.pop("payload", {})}, **fields)


def keys_of(deliveries: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(d["key"], d["key_seq"]) for d in deliveries]


def test_one_in_flight_per_key_and_each_key_to_one_member() -> None:
    d = Driver()
    m1 = d.sub("orders", group="g", key="payload.order")
    m2 = d.sub("orders", group="g", key="payload.order")
    d.publish("orders", keyed("A"), keyed("A"), keyed("B"), keyed("A"), keyed("C"))
    first = d.ok("bus.deliver", sub=m1, max=10)["deliveries"]
    assert keys_of(first) == [("A", 1), ("B", 1), ("C", 1)]  # one per key
    assert [x["seq"] for x in first] == [1, 3, 5]
    assert d.ok("bus.deliver", sub=m2, max=10)["deliveries"] == []  # A's next waits for A's first
    d.ack(m1, [first[0], first[1], first[2]])
    assert d.ok("bus.deliver", sub=m2, max=10)["deliveries"] == []  # A belongs to m1 while it lives
    assert keys_of(d.ok("bus.deliver", sub=m1, max=10)["deliveries"]) == [("A", 2)]
    d.publish("orders", keyed("D"))
    assert keys_of(d.ok("bus.deliver", sub=m2, max=10)["deliveries"]) == [("D", 1)]


def test_publish_order_beats_priority_within_a_key() -> None:
    d = Driver()
    sub = d.sub("orders", key="payload.order")
    d.publish("orders", keyed("A", priority=0), keyed("A", priority=9), keyed("B", priority=9))
    got = d.ok("bus.deliver", sub=sub, max=10)["deliveries"]
    assert keys_of(got) == [("A", 1), ("B", 1)]
    d.ack(sub, got)
    assert keys_of(d.ok("bus.deliver", sub=sub, max=10)["deliveries"]) == [("A", 2)]


def test_a_redelivery_or_a_delayed_retry_keeps_the_key_waiting() -> None:
    d = Driver()
    sub = d.sub("orders", key="payload.order", ack_timeout_ms=1000)
    d.publish("orders", keyed("A"), keyed("A"))
    [a1] = d.ok("bus.deliver", sub=sub, max=10)["deliveries"]
    d.tick(d.now_ms + 60_000)  # the ack timeout passes: a1 is ready again, before a2
    [again] = d.ok("bus.deliver", sub=sub, max=10)["deliveries"]
    assert (again["key_seq"], again["attempt"], again["seq"]) == (1, 2, a1["seq"])
    d.ok("bus.nack", sub=sub, delivery_ids=[again["delivery_id"]], delay_ms=5000)
    assert d.ok("bus.deliver", sub=sub, max=10)["deliveries"] == []  # a2 waits for the delayed a1
    d.tick(d.now_ms + 5000)
    [third] = d.ok("bus.deliver", sub=sub, max=10)["deliveries"]
    assert (third["key_seq"], third["attempt"]) == (1, 3)
    d.ack(sub, [third])
    assert keys_of(d.ok("bus.deliver", sub=sub, max=10)["deliveries"]) == [("A", 2)]


def test_a_dead_letter_leaves_a_gap_the_consumer_can_see_and_frees_the_key() -> None:
    d = Driver()
    sub = d.sub("orders", key="payload.order")
    d.publish("orders", keyed("A"), keyed("A"), keyed("A"))
    [a1] = d.ok("bus.deliver", sub=sub, max=10)["deliveries"]
    d.ack(sub, [a1])
    [a2] = d.ok("bus.deliver", sub=sub, max=10)["deliveries"]
    d.ok("bus.nack", sub=sub, delivery_ids=[a2["delivery_id"]], dead_letter=True)
    [a3] = d.ok("bus.deliver", sub=sub, max=10)["deliveries"]
    assert (a1["key_seq"], a3["key_seq"]) == (1, 3)  # 2 went to the dead letters


def test_when_the_owner_leaves_its_keys_move_on() -> None:
    d = Driver()
    m1 = d.sub("orders", group="g", key="payload.order")
    m2 = d.sub("orders", group="g", key="payload.order")
    d.publish("orders", keyed("A"), keyed("A"))
    [a1] = d.ok("bus.deliver", sub=m1, max=10)["deliveries"]
    d.ack(m1, [a1])
    d.ok("bus.unsubscribe", sub=m1)
    assert keys_of(d.ok("bus.deliver", sub=m2, max=10)["deliveries"]) == [("A", 2)]


def test_messages_without_the_key_are_delivered_unordered_and_keys_are_checked() -> None:
    d = Driver()
    sub = d.sub("orders", key="headers.tenant")
    d.publish("orders", msg("x1", payload={}), msg("x2", headers={"tenant": "t1"}))
    got = d.ok("bus.deliver", sub=sub, max=10)["deliveries"]
    assert [(x.get("key"), x["message"]["id"]) for x in got] == [(None, "x1"), ("t1", "x2")]
    for bad in ("order", "payload", "headers.a.b", "body.x"):
        assert d.refused("invalid", "bus.subscribe", topic="orders", key=bad).startswith("key:")
    d.sub("orders", group="g", key="payload.a")
    assert "key" in d.refused("conflict", "bus.subscribe", topic="orders", group="g", key="payload.b")


class KeyedGroup(RuleBasedStateMachine):
    """Random publishes, fetches by two members, acks, nacks and a restore:
    per key, first deliveries follow key_seq, at most one is in flight, and
    a key's messages go to one member."""

    def __init__(self) -> None:
        super().__init__()
        self.d = Driver()
        self.members = [self.d.sub("orders", group="g", key="payload.order") for _ in range(2)]
        self.in_flight: dict[str, dict[str, Any]] = {}  # key -> its delivery in flight
        self.next_first: dict[str, int] = {}  # key -> the key_seq its next first delivery must have
        self.owner: dict[str, str] = {}

    @rule(keys=st.lists(st.sampled_from("ABC"), min_size=1, max_size=4), priority=st.integers(0, 9))
    def publish(self, keys: list[str], priority: int) -> None:
        self.d.publish("orders", *(keyed(k, priority=priority) for k in keys))

    @rule(member=st.integers(0, 1), n=st.integers(1, 5))
    def fetch(self, member: int, n: int) -> None:
        sub = self.members[member]
        for delivery in self.d.ok("bus.deliver", sub=sub, max=n)["deliveries"]:
            key = delivery["key"]
            assert key not in self.in_flight, f"two of {key} in flight"
            assert self.owner.setdefault(key, sub) == sub, f"{key} went to another member"
            if delivery["attempt"] == 1:
                assert delivery["key_seq"] == self.next_first.get(key, 1), "out of order within a key"
                self.next_first[key] = delivery["key_seq"] + 1
            self.in_flight[key] = delivery

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        if not self.in_flight:
            return
        key = data.draw(st.sampled_from(sorted(self.in_flight)))
        delivery = self.in_flight.pop(key)
        if data.draw(st.booleans()):
            self.d.ack(self.members[0], [delivery])
        else:
            # it comes back before the key's later messages, as attempt 2 (not a first delivery)
            self.d.ok("bus.nack", sub=self.members[0], delivery_ids=[delivery["delivery_id"]], delay_ms=0)

    @rule()
    def restore(self) -> None:
        if len(self.d.machines) < 3:
            self.d.restore()

    @invariant()
    def replicas_agree(self) -> None:
        self.d.same_everywhere()


KeyedGroup.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
TestKeyedGroup = KeyedGroup.TestCase
