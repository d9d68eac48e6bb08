"""Fuzzing the doors of the HTTP API.

- ``parse_authorization`` (coordinator/api/auth.py) on arbitrary text and on
  near-valid ``Coord-Ed25519`` headers with mutated parameters: it returns a
  well-formed credential or raises ``Unauthenticated``, nothing else.
- The JSON bodies of the POST/PUT/PATCH routes: hypothesis-made objects with
  the route's own field names and random ones, wrong types, deep nesting,
  huge numbers, lone surrogates and broken JSON, sent to an anonymous
  harness node, and to a secure one as a signed agent (there the access
  rules read the body before the handler does). No answer may be a 500; the
  harness's autouse fixture also fails the test on any logged 500.

Bounded: ~100-150 examples per route group, no deadline; the file runs in
well under a minute.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from coordinator.api.auth import NONCE_RE, AgentCredential, AuthSettings, parse_authorization
from coordinator.commands.messages import FIELDS as MESSAGE_FIELDS
from coordinator.crypto import AgentKeys, authorization_header
from coordinator.errors import Unauthenticated
from tests.coordinator.api.conftest import Harness, HarnessFactory

# -- parse_authorization ----------------------------------------------------------------------------

# Characters that have tripped parsers: quotes, escapes, separators, controls,
# non-ASCII digits, undecodable header bytes (as surrogates), wide characters.
TRICKY = ['"', "\\", ",", "=", " ", "\t", "\n", "\r", "\x00", "\x7f", "\x85", "²", "٣", "\uff11", "é", "\udcff",
          "\ud800", "😀", "a", "Z", "0", "9", "-", "_", "+", "/", ".", ";"]
DIGITISH = ["0", "1", "9", "²", "³", "¹", "٣", "\uff11", "⁰", "½", "Ⅻ"]  # str.isdigit() is true for some of these
texts = st.text(max_size=80) | st.text(st.sampled_from(TRICKY), max_size=80) | st.text(st.sampled_from(DIGITISH),
                                                                                      min_size=1, max_size=17)


def _check_parse(value: str) -> None:
    try:
        kind, credential = parse_authorization(value)
    except Unauthenticated as exc:
        assert exc.message.startswith("Authorization: "), exc.message
        return
    if kind == "bearer":
        assert isinstance(credential, str) and credential and credential == credential.strip()
        return
    assert kind == "agent" and isinstance(credential, AgentCredential)
    assert 1 <= len(credential.agent_id) <= 256
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in credential.agent_id)
    assert isinstance(credential.ts_ms, int) and 0 <= credential.ts_ms < 10**16
    assert NONCE_RE.match(credential.nonce)
    assert isinstance(credential.signature, bytes) and len(credential.signature) == 64


@settings(max_examples=400, deadline=None)
@given(st.one_of(texts, st.text(max_size=1200), texts.map(lambda t: "Coord-Ed25519 " + t),
                 texts.map(lambda t: "Bearer " + t)))
def test_parse_authorization_refuses_or_returns_on_any_text(value: str) -> None:
    _check_parse(value)


VALID = {"agent": "alice", "ts": "1700000000000", "nonce": "n" * 20, "sig": base64.b64encode(b"\x01" * 64).decode()}


# What a valid value of each parameter is made of, and look-alikes from other scripts.
LOOK_ALIKES = {"agent": TRICKY, "ts": DIGITISH, "nonce": ["a", "Z", "0", "-", "_", "\uff41", "٣", "\udcff", "=", '"'],
               "sig": ["A", "z", "0", "+", "/", "=", "-", "_", " ", "\n", "é", "\udcff"]}


@st.composite
def _near(draw: st.DrawFn, name: str, value: str) -> str:
    """``value`` with a few characters replaced or inserted from the look-alikes."""
    chars = list(value)
    alphabet = st.sampled_from(LOOK_ALIKES.get(name, TRICKY))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(chars)))
        if at < len(chars) and draw(st.booleans()):
            chars[at] = draw(alphabet)
        else:
            chars.insert(at, draw(alphabet))
    return "".join(chars)


@st.composite
def near_valid(draw: st.DrawFn) -> str:
    """A valid header with a few of its parts mutated."""
    params = [[name, value] for name, value in VALID.items()]
    for _ in range(draw(st.integers(1, 3))):
        mutation = draw(st.sampled_from(["near", "near", "value", "drop", "duplicate", "unknown", "rename",
                                         "reorder"]))
        if mutation == "near":
            param = draw(st.sampled_from(params))
            param[1] = draw(_near(param[0], param[1]))
        elif mutation == "value":
            draw(st.sampled_from(params))[1] = draw(texts)
        elif mutation == "drop" and params:
            params.remove(draw(st.sampled_from(params)))
        elif mutation == "duplicate" and params:
            params.append(list(draw(st.sampled_from(params))))
        elif mutation == "unknown":
            params.append([draw(st.text("abcdefgz", min_size=1, max_size=6)), draw(texts)])
        elif mutation == "rename" and params:
            draw(st.sampled_from(params))[0] = draw(texts)
        elif mutation == "reorder":
            params = draw(st.permutations(params))
    quote = draw(st.sampled_from(['"', "", "'"]))
    separator = draw(st.sampled_from([", ", ",", " , ", " ", ";", ",,"]))
    scheme = draw(st.sampled_from(["Coord-Ed25519 ", "Coord-Ed25519  ", "coord-ed25519 ", " Coord-Ed25519 ",
                                   "Coord-Ed25519\t", "Coord-Ed25519"]))
    tail = draw(st.sampled_from(["", ",", " ", '"']))
    return scheme + separator.join(f"{name}={quote}{value}{quote}" for name, value in params) + tail


@settings(max_examples=600, deadline=None)
@given(near_valid())
def test_parse_authorization_refuses_or_returns_on_near_valid_headers(value: str) -> None:
    _check_parse(value)


ids = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters='"\\'), min_size=1,
              max_size=256)


@settings(max_examples=200, deadline=None)
@given(ids, st.integers(0, 10**16 - 1), st.from_regex(r"[A-Za-z0-9_\-]{16,64}", fullmatch=True),
       st.binary(min_size=64, max_size=64), st.sampled_from([", ", ",", " ,  "]))
def test_a_well_formed_header_parses_back_exactly(agent_id: str, ts_ms: int, nonce: str, signature: bytes,
                                                  separator: str) -> None:
    sig = base64.b64encode(signature).decode()
    header = "Coord-Ed25519 " + separator.join(
        [f'agent="{agent_id}"', f'ts="{ts_ms}"', f'nonce="{nonce}"', f'sig="{sig}"'])
    assert parse_authorization(header) == ("agent", AgentCredential(agent_id, ts_ms, nonce, signature))


# -- JSON bodies of the HTTP API --------------------------------------------------------------------

leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70), st.floats(),
    st.text(max_size=20), st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from(["", "*", ">", "a.>", "orders.eu", "w1", "s1", "topic", "agent", "kind", "1e999", "healthy",
                     "at-least-once", "exactly-once", "beginning", "/x", "127.0.0.1:1", "x" * 2000]),
)
json_values = st.recursive(leaves, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                             kids, max_size=4),
                           max_leaves=16)
# Bodies no JSON encoder writes: deep nesting, numbers past every limit, bad bytes.
WEIRD = [b"", b"null", b"[]", b'"x"', b"{", b"{}}", b'{"a":1,"a":2}', b"\xff\xfe{}", b"\xef\xbb\xbf{}",
         b'{"value": NaN}', b'{"value": Infinity}', b'{"value": -1e999}', b'{"value": 1e999}',
         b'{"value": ' + b"9" * 5000 + b"}", b'{"value": "\\ud800"}', b'{"\\udcff": 1}',
         b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b'{"value": "\x00"}']
depths = st.integers(1, 400).map(lambda n: json.dumps({"value": _nested(n)}).encode())


def _nested(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def bodies(fields: set[str]) -> st.SearchStrategy[bytes]:
    """Objects keyed by the route's fields (and strangers) holding anything,
    plus anything else as a body."""
    # each of the route's fields present or not, holding anything
    known = st.fixed_dictionaries({}, optional={name: json_values for name in sorted(fields)})
    strangers = st.dictionaries(st.text(max_size=10), json_values, max_size=2)
    objects = st.one_of(known, known, st.builds(lambda a, b: {**b, **a}, known, strangers))
    return st.one_of(objects.map(lambda o: json.dumps(o).encode()),
                     objects.map(lambda o: json.dumps(o).encode()),  # twice as likely
                     json_values.map(lambda v: json.dumps(v).encode()),
                     st.sampled_from(WEIRD), depths, st.binary(max_size=64))


AGENT_FIELDS = {"id", "type", "metadata", "ttl_s", "endpoint", "weight", "public_key", "proof", "request_id"}
ROUTES: dict[str, list[tuple[str, str, set[str]]]] = {
    "agents": [("POST", "/v1/agents", AGENT_FIELDS),
               ("PATCH", "/v1/agents/w1", {"weight", "endpoint", "metadata", "request_id"}),
               ("POST", "/v1/agents/w1/heartbeat", {"health"}),
               ("DELETE", "/v1/agents/w2", {"request_id"})],
    "kv-locks": [("PUT", "/v1/kv/k", {"value", "fence", "request_id"}),
                 ("POST", "/v1/kv/k/cas", {"value", "expected", "expected_revision", "fence", "request_id"}),
                 ("DELETE", "/v1/kv/k", {"fence", "request_id"}),
                 ("POST", "/v1/locks/L", {"holder", "ttl_s", "request_id"}),
                 ("DELETE", "/v1/locks/L", {"holder", "request_id"}),
                 ("POST", "/v1/elections/e/campaign", {"candidate", "ttl_s", "request_id"}),
                 ("POST", "/v1/elections/e/resign", {"candidate", "request_id"})],
    "topics": [("POST", "/v1/topics/orders.eu/messages", MESSAGE_FIELDS | {"messages", "request_id"}),
               ("POST", "/v1/topics/orders.eu/request", MESSAGE_FIELDS),  # timeout_s forced short
               ("PUT", "/v1/topics/orders.eu", {"max_messages", "max_age_s", "request_id"}),
               ("PUT", "/v1/topics/orders.eu/binding", {"transport", "backlog_max", "request_id"}),
               ("DELETE", "/v1/topics/orders.eu/binding", {"drop_backlog", "request_id"})],
    "subscriptions": [("POST", "/v1/subscriptions", {"topic", "group", "filter", "guarantee", "ack_timeout_s",
                                                     "max_attempts", "start", "start_offset", "start_time_ms",
                                                     "agent", "request_id"}),
                      ("POST", "/v1/subscriptions/{sub}/ack", {"delivery_ids", "request_id"}),
                      ("POST", "/v1/subscriptions/{sub}/nack", {"delivery_ids", "delay_s", "dead_letter",
                                                                "request_id"}),
                      ("POST", "/v1/subscriptions/{sub}/dlq/redrive", {"delivery_ids", "request_id"}),
                      ("POST", "/v1/agents/w1/nack", {"delivery_ids", "delay_s", "dead_letter", "request_id"}),
                      ("POST", "/v1/agents/w1/dlq/purge", {"delivery_ids", "request_id"})],
    "sagas": [("POST", "/v1/sagas", {"id", "name", "steps", "input", "compensation_retry", "request_id"}),
              ("POST", "/v1/sagas/saga-x/cancel", {"reason", "request_id"})],
    "services-access": [("PUT", "/v1/services/billing", {"strategy", "path", "timeout_s", "health_check", "breaker",
                                                         "rate_limit", "retry", "request_id"}),
                        ("POST", "/v1/services/billing/invoke", {"x"}),
                        ("PUT", "/v1/roles/r", {"permissions", "request_id"}),
                        ("DELETE", "/v1/roles/r", {"request_id"}),
                        ("PUT", "/v1/agents/w1/roles", {"roles", "request_id"})],
}

# Saga steps and permissions in the shapes the checks look into, to get past the first refusal.
actions = st.one_of(
    json_values,
    st.sampled_from([{"kind": "topic", "topic": "orders.eu"}, {"kind": "agent", "agent_type": "billing"},
                     {"kind": "agent", "agent_id": "w1"}, {"kind": "agent", "agent_id": "nobody"}]),
    st.fixed_dictionaries({"kind": st.sampled_from(["agent", "topic"]) | json_values},
                          optional={"topic": json_values, "agent_type": json_values, "agent_id": json_values,
                                    "path": json_values}))
steps = st.lists(st.fixed_dictionaries({"id": st.sampled_from(["s1", "s2"]) | json_values},
                                       optional={"action": actions, "compensation": actions,
                                                 "depends_on": json_values}),
                 max_size=3)
permissions = st.lists(st.fixed_dictionaries({"action": st.sampled_from(["send", "kv", "lock", "x"]) | json_values},
                                             optional={"pattern": json_values}), max_size=3)
SHAPED: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/v1/sagas": st.fixed_dictionaries({"steps": steps | leaves | json_values}, optional={"name": json_values,
                                                                                 "input": json_values}),
    "/v1/roles/r": st.fixed_dictionaries({"permissions": permissions}),
}


async def _setup(h: Harness, headers: Any) -> str:
    """Agents w1 and w2 and a subscription, for the routes that name them."""
    for agent_id in ("w1", "w2"):
        await _send(h, "POST", "/v1/agents", json.dumps({"id": agent_id, "type": "worker"}).encode(), headers,
                    expect=201)
    reply = await _send(h, "POST", "/v1/subscriptions", json.dumps({"topic": "orders.*"}).encode(), headers,
                        expect=201)
    return json.loads(reply)["id"]


async def _send(h: Harness, method: str, path: str, raw: bytes, headers: Any, *, expect: int | None = None,
                fuzzing: bool = False) -> bytes:
    extra = headers(method, path, raw) if headers else {}
    async with h.http.request(method, path, data=raw, headers=extra) as response:
        text = await response.read()
        status = response.status
    assert status != 500, f"{method} {path} {raw[:300]!r}: {status} {text[:300]!r}"
    if expect is not None:
        assert status == expect, f"{method} {path}: {status} {text[:300]!r}"
    if fuzzing:  # --hypothesis-show-statistics tells how far the bodies got
        event(f"{method} {path.split('/sub-')[0]} -> {status}")
    return text


def _request(group: str) -> st.SearchStrategy[tuple[str, str, bytes]]:
    choices = []
    for method, path, fields in ROUTES[group]:
        body = bodies(fields)
        if path in SHAPED:
            body = body | SHAPED[path].map(lambda o: json.dumps(o).encode())
        choices.append(st.tuples(st.just(method), st.just(path), body))
    return st.one_of(choices)


def _force_short_request(path: str, raw: bytes) -> bytes:
    """A valid request/reply waits for its answer: make that wait short."""
    if not path.endswith("/request"):
        return raw
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    if isinstance(body, dict):
        body["timeout_s"] = 0.1
        return json.dumps(body).encode()
    return raw


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])


async def _fuzz(h: Harness, request: tuple[str, str, bytes], state: dict[str, Any], headers: Any = None) -> None:
    if "sub" not in state:
        state["sub"] = await _setup(h, headers)
    method, path, raw = request
    await _send(h, method, path.replace("{sub}", state["sub"]), _force_short_request(path, raw), headers,
                fuzzing=True)


def _group_test(group: str) -> Any:
    @FUZZ
    @given(request=_request(group))
    async def test(h: Harness, request: tuple[str, str, bytes], state: dict[str, Any]) -> None:
        await _fuzz(h, request, state)
    test.__name__ = f"test_no_500_for_any_body_anonymous_{group.replace('-', '_')}"
    return test


@pytest.fixture
def state() -> dict[str, Any]:
    """What one test's examples share (the subscription they fuzz)."""
    return {}


test_no_500_for_any_body_anonymous_agents = _group_test("agents")
test_no_500_for_any_body_anonymous_kv_locks = _group_test("kv-locks")
test_no_500_for_any_body_anonymous_topics = _group_test("topics")
test_no_500_for_any_body_anonymous_subscriptions = _group_test("subscriptions")
test_no_500_for_any_body_anonymous_sagas = _group_test("sagas")
test_no_500_for_any_body_anonymous_services_access = _group_test("services-access")


# -- the same as a signed agent on a secure node: the access rules read the body first ----------------

ADMIN_TOKEN = "admin-token-" + "f" * 32
FUZZER = AgentKeys.from_seed(b"\x07" * 32)
EVERYTHING = [{"action": a, "pattern": ">"} for a in ("send", "receive", "subscribe", "invoke", "serve", "saga")] + \
             [{"action": a, "pattern": "*"} for a in ("kv", "lock")]


@pytest.fixture
async def secure(make_harness: HarnessFactory) -> Harness:
    """A secure node where the agent "fuzzer" joined itself and holds every permission."""
    h = await make_harness(auth=AuthSettings(admin_token=ADMIN_TOKEN, cluster_secret="c" * 40))
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    await h.call("PUT", "/v1/roles/all", {"permissions": EVERYTHING}, headers=admin, expect=200)
    await h.call("PUT", "/v1/agents/fuzzer/roles", {"roles": ["all"]}, headers=admin, expect=200)
    raw = json.dumps({"id": "fuzzer", "type": "worker", "public_key": FUZZER.public_key}).encode()
    await _send(h, "POST", "/v1/agents", raw, _signer(h), expect=201)
    # w1 and w2 are the admin's (the fuzzer may act only for itself)
    for agent_id in ("w1", "w2"):
        await h.call("POST", "/v1/agents", {"id": agent_id, "type": "worker"}, headers=admin, expect=201)
    return h


def _signer(h: Harness) -> Any:
    host = f"{h.http.host}:{h.http.port}"

    def headers(method: str, path: str, raw: bytes) -> dict[str, str]:
        return {"Authorization": authorization_header("fuzzer", FUZZER.sign, method, host, path, raw,
                                                      int(time.time() * 1000), secrets.token_urlsafe(18))}
    return headers


# The fuzzer's own agent in the paths (it may act only for itself); no admin-only routes.
def _signed_routes(*groups: str) -> list[tuple[str, str, set[str]]]:
    return [(method, path.replace("/v1/agents/w1", "/v1/agents/fuzzer"), fields)
            for group in groups for method, path, fields in ROUTES[group]
            if path not in ("/v1/agents/w2", "/v1/topics/orders.eu", "/v1/topics/orders.eu/binding")]


def _signed_request(*groups: str) -> st.SearchStrategy[tuple[str, str, bytes]]:
    choices = []
    for method, path, fields in _signed_routes(*groups):
        body = bodies(fields)
        if path in SHAPED:
            body = body | SHAPED[path].map(lambda o: json.dumps(o).encode())
        choices.append(st.tuples(st.just(method), st.just(path), body))
    return st.one_of(choices)


async def _fuzz_signed(h: Harness, request: tuple[str, str, bytes], state: dict[str, Any]) -> None:
    if "sub" not in state:
        reply = await _send(h, "POST", "/v1/subscriptions", json.dumps({"topic": "orders.*"}).encode(), _signer(h),
                            expect=201)
        state["sub"] = json.loads(reply)["id"]
    method, path, raw = request
    path = path.replace("{sub}", state["sub"])
    await _send(h, method, path, _force_short_request(path, raw), _signer(h), fuzzing=True)


@FUZZ
@given(request=_signed_request("agents", "kv-locks"))
async def test_no_500_for_any_body_signed_agents_kv_locks(secure: Harness, request: tuple[str, str, bytes],
                                                          state: dict[str, Any]) -> None:
    await _fuzz_signed(secure, request, state)


@FUZZ
@given(request=_signed_request("topics", "subscriptions"))
async def test_no_500_for_any_body_signed_topics_subscriptions(secure: Harness, request: tuple[str, str, bytes],
                                                               state: dict[str, Any]) -> None:
    await _fuzz_signed(secure, request, state)


@FUZZ
@given(request=_signed_request("sagas"))
async def test_no_500_for_any_body_signed_sagas(secure: Harness, request: tuple[str, str, bytes],
                                                state: dict[str, Any]) -> None:
    """The saga rule reads the steps for the send and invoke rights they need."""
    await _fuzz_signed(secure, request, state)
