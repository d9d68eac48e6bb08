"""The bus inside the replicated state machine, by example.

Every test drives ``StateMachine.apply(index, Command(op, args, now_ms))``
as the log would, and reads the bus state only to check what the commands
answered. Time is the command's ``now_ms``, set explicitly by each test, so a
redelivery or an expiry happens exactly where the test says. A refused
command is checked to leave the encoded state byte for byte as it was.
"""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.codec import decode_snapshot, encode_snapshot
from coordinator.state import Limits, StateMachine
from coordinator.state.bus import MAX_BATCH, BusLimits, Consumer
from coordinator.state.bus_timers import RedeliverTimer
from coordinator.types import Command, Result

T0 = 1_700_000_000_000


def msg(msg_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": msg_id, "type": "event", "source": "test", **fields}


def quick(msg_id: str, *, timeout: int = 1_000, backoff: int = 500, attempts: int = 3, **fields: Any) -> dict[str, Any]:
    """A message that is redelivered soon: ack timeout 1 s, backoff 0.5 s doubling."""
    options = {"timeout": timeout, "retry": {"max_attempts": attempts, "backoff_ms": backoff}}
    return msg(msg_id, deliveryOptions=options, **fields)


def state_bytes(sm: StateMachine) -> bytes:
    """The encoded snapshot without ``applied_index`` (every command moves it)."""
    data = sm.snapshot_data()
    del data["applied_index"], data["now_ms"]  # every entry moves both, refused or not
    return encode_snapshot(data)


def restored_copy(sm: StateMachine) -> StateMachine:
    return StateMachine.from_snapshot_data(decode_snapshot(encode_snapshot(sm.snapshot_data())), sm.limits)


class Driver:
    """Applies commands at growing indexes, at ``now_ms``, to every machine in
    ``machines`` (the first is ``sm``; ``restore()`` adds a restored copy) and
    checks that they all answer the same."""

    def __init__(self, **bus_limits: Any) -> None:
        self.machines = [StateMachine(Limits(bus=BusLimits(**bus_limits)))]
        self.index = 0
        self.now_ms = T0

    @property
    def sm(self) -> StateMachine:
        return self.machines[0]

    def __call__(self, op: str, **args: Any) -> Result:
        self.index += 1
        command = Command(op=op, args=args, now_ms=self.now_ms)
        results = [sm.apply(self.index, command) for sm in self.machines]
        for other in results[1:]:
            assert other == results[0], (op, args)
        return results[0]

    def ok(self, op: str, **args: Any) -> Any:
        result = self(op, **args)
        assert result.error is None, (op, result.error)
        return result.value

    def refused(self, code: str, op: str, **args: Any) -> str:
        before = state_bytes(self.sm)
        result = self(op, **args)
        assert result.error is not None and result.error[0] == code, (op, result)
        assert result.value is None and result.events == ()
        assert state_bytes(self.sm) == before, f"refused {op} changed the state"
        return result.error[1]

    def restore(self) -> StateMachine:
        """Add a copy restored from the encoded snapshot; later commands go to both."""
        copy = restored_copy(self.sm)
        assert encode_snapshot(copy.snapshot_data()) == encode_snapshot(self.sm.snapshot_data())
        self.machines.append(copy)
        return copy

    def same_everywhere(self) -> None:
        blobs = {encode_snapshot(sm.snapshot_data()) for sm in self.machines}
        assert len(blobs) == 1

    # -- shorthands -------------------------------------------------------------------

    def publish(self, topic: str, *messages: dict[str, Any]) -> list[dict[str, Any]]:
        return self.ok("bus.publish", topic=topic, messages=list(messages))["messages"]

    def sub(self, topic: str, **args: Any) -> str:
        return self.ok("bus.subscribe", topic=topic, **args)["id"]

    def deliver(self, sub: str, n: int = 100) -> list[dict[str, Any]]:
        return self.ok("bus.deliver", sub=sub, max=n)["deliveries"]

    def take(self, sub: str, n: int = 100) -> list[str]:
        """Deliver and answer the message ids, in delivery order."""
        return [d["message"]["id"] for d in self.deliver(sub, n)]

    def ack(self, sub: str, deliveries: list[dict[str, Any]]) -> dict[str, Any]:
        return self.ok("bus.ack", sub=sub, delivery_ids=[d["delivery_id"] for d in deliveries])

    def tick(self, now_ms: int) -> dict[str, Any]:
        self.now_ms = now_ms
        return self.ok("bus.tick")

    def consumer(self, sub: str) -> Consumer:
        return self.sm.bus.consumer_of(sub)

    def dead(self, sub: str) -> list[tuple[str, str]]:
        """(message id, reason) of the consumer's dead letters, oldest first."""
        return [(d["message"]["id"], d["reason"]) for d in self.sm.bus.dead_letters(self.consumer(sub), 1_000)]

    def states(self, sub: str) -> dict[str, str]:
        """message id -> entry state, over the consumer's entries and dead letters."""
        consumer = self.consumer(sub)
        bodies = self.sm.bus.bodies
        return {bodies[(e.topic, e.offset)].message["id"]: e.state
                for e in (*consumer.entries.values(), *consumer.dlq.values())}


@pytest.fixture
def bus() -> Driver:
    return Driver()


# -- routing ------------------------------------------------------------------------------

@pytest.mark.parametrize(("pattern", "topic", "expected"), [
    ("orders.created", "orders.created", True),
    ("orders.created", "orders.updated", False),
    ("orders.created", "orders.created.eu", False),
    ("orders.created", "orders", False),
    ("orders.*", "orders.created", True),
    ("orders.*", "orders.created.eu", False),
    ("orders.*", "orders", False),
    ("*.created", "orders.created", True),
    ("*.created", "orders.updated", False),
    ("orders.>", "orders.created", True),
    ("orders.>", "orders.created.eu.1", True),
    ("orders.>", "orders", False),
    ("orders.>", "shipping.created", False),
    (">", "anything.at.all", True),
])
def test_a_subscription_gets_exactly_the_topics_its_pattern_matches(bus: Driver, pattern: str, topic: str,
                                                                    expected: bool) -> None:
    sub = bus.sub(pattern)
    [stored] = bus.publish(topic, msg("m"))
    assert stored["routed"] == (1 if expected else 0)
    assert bus.take(sub) == (["m"] if expected else [])


def test_a_subscription_gets_nothing_from_other_topics(bus: Driver) -> None:
    sub = bus.sub("orders.created")
    for i, topic in enumerate(("orders.updated", "orders.created.eu", "orders", "shipping.created")):
        bus.publish(topic, msg(f"other-{i}"))
    bus.publish("orders.created", msg("mine"))
    assert bus.take(sub) == ["mine"]
    assert bus.take(sub) == []


def test_fan_out_gives_every_matching_subscription_its_own_copy(bus: Driver) -> None:
    subs = [bus.sub("a.b"), bus.sub("a.*"), bus.sub("a.>"), bus.sub(">")]
    other = bus.sub("x.*")
    [stored] = bus.publish("a.b", msg("m"))
    assert stored["routed"] == 4
    first = bus.deliver(subs[0])
    assert [d["message"]["id"] for d in first] == ["m"]
    # One consumer's ack is its own: the others still hold their copy.
    assert bus.ack(subs[0], first)["acked"] == [first[0]["delivery_id"]]
    for sub in subs[1:]:
        assert bus.take(sub) == ["m"]
    assert bus.take(other) == []
    assert bus.take(subs[0]) == []


def test_a_group_counts_once_next_to_plain_subscriptions(bus: Driver) -> None:
    bus.sub("t", group="workers")
    bus.sub("t", group="workers")
    plain = bus.sub("t")
    [stored] = bus.publish("t", msg("m"))
    assert stored["routed"] == 2
    assert bus.take(plain) == ["m"]


def test_group_members_split_the_messages(bus: Driver) -> None:
    first = bus.sub("jobs", group="workers")
    second = bus.sub("jobs", group="workers")
    bus.publish("jobs", *(msg(f"j{i}") for i in range(6)))
    got_first = bus.take(first, 2)
    got_second = bus.take(second, 2)
    got_first += bus.take(first, 1)
    got_second += bus.take(second, 5)
    assert sorted(got_first + got_second) == [f"j{i}" for i in range(6)]
    assert not set(got_first) & set(got_second)
    # While they are pending, no member gets any of them again.
    assert bus.take(first) == [] and bus.take(second) == []
    assert bus.consumer(first) is bus.consumer(second)
    assert bus.consumer(first).pending_count == 6


def test_a_group_message_pending_at_one_member_comes_back_to_any_member(bus: Driver) -> None:
    first = bus.sub("jobs", group="workers")
    second = bus.sub("jobs", group="workers")
    bus.publish("jobs", quick("j"))
    [delivery] = bus.deliver(first)
    assert bus.deliver(second) == []
    bus.tick(T0 + 1_500)
    [again] = bus.deliver(second)
    assert (again["delivery_id"], again["attempt"]) == (delivery["delivery_id"], 2)
    # Any member may ack for the group.
    assert bus.ack(first, [again])["acked"] == [delivery["delivery_id"]]


@pytest.mark.parametrize("change", [
    {"topic": "jobs.other"},
    {"filter": "payload.n > 1"},
    {"guarantee": "at-most-once"},
    {"ack_timeout_ms": 5_000},
    {"max_attempts": 2},
])
def test_joining_a_group_with_other_settings_is_a_conflict(bus: Driver, change: dict[str, Any]) -> None:
    bus.sub("jobs", group="workers")
    args = {"topic": "jobs", "group": "workers", **change}
    assert "workers" in bus.refused("conflict", "bus.subscribe", **args)
    # The same settings still join.
    bus.sub("jobs", group="workers")
    assert len(bus.sm.bus.consumers["g:workers"].members) == 2


# -- content filters --------------------------------------------------------------------

def test_filters_on_payload_and_headers(bus: Driver) -> None:
    sub = bus.sub("orders", filter="headers.region == 'eu' and payload.total >= 100")
    bus.publish("orders",
                msg("eu-big", headers={"region": "eu"}, payload={"total": 100}),
                msg("eu-small", headers={"region": "eu"}, payload={"total": 99}),
                msg("us-big", headers={"region": "us"}, payload={"total": 500}),
                msg("no-headers", payload={"total": 500}),
                msg("no-payload", headers={"region": "eu"}),
                msg("eu-bigger", headers={"region": "eu"}, payload={"total": 1e6}))
    assert bus.take(sub) == ["eu-big", "eu-bigger"]


def test_filter_on_a_nested_payload_path_and_membership(bus: Driver) -> None:
    sub = bus.sub("orders", filter="payload.order.kind in ['a', 'b'] and not exists(payload.order.void)")
    bus.publish("orders",
                msg("a", payload={"order": {"kind": "a"}}),
                msg("c", payload={"order": {"kind": "c"}}),
                msg("b-void", payload={"order": {"kind": "b", "void": False}}),
                msg("flat", payload={"kind": "a"}))
    assert bus.take(sub) == ["a"]


@pytest.mark.parametrize("bad", ["payload.total >", "(headers.region == 'eu'", "payload.x ~ 1", "   ", 5,
                                 "and == 1", "payload.x in []"])
def test_a_bad_filter_is_invalid_and_creates_nothing(bus: Driver, bad: Any) -> None:
    message = bus.refused("invalid", "bus.subscribe", topic="orders", filter=bad)
    assert message.startswith("filter:")
    assert bus.sm.bus.consumers == {} and bus.sm.bus.subscriptions == {}
    assert bus.refused("invalid", "bus.subscribe", topic="orders", group="g", filter=bad).startswith("filter:")
    assert "g:g" not in bus.sm.bus.consumers


# -- priority -----------------------------------------------------------------------------

def test_higher_priority_first_then_publish_order(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", msg("p1", priority=1), msg("p9a", priority=9), msg("p5a"), msg("p9b", priority="critical"))
    bus.publish("t", msg("p5b", priority="normal"), msg("p0", priority=0), msg("p7", priority="high"),
                msg("p2", priority="low"))
    assert bus.take(sub, 1) == ["p9a"]
    assert bus.take(sub, 2) == ["p9b", "p7"]
    assert bus.take(sub) == ["p5a", "p5b", "p2", "p1", "p0"]


def test_a_redelivered_message_keeps_its_place_by_priority(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("high", priority=8))
    assert bus.take(sub) == ["high"]
    bus.publish("t", msg("low", priority=1), msg("mid", priority=5), msg("also-high", priority=8))
    bus.tick(T0 + 1_500)
    # "high" was published first, so among priority 8 it goes first again.
    assert bus.take(sub) == ["high", "also-high", "mid", "low"]


# -- deliver, ack, redelivery -------------------------------------------------------------

def test_an_acked_message_is_never_delivered_again(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m"), quick("n"))
    deliveries = bus.deliver(sub)
    assert bus.ack(sub, deliveries[:1]) == {"acked": [deliveries[0]["delivery_id"]], "unknown": []}
    for step in range(1, 6):
        bus.tick(T0 + step * 86_400_000)
        assert "m" not in bus.take(sub)
    assert list(bus.states(sub)) == ["n"]
    assert bus.ack(sub, deliveries[:1]) == {"acked": [], "unknown": [deliveries[0]["delivery_id"]]}


def test_an_unacked_message_comes_back_after_timeout_plus_backoff_with_the_same_id(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m", timeout=1_000, backoff=500))
    [first] = bus.deliver(sub)
    assert first["attempt"] == 1 and first["guarantee"] == "at-least-once"
    assert bus.tick(T0 + 1_499)["fired"] == 0
    assert bus.deliver(sub) == []
    assert bus.consumer(sub).pending_count == 1
    assert bus.tick(T0 + 1_500)["fired"] == 1
    assert bus.consumer(sub).ready_count == 1 and bus.consumer(sub).pending_count == 0
    [second] = bus.deliver(sub)
    assert (second["delivery_id"], second["attempt"]) == (first["delivery_id"], 2)
    # The backoff doubles: timeout 1000 + backoff 1000 after the second delivery.
    bus.tick(T0 + 1_500 + 1_999)
    assert bus.deliver(sub) == []
    bus.tick(T0 + 1_500 + 2_000)
    [third] = bus.deliver(sub)
    assert (third["delivery_id"], third["attempt"]) == (first["delivery_id"], 3)
    counters = bus.consumer(sub).counters
    assert (counters["delivered"], counters["redelivered"]) == (3, 2)


def test_the_subscriptions_ack_timeout_overrides_the_messages(bus: Driver) -> None:
    sub = bus.sub("t", ack_timeout_ms=200)
    bus.publish("t", quick("m", timeout=60_000, backoff=0))
    bus.deliver(sub)
    bus.tick(T0 + 199)
    assert bus.deliver(sub) == []
    bus.tick(T0 + 200)
    assert [d["attempt"] for d in bus.deliver(sub)] == [2]


def test_max_attempts_reached_dead_letters_the_message(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m", attempts=2, timeout=1_000, backoff=500))
    assert [d["attempt"] for d in bus.deliver(sub)] == [1]
    bus.tick(T0 + 1_500)
    assert [d["attempt"] for d in bus.deliver(sub)] == [2]
    bus.tick(T0 + 1_500 + 1_999)
    assert bus.dead(sub) == []
    bus.tick(T0 + 1_500 + 2_000)
    assert bus.dead(sub) == [("m", "max_attempts")]
    assert bus.deliver(sub) == []
    [letter] = bus.sm.bus.dead_letters(bus.consumer(sub), 10)
    assert letter["attempts"] == 2 and letter["dead_ms"] == T0 + 3_500


def test_the_subscriptions_max_attempts_overrides_the_messages(bus: Driver) -> None:
    sub = bus.sub("t", max_attempts=1)
    bus.publish("t", quick("m", attempts=10))
    bus.deliver(sub)
    bus.tick(T0 + 1_500)
    assert bus.dead(sub) == [("m", "max_attempts")]


def test_nack_with_a_delay(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m"))
    [first] = bus.deliver(sub)
    bus.now_ms = T0 + 10
    result = bus.ok("bus.nack", sub=sub, delivery_ids=[first["delivery_id"]], delay_ms=2_000)
    assert result == {"nacked": [first["delivery_id"]], "unknown": []}
    assert bus.states(sub) == {"m": "delayed"}
    bus.tick(T0 + 2_009)
    assert bus.deliver(sub) == []
    bus.tick(T0 + 2_010)
    [again] = bus.deliver(sub)
    assert (again["delivery_id"], again["attempt"]) == (first["delivery_id"], 2)
    assert bus.consumer(sub).counters["nacked"] == 1


def test_nack_with_delay_zero_is_ready_at_once(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m"), quick("n", priority=1))
    [first, _] = bus.deliver(sub)
    bus.ok("bus.nack", sub=sub, delivery_ids=[first["delivery_id"]], delay_ms=0)
    assert bus.consumer(sub).ready_count == 1
    assert [(d["message"]["id"], d["attempt"]) for d in bus.deliver(sub)] == [("m", 2)]


def test_nack_without_a_delay_waits_for_the_messages_backoff(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m", backoff=300))
    [first] = bus.deliver(sub)
    bus.ok("bus.nack", sub=sub, delivery_ids=[first["delivery_id"]])
    bus.tick(T0 + 299)
    assert bus.deliver(sub) == []
    bus.tick(T0 + 300)
    assert bus.take(sub) == ["m"]


def test_nack_to_the_dead_letter_queue_is_rejected(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m"))
    [first] = bus.deliver(sub)
    bus.ok("bus.nack", sub=sub, delivery_ids=[first["delivery_id"]], dead_letter=True)
    assert bus.dead(sub) == [("m", "rejected")]
    bus.tick(T0 + 86_400_000)
    assert bus.deliver(sub) == []


def test_nack_at_the_last_attempt_dead_letters(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m", attempts=1))
    [first] = bus.deliver(sub)
    bus.ok("bus.nack", sub=sub, delivery_ids=[first["delivery_id"]], delay_ms=0)
    assert bus.dead(sub) == [("m", "max_attempts")]


def test_nack_of_what_is_not_pending_is_unknown(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("acked"), quick("ready", priority=0))
    [acked] = bus.deliver(sub, 1)
    bus.ack(sub, [acked])
    ready_id = f"{bus.consumer(sub).created_index}.2"
    ids = [acked["delivery_id"], ready_id, "nonsense", "999.1"]
    assert bus.ok("bus.nack", sub=sub, delivery_ids=ids) == {"nacked": [], "unknown": ids}
    assert bus.states(sub) == {"ready": "ready"}


def test_ack_reports_unknown_ids(bus: Driver) -> None:
    mine, other = bus.sub("t"), bus.sub("t")
    bus.publish("t", quick("m"))
    [delivery] = bus.deliver(mine)
    [foreign] = bus.deliver(other)
    assert foreign["delivery_id"] != delivery["delivery_id"]
    ids = [foreign["delivery_id"], "x", "1.999", delivery["delivery_id"], delivery["delivery_id"]]
    result = bus.ok("bus.ack", sub=mine, delivery_ids=ids)
    assert result == {"acked": [delivery["delivery_id"]], "unknown": [foreign["delivery_id"], "x", "1.999"]}
    assert bus.states(other) == {"m": "pending"}


def test_acking_a_ready_message_by_its_id_removes_it(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m"), quick("n"))
    [first] = bus.deliver(sub, 1)
    bus.tick(T0 + 1_500)  # "m" is ready again
    assert bus.ack(sub, [first])["acked"] == [first["delivery_id"]]
    assert bus.take(sub) == ["n"]
    assert bus.consumer(sub).ready_count == 0


def test_acking_a_dead_letter_removes_it_from_the_dlq(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.ok("bus.topic.configure", topic="t", max_messages=0)  # nothing retained: only the DLQ holds it
    bus.publish("t", quick("m"))
    [delivery] = bus.deliver(sub)
    bus.ok("bus.nack", sub=sub, delivery_ids=[delivery["delivery_id"]], dead_letter=True)
    assert bus.dead(sub) == [("m", "rejected")]
    assert bus.ack(sub, [delivery])["acked"] == [delivery["delivery_id"]]
    assert bus.dead(sub) == [] and bus.sm.bus.bodies == {}


# -- TTL ----------------------------------------------------------------------------------------

def test_an_undelivered_message_is_dead_lettered_on_the_tick_after_its_ttl(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", msg("short", ttl=5_000), msg("long", ttl=60_000), msg("forever"))
    bus.tick(T0 + 4_999)
    assert bus.states(sub) == {"short": "ready", "long": "ready", "forever": "ready"}
    bus.tick(T0 + 5_000)
    assert bus.dead(sub) == [("short", "ttl")]
    assert bus.consumer(sub).ready_count == 2
    assert bus.take(sub) == ["long", "forever"]
    assert bus.sm.bus.counters["expired"] == 1


def test_deliver_after_expiry_does_not_hand_the_message_out(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", msg("short", ttl=5_000, priority=9), msg("other"))
    bus.now_ms = T0 + 5_000  # no tick yet
    assert bus.take(sub) == ["other"]
    assert bus.dead(sub) == [("short", "ttl")]


def test_a_delayed_message_expires_on_the_tick(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m", ttl=3_000))
    [delivery] = bus.deliver(sub)
    bus.ok("bus.nack", sub=sub, delivery_ids=[delivery["delivery_id"]], delay_ms=10_000)
    bus.tick(T0 + 3_000)
    assert bus.dead(sub) == [("m", "ttl")]


def test_a_pending_message_that_expires_is_dead_lettered_instead_of_redelivered(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m", ttl=1_000, timeout=1_000, backoff=500))
    bus.deliver(sub)
    bus.tick(T0 + 1_000)  # the TTL fires: a pending delivery is left to its ack timeout
    assert bus.states(sub) == {"m": "pending"}
    bus.tick(T0 + 1_500)
    assert bus.dead(sub) == [("m", "ttl")]
    assert bus.deliver(sub) == []


def test_a_replay_skips_expired_messages(bus: Driver) -> None:
    bus.publish("t", msg("short", ttl=1_000), msg("long", ttl=100_000))
    bus.now_ms = T0 + 1_000
    result = bus.ok("bus.subscribe", topic="t", start="beginning")
    assert result["replayed"] == 1
    assert bus.take(result["id"]) == ["long"]


# -- dead letters ---------------------------------------------------------------------------

def _three_dead(bus: Driver) -> tuple[str, list[dict[str, Any]]]:
    sub = bus.sub("t")
    bus.publish("t", quick("a"), quick("b"), quick("c"))
    deliveries = bus.deliver(sub)
    bus.ok("bus.nack", sub=sub, delivery_ids=[d["delivery_id"] for d in deliveries], dead_letter=True)
    return sub, deliveries


def test_dead_letters_are_listed_oldest_first_up_to_a_limit(bus: Driver) -> None:
    sub, deliveries = _three_dead(bus)
    letters = bus.sm.bus.dead_letters(bus.consumer(sub), 2)
    assert [(d["message"]["id"], d["delivery_id"], d["reason"], d["attempts"], d["dead_ms"], d["topic"])
            for d in letters] == [("a", deliveries[0]["delivery_id"], "rejected", 1, T0, "t"),
                                  ("b", deliveries[1]["delivery_id"], "rejected", 1, T0, "t")]
    assert bus.consumer(sub).describe()["dlq"] == 3


def test_redrive_all_puts_dead_letters_back_with_fresh_attempts(bus: Driver) -> None:
    sub, deliveries = _three_dead(bus)
    result = bus.ok("bus.dlq.redrive", sub=sub)
    assert result == {"redriven": [d["delivery_id"] for d in deliveries]}
    assert bus.dead(sub) == []
    again = bus.deliver(sub)
    assert [(d["message"]["id"], d["attempt"], d["delivery_id"]) for d in again] == [
        (d["message"]["id"], 1, d["delivery_id"]) for d in deliveries]
    assert bus.consumer(sub).counters["redriven"] == 3


def test_redrive_by_ids(bus: Driver) -> None:
    sub, deliveries = _three_dead(bus)
    assert bus.ok("bus.dlq.redrive", sub=sub, delivery_ids=[deliveries[1]["delivery_id"]]) == {
        "redriven": [deliveries[1]["delivery_id"]]}
    assert bus.dead(sub) == [("a", "rejected"), ("c", "rejected")]
    assert bus.take(sub) == ["b"]
    # One id that is not a dead letter refuses the whole command.
    ids = [deliveries[0]["delivery_id"], deliveries[1]["delivery_id"]]
    assert "not a dead letter" in bus.refused("not_found", "bus.dlq.redrive", sub=sub, delivery_ids=ids)


def test_purge_removes_dead_letters_and_their_bodies(bus: Driver) -> None:
    bus.ok("bus.topic.configure", topic="t", max_messages=0)
    sub, deliveries = _three_dead(bus)
    assert bus.ok("bus.dlq.purge", sub=sub, delivery_ids=[deliveries[0]["delivery_id"]]) == {"purged": 1}
    assert bus.dead(sub) == [("b", "rejected"), ("c", "rejected")]
    assert bus.ok("bus.dlq.purge", sub=sub) == {"purged": 2}
    assert bus.dead(sub) == [] and bus.sm.bus.bodies == {}
    assert bus.ok("bus.dlq.redrive", sub=sub) == {"redriven": []}
    assert bus.deliver(sub) == []


def test_the_dlq_is_bounded_and_drops_the_oldest() -> None:
    bus = Driver(dlq_max=2)
    bus.ok("bus.topic.configure", topic="t", max_messages=0)
    sub, _ = _three_dead(bus)
    assert bus.dead(sub) == [("b", "rejected"), ("c", "rejected")]
    counters = bus.consumer(sub).counters
    assert (counters["dead_lettered"], counters["dlq_dropped"]) == (3, 1)
    assert sorted(offset for _, offset in bus.sm.bus.bodies) == [2, 3]


def test_an_overflow_into_a_dlq_that_keeps_nothing_leaves_a_consistent_topic() -> None:
    bus = Driver(queue_max=1, dlq_max=0)
    sub = bus.sub("t")
    bus.publish("t", msg("kept"), msg("overflow"))
    assert bus.consumer(sub).counters["dlq_dropped"] == 1
    topic = bus.sm.bus.topics["t"]
    assert all(("t", offset) in bus.sm.bus.bodies for offset in topic.log)
    later = bus.ok("bus.subscribe", topic="t", start="offset", start_value=2)  # KeyError today
    assert bus.take(later["id"]) == ["overflow"]


# -- guarantees -------------------------------------------------------------------------------

def test_an_at_most_once_subscription_never_redelivers(bus: Driver) -> None:
    sub = bus.sub("t", guarantee="at-most-once")
    bus.publish("t", quick("m"))
    [delivery] = bus.deliver(sub)
    assert delivery["guarantee"] == "at-most-once"
    assert bus.consumer(sub).entries == {} and bus.consumer(sub).pending_count == 0
    bus.tick(T0 + 86_400_000)
    assert bus.deliver(sub) == [] and bus.dead(sub) == []
    assert bus.ack(sub, [delivery]) == {"acked": [], "unknown": [delivery["delivery_id"]]}
    assert not any(isinstance(timer, RedeliverTimer) for timer in bus.sm.bus.timers)


def test_a_persistent_at_most_once_message_is_delivered_once_to_an_at_least_once_subscription(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", msg("once", deliveryOptions={"guarantee": "at-most-once", "persistent": True}), quick("twice"))
    deliveries = bus.deliver(sub)
    assert [(d["message"]["id"], d["guarantee"]) for d in deliveries] == [
        ("once", "at-most-once"), ("twice", "at-least-once")]
    bus.tick(T0 + 10_000)
    assert bus.take(sub) == ["twice"]


def test_a_message_that_is_not_persistent_is_refused(bus: Driver) -> None:
    bus.sub("t")
    for options in ({"guarantee": "at-most-once"}, {"guarantee": "at-most-once", "persistent": False}):
        message = bus.refused("invalid", "bus.publish", topic="t", messages=[msg("m", deliveryOptions=options)])
        assert message.startswith("deliveryOptions.persistent:")
    batch = [msg("ok"), msg("m", deliveryOptions={"guarantee": "at-most-once"})]
    assert bus.refused("invalid", "bus.publish", topic="t", messages=batch).startswith(
        "messages[1].deliveryOptions.persistent:")


def test_exactly_once_dedupes_a_repeated_id_in_one_batch(bus: Driver) -> None:
    sub = bus.sub("t")
    once = {"guarantee": "exactly-once"}
    out = bus.publish("t", msg("m", deliveryOptions=once), msg("n"), msg("m", deliveryOptions=once))
    assert out == [{"id": "m", "offset": 1, "routed": 1}, {"id": "n", "offset": 2, "routed": 1},
                   {"id": "m", "offset": 1, "duplicate": True}]
    assert bus.take(sub) == ["m", "n"]
    assert bus.sm.bus.topics["t"].published == 2 and bus.sm.bus.counters["duplicates"] == 1


def test_exactly_once_dedupes_a_repeated_id_across_commands_within_the_window(bus: Driver) -> None:
    sub = bus.sub("t")
    once = {"guarantee": "exactly-once"}
    window = bus.sm.limits.bus.dedupe_window_ms
    assert bus.publish("t", msg("m", deliveryOptions=once)) == [{"id": "m", "offset": 1, "routed": 1}]
    bus.now_ms = T0 + window
    assert bus.publish("t", msg("m", deliveryOptions=once)) == [{"id": "m", "offset": 1, "duplicate": True}]
    assert len(bus.sm.bus.bodies) == 1
    assert bus.take(sub) == ["m"]
    bus.now_ms = T0 + window + 1
    assert bus.publish("t", msg("m", deliveryOptions=once)) == [{"id": "m", "offset": 2, "routed": 1}]
    assert [(d["message"]["id"], d["offset"]) for d in bus.deliver(sub)] == [("m", 2)]


def test_exactly_once_dedupe_is_per_topic(bus: Driver) -> None:
    once = {"guarantee": "exactly-once"}
    assert bus.publish("t", msg("m", deliveryOptions=once))[0]["offset"] == 1
    assert bus.publish("u", msg("m", deliveryOptions=once))[0] == {"id": "m", "offset": 1, "routed": 0}


def test_at_least_once_messages_with_the_same_id_are_both_stored(bus: Driver) -> None:
    sub = bus.sub("t")
    out = bus.publish("t", msg("m"), msg("m"))
    assert [o["offset"] for o in out] == [1, 2] and not any(o.get("duplicate") for o in out)
    bus.publish("t", msg("m"))
    assert bus.take(sub) == ["m", "m", "m"]


@pytest.mark.parametrize(("subscription", "message", "effective"), [
    ("exactly-once", "exactly-once", "exactly-once"),
    ("exactly-once", "at-least-once", "at-least-once"),
    ("at-least-once", "exactly-once", "at-least-once"),
    ("at-most-once", "exactly-once", "at-most-once"),
])
def test_a_delivery_carries_the_weaker_guarantee(bus: Driver, subscription: str, message: str,
                                                 effective: str) -> None:
    sub = bus.sub("t", guarantee=subscription)
    bus.publish("t", msg("m", deliveryOptions={"guarantee": message}))
    assert [d["guarantee"] for d in bus.deliver(sub)] == [effective]
    assert bus.consumer(sub).pending_count == (0 if effective == "at-most-once" else 1)


# -- replay and retention -------------------------------------------------------------------------

def _history(bus: Driver) -> None:
    """t.a: a1 at T0, a2 and a3 at T0+10 (one batch); t.b: b1 at T0+5, b2 at T0+20."""
    bus.now_ms = T0
    bus.publish("t.a", msg("a1"))
    bus.now_ms = T0 + 5
    bus.publish("t.b", msg("b1"))
    bus.now_ms = T0 + 10
    bus.publish("t.a", msg("a2"), msg("a3"))
    bus.now_ms = T0 + 20
    bus.publish("t.b", msg("b2"))


def test_a_new_subscription_gets_only_new_messages_by_default(bus: Driver) -> None:
    _history(bus)
    result = bus.ok("bus.subscribe", topic="t.*")
    assert result["replayed"] == 0
    bus.publish("t.a", msg("new"))
    assert bus.take(result["id"]) == ["new"]


def test_replay_from_the_beginning_in_publish_order(bus: Driver) -> None:
    _history(bus)
    result = bus.ok("bus.subscribe", topic="t.*", start="beginning")
    assert result["replayed"] == 5
    bus.publish("t.b", msg("live"))
    assert bus.take(result["id"]) == ["a1", "b1", "a2", "a3", "b2", "live"]


def test_replay_respects_the_filter(bus: Driver) -> None:
    bus.publish("t", msg("x", payload={"n": 1}), msg("y", payload={"n": 2}), msg("z", payload={"n": 3}))
    result = bus.ok("bus.subscribe", topic="t", start="beginning", filter="payload.n != 2")
    assert result["replayed"] == 2
    assert bus.take(result["id"]) == ["x", "z"]


def test_replay_from_an_offset(bus: Driver) -> None:
    _history(bus)
    result = bus.ok("bus.subscribe", topic="t.a", start="offset", start_value=2)
    assert result["replayed"] == 2
    assert [(d["message"]["id"], d["offset"]) for d in bus.deliver(result["id"])] == [("a2", 2), ("a3", 3)]


def test_replay_from_a_time(bus: Driver) -> None:
    _history(bus)
    result = bus.ok("bus.subscribe", topic="t.>", start="time", start_value=T0 + 5)
    assert bus.take(result["id"]) == ["b1", "a2", "a3", "b2"]
    late = bus.ok("bus.subscribe", topic="t.>", start="time", start_value=T0 + 21)
    assert late["replayed"] == 0


def test_replay_from_an_offset_below_the_retained_window_is_compacted(bus: Driver) -> None:
    bus.ok("bus.topic.configure", topic="t", max_messages=2)
    bus.publish("t", *(msg(f"m{i}") for i in range(1, 5)))
    described = bus.sm.bus.describe_topic(bus.sm.bus.topics["t"])
    assert (described["first_offset"], described["retained"], described["next_offset"]) == (3, 2, 5)
    assert "no longer retained" in bus.refused("compacted", "bus.subscribe", topic="t", start="offset",
                                               start_value=2)
    result = bus.ok("bus.subscribe", topic="t", start="offset", start_value=3)
    assert bus.take(result["id"]) == ["m3", "m4"]
    # An offset not reached yet is no error: the subscription waits for it.
    assert bus.ok("bus.subscribe", topic="t", start="offset", start_value=9)["replayed"] == 0


@pytest.mark.parametrize("pattern", ["t.*", "t.>", ">"])
def test_replay_from_an_offset_needs_a_topic_without_wildcards(bus: Driver, pattern: str) -> None:
    bus.publish("t.a", msg("m"))
    assert bus.refused("invalid", "bus.subscribe", topic=pattern, start="offset", start_value=1).startswith(
        "start_offset:")


def test_retention_by_count_limits_what_a_replay_sees(bus: Driver) -> None:
    bus.publish("t", msg("m1"), msg("m2"), msg("m3"))
    bus.ok("bus.topic.configure", topic="t", max_messages=2)  # trims what is already there
    bus.publish("t", msg("m4"))
    result = bus.ok("bus.subscribe", topic="t", start="beginning")
    assert bus.take(result["id"]) == ["m3", "m4"]
    assert bus.sm.bus.topics["t"].published == 4


def test_retention_by_age_is_trimmed_on_tick(bus: Driver) -> None:
    bus.ok("bus.topic.configure", topic="t", max_age_ms=1_000)
    bus.publish("t", msg("old"))
    bus.now_ms = T0 + 600
    bus.publish("t", msg("young"))
    bus.tick(T0 + 999)
    assert len(bus.sm.bus.topics["t"].log) == 2
    bus.tick(T0 + 1_000)
    assert list(bus.sm.bus.topics["t"].log) == [2]
    result = bus.ok("bus.subscribe", topic="t", start="beginning")
    assert bus.take(result["id"]) == ["young"]
    bus.tick(T0 + 1_600)
    assert bus.sm.bus.topics["t"].log == {} and bus.sm.bus.bodies.keys() == {("t", 2)}  # still held


def test_shortening_the_max_age_of_a_topic_with_messages_trims_on_the_next_due_tick(bus: Driver) -> None:
    bus.publish("t", msg("m"))  # armed for the default age, one day
    bus.now_ms = T0 + 500
    bus.ok("bus.topic.configure", topic="t", max_age_ms=1_000)
    assert bus.sm.bus.next_due_ms() == T0 + 1_000
    bus.tick(T0 + 1_000)
    assert bus.sm.bus.topics["t"].log == {}
    assert bus.ok("bus.subscribe", topic="t", start="beginning")["replayed"] == 0


def test_a_retained_message_outlives_its_acks_and_a_replay_gets_it_again(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", msg("m"))
    bus.ack(sub, bus.deliver(sub))
    assert ("t", 1) in bus.sm.bus.bodies
    later = bus.ok("bus.subscribe", topic="t", start="beginning")
    assert bus.take(later["id"]) == ["m"] and bus.take(sub) == []


# -- direct delivery ------------------------------------------------------------------------------

def _agent(bus: Driver, agent_id: str) -> None:
    bus.ok("agent.register", id=agent_id, type="worker", ttl_ms=60_000)


def test_a_direct_message_goes_to_the_agents_inbox_only(bus: Driver) -> None:
    _agent(bus, "a1")
    _agent(bus, "a2")
    topic_sub = bus.sub("work")
    [stored] = bus.publish("work", msg("direct", destination=["a1", "a2"]))
    assert stored["routed"] == 2
    assert bus.take(topic_sub) == []
    for agent in ("a1", "a2"):
        inbox = bus.sm.bus.consumer_of(None, agent)
        assert inbox.kind == "inbox"
        deliveries = bus.ok("bus.deliver", agent=agent, max=5)["deliveries"]
        assert [d["message"]["id"] for d in deliveries] == ["direct"]
        assert bus.ok("bus.ack", agent=agent, delivery_ids=[deliveries[0]["delivery_id"]])["acked"]
    # Direct messages are not retained for replay.
    assert bus.sm.bus.bodies == {} and bus.sm.bus.topics["work"].log == {}
    assert bus.ok("bus.subscribe", topic="work", start="beginning")["replayed"] == 0


def test_a_direct_message_to_an_unregistered_agent_is_not_found(bus: Driver) -> None:
    _agent(bus, "a1")
    message = bus.refused("not_found", "bus.publish", topic="work", messages=[msg("m", destination=["a1", "ghost"])])
    assert "destination[1]" in message and "ghost" in message
    assert bus.sm.bus.bodies == {} and bus.sm.bus.consumers == {}
    batch = [msg("ok"), msg("m", destination=["ghost"])]
    message = bus.refused("not_found", "bus.publish", topic="work", messages=batch)
    assert message.startswith("messages[1].destination[0]")
    assert "work" not in bus.sm.bus.topics


def test_an_inbox_exists_once_something_was_sent(bus: Driver) -> None:
    _agent(bus, "a1")
    bus.refused("not_found", "bus.deliver", agent="a1", max=1)
    bus.publish("work", msg("m", destination=["a1"]))
    assert bus.ok("bus.deliver", agent="a1", max=1)["deliveries"][0]["message"]["id"] == "m"


def test_deregistering_an_agent_drops_its_inbox_and_owned_subscriptions(bus: Driver) -> None:
    _agent(bus, "a1")
    _agent(bus, "a2")
    owned = bus.sub("work", agent="a1")
    owned_member = bus.sub("work", group="g", agent="a1")
    other_member = bus.sub("work", group="g", agent="a2")
    unowned = bus.sub("work")
    bus.ok("bus.topic.configure", topic="work", max_messages=0)
    bus.publish("work", msg("direct", destination=["a1"]))
    bus.publish("work", msg("broadcast"))
    assert bus.take(owned) == ["broadcast"]
    bus.ok("agent.deregister", id="a1")
    bus.refused("not_found", "bus.deliver", sub=owned, max=1)
    bus.refused("not_found", "bus.deliver", sub=owned_member, max=1)
    bus.refused("not_found", "bus.deliver", agent="a1", max=1)
    assert "a:a1" not in bus.sm.bus.consumers and f"s:{owned}" not in bus.sm.bus.consumers
    # The group stays with its other member, and subscriptions nobody owns stay too.
    assert list(bus.sm.bus.consumers["g:g"].members) == [other_member]
    assert bus.take(other_member) == ["broadcast"] and bus.take(unowned) == ["broadcast"]
    # The direct message's body went with the inbox; the broadcast is held by the others.
    assert [bus.sm.bus.bodies[k].message["id"] for k in bus.sm.bus.bodies] == ["broadcast"]


def test_a_subscription_owned_by_an_unregistered_agent_is_not_found(bus: Driver) -> None:
    assert "agent" in bus.refused("not_found", "bus.subscribe", topic="t", agent="ghost")


def test_a_destination_listed_twice_is_delivered_and_acked_without_breaking_the_state(bus: Driver) -> None:
    _agent(bus, "a1")
    bus.publish("work", msg("m", destination=["a1", "a1"]))
    deliveries = bus.ok("bus.deliver", agent="a1", max=5)["deliveries"]
    for delivery in deliveries:  # KeyError out of StateMachine.apply today
        bus.ok("bus.ack", agent="a1", delivery_ids=[delivery["delivery_id"]])
    assert bus.sm.bus.bodies == {}


# -- reserved topics and cluster events ----------------------------------------------------------

@pytest.mark.parametrize("topic", ["agent.x", "agent.spawned", "lock.x", "system.failure", "system.a.b"])
def test_publishing_on_a_reserved_topic_is_invalid(bus: Driver, topic: str) -> None:
    assert bus.refused("invalid", "bus.publish", topic=topic, messages=[msg("m")]).startswith("topic:")


def test_task_topics_carry_typed_task_events(bus: Driver) -> None:
    sub = bus.sub("task.>")
    good = msg("t1", payload={"taskId": "T-1", "agentId": "a1", "progress": 50})
    assert bus.publish("task.progress", good)[0]["routed"] == 1
    bad: list[tuple[str, dict[str, Any], str]] = [
        ("task.exploded", good, "topic:"),
        ("task.completed", {**good, "type": "command"}, "type:"),
        ("task.completed", msg("t2", payload=["T-1"]), "payload:"),
        ("task.completed", msg("t2", payload={}), "payload.taskId:"),
        ("task.completed", msg("t2", payload={"taskId": 7}), "payload.taskId:"),
        ("task.progress", msg("t2", payload={"taskId": "T", "progress": 101}), "payload.progress:"),
        ("task.failed", msg("t2", payload={"taskId": "T", "error": 1}), "payload.error:"),
    ]
    for topic, message, field in bad:
        assert bus.refused("invalid", "bus.publish", topic=topic, messages=[message]).startswith(field), topic
    assert bus.take(sub) == ["t1"]


def test_cluster_events_are_delivered_as_event_messages(bus: Driver) -> None:
    agents, locks, system = bus.sub("agent.>"), bus.sub("lock.*"), bus.sub("system.>")
    bus.ok("agent.register", id="a1", type="worker", ttl_ms=60_000)
    bus.ok("lock.acquire", name="L", holder="a1", ttl_ms=60_000)
    bus.ok("system.report", type="system.failure", data={"member": "n2"})

    [spawned] = bus.deliver(agents)
    assert spawned["topic"] == "agent.spawned"
    message = spawned["message"]
    assert (message["type"], message["source"]) == ("event", "coordinator")
    assert message["payload"]["agentId"] == "a1" and message["payload"]["agentType"] == "worker"
    [acquired] = bus.deliver(locks)
    assert acquired["topic"] == "lock.acquired" and acquired["message"]["payload"]["name"] == "L"
    assert acquired["message"]["type"] == "event"
    [failure] = bus.deliver(system)
    assert failure["topic"] == "system.failure" and failure["message"]["payload"] == {"member": "n2"}
    assert int(failure["message"]["headers"]["seq"]) == bus.sm.events.last_seq
    # Acked like any message, and not retained for replay.
    bus.ack(agents, [spawned])
    assert bus.ok("bus.subscribe", topic="agent.>", start="beginning")["replayed"] == 0
    assert bus.sm.bus.bodies.keys() == {("lock.acquired", 1), ("system.failure", 1)}


def test_cluster_events_nobody_listens_to_store_nothing(bus: Driver) -> None:
    bus.ok("agent.register", id="a1", type="worker", ttl_ms=60_000)
    bus.ok("lock.acquire", name="L", holder="a1", ttl_ms=60_000)
    assert bus.sm.bus.bodies == {} and bus.sm.bus.topics == {}


# -- limits -------------------------------------------------------------------------------------

def test_a_full_bus_refuses_a_publish_when_every_message_is_still_needed() -> None:
    bus = Driver(messages_max=2)
    sub = bus.sub("t")
    bus.publish("t", msg("m1"), msg("m2"))
    assert "2 messages" in bus.refused("unavailable", "bus.publish", topic="t", messages=[msg("m3")])
    assert bus.refused("unavailable", "bus.publish", topic="u", messages=[msg("m3")])
    # An ack makes m1 retained-only, so it can be evicted for m3.
    bus.ack(sub, bus.deliver(sub, 1))
    assert bus.publish("t", msg("m3"))[0]["offset"] == 3
    assert bus.sm.bus.counters["evicted"] == 1
    assert sorted(bus.sm.bus.bodies) == [("t", 2), ("t", 3)]


def test_a_full_bus_evicts_retained_only_messages_oldest_first() -> None:
    bus = Driver(messages_max=3)
    bus.publish("old", msg("a"))
    bus.publish("old", msg("b"))
    sub = bus.sub("live")
    bus.publish("live", msg("c"))
    bus.publish("live", msg("d"))  # evicts a
    assert sorted(bus.sm.bus.bodies) == [("live", 1), ("live", 2), ("old", 2)]
    bus.refused("compacted", "bus.subscribe", topic="old", start="offset", start_value=1)
    bus.publish("live", msg("e"))  # evicts b
    assert sorted(bus.sm.bus.bodies) == [("live", 1), ("live", 2), ("live", 3)]
    assert bus.sm.bus.topics["old"].log == {} and bus.sm.bus.counters["evicted"] == 2
    bus.refused("unavailable", "bus.publish", topic="live", messages=[msg("f")])
    assert bus.take(sub) == ["c", "d", "e"]
    # A batch must fit as a whole.
    bus.refused("unavailable", "bus.publish", topic="old", messages=[msg("x")])


def test_queue_overflow_dead_letters_the_newcomer() -> None:
    bus = Driver(queue_max=2)
    sub = bus.sub("t")
    out = bus.publish("t", msg("m1"), msg("m2"), msg("m3"))
    assert [o["routed"] for o in out] == [1, 1, 1]
    assert bus.dead(sub) == [("m3", "overflow")]
    counters = bus.consumer(sub).counters
    assert (counters["overflowed"], counters["dead_lettered"]) == (1, 1)
    assert bus.take(sub) == ["m1", "m2"]
    # Redrive needs room in the queue.
    bus.refused("unavailable", "bus.dlq.redrive", sub=sub)


def test_batches_hold_at_most_max_batch_messages(bus: Driver) -> None:
    too_many = [msg(f"m{i}") for i in range(MAX_BATCH + 1)]
    assert bus.refused("invalid", "bus.publish", topic="t", messages=too_many).startswith("messages:")
    bus.refused("invalid", "bus.publish", topic="t", messages=[])
    assert len(bus.publish("t", *too_many[:MAX_BATCH])) == MAX_BATCH


@pytest.mark.parametrize(("op", "args", "field"), [
    ("bus.publish", {"topic": "t", "messages": [msg("a"), msg("b", priority=10)]}, "messages[1].priority:"),
    ("bus.publish", {"topic": "t", "messages": [msg("b", priority="urgent")]}, "priority:"),
    ("bus.publish", {"topic": "t", "messages": [msg("a"), msg("b"), {"id": "c", "source": "s"}]}, "messages[2].type:"),
    ("bus.publish", {"topic": "t", "messages": [msg("a", deliveryOptions={"retry": {"max_attempts": 0}})]},
     "deliveryOptions.retry.max_attempts:"),
    ("bus.publish", {"topic": "t", "messages": [msg("a"), msg("b", ttl=0)]}, "messages[1].ttl:"),
    ("bus.publish", {"topic": "t", "messages": msg("a")}, "messages:"),
    ("bus.publish", {"topic": "t.*", "messages": [msg("a")]}, "topic:"),
    ("bus.publish", {"topic": "a..b", "messages": [msg("a")]}, "topic:"),
    ("bus.subscribe", {"topic": "a.>.b"}, "topic:"),
    ("bus.subscribe", {"topic": "t", "guarantee": "sometimes"}, "guarantee:"),
    ("bus.subscribe", {"topic": "t", "ack_timeout_ms": 99}, "ack_timeout_ms:"),
    ("bus.subscribe", {"topic": "t", "max_attempts": 101}, "max_attempts:"),
    ("bus.subscribe", {"topic": "t", "start": "middle"}, "start:"),
    ("bus.subscribe", {"topic": "t", "start": "offset", "start_value": -1}, "start_value:"),
    ("bus.subscribe", {"topic": "t", "group": ""}, "group:"),
    ("bus.deliver", {"sub": "SUB", "max": 0}, "max:"),
    ("bus.deliver", {"sub": "SUB", "max": 1_001}, "max:"),
    ("bus.deliver", {"max": 1}, "sub:"),
    ("bus.ack", {"sub": "SUB", "delivery_ids": []}, "delivery_ids:"),
    ("bus.ack", {"sub": "SUB", "delivery_ids": ["1.1", 5]}, "delivery_ids[1]:"),
    ("bus.nack", {"sub": "SUB", "delivery_ids": ["1.1"], "delay_ms": -1}, "delay_ms:"),
    ("bus.nack", {"sub": "SUB", "delivery_ids": ["1.1"], "dead_letter": "yes"}, "dead_letter:"),
    ("bus.dlq.redrive", {"sub": "SUB", "delivery_ids": "1.1"}, "delivery_ids:"),
    ("bus.topic.configure", {"topic": "t", "max_age_ms": 999}, "max_age_ms:"),
    ("bus.topic.configure", {"topic": "t", "max_messages": -1}, "max_messages:"),
])
def test_bad_input_is_invalid_and_names_the_field(bus: Driver, op: str, args: dict[str, Any], field: str) -> None:
    sub = bus.sub("t")
    bus.publish("t", quick("m"))
    bus.deliver(sub)
    args = {k: (sub if v == "SUB" else v) for k, v in args.items()}
    message = bus.refused("invalid", op, **args)
    assert message.startswith(field), message


@pytest.mark.parametrize(("op", "args"), [
    ("bus.deliver", {"sub": "sub-999", "max": 1}),
    ("bus.ack", {"sub": "sub-999", "delivery_ids": ["1.1"]}),
    ("bus.unsubscribe", {"sub": "sub-999"}),
    ("bus.group.delete", {"group": "nobody"}),
    ("bus.dlq.purge", {"agent": "nobody"}),
])
def test_naming_what_does_not_exist_is_not_found(bus: Driver, op: str, args: dict[str, Any]) -> None:
    bus.sub("t")
    bus.publish("t", msg("m"))
    bus.refused("not_found", op, **args)


# -- snapshots ----------------------------------------------------------------------------------

def _busy(bus: Driver) -> dict[str, str]:
    """A state with a bit of everything: pending, delayed, ready (with stale heap
    keys from acks and expiries), dead letters, a group, an inbox, retention,
    dedupe records and timers."""
    _agent(bus, "a1")
    subs = {"plain": bus.sub("t.*"), "member1": bus.sub("t.a", group="g", ack_timeout_ms=1_000),
            "member2": bus.sub("t.a", group="g", ack_timeout_ms=1_000), "amo": bus.sub("t.>", guarantee="at-most-once"),
            "filtered": bus.sub("t.a", filter="payload.n >= 5")}
    bus.ok("bus.topic.configure", topic="t.b", max_messages=3)
    for i in range(12):
        bus.now_ms = T0 + i * 100
        topic = "t.a" if i % 3 else "t.b"
        message = quick(f"m{i}", priority=(i * 7) % 10, payload={"n": i}, ttl=900 if i == 5 else None)
        if i % 4 == 0:
            message["deliveryOptions"]["guarantee"] = "exactly-once"
        bus.publish(topic, message)
    bus.publish("direct", msg("d1", destination=["a1"]), msg("d2", destination=["a1"], priority=9))
    got = bus.deliver(subs["plain"], 4)
    bus.ack(subs["plain"], got[:1])
    bus.ok("bus.nack", sub=subs["plain"], delivery_ids=[got[1]["delivery_id"]], delay_ms=700)
    bus.ok("bus.nack", sub=subs["plain"], delivery_ids=[got[2]["delivery_id"]], dead_letter=True)
    bus.deliver(subs["member1"], 2)
    bus.deliver(subs["member2"], 1)
    bus.deliver(subs["amo"], 3)
    created = bus.consumer(subs["filtered"]).created_index
    bus.ok("bus.ack", sub=subs["filtered"], delivery_ids=[f"{created}.2"])  # a ready one: a stale heap key
    bus.ok("bus.deliver", agent="a1", max=1)
    bus.tick(T0 + 2_000)  # m5's TTL fires, a group delivery times out
    return subs


def _continue(bus: Driver, subs: dict[str, str]) -> None:
    for step in range(8):
        bus.now_ms = T0 + 2_000 + step * 700
        for sub in subs.values():
            got = bus.deliver(sub, 2)
            if got and step % 2:
                bus.ack(sub, got[:1])
        bus.publish("t.a", quick(f"late{step}", priority=step % 10))
        bus.ok("bus.tick")
        bus.same_everywhere()
    bus.ok("bus.dlq.redrive", sub=subs["plain"])
    bus.ok("bus.deliver", agent="a1", max=5)
    bus.ok("bus.unsubscribe", sub=subs["member2"])
    bus.ok("bus.group.delete", group="g")
    bus.ok("agent.deregister", id="a1")
    bus.tick(T0 + 86_400_000 * 2)
    bus.same_everywhere()


def test_a_restored_snapshot_encodes_to_the_same_bytes(bus: Driver) -> None:
    _busy(bus)
    blob = encode_snapshot(bus.sm.snapshot_data())
    restored = StateMachine.from_snapshot_data(decode_snapshot(blob), bus.sm.limits)
    assert encode_snapshot(restored.snapshot_data()) == blob
    # The rebuilt heaps and counters agree with the original's.
    for key, consumer in bus.sm.bus.consumers.items():
        twin = restored.bus.consumers[key]
        assert (twin.ready_count, twin.pending_count) == (consumer.ready_count, consumer.pending_count)
    assert restored.bus.evictable_count == bus.sm.bus.evictable_count
    assert restored.bus.next_due_ms() == bus.sm.bus.next_due_ms()


def test_a_restored_machine_answers_like_the_original(bus: Driver) -> None:
    subs = _busy(bus)
    bus.restore()
    _continue(bus, subs)  # every command is checked to give equal results on both


def test_a_machine_restored_twice_answers_like_the_original(bus: Driver) -> None:
    subs = _busy(bus)
    bus.restore()
    bus.now_ms = T0 + 2_100
    bus.deliver(subs["plain"], 3)
    bus.machines.append(restored_copy(bus.machines[1]))
    _continue(bus, subs)


def test_pop_order_survives_a_restore_with_many_stale_heap_keys(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", *(msg(f"m{i}", priority=(i * 5) % 10) for i in range(60)))
    created = bus.consumer(sub).created_index
    # Ack every third one while it is still ready: its heap key goes stale.
    bus.ok("bus.ack", sub=sub, delivery_ids=[f"{created}.{seq}" for seq in range(1, 61, 3)])
    assert len(bus.consumer(sub).ready) > bus.consumer(sub).ready_count
    bus.restore()
    order = []
    while batch := bus.take(sub, 7):
        order += batch
    expected = sorted((i for i in range(60) if i % 3), key=lambda i: (-((i * 5) % 10), i))
    assert order == [f"m{i}" for i in expected]
    bus.same_everywhere()


# -- unsubscribing ------------------------------------------------------------------------------

def test_unsubscribe_releases_what_the_subscription_held(bus: Driver) -> None:
    bus.ok("bus.topic.configure", topic="gone", max_messages=0)
    sub = bus.sub("gone")
    keep = bus.sub("kept")
    bus.publish("gone", quick("m1"), quick("m2"), quick("m3"))
    bus.publish("kept", msg("k"))
    bus.deliver(sub, 1)
    bus.ok("bus.nack", sub=sub, delivery_ids=[bus.deliver(sub, 1)[0]["delivery_id"]], dead_letter=True)
    assert len(bus.sm.bus.bodies) == 4
    assert bus.ok("bus.unsubscribe", sub=sub) == {"id": sub, "dropped": 3}
    assert sorted(bus.sm.bus.bodies) == [("kept", 1)]
    assert f"s:{sub}" not in bus.sm.bus.consumers
    bus.refused("not_found", "bus.deliver", sub=sub, max=1)
    bus.refused("not_found", "bus.unsubscribe", sub=sub)
    # Its timers fire into nothing.
    bus.tick(T0 + 86_400_000)
    assert bus.take(keep) == ["k"]


def test_unsubscribe_keeps_retained_bodies(bus: Driver) -> None:
    sub = bus.sub("t")
    bus.publish("t", msg("m"))
    bus.ok("bus.unsubscribe", sub=sub)
    assert list(bus.sm.bus.bodies) == [("t", 1)] and bus.sm.bus.evictable_count == 1


def test_a_group_member_leaving_keeps_the_group(bus: Driver) -> None:
    first = bus.sub("jobs", group="g")
    second = bus.sub("jobs", group="g")
    bus.publish("jobs", msg("j1"), msg("j2"))
    assert bus.ok("bus.unsubscribe", sub=first) == {"id": first, "dropped": 0}
    assert bus.take(second) == ["j1", "j2"]


def test_deleting_a_group_drops_its_members_and_messages(bus: Driver) -> None:
    bus.ok("bus.topic.configure", topic="jobs", max_messages=0)
    members = [bus.sub("jobs", group="g") for _ in range(3)]
    bus.publish("jobs", msg("j1"), msg("j2"))
    bus.deliver(members[0], 1)
    assert bus.ok("bus.group.delete", group="g") == {"group": "g", "dropped": 2}
    for member in members:
        bus.refused("not_found", "bus.deliver", sub=member, max=1)
    assert bus.sm.bus.consumers == {} and bus.sm.bus.subscriptions == {} and bus.sm.bus.bodies == {}
    # A new group under the same name starts afresh, with its own delivery ids.
    again = bus.sub("jobs.other", group="g")
    bus.publish("jobs.other", msg("new"))
    assert bus.take(again) == ["new"]
