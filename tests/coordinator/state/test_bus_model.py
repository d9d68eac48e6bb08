"""The bus against a deliberately dumb model.

``Model`` is plain dicts and the documented rules, never the implementation:
for each consumer (a subscription, or a group shared by its members) the
messages it still owes — published after it was made (or replayed into it),
on a topic its pattern matches — until they are acked or handed out
at-most-once. A dead letter is still owed: it waits in the DLQ for an ack,
a redrive or a purge. The model also knows when a delivery may come back
(ack timeout plus the message's backoff, or the nack's delay) and what the
exactly-once publisher dedupe answers.

The hypothesis ``RuleBasedStateMachine`` applies every command both to the
machine under test (``sm``, which the ``restore`` rule replaces by a copy
restored from its encoded snapshot) and to a reference that is never
restored (``ref``): their results and snapshot bytes must stay equal. After
every step the invariants compare the machine's consumers with the model:
nothing owed is lost, nothing else is held, and the counters and body
holders agree with a recount.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from coordinator.codec import decode_snapshot, encode_snapshot
from coordinator.state import Limits, StateMachine
from coordinator.state.bus import BusLimits
from coordinator.types import Command, Result

T0 = 1_700_000_000_000
TOPICS = ("t.a", "t.b", "u.a")
PATTERNS = ("t.a", "t.*", "t.>", ">", "u.a", "*.a", "u.*")
GROUPS = (None, None, "g1", "g2")
GUARANTEES = ("at-most-once", "at-least-once", "exactly-once")
RANK = {g: i for i, g in enumerate(GUARANTEES)}
REUSED_IDS = ("x1", "x2")
RETAINED = 4  # per topic; small so that count retention drops bodies during a run
BUS_LIMITS = BusLimits(retention_messages=RETAINED)
DEDUPE_WINDOW_MS = BUS_LIMITS.dedupe_window_ms
MAX_BACKOFF_MS = 60_000  # the default of deliveryOptions.retry.max_backoff_ms
NEVER = 2**62

Key = tuple[str, int]  # (topic, offset): one stored message


def matches(pattern: str, topic: str) -> bool:
    """Written out again on purpose: the model does not call the implementation."""
    p, t = pattern.split("."), topic.split(".")
    if p[-1] == ">":
        return len(t) > len(p) - 1 and all(a in ("*", b) for a, b in zip(p[:-1], t, strict=False))
    return len(p) == len(t) and all(a in ("*", b) for a, b in zip(p, t, strict=True))


def backoff_ms(backoff: int, attempt: int) -> int:
    return int(min(backoff * 2.0 ** (attempt - 1), MAX_BACKOFF_MS))


@dataclass
class Message:
    id: str
    priority: int
    guarantee: str
    publish_ms: int
    expires_ms: int  # NEVER without a ttl
    timeout_ms: int
    max_attempts: int
    backoff_ms: int
    order: int  # publish order over all topics


@dataclass
class Consumer:
    key: str
    pattern: str
    guarantee: str
    ack_timeout_ms: int | None
    members: list[str] = field(default_factory=list)
    owed: dict[Key, None] = field(default_factory=dict)
    acked: set[Key] = field(default_factory=set)
    delivery_ids: dict[Key, str] = field(default_factory=dict)
    attempts: Counter[Key] = field(default_factory=Counter)
    due_ms: dict[Key, int] = field(default_factory=dict)  # not handed out again before this
    touched: set[Key] = field(default_factory=set)  # ever delivered or redriven

    def settings(self) -> tuple[Any, ...]:
        return self.pattern, self.guarantee, self.ack_timeout_ms

    def known_ids(self, owed_first: bool) -> list[str]:
        """Delivery ids handed out so far; with ``owed_first`` only those still owed
        (when there are any), so that acks and nacks mostly hit something live."""
        owed = [d for k, d in self.delivery_ids.items() if k in self.owed]
        return owed if owed_first and owed else list(self.delivery_ids.values())

    def key_of(self, delivery_id: str) -> Key | None:
        return next((k for k, d in self.delivery_ids.items() if d == delivery_id), None)


@dataclass
class Model:
    messages: dict[Key, Message] = field(default_factory=dict)
    stored: dict[str, list[int]] = field(default_factory=dict)  # topic -> offsets, oldest first
    dedupe: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # (topic, id) -> (offset, ms)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    subs: dict[str, str] = field(default_factory=dict)  # subscription id -> consumer key
    published: int = 0

    def retained(self, topic: str) -> list[int]:
        return self.stored.get(topic, [])[-RETAINED:]


message_spec = st.tuples(
    st.integers(0, 9),                                   # priority
    st.sampled_from(("at-least-once", "exactly-once")),  # guarantee
    st.sampled_from((None, None, None, 300, 10_000)),    # ttl
    st.sampled_from((500, 2_000)),                       # timeout
    st.sampled_from((3, 2, 1)),                          # max attempts
    st.sampled_from((0, 100, 300)),                      # backoff
    st.booleans(),                                       # reuse an id
    st.sampled_from(REUSED_IDS),
)


class BusRules(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        limits = Limits(bus=BUS_LIMITS)
        self.sm = StateMachine(limits)
        self.ref = StateMachine(limits)  # never restored
        self.model = Model()
        self.index = 0
        self.now_ms = T0
        self.fresh = 0

    # -- driving ------------------------------------------------------------------------

    def apply(self, op: str, **args: Any) -> Result:
        self.index += 1
        command = Command(op=op, args=args, now_ms=self.now_ms)
        result = self.sm.apply(self.index, command)
        assert self.ref.apply(self.index, command) == result, (op, args)
        return result

    def ok(self, op: str, **args: Any) -> Any:
        result = self.apply(op, **args)
        assert result.error is None, (op, args, result.error)
        return result.value

    def pick(self, live: list[str], n: int) -> str:
        return sorted(live)[n % len(live)]

    def consumer_of(self, sub: str) -> Consumer:
        return self.model.consumers[self.model.subs[sub]]

    def entries(self, key: str) -> dict[Key, Any]:
        """The machine's entries and dead letters of one consumer, by message."""
        consumer = self.sm.bus.consumers[key]
        return {(e.topic, e.offset): e for e in (*consumer.entries.values(), *consumer.dlq.values())}

    def effective(self, consumer: Consumer, message: Message) -> str:
        return min(consumer.guarantee, message.guarantee, key=RANK.__getitem__)

    # -- rules ----------------------------------------------------------------------------

    @initialize(pattern=st.sampled_from(PATTERNS), guarantee=st.sampled_from(GUARANTEES),
                topic=st.sampled_from(TOPICS), specs=st.lists(message_spec, min_size=1, max_size=3))
    def start(self, pattern: str, guarantee: str, topic: str, specs: list[tuple[Any, ...]]) -> None:
        """Begin with a subscription and a few messages, so that runs reach deliveries early."""
        self.subscribe(pattern, None, guarantee, None, "new", 0)
        self.publish(topic, specs)

    @rule(topic=st.sampled_from(TOPICS), specs=st.lists(message_spec, min_size=1, max_size=3))
    def publish(self, topic: str, specs: list[tuple[Any, ...]]) -> None:
        raw, expected = [], []
        model = self.model
        dedupe = {k: v for k, v in model.dedupe.items() if v[1] >= self.now_ms - DEDUPE_WINDOW_MS}
        for priority, guarantee, ttl, timeout, attempts, backoff, reuse, reused_id in specs:
            self.fresh += 1
            msg_id = reused_id if reuse else f"m{self.fresh}"
            raw.append({"id": msg_id, "type": "event", "source": "model", "priority": priority, "ttl": ttl,
                        "deliveryOptions": {"guarantee": guarantee, "timeout": timeout,
                                            "retry": {"max_attempts": attempts, "backoff_ms": backoff}}})
            if guarantee == "exactly-once" and (topic, msg_id) in dedupe:
                expected.append({"id": msg_id, "offset": dedupe[(topic, msg_id)][0], "duplicate": True})
                continue
            offsets = model.stored.setdefault(topic, [])
            offset = len(offsets) + 1
            offsets.append(offset)
            model.published += 1
            model.messages[(topic, offset)] = Message(
                msg_id, priority, guarantee, self.now_ms, NEVER if ttl is None else self.now_ms + ttl, timeout,
                attempts, backoff, model.published)
            routed = 0
            for consumer in model.consumers.values():
                if matches(consumer.pattern, topic):
                    consumer.owed[(topic, offset)] = None
                    routed += 1
            if guarantee == "exactly-once":
                dedupe[(topic, msg_id)] = model.dedupe[(topic, msg_id)] = (offset, self.now_ms)
            expected.append({"id": msg_id, "offset": offset, "routed": routed})
        assert self.ok("bus.publish", topic=topic, messages=raw) == {"topic": topic, "index": self.index,
                                                                      "messages": expected}

    @rule(pattern=st.sampled_from(PATTERNS), group=st.sampled_from(GROUPS),
          guarantee=st.sampled_from(GUARANTEES[1:] * 2 + GUARANTEES[:1]),
          ack_timeout_ms=st.sampled_from((None, None, 200, 1_000)),
          start=st.sampled_from(("new", "new", "beginning", "time")), back_ms=st.sampled_from((0, 500, 5_000)))
    def subscribe(self, pattern: str, group: str | None, guarantee: str, ack_timeout_ms: int | None, start: str,
                  back_ms: int) -> None:
        args: dict[str, Any] = {"topic": pattern, "guarantee": guarantee, "start": start,
                                "start_value": self.now_ms - back_ms}
        if group is not None:
            args["group"] = group
        if ack_timeout_ms is not None:
            args["ack_timeout_ms"] = ack_timeout_ms
        sub_id = f"sub-{self.index + 1}"
        key = f"g:{group}" if group is not None else f"s:{sub_id}"
        model = self.model
        existing = model.consumers.get(key)
        if existing is not None and existing.settings() != (pattern, guarantee, ack_timeout_ms):
            before = encode_snapshot({k: v for k, v in self.sm.snapshot_data().items()
                                      if k not in ("applied_index", "now_ms")})
            result = self.apply("bus.subscribe", **args)
            assert result.error is not None and result.error[0] == "conflict"
            assert encode_snapshot({k: v for k, v in self.sm.snapshot_data().items()
                                    if k not in ("applied_index", "now_ms")}) == before
            return
        replay: list[Key] = []
        if existing is None:
            existing = model.consumers[key] = Consumer(key, pattern, guarantee, ack_timeout_ms)
            if start != "new":
                for topic in model.stored:
                    if matches(pattern, topic):
                        replay += [(topic, o) for o in model.retained(topic)]
                replay = [k for k in replay if model.messages[k].expires_ms > self.now_ms
                          and (start == "beginning" or model.messages[k].publish_ms >= args["start_value"])]
                replay.sort(key=lambda k: model.messages[k].order)
                existing.owed.update(dict.fromkeys(replay))
        existing.members.append(sub_id)
        model.subs[sub_id] = key
        value = self.ok("bus.subscribe", **args)
        assert (value["id"], value["group"], value["replayed"]) == (sub_id, group, len(replay))
        if replay:  # enqueued in publish order, so equal priorities come out in that order
            entries = self.sm.bus.consumers[key].entries.values()
            assert [(e.topic, e.offset) for e in sorted(entries, key=lambda e: e.seq)] == replay
        assert value["consumer"]["backlog"] == self.sm.bus.consumers[key].ready_count

    @precondition(lambda self: self.model.subs)
    @rule(n=st.integers(0, 10**6), max_n=st.integers(1, 4), busy_first=st.integers(0, 3).map(bool))
    def deliver(self, n: int, max_n: int, busy_first: bool) -> None:
        # Mostly from a consumer that owes something, so that runs reach redeliveries.
        busy = [s for s, k in self.model.subs.items() if self.model.consumers[k].owed]
        sub = self.pick(busy if busy_first and busy else list(self.model.subs), n)
        consumer = self.consumer_of(sub)
        machine = self.sm.bus.consumers[consumer.key]
        ready_before = {e.seq for e in machine.entries.values() if e.state == "ready"}
        value = self.ok("bus.deliver", sub=sub, max=max_n)
        deliveries = value["deliveries"]
        assert len(deliveries) <= max_n
        order = []
        for d in deliveries:
            key = (d["topic"], d["offset"])
            message = self.model.messages[key]
            seq = int(d["delivery_id"].split(".")[1])
            assert key in consumer.owed, ("delivered what is not owed", key)
            assert key not in consumer.acked, ("delivered again after an ack", key)
            assert seq in ready_before, ("handed out while pending, delayed or dead", key)
            assert self.now_ms >= consumer.due_ms.get(key, 0), ("handed out before its due time", key)
            assert message.expires_ms > self.now_ms, ("handed out after its ttl", key)
            assert d["message"]["id"] == message.id
            assert d["delivery_id"] == consumer.delivery_ids.setdefault(key, d["delivery_id"])
            consumer.attempts[key] += 1
            consumer.touched.add(key)
            assert d["attempt"] == consumer.attempts[key] <= message.max_attempts
            guarantee = self.effective(consumer, message)
            assert d["guarantee"] == guarantee
            order.append((-message.priority, seq))
            if guarantee == "at-most-once":
                del consumer.owed[key]  # handed out for good
                consumer.due_ms[key] = NEVER
            else:
                timeout = consumer.ack_timeout_ms or message.timeout_ms
                consumer.due_ms[key] = self.now_ms + timeout + backoff_ms(message.backoff_ms, consumer.attempts[key])
        # Highest priority first, then publish order; nothing better stays ready.
        assert order == sorted(order) and len(set(order)) == len(order)
        still_ready = [(-e.priority, e.seq) for e in machine.entries.values() if e.state == "ready"]
        if len(deliveries) < max_n:
            assert still_ready == [], "a deliver left ready messages behind"
        elif order and still_ready:
            assert min(still_ready) > order[-1], "a lower priority was handed out before a higher one"
        assert value["backlog"] == len(still_ready)

    @precondition(lambda self: any(c.delivery_ids for c in self.model.consumers.values() if c.members))
    @rule(n=st.integers(0, 10**6), picks=st.lists(st.integers(0, 50), min_size=1, max_size=3),
          owed_first=st.integers(0, 3).map(bool), bogus=st.sampled_from((None, None, "nonsense", "1.999999")))
    def ack(self, n: int, picks: list[int], owed_first: bool, bogus: str | None) -> None:
        sub = self.pick([s for s, k in self.model.subs.items() if self.model.consumers[k].delivery_ids], n)
        consumer = self.consumer_of(sub)
        known = consumer.known_ids(owed_first)
        ids = [known[p % len(known)] for p in picks] + ([bogus] if bogus else [])
        acked, unknown = [], []
        for delivery_id in dict.fromkeys(ids):
            key = consumer.key_of(delivery_id)
            if key is not None and key in consumer.owed:
                acked.append(delivery_id)
                del consumer.owed[key]
                consumer.acked.add(key)
                consumer.due_ms[key] = NEVER
            else:
                unknown.append(delivery_id)
        assert self.ok("bus.ack", sub=sub, delivery_ids=ids) == {"acked": acked, "unknown": unknown}

    @precondition(lambda self: any(c.delivery_ids for c in self.model.consumers.values() if c.members))
    @rule(n=st.integers(0, 10**6), picks=st.lists(st.integers(0, 50), min_size=1, max_size=3),
          owed_first=st.integers(0, 3).map(bool), mode=st.sampled_from(("backoff", "zero", "delay", "dead")))
    def nack(self, n: int, picks: list[int], owed_first: bool, mode: str) -> None:
        sub = self.pick([s for s, k in self.model.subs.items() if self.model.consumers[k].delivery_ids], n)
        consumer = self.consumer_of(sub)
        known = consumer.known_ids(owed_first)
        ids = list(dict.fromkeys(known[p % len(known)] for p in picks))
        before = self.entries(consumer.key)
        pending = [d for d in ids if before.get(consumer.key_of(d)) is not None
                   and before[consumer.key_of(d)].state == "pending"]
        args: dict[str, Any] = {"delivery_ids": ids}
        if mode == "dead":
            args["dead_letter"] = True
        elif mode != "backoff":
            args["delay_ms"] = 0 if mode == "zero" else 700
        value = self.ok("bus.nack", sub=sub, **args)
        assert value == {"nacked": pending, "unknown": [d for d in ids if d not in pending]}
        after = self.entries(consumer.key)
        for delivery_id in pending:
            key = consumer.key_of(delivery_id)
            assert key in consumer.owed, ("pending but not owed", key)
            message = self.model.messages[key]
            entry = after[key]
            if mode == "dead":
                assert (entry.state, entry.reason) == ("dead", "rejected")
                consumer.due_ms[key] = NEVER
            elif consumer.attempts[key] >= message.max_attempts:
                assert (entry.state, entry.reason) == ("dead", "max_attempts")
                consumer.due_ms[key] = NEVER
            else:
                delay = {"backoff": backoff_ms(message.backoff_ms, consumer.attempts[key]), "zero": 0,
                         "delay": 700}[mode]
                assert entry.state == ("ready" if delay == 0 else "delayed")
                consumer.due_ms[key] = self.now_ms + delay

    @rule(advance_ms=st.sampled_from((300, 2_000)))
    def wait(self, advance_ms: int) -> None:
        """Time passes before the leader proposes a tick: deliveries must check expiry themselves."""
        self.now_ms += advance_ms

    @rule(advance_ms=st.sampled_from((0, 50, 300, 1_000, 1_000, 5_000)))
    def tick(self, advance_ms: int) -> None:
        self.now_ms += advance_ms
        value = self.ok("bus.tick")
        assert value["next_due_ms"] is None or value["next_due_ms"] > self.now_ms
        for consumer in self.model.consumers.values():
            entries = self.entries(consumer.key)
            for key in consumer.owed:
                entry = entries[key]
                if consumer.due_ms.get(key, 0) <= self.now_ms:
                    assert entry.state in ("ready", "dead"), ("still waiting after its due time", key, entry)
                if key not in consumer.touched and self.model.messages[key].expires_ms <= self.now_ms:
                    assert (entry.state, entry.reason) == ("dead", "ttl"), ("expired but not dead", key, entry)

    @precondition(lambda self: self.model.subs)
    @rule(advance_ms=st.sampled_from((1_000, 3_500)), n=st.integers(0, 10**6), max_n=st.integers(1, 4))
    def tick_then_deliver(self, advance_ms: int, n: int, max_n: int) -> None:
        """Past most ack timeouts and backoffs, then fetch: the way to redeliveries."""
        self.tick(advance_ms)
        self.deliver(n, max_n, True)

    @precondition(lambda self: self.model.subs)
    @rule(n=st.integers(0, 10**6))
    def redrive(self, n: int) -> None:
        sub = self.pick(list(self.model.subs), n)
        consumer = self.consumer_of(sub)
        dead = self.sm.bus.dead_letters(self.sm.bus.consumers[consumer.key], 10**6)
        value = self.ok("bus.dlq.redrive", sub=sub)
        assert value == {"redriven": [d["delivery_id"] for d in dead]}
        after = self.entries(consumer.key)
        for letter in dead:
            key = (letter["topic"], letter["offset"])
            assert key in consumer.owed
            assert (after[key].state, after[key].attempts) == ("ready", 0)
            consumer.attempts[key] = 0
            consumer.due_ms[key] = 0
            consumer.touched.add(key)

    @precondition(lambda self: self.model.subs)
    @rule(n=st.integers(0, 10**6))
    def unsubscribe(self, n: int) -> None:
        sub = self.pick(list(self.model.subs), n)
        consumer = self.consumer_of(sub)
        del self.model.subs[sub]
        consumer.members.remove(sub)
        dropped = 0
        if consumer.key.startswith("s:"):
            dropped = len(consumer.owed)
            del self.model.consumers[consumer.key]
        assert self.ok("bus.unsubscribe", sub=sub) == {"id": sub, "dropped": dropped}

    @precondition(lambda self: any(k.startswith("g:") for k in self.model.consumers))
    @rule(n=st.integers(0, 10**6))
    def delete_group(self, n: int) -> None:
        key = self.pick([k for k in self.model.consumers if k.startswith("g:")], n)
        consumer = self.model.consumers.pop(key)
        for sub in consumer.members:
            del self.model.subs[sub]
        assert self.ok("bus.group.delete", group=key[2:]) == {"group": key[2:], "dropped": len(consumer.owed)}

    @rule()
    def restore(self) -> None:
        blob = encode_snapshot(self.sm.snapshot_data())
        self.sm = StateMachine.from_snapshot_data(decode_snapshot(blob), self.sm.limits)
        assert encode_snapshot(self.sm.snapshot_data()) == blob

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def same_as_the_reference(self) -> None:
        assert encode_snapshot(self.sm.snapshot_data()) == encode_snapshot(self.ref.snapshot_data())

    @invariant()
    def consumers_hold_exactly_what_they_owe(self) -> None:
        bus, model = self.sm.bus, self.model
        assert list(bus.subscriptions) == list(model.subs)
        assert sorted(bus.consumers) == sorted(model.consumers)
        for key, consumer in model.consumers.items():
            machine = bus.consumers[key]
            held = Counter((e.topic, e.offset) for e in (*machine.entries.values(), *machine.dlq.values()))
            assert held == Counter(consumer.owed.keys()), (key, held, consumer.owed)  # nothing lost, nothing extra
            assert list(machine.members) == consumer.members
            assert all(e.state in ("ready", "pending", "delayed") for e in machine.entries.values())
            assert all(e.state == "dead" and e.reason in ("ttl", "max_attempts", "rejected")
                       for e in machine.dlq.values())
            states = Counter(e.state for e in machine.entries.values())
            assert (machine.ready_count, machine.pending_count) == (states["ready"], states["pending"])
            heap_keys = set(machine.ready)
            assert all((-e.priority, seq) in heap_keys for seq, e in machine.entries.items() if e.state == "ready")
            for entry in (*machine.entries.values(), *machine.dlq.values()):
                body = bus.bodies.get((entry.topic, entry.offset))
                assert body is not None, ("an entry without its body", key, entry)
                assert body.holders.get(key) == entry.seq

    @invariant()
    def bodies_live_exactly_while_retained_or_held(self) -> None:
        bus, model = self.sm.bus, self.model
        evictable = 0
        for (topic, offset), body in bus.bodies.items():
            assert body.retained or body.holders, ("a body nobody needs", topic, offset)
            evictable += body.retained and not body.holders
            for key, seq in body.holders.items():
                consumer = bus.consumers[key]
                entry = consumer.entries.get(seq) or consumer.dlq.get(seq)
                assert entry is not None and (entry.topic, entry.offset) == (topic, offset)
        assert bus.evictable_count == evictable
        for topic, offsets in model.stored.items():
            assert list(bus.topics[topic].log) == model.retained(topic)
            assert all((topic, o) in bus.bodies for o in offsets[-RETAINED:])


BusRules.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBusModel = BusRules.TestCase
