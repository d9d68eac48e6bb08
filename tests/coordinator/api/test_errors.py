"""Bad input never changes state and always answers the DESIGN error body;
no quorum, unknown outcomes and overload map to 503/504 with the right hints."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest

from tests.coordinator.api.conftest import Harness, HarnessFactory
from tests.waiting import eventually

LONG_KEY = "k" * 1025


def _assert_error(status: int, body: Any, want_status: int, code: str, field: str | None = None) -> None:
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]
    assert error["code"] == code, error
    if field is not None:
        assert error.get("field") == field, error


# (method, path, raw body or JSON-able body, field named by the 400)
BAD_BODIES: list[tuple[str, str, Any, str]] = [
    ("PUT", "/v1/kv/k", b"{not json", "body"),
    ("PUT", "/v1/kv/k", b"", "body"),
    ("PUT", "/v1/kv/k", b"\xff\xfe{}", "body"),
    ("PUT", "/v1/kv/k", b"[1, 2]", "body"),
    ("PUT", "/v1/kv/k", b'"just a string"', "body"),
    ("PUT", "/v1/kv/k", b"null", "body"),
    ("PUT", "/v1/kv/k", {"value": 1, "extra": 2}, "extra"),
    ("PUT", "/v1/kv/k", {}, "value"),
    ("PUT", "/v1/kv/k", b'{"value": NaN}', "body"),
    ("PUT", "/v1/kv/k", b'{"value": Infinity}', "body"),
    ("PUT", "/v1/kv/k", b'{"value": [-Infinity]}', "body"),
    ("PUT", "/v1/kv/k", {"value": 1, "request_id": 7}, "request_id"),
    ("PUT", "/v1/kv/k", {"value": 1, "request_id": ""}, "request_id"),
    ("PUT", "/v1/kv/k", {"value": 1, "fence": "db"}, "fence"),
    ("PUT", "/v1/kv/k", {"value": 1, "fence": {"lock": "db"}}, "fence.token"),
    ("PUT", "/v1/kv/k", {"value": 1, "fence": {"lock": "db", "token": "1"}}, "fence.token"),
    ("PUT", "/v1/kv/k", {"value": 1, "fence": {"lock": "db", "token": 1, "x": 0}}, "fence.x"),
    ("POST", "/v1/kv/k/cas", {"value": 1}, "expected"),
    ("POST", "/v1/kv/k/cas", {"expected": 1, "expected_revision": 1, "value": 2}, "expected"),
    ("POST", "/v1/kv/k/cas", {"expected": 1}, "value"),
    ("POST", "/v1/kv/k/cas", {"expected_revision": -1, "value": 2}, "expected_revision"),
    ("POST", "/v1/kv/k/cas", {"expected_revision": "3", "value": 2}, "expected_revision"),
    ("DELETE", "/v1/kv/k", b"[]", "body"),
    ("POST", "/v1/agents", {}, "type"),
    ("POST", "/v1/agents", {"type": 5}, "type"),
    ("POST", "/v1/agents", {"type": ""}, "type"),
    ("POST", "/v1/agents", {"type": "w", "id": 12}, "id"),
    ("POST", "/v1/agents", {"type": "w", "ttl_s": "10"}, "ttl_s"),
    ("POST", "/v1/agents", {"type": "w", "ttl_s": True}, "ttl_s"),
    ("POST", "/v1/agents", {"type": "w", "ttl_s": 0.5}, "ttl_s"),
    ("POST", "/v1/agents", {"type": "w", "ttl_s": 86_401}, "ttl_s"),
    ("POST", "/v1/agents", {"type": "w", "ttl_s": -5}, "ttl_s"),
    ("POST", "/v1/agents", {"type": "w", "weight": 0}, "weight"),
    ("POST", "/v1/agents", {"type": "w", "weight": 1.5}, "weight"),
    ("POST", "/v1/agents", {"type": "w", "weight": 1_000_001}, "weight"),
    ("POST", "/v1/agents", {"type": "w", "metadata": "x"}, "metadata"),
    ("POST", "/v1/agents", {"type": "w", "metadata": [1]}, "metadata"),
    ("POST", "/v1/agents", {"type": "w", "endpoint": 80}, "endpoint"),
    ("POST", "/v1/agents", {"type": "w", "colour": "red"}, "colour"),
    ("POST", "/v1/locks/l", {"holder": 5, "ttl_s": 10}, "holder"),
    ("POST", "/v1/locks/l", {"ttl_s": 10}, "holder"),
    ("POST", "/v1/locks/l", {"holder": "h\nx", "ttl_s": 10}, "holder"),
    ("POST", "/v1/locks/l", {"holder": "h" * 257, "ttl_s": 10}, "holder"),
    ("POST", "/v1/locks/l", {"holder": "h", "ttl_s": "10"}, "ttl_s"),
    ("POST", "/v1/locks/l", {"holder": "h", "ttl_s": 0}, "ttl_s"),
    ("DELETE", "/v1/locks/l", {}, "holder"),
    ("DELETE", "/v1/locks/l", b"", "body"),
    ("POST", "/v1/elections/e/campaign", {"candidate": None}, "candidate"),
    ("POST", "/v1/elections/e/campaign", {"candidate": "c", "ttl_s": [1]}, "ttl_s"),
    ("POST", "/v1/elections/e/resign", {"who": "c"}, "who"),
    ("POST", "/v1/members", {"id": "n9", "raft": "nohost", "http": "127.0.0.1:1"}, "raft"),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), BAD_BODIES,
                         ids=[f"{m} {p} {str(b)[:40]}" for m, p, b, _ in BAD_BODIES])
async def test_bad_body_is_400_and_changes_nothing(h: Harness, method: str, path: str, body: Any,
                                                   field: str) -> None:
    await h.put("k", "original")
    before = h.fingerprint()
    raw = body if isinstance(body, bytes) else None
    status, answer = await h.call(method, path, None if raw is not None else body, raw=raw,
                                  headers={"Content-Type": "application/json"})
    _assert_error(status, answer, 400, "invalid", field)
    assert h.fingerprint() == before
    assert (await h.get("k"))["value"] == "original"


BAD_QUERIES = [
    ("GET", "/v1/kv/k?consistency=bogus", "consistency"),
    ("GET", "/v1/kv?consistency=STALE", "consistency"),
    ("GET", "/v1/agents?consistency=eventual", "consistency"),
    ("GET", "/v1/kv?limit=0", "limit"),
    ("GET", "/v1/kv?limit=abc", "limit"),
    ("GET", "/v1/kv?limit=10001", "limit"),
    ("GET", "/v1/kv?prefix=" + "p" * 1025, "prefix"),
    ("GET", "/v1/events?from_seq=0", "from_seq"),
    ("GET", "/v1/events?limit=-1", "limit"),
    ("GET", "/v1/watch?from_revision=zero", "from_revision"),
    ("GET", "/v1/kv/a%01b", "key"),
    ("GET", "/v1/kv/a%7Fb", "key"),
    ("PUT", "/v1/kv/a%0Ab", "key"),
    ("PUT", "/v1/kv/" + LONG_KEY, "key"),
    ("GET", "/v1/kv/" + LONG_KEY, "key"),
    ("POST", "/v1/kv/" + LONG_KEY + "/cas", "key"),
    ("DELETE", "/v1/kv/a%00", "key"),
    ("POST", "/v1/locks/" + "n" * 257, "name"),
    ("POST", "/v1/locks/a%0Ab", "name"),
    ("POST", "/v1/elections/a%0Ab/campaign", "name"),
    ("POST", "/v1/agents/" + "i" * 257 + "/heartbeat", "id"),
]


@pytest.mark.parametrize(("method", "path", "field"), BAD_QUERIES, ids=[f"{m} {p[:50]}" for m, p, _ in BAD_QUERIES])
async def test_bad_path_or_query_is_400_and_changes_nothing(h: Harness, method: str, path: str, field: str) -> None:
    await h.put("k", "original")
    before = h.fingerprint()
    body = {"value": 1, "holder": "h", "expected": None} if method in ("PUT", "POST") else None
    if path.startswith("/v1/locks/"):
        body = {"holder": "h"}
    elif path.endswith("/heartbeat"):
        body = {}
    status, answer = await h.call(method, path, body)
    _assert_error(status, answer, 400, "invalid", field)
    assert h.fingerprint() == before


async def test_undecodable_idempotency_key_is_400_and_changes_nothing(h: Harness) -> None:
    """aiohttp hands undecodable header bytes over as surrogates; they crashed
    the command encoder (500) before ``name`` refused them."""
    before = h.fingerprint()
    port = h.http.server.port
    body = b'{"value": 1}'
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"PUT /v1/kv/k HTTP/1.1\r\nHost: test\r\nConnection: close\r\nIdempotency-Key: \xff\xfe\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        async with asyncio.timeout(5):
            response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400", response
    _assert_error(400, json.loads(payload), 400, "invalid", "request_id")
    assert h.fingerprint() == before


async def test_bad_last_event_id_is_400(h: Harness) -> None:
    status, answer = await h.call("GET", "/v1/watch", headers={"Last-Event-ID": "yesterday"})
    _assert_error(status, answer, 400, "invalid", "Last-Event-ID")


async def test_unknown_health_in_heartbeat_is_400_and_commits_nothing(h: Harness) -> None:
    agent = await h.register(id="a1")
    before = h.fingerprint()
    status, answer = await h.call("POST", f"/v1/agents/{agent['id']}/heartbeat", {"health": "great"})
    _assert_error(status, answer, 400, "invalid", "health")
    status, answer = await h.call("POST", f"/v1/agents/{agent['id']}/heartbeat", {"mood": "ok"})
    _assert_error(status, answer, 400, "invalid", "mood")
    assert h.fingerprint() == before


async def test_oversized_body_is_413_and_changes_nothing(h: Harness) -> None:
    before = h.fingerprint()
    blob = io.BytesIO(json.dumps({"value": "x" * (1 << 20)}).encode())
    status, answer = await h.call("PUT", "/v1/kv/big", raw=blob, headers={"Content-Type": "application/json"})
    _assert_error(status, answer, 413, "too_large")
    assert h.fingerprint() == before
    assert await h.get("big") is None
    # Just under the limit is fine.
    blob = io.BytesIO(json.dumps({"value": "x" * ((1 << 20) - 100)}).encode())
    await h.call("PUT", "/v1/kv/big", raw=blob, expect=200)


async def test_unknown_route_is_404_json(h: Harness) -> None:
    status, answer = await h.call("GET", "/v2/nothing")
    _assert_error(status, answer, 404, "not_found")
    status, answer = await h.call("POST", "/v1/kv", {"value": 1})
    assert status == 405  # /v1/kv exists, for GET only


async def test_wrong_method_is_405_json_with_allow(h: Harness) -> None:
    before = h.fingerprint()
    async with h.http.request("PATCH", "/v1/kv/k", json={"value": 1}) as response:
        status = response.status
        allow = response.headers.get("Allow", "")
        answer = await response.json()
    _assert_error(status, answer, 405, "method_not_allowed")
    assert {"GET", "PUT", "DELETE"} <= set(allow.split(","))
    status, answer = await h.call("GET", "/v1/kv/k/cas?consistency=stale")
    assert status == 404  # a GET of the key "k/cas", which does not exist
    status, answer = await h.call("PUT", "/v1/status", {})
    _assert_error(status, answer, 405, "method_not_allowed")
    assert h.fingerprint() == before


async def test_error_responses_are_json_content(h: Harness) -> None:
    async with h.http.get("/nope") as response:
        assert response.content_type == "application/json"
        await response.read()
    async with h.http.put("/v1/kv/k", data=b"{") as response:
        assert response.content_type == "application/json"
        await response.read()


# -- values that JSON carries but the log cannot: they are bad input (400), not a 500 ------------

UNREPRESENTABLE: list[tuple[str, str, bytes, str]] = [
    # json.loads turns an overflowing literal into inf: stored, it came back as the non-JSON "Infinity".
    ("PUT", "/v1/kv/k", b'{"value": 1e999}', "body"),
    ("PUT", "/v1/kv/k", b'{"value": {"x": [-1e400]}}', "body"),
    # Integers outside msgpack's 64 bits crashed the encoder (500).
    ("PUT", "/v1/kv/k", b'{"value": 18446744073709551616}', "value"),
    ("PUT", "/v1/kv/k", b'{"value": [-9223372036854775809]}', "value"),
    # Lone surrogates are valid JSON escapes but not UTF-8: the encoder crashed (500).
    ("PUT", "/v1/kv/k", b'{"value": "\\ud800"}', "value"),
    ("PUT", "/v1/kv/k", b'{"value": {"\\udfff": 1}}', "value"),
    ("POST", "/v1/locks/l", b'{"holder": "\\ud800x", "ttl_s": 10}', "holder"),
    ("POST", "/v1/agents", b'{"type": "w", "metadata": {"n": 99999999999999999999}}', "metadata"),
    # Deep nesting: json.loads raised RecursionError (500).
    ("PUT", "/v1/kv/k", b'{"value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
    ("PUT", "/v1/kv/k", b'{"value": ' + b"[" * 200 + b"]" * 200 + b"}", "value"),
    # ttl_s overflowing to inf when turned into milliseconds crashed ttl_ms_from (500).
    ("POST", "/v1/agents", b'{"type": "w", "ttl_s": 1.7e308}', "ttl_s"),
    ("POST", "/v1/locks/l", b'{"holder": "h", "ttl_s": 1e308}', "ttl_s"),
]


@pytest.mark.parametrize(("method", "path", "raw", "field"), UNREPRESENTABLE,
                         ids=[f"{m} {p} {r[:40]!r}" for m, p, r, _ in UNREPRESENTABLE])
async def test_unrepresentable_values_are_400_and_change_nothing(h: Harness, method: str, path: str, raw: bytes,
                                                                 field: str) -> None:
    before = h.fingerprint()
    status, answer = await h.call(method, path, raw=raw, headers={"Content-Type": "application/json"})
    _assert_error(status, answer, 400, "invalid", field)
    assert h.fingerprint() == before


async def test_edge_values_that_the_log_can_carry_are_accepted(h: Harness) -> None:
    edge = {"big": 2**64 - 1, "small": -(2**63), "float": 1.7976931348623157e308, "text": "\u00e9\U0001f600",
            "nested": [[[[[[[[[[1]]]]]]]]]]}
    await h.put("edge", edge)
    assert (await h.get("edge"))["value"] == edge
    _, agent = await h.call("POST", "/v1/agents", {"type": "w", "ttl_s": 86_400}, expect=201)
    assert agent["ttl_s"] == 86_400


# -- no quorum, unknown outcomes, overload ------------------------------------------------------------

async def test_no_leader_writes_and_linearizable_reads_are_503(h: Harness) -> None:
    await h.put("k", "before")
    await h.register(id="a1")
    h.engine.no_leader = True
    before = h.fingerprint()
    requests = [
        ("PUT", "/v1/kv/k", {"value": "during"}),
        ("POST", "/v1/kv/k/cas", {"expected": "before", "value": "during"}),
        ("DELETE", "/v1/kv/k", None),
        ("POST", "/v1/agents", {"type": "w"}),
        ("DELETE", "/v1/agents/a1", None),
        ("POST", "/v1/locks/l", {"holder": "h"}),
        ("GET", "/v1/kv/k", None),
        ("GET", "/v1/kv", None),
        ("GET", "/v1/agents", None),
        ("GET", "/v1/events", None),
        ("GET", "/v1/locks/l", None),
    ]
    for method, path, body in requests:
        async with h.http.request(method, path, json=body) as response:
            answer = await response.json()
            _assert_error(response.status, answer, 503, "unavailable")
            assert int(response.headers["Retry-After"]) >= 1, (method, path)
    assert h.fingerprint() == before

    _, stale = await h.call("GET", "/v1/kv/k?consistency=stale", expect=200)
    assert stale["value"] == "before"
    _, agents = await h.call("GET", "/v1/agents?consistency=stale", expect=200)
    assert [a["id"] for a in agents["agents"]] == ["a1"]

    h.engine.no_leader = False
    await h.put("k", "after")
    assert (await h.get("k"))["value"] == "after"


async def test_held_write_is_504_outcome_unknown_and_a_retry_applies_once(make_harness: HarnessFactory) -> None:
    h = await make_harness(proposal_timeout_s=0.5)
    h.engine.hold = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, answer = await h.call("PUT", "/v1/kv/maybe", {"value": 1, "request_id": "r-maybe"})
    elapsed = loop.time() - started
    _assert_error(status, answer, 504, "outcome_unknown")
    assert 0.4 <= elapsed < 3.0
    assert h.applier.machine.kv.get("maybe") is None

    h.engine.release()  # the "lost" entry commits after all
    await eventually(lambda: h.applier.machine.kv.get("maybe") is not None, "the held write to apply")
    revision = h.applier.machine.kv.get("maybe").mod_revision
    # The client retries with the same request_id: the first outcome, not a second write.
    _, retried = await h.call("PUT", "/v1/kv/maybe", {"value": 1, "request_id": "r-maybe"}, expect=200)
    assert retried["revision"] == revision
    assert (await h.get("maybe"))["version"] == 1


async def test_inflight_bound_refuses_the_fifth_write_at_once(make_harness: HarnessFactory) -> None:
    h = await make_harness(inflight_max=4, proposal_timeout_s=5.0)
    h.engine.hold = True
    writes = [asyncio.create_task(h.call("PUT", f"/v1/kv/w{i}", {"value": i})) for i in range(4)]
    await eventually(lambda: h.node.proposer.inflight == 4, "four proposals in flight")

    status, answer = await h.call("PUT", "/v1/kv/w5", {"value": 5})
    _assert_error(status, answer, 503, "unavailable")
    assert not any(w.done() for w in writes)  # refused at once, not after the proposal timeout
    assert h.node.proposer.outcomes.get("overloaded") == 1

    h.engine.release()
    results = await asyncio.gather(*writes)
    assert [status for status, _ in results] == [200, 200, 200, 200]
    assert h.applier.machine.kv.get("w5") is None
    assert h.node.proposer.inflight == 0
