"""Topics bound to a broker transport, in the replicated state (issue 5):
the binding holds each message until the leader commits the broker's
confirmation (``bus.cursor``), bounds that backlog, and survives snapshots."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.coordinator.state.test_bus import Driver, msg, restored_copy


def _bound(bus: Driver, topic: str = "orders", **args: object) -> dict:
    return bus.ok("bus.bind", topic=topic, transport="redis", **args)


def test_a_bound_topic_goes_to_the_transport_not_to_embedded_subscriptions() -> None:
    bus = Driver()
    sub = bus.sub("orders")
    bus.publish("orders", msg("before"))
    binding = _bound(bus)
    assert binding["cursor"] == 1 and binding["backlog"] == 0  # what was published before stays embedded
    answers = bus.publish("orders", msg("m2"), msg("m3"))
    assert [a["routed"] for a in answers] == [0, 0]
    assert bus.take(sub) == ["before"]
    assert [b.message["id"] for b in bus.sm.bus.unsent("orders", 10)] == ["m2", "m3"]
    assert [b.message["id"] for b in bus.sm.bus.unsent("orders", 1)] == ["m2"]


def test_the_cursor_releases_what_the_broker_holds_and_never_moves_back() -> None:
    bus = Driver()
    bus.ok("bus.topic.configure", topic="orders", max_messages=0)  # nothing retained: bodies live only while unsent
    _bound(bus)
    bus.publish("orders", msg("a"), msg("b"), msg("c"))
    assert len(bus.sm.bus.bodies) == 3
    moved = bus.ok("bus.cursor", topic="orders", offset=2)
    assert (moved["cursor"], moved["backlog"], moved["moved"]) == (2, 1, 2)
    assert [b.message["id"] for b in bus.sm.bus.unsent("orders", 10)] == ["c"]
    assert len(bus.sm.bus.bodies) == 1
    assert bus.ok("bus.cursor", topic="orders", offset=1)["cursor"] == 2  # a late, older confirmation
    bus.refused("invalid", "bus.cursor", topic="orders", offset=4)  # beyond the last offset
    bus.refused("not_found", "bus.cursor", topic="other", offset=1)
    bus.refused("conflict", "bus.cursor", topic="orders", offset=3, created_index=999)


def test_a_direct_topic_refuses_log_publishes_and_keeps_its_mode() -> None:
    bus = Driver()
    binding = _bound(bus, mode="direct")
    assert binding["mode"] == "direct"
    message = bus.refused("conflict", "bus.publish", topic="orders", messages=[msg("a")])
    assert "is direct" in message
    assert "bound in direct mode" in bus.refused("conflict", "bus.bind", topic="orders", transport="redis")
    assert _bound(bus, mode="direct")["mode"] == "direct"  # the same again: idempotent
    sub = bus.sub("orders")
    assert bus.ok("bus.transport.checkpoint", sub=sub, acked=5, position=9) == {"acked": 5}
    assert bus.ok("bus.transport.checkpoint", sub=sub, acked=2)["acked"] == 7
    copy = bus.restore()
    assert copy.bus.bindings["orders"].mode == "direct"
    assert bus.ok("bus.unbind", topic="orders")["dropped"] == 0
    assert _bound(bus)["mode"] == "log"
    assert "bound in log mode" in bus.refused("conflict", "bus.bind", topic="orders", transport="redis",
                                              mode="direct")


def test_a_log_binding_keeps_its_old_snapshot_row() -> None:
    bus = Driver()
    _bound(bus)
    assert bus.sm.bus.bindings["orders"].to_data()[-1] != "log"
    assert len(bus.sm.bus.bindings["orders"].to_data()) == 5  # rows of older snapshots load the same


def test_the_backlog_bound_refuses_a_publish_and_stores_nothing() -> None:
    bus = Driver()
    _bound(bus, backlog_max=3)
    bus.publish("orders", msg("a"), msg("b"))
    message = bus.refused("unavailable", "bus.publish", topic="orders", messages=[msg("c"), msg("d")])
    assert "wait for the redis transport" in message
    bus.ok("bus.cursor", topic="orders", offset=2)
    assert len(bus.publish("orders", msg("c"), msg("d"))) == 2


def test_binding_is_idempotent_conflicts_with_another_transport_and_refuses_reserved_topics() -> None:
    bus = Driver()
    assert _bound(bus)["transport"] == "redis"
    assert _bound(bus, backlog_max=10)["backlog_max"] == 10
    bus.refused("conflict", "bus.bind", topic="orders", transport="nats")
    bus.refused("invalid", "bus.bind", topic="agent.x", transport="redis")
    bus.refused("invalid", "bus.bind", topic="orders.*", transport="redis")
    bus.refused("invalid", "bus.bind", topic="t", transport="redis", backlog_max=0)


def test_unbind_waits_for_the_backlog_unless_told_to_drop_it() -> None:
    bus = Driver()
    bus.ok("bus.topic.configure", topic="orders", max_messages=0)
    _bound(bus)
    bus.publish("orders", msg("a"))
    bus.refused("conflict", "bus.unbind", topic="orders")
    assert bus.ok("bus.unbind", topic="orders", drop_backlog=True)["dropped"] == 1
    assert bus.sm.bus.bodies == {} and bus.sm.bus.bindings == {}
    bus.refused("not_found", "bus.unbind", topic="orders")
    sub = bus.sub("orders")
    bus.publish("orders", msg("after"))
    assert bus.take(sub) == ["after"]  # embedded again


def test_bindings_survive_a_snapshot_and_replicas_stay_identical() -> None:
    bus = Driver()
    _bound(bus, backlog_max=50)
    bus.publish("orders", msg("a"), msg("b"))
    bus.restore()
    bus.ok("bus.cursor", topic="orders", offset=1)
    bus.publish("orders", msg("c"))
    bus.same_everywhere()
    for machine in bus.machines:
        assert [b.message["id"] for b in machine.bus.unsent("orders", 10)] == ["b", "c"]


@settings(max_examples=60, stateful_step_count=30, deadline=None)
class BindingMachine(RuleBasedStateMachine):
    """Random publishes, broker confirmations, restores and rebinds on one bound
    topic, against a model: the offsets still waiting for the broker."""

    def __init__(self) -> None:
        super().__init__()
        self.bus = Driver()
        self.bus.ok("bus.topic.configure", topic="t", max_messages=2)
        _bound(self.bus, "t", backlog_max=6)
        self.cursor = 0
        self.last = 0

    @rule(n=st.integers(1, 4))
    def publish(self, n: int) -> None:
        result = self.bus("bus.publish", topic="t", messages=[msg(f"m{self.last + i}") for i in range(n)])
        if self.last - self.cursor + n > 6:
            assert result.error is not None and result.error[0] == "unavailable"
        else:
            assert result.error is None
            self.last += n

    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        offset = data.draw(st.integers(0, self.last))
        self.bus.ok("bus.cursor", topic="t", offset=offset)
        self.cursor = max(self.cursor, offset)

    @rule()
    def restore(self) -> None:
        self.bus.machines = [restored_copy(self.bus.sm)]

    @invariant()
    def waiting_messages_are_held_and_nothing_else_is(self) -> None:
        bus = self.bus.sm.bus
        assert [b.offset for b in bus.unsent("t", 100)] == list(range(self.cursor + 1, self.last + 1))
        assert bus.bindings["t"].cursor == self.cursor
        retained = set(bus.topics["t"].log)
        for topic, offset in bus.bodies:
            assert topic == "t" and (offset > self.cursor or offset in retained), offset
        assert len(retained) <= 2


TestBindingMachine = BindingMachine.TestCase
