"""Transform rules: the language (errors with their line and column), the
interpreter (never anything but a result or a stated failure, on any JSON),
and transforms applied at publish in the replicated state machine: versions
mapped, messages routed, failures dead-lettered with the reason."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.state.transforms import Failed, RuleError, parse, run
from tests.coordinator.state.test_bus import Driver, msg

V1_TO_V2 = """# user.created v1 -> v2
when header.version == "1" and payload.userId exists
rename payload.userId to payload.user_id
move payload.address.city to payload.city
drop payload.password
set header.version = "2"
set payload.tags = ["migrated"]
"""


@pytest.mark.parametrize(("rule", "line", "column", "why"), [
    ("rename payload.a payload.b", 1, 18, "expected 'to'"),
    ("drop payload.a\nsett payload.a = 1", 2, 1, "unknown statement 'sett'"),
    ("set payload.a = nope", 1, 17, "expected a JSON value"),
    ('drop payload.x\nwhen type == "y"', 2, 1, "'when' must be the first statement"),
    ('set type = "x"', 1, 5, "only payload"),
    ("route agent.joined", 1, 7, "reserved"),
    ("route a..b", 1, 7, "token"),
    ("drop payload.a extra", 1, 16, "unexpected text"),
    ("set payload.a == 1", 1, 15, "expected '='"),
    ("when payload.a ~ 1\ndrop payload.b", 1, 16, "expected ==, !=, exists or missing"),
    ('when payload.a == 1 or type == "x"\ndrop payload.b', 1, 21, "expected 'and'"),
    ('when type == "x"', 1, 1, "at least one statement"),
    ("drop payload", 1, 6, "expected a path"),
    ("drop payload.a\n  set header.v = 1 2", 2, 20, "unexpected text"),
])
def test_syntax_errors_name_line_and_column(rule: str, line: int, column: int, why: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse(rule)
    assert (caught.value.line, caught.value.column) == (line, column), caught.value.message
    assert why in caught.value.message and caught.value.message.startswith(f"rule: line {line}, column {column}: ")


def test_a_version_mapping() -> None:
    program = parse(V1_TO_V2)
    message = {"headers": {"version": "1"}, "payload": {"userId": 7, "address": {"city": "Oslo"}, "password": "x"}}
    assert run(program, message) is None
    assert message == {"headers": {"version": "2"},
                       "payload": {"user_id": 7, "address": {}, "city": "Oslo", "tags": ["migrated"]}}
    v2 = {"headers": {"version": "2"}, "payload": {"user_id": 1}}
    run(program, v2)  # the guard does not hold: unchanged
    assert v2 == {"headers": {"version": "2"}, "payload": {"user_id": 1}}
    with pytest.raises(Failed) as caught:
        run(program, {"headers": {"version": "1"}, "payload": {"userId": 1, "address": "flat"}})
    assert caught.value.line == 4 and "payload.address.city is missing" in caught.value.why


# -- never a crash, on any JSON ------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c", "x"]), inner,
                                                                max_size=3),
    max_leaves=12,
)
paths = st.sampled_from(["payload.a", "payload.a.b", "payload.b.c.x", "payload.x", "header.h", "header.k"])
read_paths = st.one_of(paths, st.sampled_from(["type", "source"]))
literals = st.one_of(st.just('"v"'), st.just("1"), st.just("null"), st.just('{"a": {"b": 2}}'), st.just("[1, 2]"))
statements = st.one_of(
    st.builds(lambda op, a, b: f"{op} {a} to {b}", st.sampled_from(["rename", "move", "copy"]), paths, paths),
    st.builds(lambda a: f"drop {a}", paths),
    st.builds(lambda a, v: f"set {a} = {v}", paths, literals),
    st.just("route other.topic"),
)
guards = st.one_of(st.just(""), st.builds(lambda a, v: f"when {a} == {v}\n", read_paths, literals),
                   st.builds(lambda a: f"when {a} exists and {a} missing\n", read_paths))
rules = st.builds(lambda g, body: g + "\n".join(body), guards, st.lists(statements, min_size=1, max_size=6))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule=rules, payload=json_values, headers=st.dictionaries(st.sampled_from(["h", "k", "version"]),
                                                                 st.text(max_size=4), max_size=3))
def test_any_rule_on_any_json_either_applies_or_fails_with_a_reason(rule: str, payload: Any,
                                                                     headers: dict[str, str]) -> None:
    program = parse(rule)
    message = {"type": "event", "source": "s", "headers": headers, "payload": payload}
    try:
        route = run(program, message)
    except Failed as failed:
        assert failed.why and 1 <= failed.line <= rule.count("\n") + 1
        return
    assert route in (None, "other.topic")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in message["headers"].items())


# -- at publish, in the state machine ------------------------------------------------------------


def test_transforms_map_versions_route_and_dead_letter_failures() -> None:
    d = Driver()
    d.ok("transform.put", name="users-v2", topic="users.created", rule=V1_TO_V2)
    d.ok("transform.put", name="zz-route", topic="users.created", rule='when header.version == "2"\nroute users.v2')
    created, v2 = d.sub("users.created"), d.sub("users.v2")
    good = msg("m1", headers={"version": "1"}, payload={"userId": 7, "address": {"city": "Oslo"}})
    bad = msg("m2", headers={"version": "1"}, payload={"userId": 8, "address": "flat"})
    untouched = msg("m3", headers={"version": "3"}, payload={"userId": 9})
    out = d.publish("users.created", good, bad, untouched)
    assert out[0]["topic"] == "users.v2" and "topic" not in out[2]
    assert out[1]["transform_failed"].startswith("transform 'users-v2' line 4: payload.address.city is missing")
    [delivered] = d.deliver(v2)
    assert delivered["message"]["payload"] == {"user_id": 7, "address": {}, "city": "Oslo", "tags": ["migrated"]}
    assert delivered["message"]["headers"] == {"version": "2"}
    assert d.take(created) == ["m3"]  # m1 went to users.v2, m2 to the dead letters
    [(dead_id, reason)] = d.dead(created)
    assert dead_id == "m2" and "payload.address.city is missing" in reason
    assert d.sm.bus.counters["transform_failed"] == 1
    described = {t["name"]: t for t in (x.describe() for x in d.sm.transforms.items.values())}
    assert (described["users-v2"]["applied"], described["users-v2"]["failed"]) == (2, 1)
    copy = d.restore()
    assert copy.transforms.items.keys() == d.sm.transforms.items.keys()
    d.publish("users.created", msg("m4", headers={"version": "1"}, payload={"userId": 1, "address": {"city": "A"}}))
    d.same_everywhere()


def test_a_route_loop_fails_and_a_routed_message_must_fit_its_new_topic() -> None:
    d = Driver()
    d.ok("transform.put", name="a", topic="ping", rule="route pong")
    d.ok("transform.put", name="b", topic="pong", rule="route ping")
    sub = d.sub("ping")
    [out] = d.publish("ping", msg("m1", payload={}))
    assert "routed more than" in out["transform_failed"]
    assert d.dead(sub)[0][0] == "m1"
    d.ok("transform.delete", name="a")
    d.ok("transform.delete", name="b")
    d.ok("transform.put", name="t", topic="jobs", rule="route task.failed")
    [out] = d.publish("jobs", msg("m2", payload={"free": "form"}))
    assert "where it is not valid" in out["transform_failed"]


def test_transform_definitions_are_checked() -> None:
    d = Driver()
    assert d.refused("invalid", "transform.put", name="t", topic="a..b", rule="drop payload.a").startswith("topic:")
    assert d.refused("invalid", "transform.put", name="t", topic="a", rule="nope").startswith("rule: line 1")
    assert d.refused("invalid", "transform.put", name="a/b", topic="a", rule="drop payload.a").startswith("name:")
    d.refused("not_found", "transform.delete", name="t")


def test_exactly_once_duplicates_are_not_transformed_twice() -> None:
    d = Driver()
    d.ok("transform.put", name="t", topic="orders", rule="set payload.seen = true")
    once = msg("m1", payload={}, deliveryOptions={"guarantee": "exactly-once"})
    d.publish("orders", once)
    [again] = d.publish("orders", once)
    assert again["duplicate"] is True and d.sm.transforms.items["t"].applied == 1
