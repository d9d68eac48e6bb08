"""Transform rules over HTTP: a syntax error is a 400 with its line and
column and changes nothing; a rule can be tried on a message; published
messages are transformed, routed or dead-lettered with the reason."""

from __future__ import annotations

from coordinator.client import CoordinatorClient
from tests.coordinator.api.conftest import Harness

RULE = 'when header.version == "1"\nrename payload.userId to payload.user_id\nset header.version = "2"'


async def test_a_syntax_error_names_line_and_column(h: Harness) -> None:
    before = h.fingerprint()
    status, error = await h.call("PUT", "/v1/transforms/t", {"topic": "users", "rule": "drop payload.a\nrename x"})
    assert status == 400
    assert error["error"]["field"] == "rule" and (error["error"]["line"], error["error"]["column"]) == (2, 8)
    status, error = await h.call("PUT", "/v1/transforms/t", {"topic": "users..x", "rule": "drop payload.a"})
    assert status == 400 and error["error"]["field"] == "topic"
    status, error = await h.call("PUT", "/v1/transforms/t", {"topic": "users", "rule": 5})
    assert status == 400 and error["error"]["field"] == "rule"
    assert h.fingerprint() == before


async def test_try_a_rule_without_defining_it(h: Harness) -> None:
    _, tried = await h.call("POST", "/v1/transforms/try", {"rule": RULE, "message": {
        "headers": {"version": "1"}, "payload": {"userId": 3}}}, expect=200)
    assert tried["applied"] is True and tried["message"]["payload"] == {"user_id": 3}
    assert tried["message"]["headers"] == {"version": "2"}
    _, failed = await h.call("POST", "/v1/transforms/try", {"rule": RULE, "message": {
        "headers": {"version": "1"}, "payload": {}}}, expect=200)
    assert failed == {"applied": False, "failure": "line 2: payload.userId is missing"}
    status, error = await h.call("POST", "/v1/transforms/try", {"rule": RULE, "message": {"priority": "urgent"}})
    assert status == 400 and error["error"]["field"] == "priority"


async def test_published_messages_are_transformed_or_dead_lettered(h: Harness, client: CoordinatorClient) -> None:
    await h.call("PUT", "/v1/transforms/users-v2", {"topic": "users.>", "rule": RULE}, expect=200)
    sub = await client.subscribe("users.created")
    ok = await client.publish("users.created", {"headers": {"version": "1"}, "payload": {"userId": 1}})
    assert "transform_failed" not in ok
    failed = await client.publish("users.created", {"headers": {"version": "1"}, "payload": {"name": "x"}})
    assert "payload.userId is missing" in failed["transform_failed"]
    [delivery] = await client.fetch(sub, max=10)
    assert delivery["message"]["payload"] == {"user_id": 1} and delivery["message"]["headers"]["version"] == "2"
    [dead] = await client.dead_letters(sub)
    assert "transform 'users-v2' line 2: payload.userId is missing" in dead["reason"]
    _, listed = await h.call("GET", "/v1/transforms", expect=200)
    assert [(t["name"], t["applied"], t["failed"]) for t in listed["transforms"]] == [("users-v2", 1, 1)]
    await h.call("DELETE", "/v1/transforms/users-v2", expect=200)
    await h.call("GET", "/v1/transforms/users-v2", expect=404)


async def test_at_most_once_messages_are_transformed_too(h: Harness, client: CoordinatorClient) -> None:
    await h.call("PUT", "/v1/transforms/route", {"topic": "pings", "rule": "set payload.seen = true\nroute pongs"},
                 expect=200)
    sub = await client.subscribe("pongs", guarantee="at-most-once")
    volatile = {"payload": {"n": 1}, "deliveryOptions": {"guarantee": "at-most-once", "persistent": False}}
    answer = await client.publish("pings", volatile)
    assert answer["topic"] == "pongs" and answer["routed"] == 1
    [delivery] = await client.fetch(sub, max=10)
    assert delivery["message"]["payload"] == {"n": 1, "seen": True}
