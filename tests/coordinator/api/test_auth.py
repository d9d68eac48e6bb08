"""Authentication and access control over HTTP (coordinator/api/auth.py, the
role routes of coordinator/api/access.py, the join rule ``_may_join`` of
routes.py) on a secure harness node.

Every denial is checked for its status, for what its error body names and
for leaving the state untouched (``Harness.fingerprint`` before and after):
a 401 for a missing, malformed, forged, stale or replayed credential, a 403
naming the permission and resource for a known caller without the right.
Anonymous (development) mode checks signatures but nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from coordinator.api.auth import (
    AUTH,
    FORWARD_SIG_HEADER,
    PRINCIPAL_HEADER,
    AuthSettings,
    AuthState,
    check_proof,
    forward_signature,
    issue_challenge,
)
from coordinator.client import CoordinatorClient
from coordinator.crypto import (
    KEY_FORWARDED_PRINCIPAL,
    AgentKeys,
    SealError,
    authorization_header,
    derived_key,
    is_sealed,
)
from coordinator.errors import Forbidden, Unauthenticated
from tests.coordinator.api.conftest import Harness, HarnessFactory

ADMIN_TOKEN = "admin-token-" + "t" * 32
CLUSTER_SECRET = "cluster-secret-" + "s" * 32
SKEW_S = 30.0  # AuthSettings' default clock_skew_s


@dataclass(frozen=True)
class Agent:
    id: str
    keys: AgentKeys


def _agent(agent_id: str, seed: int) -> Agent:
    return Agent(agent_id, AgentKeys.from_seed(bytes([seed]) * 32))


ALICE = _agent("alice", 1)
BOB = _agent("bob", 2)
MALLORY = _agent("mallory", 3)  # registered, holds no role
GHOST = _agent("ghost", 4)  # never registered
CAROL = _agent("carol", 5)  # joins during a test

ROLES: dict[str, list[dict[str, str]]] = {
    "orders-clerk": [{"action": "send", "pattern": "orders.>"},
                     {"action": "subscribe", "pattern": "orders.*"},
                     {"action": "receive", "pattern": "orders.*"}],
    "alice-worker": [{"action": "invoke", "pattern": "billing"},
                     {"action": "saga", "pattern": "checkout"},
                     {"action": "kv", "pattern": "alice/*"},
                     {"action": "lock", "pattern": "alice-*"},
                     {"action": "lock", "pattern": "election/alice-*"}],
}


# -- requests ------------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    body: Any
    text: str
    headers: Mapping[str, str]

    @property
    def error(self) -> dict[str, Any]:
        return self.body["error"]


def host_of(h: Harness) -> str:
    """The Host header aiohttp's test client sends (and an agent signs)."""
    return f"{h.http.host}:{h.http.port}"


def now_ms() -> int:
    return int(time.time() * 1000)


FORWARD_KEY = derived_key(CLUSTER_SECRET, KEY_FORWARDED_PRINCIPAL)


def forwarded(h: Harness, principal: str, method: str, path: str, raw: bytes, *, ts_ms: int | None = None,
              key: bytes = FORWARD_KEY, host: str | None = None, nonce: str | None = None) -> str:
    """The forward signature a node holding ``key`` gives ``principal``'s request to ``h`` (or ``host``)."""
    return forward_signature(key, principal, method, host or host_of(h), path, raw,
                             now_ms() if ts_ms is None else ts_ms, nonce or secrets.token_urlsafe(18))


def authorization(h: Harness, who: Agent, method: str, path: str, raw: bytes, *, ts_ms: int | None = None,
                  nonce: str | None = None, host: str | None = None, keys: AgentKeys | None = None) -> str:
    """``who``'s Authorization header for one request (signed by ``keys``, default its own)."""
    return authorization_header(who.id, (keys or who.keys).sign, method, host or host_of(h), path, raw,
                                now_ms() if ts_ms is None else ts_ms, nonce or secrets.token_urlsafe(18))


def encode(body: Any) -> bytes:
    return json.dumps(body).encode() if body is not None else b""


async def send(h: Harness, method: str, path: str, raw: bytes = b"", headers: dict[str, str] | None = None,
               *, expect: int | None = None) -> Reply:
    async with h.http.request(method, path, data=raw or None, headers=headers) as response:
        text = await response.text()
        body = json.loads(text) if text and response.content_type == "application/json" else None
        reply = Reply(response.status, body, text, response.headers)
    if expect is not None:
        assert reply.status == expect, f"{method} {path}: {reply.status} {text}"
    return reply


async def as_admin(h: Harness, method: str, path: str, body: Any = None, *, expect: int | None = None) -> Reply:
    return await send(h, method, path, encode(body), {"Authorization": f"Bearer {ADMIN_TOKEN}"}, expect=expect)


async def as_agent(h: Harness, who: Agent, method: str, path: str, body: Any = None, *, expect: int | None = None,
                   **signing: Any) -> Reply:
    raw = encode(body)
    return await send(h, method, path, raw, {"Authorization": authorization(h, who, method, path, raw, **signing)},
                      expect=expect)


JOIN_TYPE = "worker"


async def join(h: Harness, who: Agent, *, agent_id: str | None = None, key: AgentKeys | None = None,
               signer: Agent | None = None, expect: int | None = 201) -> Reply:
    """``signer`` (default ``who``) registers ``agent_id`` (default ``who.id``) with ``key``'s public key,
    as type ``worker``: for the join only, the admin grants the signer ``serve`` on it (a role
    ``joiner`` next to its own), and gives it back its roles after."""
    body = {"id": agent_id or who.id, "type": JOIN_TYPE, "public_key": (key or who.keys).public_key}
    async with serving(h, (signer or who).id):
        return await as_agent(h, signer or who, "POST", "/v1/agents", body, expect=expect)


@contextlib.asynccontextmanager
async def serving(h: Harness, agent_id: str) -> AsyncIterator[None]:
    """Within: ``agent_id`` also holds ``serve`` on ``worker`` (so it may register as one);
    nothing to grant on an anonymous node. The role ``joiner`` is gone after."""
    if h.http.app[AUTH].settings.allow_anonymous:
        yield
        return
    held = list(h.applier.machine.access.grants.get(agent_id, []))
    await as_admin(h, "PUT", "/v1/roles/joiner", {"permissions": [{"action": "serve", "pattern": JOIN_TYPE}]},
                   expect=200)
    await as_admin(h, "PUT", f"/v1/agents/{agent_id}/roles", {"roles": sorted({*held, "joiner"})}, expect=200)
    try:
        yield
    finally:
        await as_admin(h, "PUT", f"/v1/agents/{agent_id}/roles", {"roles": held}, expect=200)
        await as_admin(h, "DELETE", "/v1/roles/joiner", expect=200)


async def refused(h: Harness, status: int, method: str, path: str, body: Any = None, *, who: Agent | None = None,
                  headers: dict[str, str] | None = None, raw: bytes | None = None, **signing: Any
                  ) -> dict[str, Any]:
    """Make the request (signed by ``who``, or with ``headers`` as given); check
    it answered ``status`` with the matching error and changed nothing."""
    before = h.fingerprint()
    if who is not None:
        reply = await as_agent(h, who, method, path, body, **signing)
    else:
        reply = await send(h, method, path, raw if raw is not None else encode(body), headers)
    assert reply.status == status, f"{method} {path}: {reply.status} {reply.text}"
    assert h.fingerprint() == before, f"{method} {path} changed the state"
    if status == 401:
        assert reply.error["code"] == "unauthenticated"
        assert "Coord-Ed25519" in reply.headers["WWW-Authenticate"]
    if status == 403:
        assert reply.error["code"] == "forbidden"
    return reply.error


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
async def sh(make_harness: HarnessFactory) -> Harness:
    """A secure node: the admin token, signed agents, no anonymous access."""
    return await make_harness(auth=AuthSettings(admin_token=ADMIN_TOKEN, cluster_secret=CLUSTER_SECRET))


@dataclass
class World:
    h: Harness
    sub: str  # the admin's subscription on orders.eu, holding one message


@pytest.fixture
async def world(sh: Harness) -> World:
    """Roles, alice (orders-clerk and alice-worker), bob (orders-clerk) and mallory
    (nothing), all joined by themselves; a subscription and a message on orders.eu."""
    for name, permissions in ROLES.items():
        await as_admin(sh, "PUT", f"/v1/roles/{name}", {"permissions": permissions}, expect=200)
    for who in (ALICE, BOB, MALLORY):
        await join(sh, who)
    await as_admin(sh, "PUT", "/v1/agents/alice/roles", {"roles": sorted(ROLES)}, expect=200)
    await as_admin(sh, "PUT", "/v1/agents/bob/roles", {"roles": ["orders-clerk"]}, expect=200)
    sub = await as_admin(sh, "POST", "/v1/subscriptions", {"topic": "orders.eu", "start": "beginning"}, expect=201)
    await as_admin(sh, "POST", "/v1/topics/orders.eu/messages", {"payload": {"n": 1}}, expect=200)
    return World(sh, sub.body["id"])


# -- 401: who is calling? -----------------------------------------------------------------------------

async def test_no_credentials_is_401_naming_both_schemes(world: World) -> None:
    error = await refused(world.h, 401, "PUT", "/v1/kv/alice/x", {"value": 1})
    assert "credentials" in error["message"]
    error = await refused(world.h, 401, "GET", "/v1/agents")
    assert "admin token" in error["message"]


async def test_a_signature_by_another_key_is_401(world: World) -> None:
    error = await refused(world.h, 401, "PUT", "/v1/kv/alice/x", {"value": 1}, who=ALICE, keys=MALLORY.keys)
    assert "does not verify" in error["message"] and "alice" in error["message"]


async def test_random_signature_bytes_are_401(world: World) -> None:
    h = world.h
    sig = base64.b64encode(secrets.token_bytes(64)).decode()
    header = f'Coord-Ed25519 agent="alice", ts="{now_ms()}", nonce="{"n" * 20}", sig="{sig}"'
    await refused(h, 401, "PUT", "/v1/kv/alice/x", {"value": 1}, headers={"Authorization": header})


async def test_a_signature_over_another_body_is_401(world: World) -> None:
    h = world.h
    signed = encode({"value": 1})
    header = authorization(h, ALICE, "PUT", "/v1/kv/alice/x", signed)
    await refused(h, 401, "PUT", "/v1/kv/alice/x", raw=encode({"value": 2}), headers={"Authorization": header})
    # also an empty body against a signed one, and the reverse
    await refused(h, 401, "PUT", "/v1/kv/alice/x", raw=b"", headers={"Authorization": header})
    header = authorization(h, ALICE, "DELETE", "/v1/kv/alice/x", b"")
    await refused(h, 401, "DELETE", "/v1/kv/alice/x", raw=encode({}), headers={"Authorization": header})


async def test_a_signature_over_another_path_or_query_is_401(world: World) -> None:
    h = world.h
    raw = encode({"value": 1})
    header = authorization(h, ALICE, "PUT", "/v1/kv/alice/x", raw)
    await refused(h, 401, "PUT", "/v1/kv/alice/y", raw=raw, headers={"Authorization": header})
    header = authorization(h, ALICE, "GET", "/v1/kv?prefix=alice/", b"")
    await refused(h, 401, "GET", "/v1/kv?prefix=alice/a", headers={"Authorization": header})
    await refused(h, 401, "GET", "/v1/kv?prefix=alice/&limit=1", headers={"Authorization": header})


async def test_a_signature_for_another_host_is_401(world: World) -> None:
    h = world.h
    raw = encode({"value": 1})
    header = authorization(h, ALICE, "PUT", "/v1/kv/alice/x", raw, host="other-node:7001")
    await refused(h, 401, "PUT", "/v1/kv/alice/x", raw=raw, headers={"Authorization": header})
    # Sent on with the Host it was signed for (a replay to this node of a request
    # made to another): the Host is not one of this node's names, so it is refused too.
    error = await refused(h, 401, "PUT", "/v1/kv/alice/x", raw=raw,
                          headers={"Authorization": header, "Host": "other-node:7001"})
    assert "Host is not a name of this node" in error["message"]


async def test_the_names_a_node_is_given_and_its_loopback_aliases_are_accepted_as_host(
        make_harness: HarnessFactory) -> None:
    """``AuthSettings.hosts``: a name the node is reached by (a DNS name, a load
    balancer's) may be signed for; a loopback address is also ``localhost``."""
    h = await make_harness(auth=AuthSettings(admin_token=ADMIN_TOKEN, cluster_secret=CLUSTER_SECRET,
                                             hosts=("Coord-1.example.com:7001", "lb.example.com")))
    await join(h, ALICE)
    for host in ("coord-1.example.com:7001", "COORD-1.example.com.:7001", "lb.example.com", "lb.example.com:80",
                 f"localhost:{h.http.port}", f"[::1]:{h.http.port}"):
        reply = await send(h, "GET", "/v1/agents", headers={
            "Authorization": authorization(h, ALICE, "GET", "/v1/agents", b"", host=host), "Host": host})
        assert reply.status == 200, (host, reply.text)
    for host in ("coord-1.example.com:7002", "lb.example.com:443", "coord-2.example.com:7001",
                 f"10.0.0.1:{h.http.port}", "", "lb.example.com:80:80"):
        error = await refused(h, 401, "GET", "/v1/agents", headers={
            "Authorization": authorization(h, ALICE, "GET", "/v1/agents", b"", host=host), "Host": host})
        assert "Host" in error["message"], host


async def test_a_signature_for_another_method_is_401(world: World) -> None:
    h = world.h
    header = authorization(h, ALICE, "GET", "/v1/kv/alice/x", b"")
    await refused(h, 401, "DELETE", "/v1/kv/alice/x", headers={"Authorization": header})
    raw = encode({"value": 1})
    header = authorization(h, ALICE, "POST", "/v1/kv/alice/x", raw)
    await refused(h, 401, "PUT", "/v1/kv/alice/x", raw=raw, headers={"Authorization": header})


async def test_a_replayed_nonce_is_401_the_second_time(world: World) -> None:
    h = world.h
    raw = encode({"value": 1})
    header = authorization(h, ALICE, "PUT", "/v1/kv/alice/x", raw, nonce="replay-me-0123456789")
    await send(h, "PUT", "/v1/kv/alice/x", raw, {"Authorization": header}, expect=200)
    error = await refused(h, 401, "PUT", "/v1/kv/alice/x", raw=raw, headers={"Authorization": header})
    assert "nonce was already used" in error["message"]
    # the same nonce under a fresh timestamp (a new signature) is still a replay
    error = await refused(h, 401, "PUT", "/v1/kv/alice/x", {"value": 1}, who=ALICE, nonce="replay-me-0123456789")
    assert "nonce" in error["message"]


async def test_a_request_that_failed_does_not_use_up_its_nonce(world: World) -> None:
    """Only a verified request remembers its nonce: a forgery cannot block the real one."""
    h = world.h
    raw = encode({"value": 1})
    nonce = "not-burnt-0123456789"
    forged = authorization(h, ALICE, "PUT", "/v1/kv/alice/x", raw, nonce=nonce, keys=MALLORY.keys)
    await refused(h, 401, "PUT", "/v1/kv/alice/x", raw=raw, headers={"Authorization": forged})
    await as_agent(h, ALICE, "PUT", "/v1/kv/alice/x", {"value": 1}, nonce=nonce, expect=200)


@pytest.mark.parametrize("offset_s", [-(SKEW_S + 2), SKEW_S + 2, -3600, 10**9])
async def test_timestamps_beyond_the_skew_are_401(world: World, offset_s: float) -> None:
    error = await refused(world.h, 401, "PUT", "/v1/kv/alice/x", {"value": 1}, who=ALICE,
                          ts_ms=now_ms() + int(offset_s * 1000))
    assert "timestamp" in error["message"]


@pytest.mark.parametrize("offset_s", [-(SKEW_S - 2), SKEW_S - 2])
async def test_timestamps_within_the_skew_are_accepted(world: World, offset_s: float) -> None:
    await as_agent(world.h, ALICE, "PUT", "/v1/kv/alice/x", {"value": 1}, ts_ms=now_ms() + int(offset_s * 1000),
                   expect=200)


async def test_an_unknown_agent_is_401(world: World) -> None:
    error = await refused(world.h, 401, "PUT", "/v1/kv/alice/x", {"value": 1}, who=GHOST)
    assert "ghost" in error["message"] and "no registered public key" in error["message"]


async def test_a_wrong_admin_token_is_401(world: World) -> None:
    h = world.h
    for token in ("wrong", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1], ADMIN_TOKEN.upper()):
        error = await refused(h, 401, "PUT", "/v1/roles/r", {"permissions": []},
                              headers={"Authorization": f"Bearer {token}"})
        assert error["message"] == "the admin token is not valid"
    await as_admin(h, "PUT", "/v1/roles/r", {"permissions": []}, expect=200)
    # the scheme is case-insensitive, the token is not
    await send(h, "GET", "/v1/roles", headers={"Authorization": f"bearer {ADMIN_TOKEN}"}, expect=200)


def _sig(size: int = 64) -> str:
    return base64.b64encode(b"\x01" * size).decode()


NONCE = "n" * 20
MALFORMED = [
    ("Basic YWxpY2U6cHc=", "unknown scheme"),
    ("Bearer", "Bearer needs a token"),
    ("Coord-Ed25519", "agent is missing"),
    (f'Coord-Ed25519 agent="alice", nonce="{NONCE}", sig="{_sig()}"', "ts is missing"),
    (f'Coord-Ed25519 agent="alice", ts="1", sig="{_sig()}"', "nonce is missing"),
    (f'Coord-Ed25519 agent="alice", ts="1", nonce="{NONCE}"', "sig is missing"),
    (f'Coord-Ed25519 ts="1", nonce="{NONCE}", sig="{_sig()}"', "agent is missing"),
    (f'Coord-Ed25519 agent="alice", agent="bob", ts="1", nonce="{NONCE}", sig="{_sig()}"', "agent is given twice"),
    (f'Coord-Ed25519 agent="alice", ts="1", nonce="{NONCE}", sig="{_sig()}", extra="1"', "unknown parameter extra"),
    (f'Coord-Ed25519 agent=alice, ts="1", nonce="{NONCE}", sig="{_sig()}"', "cannot parse"),
    (f'Coord-Ed25519 agent="alice" ts="1" nonce="{NONCE}" sig="{_sig()}"', "cannot parse"),
    (f'Coord-Ed25519 Agent="alice", ts="1", nonce="{NONCE}", sig="{_sig()}"', "cannot parse"),
    (f'Coord-Ed25519 agent="", ts="1", nonce="{NONCE}", sig="{_sig()}"', "agent is not a valid agent id"),
    (f'Coord-Ed25519 agent="{"a" * 300}", ts="1", nonce="{NONCE}", sig="{_sig()}"', "agent is not a valid"),
    (f'Coord-Ed25519 agent="alice", ts="soon", nonce="{NONCE}", sig="{_sig()}"', "ts must be unix milliseconds"),
    (f'Coord-Ed25519 agent="alice", ts="-1", nonce="{NONCE}", sig="{_sig()}"', "ts must be unix milliseconds"),
    (f'Coord-Ed25519 agent="alice", ts="{"9" * 17}", nonce="{NONCE}", sig="{_sig()}"', "ts must be unix"),
    (f'Coord-Ed25519 agent="alice", ts="1", nonce="short", sig="{_sig()}"', "nonce must be 16 to 64"),
    (f'Coord-Ed25519 agent="alice", ts="1", nonce="{"n" * 65}", sig="{_sig()}"', "nonce must be 16 to 64"),
    (f'Coord-Ed25519 agent="alice", ts="1", nonce="{"n" * 15}.", sig="{_sig()}"', "nonce must be 16 to 64"),
    (f'Coord-Ed25519 agent="alice", ts="1", nonce="{NONCE}", sig="not base64!"', "sig is not base64"),
    (f'Coord-Ed25519 agent="alice", ts="1", nonce="{NONCE}", sig="{_sig(32)}"', "sig is not an Ed25519 signature"),
    ("Coord-Ed25519 " + "x" * 1100, "too long"),
]


@pytest.mark.parametrize(("header", "problem"), MALFORMED, ids=[p for _, p in MALFORMED])
async def test_a_malformed_authorization_header_is_401_naming_the_problem(world: World, header: str,
                                                                         problem: str) -> None:
    error = await refused(world.h, 401, "PUT", "/v1/kv/alice/x", {"value": 1}, headers={"Authorization": header})
    assert error["message"].startswith("Authorization:")
    assert problem in error["message"]


async def test_a_forged_forwarded_principal_is_401(world: World) -> None:
    """Only a node holding the cluster secret can say whom it forwards for."""
    h = world.h
    path, raw = "/v1/roles/r", encode({"permissions": []})
    for headers in ({PRINCIPAL_HEADER: "admin"},
                    {PRINCIPAL_HEADER: "admin", FORWARD_SIG_HEADER: "0" * 64},
                    {PRINCIPAL_HEADER: "admin",
                     FORWARD_SIG_HEADER: forwarded(h, "admin", "PUT", path, raw, key=b"not-the-key")},
                    # signed for another body, path or principal
                    {PRINCIPAL_HEADER: "admin",
                     FORWARD_SIG_HEADER: forwarded(h, "admin", "PUT", path, b"{}")},
                    {PRINCIPAL_HEADER: "admin",
                     FORWARD_SIG_HEADER: forwarded(h, "admin", "PUT", "/v1/roles/s", raw)},
                    {PRINCIPAL_HEADER: "admin",
                     FORWARD_SIG_HEADER: forwarded(h, "agent:alice", "PUT", path, raw)},
                    # and a principal header next to a valid admin token still needs its signature
                    {PRINCIPAL_HEADER: "admin", "Authorization": f"Bearer {ADMIN_TOKEN}"}):
        error = await refused(h, 401, "PUT", path, raw=raw, headers=headers)
        assert "forwarded principal" in error["message"]
    stale = forwarded(h, "admin", "PUT", path, raw, ts_ms=now_ms() - 120_000)  # captured earlier
    error = await refused(h, 401, "PUT", path, raw=raw, headers={PRINCIPAL_HEADER: "admin", FORWARD_SIG_HEADER: stale})
    assert "too long ago" in error["message"]
    good = forwarded(h, "admin", "PUT", path, raw)
    await send(h, "PUT", path, raw, {PRINCIPAL_HEADER: "admin", FORWARD_SIG_HEADER: good}, expect=200)


async def test_a_forwarded_principal_of_an_unknown_kind_is_401(world: World) -> None:
    path = "/v1/agents"
    signature = forwarded(world.h, "root", "GET", path, b"")
    error = await refused(world.h, 401, "GET", path, headers={PRINCIPAL_HEADER: "root", FORWARD_SIG_HEADER: signature})
    assert "unknown kind" in error["message"]


async def test_a_forwarded_principal_is_good_once_for_one_node_under_a_derived_key(world: World) -> None:
    """A forwarded principal names the node it is for (its Host) and a nonce
    the node remembers, and is keyed with a key derived from the cluster
    secret (HKDF), never the secret itself."""
    h = world.h
    path, raw = "/v1/roles/r", encode({"permissions": []})
    signature = forwarded(h, "admin", "PUT", path, raw)
    headers = {PRINCIPAL_HEADER: "admin", FORWARD_SIG_HEADER: signature}
    await send(h, "PUT", path, raw, headers, expect=200)
    error = await refused(h, 401, "PUT", path, raw=raw, headers=headers)  # captured and sent again
    assert "already used" in error["message"]
    for_other = forwarded(h, "admin", "PUT", path, raw, host="other-node:7001")
    error = await refused(h, 401, "PUT", path, raw=raw, headers={PRINCIPAL_HEADER: "admin",
                                                                 FORWARD_SIG_HEADER: for_other})
    error = await refused(h, 401, "PUT", path, raw=raw, headers={
        PRINCIPAL_HEADER: "admin", FORWARD_SIG_HEADER: for_other, "Host": "other-node:7001"})
    assert "another node" in error["message"]
    raw_keyed = forwarded(h, "admin", "PUT", path, raw, key=CLUSTER_SECRET.encode())
    error = await refused(h, 401, "PUT", path, raw=raw, headers={PRINCIPAL_HEADER: "admin",
                                                                 FORWARD_SIG_HEADER: raw_keyed})
    assert "forwarded principal" in error["message"]


async def test_a_node_changing_its_secret_accepts_the_other_one_and_signs_with_its_own(
        make_harness: HarnessFactory) -> None:
    """``accepted_secrets``: forwarded principals and join challenges made under
    the other secret are accepted; a third secret's are not; what this node
    signs and issues uses its own secret only."""
    new_secret = "new-cluster-secret-" + "n" * 32
    h = await make_harness(auth=AuthSettings(admin_token=ADMIN_TOKEN, cluster_secret=new_secret,
                                             accepted_secrets=(CLUSTER_SECRET,)))
    path, raw = "/v1/roles/r", encode({"permissions": []})
    under_old = forwarded(h, "admin", "PUT", path, raw, key=FORWARD_KEY)
    await send(h, "PUT", path, raw, {PRINCIPAL_HEADER: "admin", FORWARD_SIG_HEADER: under_old}, expect=200)
    under_new = forwarded(h, "admin", "PUT", path, raw, key=derived_key(new_secret, KEY_FORWARDED_PRINCIPAL))
    await send(h, "PUT", path, raw, {PRINCIPAL_HEADER: "admin", FORWARD_SIG_HEADER: under_new}, expect=200)
    other = forwarded(h, "admin", "PUT", path, raw, key=derived_key("third-secret-" + "z" * 32,
                                                                      KEY_FORWARDED_PRINCIPAL))
    error = await refused(h, 401, "PUT", path, raw=raw, headers={PRINCIPAL_HEADER: "admin", FORWARD_SIG_HEADER: other})
    assert "forwarded principal" in error["message"]
    state = h.http.app[AUTH]
    assert state.forward_key == derived_key(new_secret, KEY_FORWARDED_PRINCIPAL)  # signs with its own
    keys = AgentKeys.generate()
    old_node = AuthState(AuthSettings(cluster_secret=CLUSTER_SECRET))
    check_proof(state, {"challenge": issue_challenge(old_node), "nonce": "0"}, "a1", keys.public_key, 0)
    third = AuthState(AuthSettings(cluster_secret="third-secret-" + "z" * 32))
    with pytest.raises(Forbidden, match="not issued by this cluster"):
        check_proof(state, {"challenge": issue_challenge(third), "nonce": "0"}, "a1", keys.public_key, 0)
    issued = issue_challenge(state)  # under its own secret: a node with only the old one refuses it
    check_proof(AuthState(AuthSettings(cluster_secret=new_secret)), {"challenge": issued, "nonce": "0"}, "a1",
                keys.public_key, 0)
    with pytest.raises(Forbidden, match="not issued by this cluster"):
        check_proof(old_node, {"challenge": issued, "nonce": "0"}, "a1", keys.public_key, 0)


async def test_a_signed_write_replayed_after_the_node_forgot_its_nonces_applies_nothing(world: World) -> None:
    """A restart empties a node's nonces: a write replayed within the clock
    window passes the signature check, but its request id is derived from its
    nonce, so the state machine answers it with the first result."""
    h = world.h
    raw = encode({"value": 1})
    header = authorization(h, ALICE, "PUT", "/v1/kv/alice/replayed", raw)
    first = await send(h, "PUT", "/v1/kv/alice/replayed", raw, {"Authorization": header}, expect=200)
    h.http.app[AUTH]._nonces.clear()  # what a restart does
    before = h.fingerprint()
    again = await send(h, "PUT", "/v1/kv/alice/replayed", raw, {"Authorization": header}, expect=200)
    assert again.body == first.body
    assert h.applier.machine.kv.get("alice/replayed").version == 1
    assert h.fingerprint()[2:] == before[2:]  # kv revision and events: the deduplicated entry changed nothing
    # the same body signed anew is a new write; a request_id of the caller's own still counts
    await as_agent(h, ALICE, "PUT", "/v1/kv/alice/replayed", {"value": 1}, expect=200)
    assert h.applier.machine.kv.get("alice/replayed").version == 2
    for _ in range(2):
        await as_agent(h, ALICE, "PUT", "/v1/kv/alice/replayed", {"value": 2, "request_id": "mine-1"}, expect=200)
    assert h.applier.machine.kv.get("alice/replayed").version == 3


async def test_request_ids_are_each_callers_own(world: World) -> None:
    """The log keys a request_id on who gave it: bob's "r-1" neither answers
    nor blocks alice's, and the admin's is a third one."""
    h, path = world.h, "/v1/topics/orders.eu/messages"
    first = await as_agent(h, ALICE, "POST", path, {"payload": "a", "request_id": "r-1"}, expect=200)
    second = await as_agent(h, BOB, "POST", path, {"payload": "b", "request_id": "r-1"}, expect=200)
    third = await as_admin(h, "POST", path, {"payload": "c", "request_id": "r-1"}, expect=200)
    offsets = {r.body["offset"] for r in (first, second, third)}
    assert len(offsets) == 3
    assert [h.applier.machine.bus.bodies[("orders.eu", o)].message["payload"] for o in sorted(offsets)] == [
        "a", "b", "c"]
    # alice's own retry is answered from the log; her "r-1" for another message is a 409 naming request_id
    again = await as_agent(h, ALICE, "POST", path, {"payload": "a", "request_id": "r-1"}, expect=200)
    assert again.body == first.body
    other = await as_agent(h, ALICE, "POST", path, {"payload": "z", "request_id": "r-1"}, expect=409)
    assert other.error["code"] == "conflict" and other.error["message"].startswith("request_id:")


async def test_a_properly_forwarded_agent_is_held_to_its_roles(world: World) -> None:
    h = world.h
    path, raw = "/v1/topics/payments.eu/messages", encode({"payload": 1})
    signature = forwarded(h, "agent:alice", "POST", path, raw)
    reply = await send(h, "POST", path, raw, {PRINCIPAL_HEADER: "agent:alice", FORWARD_SIG_HEADER: signature},
                       expect=403)
    assert (reply.error["permission"], reply.error["resource"]) == ("send", "payments.eu")


async def _raw_request(h: Harness, head: bytes) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers, exactly these bytes) and read the answer."""
    reader, writer = await asyncio.open_connection(h.http.host, h.http.port)
    try:
        writer.write(head + b"Connection: close\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return int(answer.split(b" ", 2)[1]), answer


@pytest.mark.parametrize("header", [
    'Authorization: Coord-Ed25519 agent="alice", ts="\xc2\xb2", nonce="nnnnnnnnnnnnnnnnnnnn", sig="{sig}"',
    'Authorization: Coord-Ed25519 agent="alice", ts="\xb2", nonce="nnnnnnnnnnnnnnnnnnnn", sig="{sig}"',
    'Authorization: Coord-Ed25519 agent="al\xffice", ts="{ts}", nonce="nnnnnnnnnnnnnnnnnnnn", sig="{sig}"',
    'Authorization: Bearer t\xc3\xa9st',
    'Authorization: Bearer t\xffst',
    f'{PRINCIPAL_HEADER}: admin\r\n{FORWARD_SIG_HEADER}: \xc3\xa9',
    f'{PRINCIPAL_HEADER}: admin\r\n{FORWARD_SIG_HEADER}: \xff',
    f'{PRINCIPAL_HEADER}: agent:\xff\r\n{FORWARD_SIG_HEADER}: 00',
    'Authorization: Coord-Ed25519 agent="alice", ts="{ts}", nonce="nnnnnnnnnnnnnnnnnnnn", sig="{sig}"\r\n'
    'Host: h\xffst',
], ids=["superscript-ts", "latin1-ts", "byte-in-agent", "utf8-bearer", "byte-in-bearer", "utf8-forward-sig",
        "byte-in-forward-sig", "byte-in-principal", "byte-in-host"])
async def test_non_ascii_credentials_are_401_not_500(world: World, header: str) -> None:
    """Header values are bytes: whatever they hold is a bad credential, never a crash."""
    h = world.h
    text = header.replace("{sig}", _sig()).replace("{ts}", str(now_ms()))
    before = h.fingerprint()
    head = b"GET /v1/agents HTTP/1.1\r\n" + text.encode("latin-1") + b"\r\n"
    if b"Host:" not in head:
        head += f"Host: {host_of(h)}\r\n".encode()
    status, answer = await _raw_request(h, head)
    assert status == 401, answer
    assert h.fingerprint() == before


# -- 403: may they? -----------------------------------------------------------------------------------

def _saga(name: str, *steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "steps": list(steps) or [{"id": "s1", "action": {"kind": "topic", "topic": "orders.eu"}}]}


def _topic_step(step_id: str, topic: str, undo_topic: str | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"id": step_id, "action": {"kind": "topic", "topic": topic}}
    if undo_topic is not None:
        step["compensation"] = {"kind": "topic", "topic": undo_topic}
    return step


def _agent_step(step_id: str, agent_type: str) -> dict[str, Any]:
    return {"id": step_id, "action": {"kind": "agent", "agent_type": agent_type}}


SUB = "{sub}"  # replaced by the world's subscription id
DENIED: list[tuple[Agent, str, str, Any, str, str]] = [
    # publish and request: send on the topic
    (MALLORY, "POST", "/v1/topics/orders.eu/messages", {"payload": 1}, "send", "orders.eu"),
    (ALICE, "POST", "/v1/topics/payments.eu/messages", {"payload": 1}, "send", "payments.eu"),
    (ALICE, "POST", "/v1/topics/orders/messages", {"payload": 1}, "send", "orders"),  # orders.> needs a token more
    (MALLORY, "POST", "/v1/topics/orders.eu/request", {"payload": 1, "timeout_s": 1}, "send", "orders.eu"),
    # subscribe: the grant must cover every topic the pattern can match
    (MALLORY, "POST", "/v1/subscriptions", {"topic": "orders.eu"}, "subscribe", "orders.eu"),
    (ALICE, "POST", "/v1/subscriptions", {"topic": "orders.>"}, "subscribe", "orders.>"),
    (ALICE, "POST", "/v1/subscriptions", {"topic": ">"}, "subscribe", ">"),
    (ALICE, "POST", "/v1/subscriptions", {"topic": "*.eu"}, "subscribe", "*.eu"),
    (ALICE, "POST", "/v1/subscriptions", {"topic": "orders.eu.late"}, "subscribe", "orders.eu.late"),
    (MALLORY, "DELETE", f"/v1/subscriptions/{SUB}", None, "subscribe", "orders.eu"),
    # a subscription's deliveries: receive on its pattern
    (MALLORY, "GET", f"/v1/subscriptions/{SUB}/messages", None, "receive", "orders.eu"),
    (MALLORY, "GET", f"/v1/subscriptions/{SUB}/stream", None, "receive", "orders.eu"),
    (MALLORY, "POST", f"/v1/subscriptions/{SUB}/ack", {"delivery_ids": ["d-1"]}, "receive", "orders.eu"),
    (MALLORY, "POST", f"/v1/subscriptions/{SUB}/nack", {"delivery_ids": ["d-1"]}, "receive", "orders.eu"),
    (MALLORY, "GET", f"/v1/subscriptions/{SUB}/dlq", None, "receive", "orders.eu"),
    (MALLORY, "POST", f"/v1/subscriptions/{SUB}/dlq/redrive", None, "receive", "orders.eu"),
    (MALLORY, "POST", f"/v1/subscriptions/{SUB}/dlq/purge", None, "receive", "orders.eu"),
    # replay of a topic: receive on it
    (MALLORY, "GET", "/v1/topics/orders.eu/messages", None, "receive", "orders.eu"),
    (ALICE, "GET", "/v1/topics/payments.eu/messages?from_offset=1", None, "receive", "payments.eu"),
    # invoke on the agent type
    (MALLORY, "POST", "/v1/services/billing/invoke", {"x": 1}, "invoke", "billing"),
    (ALICE, "POST", "/v1/services/shipping/invoke", {"x": 1}, "invoke", "shipping"),
    # saga start: saga on the name, and what its steps (and compensations) need
    (MALLORY, "POST", "/v1/sagas", _saga("checkout"), "saga", "checkout"),
    (ALICE, "POST", "/v1/sagas", _saga("refund"), "saga", "refund"),
    (ALICE, "POST", "/v1/sagas", {"steps": _saga("x")["steps"]}, "saga", "saga"),  # the default name
    (ALICE, "POST", "/v1/sagas", _saga("checkout", _agent_step("s1", "shipping")), "invoke", "shipping"),
    (ALICE, "POST", "/v1/sagas", _saga("checkout", _topic_step("s1", "payments.eu")), "send", "payments.eu"),
    (ALICE, "POST", "/v1/sagas", _saga("checkout", _agent_step("s1", "billing"),
                                        _topic_step("s2", "orders.eu", undo_topic="payments.undo")),
     "send", "payments.undo"),
    # kv: the key, or the listed prefix
    (ALICE, "GET", "/v1/kv/bob/x", None, "kv", "bob/x"),
    (ALICE, "PUT", "/v1/kv/bob/x", {"value": 1}, "kv", "bob/x"),
    (ALICE, "POST", "/v1/kv/bob/x/cas", {"expected": None, "value": 1}, "kv", "bob/x"),
    (ALICE, "DELETE", "/v1/kv/bob/x", None, "kv", "bob/x"),
    (ALICE, "PUT", "/v1/kv/alice", {"value": 1}, "kv", "alice"),  # alice/* is a prefix with the slash
    (ALICE, "GET", "/v1/kv?prefix=bob/", None, "kv", "bob/*"),
    (ALICE, "GET", "/v1/kv?prefix=alice", None, "kv", "alice*"),
    (ALICE, "GET", "/v1/kv", None, "kv", "*"),
    (ALICE, "GET", "/v1/watch?prefix=bob/", None, "kv", "bob/*"),
    (MALLORY, "PUT", "/v1/kv/alice/x", {"value": 1}, "kv", "alice/x"),
    # locks and elections: lock on the name (elections under election/)
    (ALICE, "POST", "/v1/locks/bob-1", {"holder": "alice"}, "lock", "bob-1"),
    (ALICE, "DELETE", "/v1/locks/bob-1", {"holder": "alice"}, "lock", "bob-1"),
    (ALICE, "POST", "/v1/elections/bob-e/campaign", {"candidate": "alice"}, "lock", "election/bob-e"),
    (ALICE, "POST", "/v1/elections/bob-e/resign", {"candidate": "alice"}, "lock", "election/bob-e"),
    (MALLORY, "POST", "/v1/locks/alice-1", {"holder": "mallory"}, "lock", "alice-1"),
    # the admin's routes
    (ALICE, "PUT", "/v1/roles/mine", {"permissions": [{"action": "kv", "pattern": "*"}]}, "admin", "/v1/roles/mine"),
    (ALICE, "DELETE", "/v1/roles/orders-clerk", None, "admin", "/v1/roles/orders-clerk"),
    (ALICE, "PUT", "/v1/agents/alice/roles", {"roles": ["orders-clerk", "alice-worker"]}, "admin",
     "/v1/agents/alice/roles"),
    (MALLORY, "PUT", "/v1/agents/mallory/roles", {"roles": ["alice-worker"]}, "admin", "/v1/agents/mallory/roles"),
    (ALICE, "PUT", "/v1/services/billing", {"strategy": "random"}, "admin", "/v1/services/billing"),
    (ALICE, "DELETE", "/v1/services/billing", None, "admin", "/v1/services/billing"),
    (ALICE, "GET", "/v1/snapshot", None, "admin", "/v1/snapshot"),  # the whole state: admin only
    (ALICE, "POST", "/v1/members", {"id": "n9", "raft": "127.0.0.1:9", "http": "127.0.0.1:10"}, "admin",
     "/v1/members"),
    (ALICE, "DELETE", "/v1/members/n1", None, "admin", "/v1/members/n1"),
    (ALICE, "PUT", "/v1/topics/orders.eu", {"max_messages": 1}, "admin", "/v1/topics/orders.eu"),
    (ALICE, "PUT", "/v1/topics/orders.eu/binding", {"transport": "redis"}, "admin", "/v1/topics/orders.eu/binding"),
    (ALICE, "DELETE", "/v1/topics/orders.eu/binding", None, "admin", "/v1/topics/orders.eu/binding"),
    (ALICE, "PUT", "/v1/transports/redis", {"url": "redis://127.0.0.1:1/0"}, "admin", "/v1/transports/redis"),
    (ALICE, "DELETE", "/v1/transports/redis", None, "admin", "/v1/transports/redis"),
    (ALICE, "DELETE", "/v1/groups/g1", None, "admin", "/v1/groups/g1"),
    (ALICE, "GET", "/v1/no-such-route", None, "admin", "/v1/no-such-route"),  # no rule: the admin's
    # self: an agent acts for itself only
    (ALICE, "POST", "/v1/agents/bob/heartbeat", None, "self", "bob"),
    (ALICE, "DELETE", "/v1/agents/bob", None, "self", "bob"),
    (ALICE, "PATCH", "/v1/agents/bob", {"weight": 5}, "self", "bob"),
    (ALICE, "GET", "/v1/agents/bob/messages", None, "self", "bob"),
    (ALICE, "GET", "/v1/agents/bob/stream", None, "self", "bob"),
    (ALICE, "POST", "/v1/agents/bob/ack", {"delivery_ids": ["d-1"]}, "self", "bob"),
    (ALICE, "POST", "/v1/agents/bob/nack", {"delivery_ids": ["d-1"]}, "self", "bob"),
    (ALICE, "GET", "/v1/agents/bob/dlq", None, "self", "bob"),
    (ALICE, "POST", "/v1/agents/bob/dlq/redrive", None, "self", "bob"),
    (ALICE, "POST", "/v1/agents/bob/dlq/purge", None, "self", "bob"),
    (MALLORY, "POST", "/v1/agents/ghost/heartbeat", None, "self", "ghost"),
]


def _denied_id(case: tuple[Agent, str, str, Any, str, str]) -> str:
    who, method, path, _, permission, _ = case
    return f"{who.id}-{method}-{path}-{permission}"


@pytest.mark.parametrize("case", DENIED, ids=[_denied_id(c) for c in DENIED])
async def test_a_missing_permission_is_403_naming_it(world: World, case: tuple[Agent, str, str, Any, str, str]
                                                     ) -> None:
    who, method, path, body, permission, resource = case
    error = await refused(world.h, 403, method, path.replace(SUB, world.sub), body, who=who)
    assert (error["permission"], error["resource"]) == (permission, resource)
    assert who.id in error["message"]
    metrics = (await as_admin(world.h, "GET", "/metrics", expect=200)).text
    assert metric(metrics, "coord_auth_denied_total", f'{{permission="{permission}"}}') == 1


ALLOWED: list[tuple[Agent, str, str, Any, int]] = [
    (ALICE, "POST", "/v1/topics/orders.eu/messages", {"payload": 1}, 200),
    (ALICE, "POST", "/v1/topics/orders.us.west/messages", {"payload": 1}, 200),
    (BOB, "POST", "/v1/topics/orders.eu/messages", {"payload": 1}, 200),
    (ALICE, "POST", "/v1/subscriptions", {"topic": "orders.*"}, 201),  # as wide as the grant
    (ALICE, "POST", "/v1/subscriptions", {"topic": "orders.eu"}, 201),  # narrower
    (ALICE, "GET", f"/v1/subscriptions/{SUB}/messages", None, 200),
    (ALICE, "GET", f"/v1/subscriptions/{SUB}/dlq", None, 200),
    (BOB, "DELETE", f"/v1/subscriptions/{SUB}", None, 200),
    (ALICE, "GET", "/v1/topics/orders.eu/messages", None, 200),
    (ALICE, "POST", "/v1/sagas", _saga("checkout", _topic_step("s1", "orders.eu", undo_topic="orders.undo")), 201),
    (ALICE, "PUT", "/v1/kv/alice/x", {"value": 1}, 200),
    (ALICE, "GET", "/v1/kv/alice/missing", None, 404),
    (ALICE, "POST", "/v1/kv/alice/y/cas", {"expected": None, "value": 1}, 200),
    (ALICE, "GET", "/v1/kv?prefix=alice/", None, 200),
    (ALICE, "GET", "/v1/kv?prefix=alice/deeper/", None, 200),
    (ALICE, "POST", "/v1/locks/alice-1", {"holder": "alice"}, 200),
    (ALICE, "POST", "/v1/elections/alice-e/campaign", {"candidate": "alice"}, 200),
    (ALICE, "POST", "/v1/agents/alice/heartbeat", None, 200),
    (ALICE, "PATCH", "/v1/agents/alice", {"weight": 5}, 200),
    (ALICE, "GET", "/v1/agents/alice/messages", None, 200),
    (ALICE, "GET", "/v1/agents/alice/dlq", None, 200),
    # any authenticated caller may read these
    (MALLORY, "GET", "/v1/agents", None, 200),
    (MALLORY, "GET", "/v1/agents/alice", None, 200),
    (MALLORY, "GET", "/v1/roles", None, 200),
    (MALLORY, "GET", "/v1/members", None, 200),
    (MALLORY, "GET", "/v1/topics", None, 200),
    (MALLORY, "GET", "/v1/subscriptions", None, 200),
    (MALLORY, "GET", "/v1/events", None, 200),
    (MALLORY, "GET", "/v1/sagas", None, 200),
    (MALLORY, "GET", "/v1/services", None, 200),
    (MALLORY, "GET", "/v1/locks/alice-1", None, 404),
    (MALLORY, "DELETE", "/v1/agents/mallory", None, 200),
]


@pytest.mark.parametrize("case", ALLOWED, ids=[f"{c[0].id}-{c[1]}-{c[2]}" for c in ALLOWED])
async def test_a_granted_request_is_served(world: World, case: tuple[Agent, str, str, Any, int]) -> None:
    who, method, path, body, status = case
    await as_agent(world.h, who, method, path.replace(SUB, world.sub), body, expect=status)


async def test_invoke_with_the_permission_passes_the_check(world: World) -> None:
    """No agent of the type is registered: the balancer's 503, not a 403."""
    reply = await as_agent(world.h, ALICE, "POST", "/v1/services/billing/invoke", {"x": 1})
    assert reply.status not in (401, 403), reply.text


async def test_a_saga_step_naming_an_agent_needs_invoke_on_its_type(world: World) -> None:
    """An ``agent_id`` step calls that agent directly: the same right as invoking its type."""
    h = world.h
    await as_admin(h, "PUT", "/v1/security", {"endpoint_allow": ["127.0.0.1"]}, expect=200)  # the test's agents
    await as_admin(h, "POST", "/v1/agents", {"id": "ship-1", "type": "shipping", "endpoint": "127.0.0.1:9"},
                   expect=201)
    await as_admin(h, "POST", "/v1/agents", {"id": "bill-1", "type": "billing", "endpoint": "127.0.0.1:9"},
                   expect=201)
    step = {"id": "s1", "action": {"kind": "agent", "agent_id": "ship-1"}}
    error = await refused(h, 403, "POST", "/v1/sagas", _saga("checkout", step), who=ALICE)
    assert (error["permission"], error["resource"]) == ("invoke", "shipping")
    # an agent that is not registered could register later under any type
    step = {"id": "s1", "action": {"kind": "agent", "agent_id": "not-yet"}}
    error = await refused(h, 403, "POST", "/v1/sagas", _saga("checkout", step), who=ALICE)
    assert (error["permission"], error["resource"]) == ("invoke", ">")
    step = {"id": "s1", "action": {"kind": "agent", "agent_id": "bill-1"}, "compensation": {
        "kind": "agent", "agent_id": "ship-1"}}
    error = await refused(h, 403, "POST", "/v1/sagas", _saga("checkout", step), who=ALICE)
    assert (error["permission"], error["resource"]) == ("invoke", "shipping")
    step = {"id": "s1", "action": {"kind": "agent", "agent_id": "bill-1"}}
    await as_agent(h, ALICE, "POST", "/v1/sagas", _saga("checkout", step), expect=201)


@pytest.mark.parametrize("body", [
    {"name": "checkout", "steps": 5},
    {"name": "checkout", "steps": True},
    {"name": "checkout", "steps": {"id": "s1"}},
    {"name": "checkout", "steps": [5, None, "x", {"action": 5}, {"action": {"kind": 5}}]},
    {"name": "checkout", "steps": [{"id": "s1", "action": {"kind": "agent", "agent_id": ["x"]}}]},
    {"name": ["checkout"], "steps": []},
    [1, 2],
    "not an object",
])
async def test_a_malformed_saga_is_400_not_a_crash_for_an_agent(world: World, body: Any) -> None:
    h = world.h
    before = h.fingerprint()
    reply = await as_agent(h, ALICE, "POST", "/v1/sagas", body)
    assert reply.status in (400, 403), reply.text
    assert h.fingerprint() == before


async def test_a_grant_on_keys_starting_with_a_star_does_not_list_the_parent(world: World) -> None:
    """kv "alice/x**" covers the keys that start with "alice/x*", not the listing
    of "alice/x" (whose resource is named "alice/x*" too)."""
    h = world.h
    await as_admin(h, "PUT", "/v1/kv/alice/xyz", {"value": "not mallory's"}, expect=200)
    await as_admin(h, "PUT", "/v1/roles/starry", {"permissions": [{"action": "kv", "pattern": "alice/x**"}]},
                   expect=200)
    await as_admin(h, "PUT", "/v1/agents/mallory/roles", {"roles": ["starry"]}, expect=200)
    error = await refused(h, 403, "GET", "/v1/kv?prefix=alice/x", who=MALLORY)
    assert (error["permission"], error["resource"]) == ("kv", "alice/x*")
    await refused(h, 403, "GET", "/v1/watch?prefix=alice/x", who=MALLORY)
    await refused(h, 403, "GET", "/v1/kv/alice/xyz", who=MALLORY)
    await as_agent(h, MALLORY, "PUT", "/v1/kv/alice/x*", {"value": 1}, expect=200)
    listed = await as_agent(h, MALLORY, "GET", "/v1/kv?prefix=alice/x*", expect=200)
    assert [item["key"] for item in listed.body["items"]] == ["alice/x*"]


async def test_grants_change_what_an_agent_may_do_at_once(world: World) -> None:
    h = world.h
    await as_agent(h, MALLORY, "PUT", "/v1/kv/alice/m", {"value": 1}, expect=403)
    await as_admin(h, "PUT", "/v1/agents/mallory/roles", {"roles": ["alice-worker"]}, expect=200)
    await as_agent(h, MALLORY, "PUT", "/v1/kv/alice/m", {"value": 1}, expect=200)
    # taking the role away (an empty list) takes the permission away
    await as_admin(h, "PUT", "/v1/agents/mallory/roles", {"roles": []}, expect=200)
    await as_agent(h, MALLORY, "PUT", "/v1/kv/alice/m", {"value": 1}, expect=403)
    # deleting a role removes it from alice
    await as_admin(h, "DELETE", "/v1/roles/alice-worker", expect=200)
    await as_agent(h, ALICE, "PUT", "/v1/kv/alice/m", {"value": 1}, expect=403)
    roles = (await as_agent(h, ALICE, "GET", "/v1/roles", expect=200)).body
    assert {"agent": "alice", "roles": ["orders-clerk"]} in roles["grants"]


async def test_role_routes_validate_and_name_the_field(world: World) -> None:
    h = world.h
    before = h.fingerprint()
    reply = await as_admin(h, "PUT", "/v1/roles/r", {"permissions": [{"action": "fly", "pattern": "x"}]},
                           expect=400)
    assert reply.error["field"] == "permissions[0].action"
    reply = await as_admin(h, "PUT", "/v1/roles/r", {"permissions": [{"action": "send", "pattern": "a.>.b"}]},
                           expect=400)
    assert reply.error["field"] == "permissions[0].pattern"
    reply = await as_admin(h, "PUT", "/v1/agents/alice/roles", {"roles": ["no-such-role"]}, expect=400)
    assert reply.error["field"] == "roles[0]"
    reply = await as_admin(h, "PUT", "/v1/roles/r", {"permissions": [], "extra": 1}, expect=400)
    assert reply.error["field"] == "extra"
    await as_admin(h, "DELETE", "/v1/roles/no-such-role", expect=404)
    assert h.fingerprint()[2:] == before[2:]  # rejected commands may enter the log, but change nothing


# -- self: heartbeats, leaving ---------------------------------------------------------------------------

async def test_an_agent_heartbeats_and_deregisters_only_itself(world: World) -> None:
    h = world.h
    await as_agent(h, ALICE, "POST", "/v1/agents/alice/heartbeat", expect=200)
    error = await refused(h, 403, "POST", "/v1/agents/bob/heartbeat", who=ALICE)
    assert (error["permission"], error["resource"]) == ("self", "bob")
    error = await refused(h, 403, "DELETE", "/v1/agents/alice", who=BOB)
    assert (error["permission"], error["resource"]) == ("self", "alice")
    await as_agent(h, BOB, "DELETE", "/v1/agents/bob", expect=200)
    assert "bob" not in h.applier.machine.registry.agents
    # the admin acts for anyone
    await as_admin(h, "POST", "/v1/agents/alice/heartbeat", expect=200)
    await as_admin(h, "DELETE", "/v1/agents/alice", expect=200)
    assert "alice" not in h.applier.machine.registry.agents


# -- joining ---------------------------------------------------------------------------------------------

async def test_an_unauthenticated_join_is_401(sh: Harness) -> None:
    body = {"id": "carol", "type": "worker", "public_key": CAROL.keys.public_key}
    error = await refused(sh, 401, "POST", "/v1/agents", body)
    assert "joining needs" in error["message"]
    assert "carol" not in sh.applier.machine.registry.agents


async def test_a_self_signed_join_is_accepted_and_pins_the_key(sh: Harness) -> None:
    reply = await join(sh, CAROL)
    assert reply.body["id"] == "carol"
    assert sh.applier.machine.registry.agents["carol"].public_key == CAROL.keys.public_key
    await as_agent(sh, CAROL, "POST", "/v1/agents/carol/heartbeat", expect=200)


async def test_a_join_signed_by_another_key_than_the_body_names_is_401(sh: Harness) -> None:
    error = await refused(sh, 401, "POST", "/v1/agents", {"id": "carol", "type": "worker",
                                                           "public_key": CAROL.keys.public_key},
                          who=CAROL, keys=MALLORY.keys)
    assert "does not verify" in error["message"]
    # a body without a public key gives nothing to check the signature with
    error = await refused(sh, 401, "POST", "/v1/agents", {"id": "carol", "type": "worker"}, who=CAROL)
    assert "joining needs" in error["message"]


async def test_joining_as_another_id_is_refused(world: World) -> None:
    h = world.h
    # a newcomer signs as carol but registers dave: its key is not dave's
    await refused(h, 401, "POST", "/v1/agents", {"id": "dave", "type": "worker",
                                                  "public_key": CAROL.keys.public_key}, who=CAROL)
    # a registered agent registers someone else
    error = await refused(h, 403, "POST", "/v1/agents", {"id": "dave", "type": "worker",
                                                          "public_key": MALLORY.keys.public_key}, who=MALLORY)
    assert (error["permission"], error["resource"]) == ("self", "dave")
    # or takes over a registered id with its own key
    error = await refused(h, 403, "POST", "/v1/agents", {"id": "alice", "type": "worker",
                                                          "public_key": MALLORY.keys.public_key}, who=MALLORY)
    assert (error["permission"], error["resource"]) == ("self", "alice")
    # without an id the node would pick one: not the signer's either
    await refused(h, 403, "POST", "/v1/agents", {"type": "worker", "public_key": MALLORY.keys.public_key},
                  who=MALLORY)
    assert set(h.applier.machine.registry.agents) == {"alice", "bob", "mallory"}
    assert h.applier.machine.registry.agents["alice"].public_key == ALICE.keys.public_key


async def test_re_registering_with_a_new_key_needs_the_old_one(world: World) -> None:
    h = world.h
    new = AgentKeys.from_seed(b"\x09" * 32)
    # signed by the new key alone (whoever holds it is a stranger to alice): refused
    error = await refused(h, 401, "POST", "/v1/agents", {"id": "alice", "type": "worker",
                                                          "public_key": new.public_key}, who=ALICE, keys=new)
    assert "does not verify" in error["message"]
    assert h.applier.machine.registry.agents["alice"].public_key == ALICE.keys.public_key
    # signed by the registered key: the key rotates
    await join(h, ALICE, key=new)
    assert h.applier.machine.registry.agents["alice"].public_key == new.public_key
    await refused(h, 401, "PUT", "/v1/kv/alice/x", {"value": 1}, who=ALICE)
    await as_agent(h, ALICE, "PUT", "/v1/kv/alice/x", {"value": 1}, keys=new, expect=200)  # roles kept
    # re-registering without a key keeps the one registered
    async with serving(h, "alice"):
        await as_agent(h, ALICE, "POST", "/v1/agents", {"id": "alice", "type": "worker"}, keys=new, expect=201)
    assert h.applier.machine.registry.agents["alice"].public_key == new.public_key


async def test_the_admin_registers_anyone(world: World) -> None:
    h = world.h
    await as_admin(h, "POST", "/v1/agents", {"id": "carol", "type": "worker", "public_key": CAROL.keys.public_key},
                   expect=201)
    await as_agent(h, CAROL, "POST", "/v1/agents/carol/heartbeat", expect=200)
    # also an existing agent, with a new key (the admin's key recovery)
    await as_admin(h, "POST", "/v1/agents", {"id": "bob", "type": "worker", "public_key": CAROL.keys.public_key},
                   expect=201)
    assert h.applier.machine.registry.agents["bob"].public_key == CAROL.keys.public_key
    await refused(h, 401, "POST", "/v1/agents/bob/heartbeat", who=BOB)
    # and an agent without a key (it cannot sign; the admin acts for it)
    reply = await as_admin(h, "POST", "/v1/agents", {"type": "worker"}, expect=201)
    assert h.applier.machine.registry.agents[reply.body["id"]].public_key is None


async def test_a_malformed_public_key_is_400(sh: Harness) -> None:
    before = sh.fingerprint()
    for key in ("not base64!", base64.b64encode(b"x" * 31).decode(), 42):
        reply = await as_admin(sh, "POST", "/v1/agents", {"id": "carol", "type": "worker", "public_key": key},
                               expect=400)
        assert reply.error["field"] == "public_key"
    assert sh.fingerprint() == before


# -- public routes, metrics, secrets ----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/status"])
async def test_public_routes_answer_without_credentials(sh: Harness, path: str) -> None:
    await send(sh, "GET", path, expect=200)


async def test_metrics_need_the_admin_or_the_metrics_token_on_a_secure_node(make_harness: HarnessFactory) -> None:
    """/metrics lists agent ids and topic names: not public on a secure node.
    The metrics token (a scraper's) reads /metrics and nothing else."""
    scrape = "scrape-token-" + "k" * 24
    h = await make_harness(auth=AuthSettings(admin_token=ADMIN_TOKEN, cluster_secret=CLUSTER_SECRET,
                                             metrics_token=scrape))
    await join(h, ALICE)
    await as_admin(h, "POST", "/v1/topics/orders.secret-launch/messages", {"payload": 1}, expect=200)
    error = await refused(h, 401, "GET", "/metrics")
    assert "credentials" in error["message"]
    error = await refused(h, 401, "GET", "/metrics", headers={"Authorization": f"Bearer {scrape}x"})
    error = await refused(h, 403, "GET", "/metrics", who=ALICE)  # an agent does not see every agent and topic
    assert (error["permission"], error["resource"]) == ("metrics", "/metrics")
    for token in (scrape, ADMIN_TOKEN):
        text = (await send(h, "GET", "/metrics", headers={"Authorization": f"Bearer {token}"}, expect=200)).text
        assert "coord_" in text and scrape not in text
    for method, path in (("GET", "/v1/agents"), ("GET", "/v1/topics"), ("PUT", "/v1/roles/r"), ("GET", "/v1/roles")):
        error = await refused(h, 403, method, path, {"permissions": []} if method == "PUT" else None,
                              headers={"Authorization": f"Bearer {scrape}"})
        assert "metrics token" in error["message"]


async def test_denials_and_refusals_are_counted_in_metrics(world: World) -> None:
    h = world.h
    before = (await as_admin(h, "GET", "/metrics", expect=200)).text
    assert metric(before, "coord_auth_denied_total", '{permission="send"}') == 0
    await refused(h, 403, "POST", "/v1/topics/orders.eu/messages", {"payload": 1}, who=MALLORY)
    await refused(h, 403, "POST", "/v1/topics/orders.us/messages", {"payload": 1}, who=MALLORY)
    await refused(h, 403, "PUT", "/v1/kv/bob/x", {"value": 1}, who=ALICE)
    await refused(h, 403, "PUT", "/v1/roles/x", {"permissions": []}, who=ALICE)
    await refused(h, 403, "POST", "/v1/agents/bob/heartbeat", who=ALICE)
    await refused(h, 401, "GET", "/v1/agents")
    await refused(h, 401, "GET", "/v1/agents", headers={"Authorization": "Bearer nope"})
    await refused(h, 401, "GET", "/v1/agents", who=GHOST)
    after = (await as_admin(h, "GET", "/metrics", expect=200)).text
    assert metric(after, "coord_auth_denied_total", '{permission="send"}') == 2
    assert metric(after, "coord_auth_denied_total", '{permission="kv"}') == 1
    assert metric(after, "coord_auth_denied_total", '{permission="admin"}') == 1
    assert metric(after, "coord_auth_denied_total", '{permission="self"}') == 1
    assert metric(after, "coord_auth_refused_total") - metric(before, "coord_auth_refused_total") == 3


async def test_no_secret_appears_in_errors_status_or_metrics(world: World) -> None:
    h = world.h
    texts = []
    raw = encode({"value": 1})
    forged = authorization(h, ALICE, "PUT", "/v1/kv/alice/x", raw, keys=MALLORY.keys)
    sent_sig = forged.rsplit('sig="', 1)[1].rstrip('"')
    texts.append((await send(h, "PUT", "/v1/kv/alice/x", raw, {"Authorization": forged}, expect=401)).text)
    signed = authorization(h, ALICE, "PUT", "/v1/kv/bob/x", raw)
    texts.append((await send(h, "PUT", "/v1/kv/bob/x", raw, {"Authorization": signed}, expect=403)).text)
    texts.append((await send(h, "PUT", "/v1/kv/bob/x", raw, {"Authorization": signed}, expect=401)).text)  # replay
    near = ADMIN_TOKEN[:-1] + "X"
    texts.append((await send(h, "GET", "/v1/agents", headers={"Authorization": f"Bearer {near}"}, expect=401)).text)
    texts.append((await send(h, "GET", "/v1/agents", headers={PRINCIPAL_HEADER: "admin"}, expect=401)).text)
    texts.append((await send(h, "GET", "/v1/status", expect=200)).text)
    texts.append((await as_admin(h, "GET", "/metrics", expect=200)).text)
    texts.append((await as_agent(h, ALICE, "GET", "/v1/agents", expect=200)).text)
    for text in texts:
        for secret in (ADMIN_TOKEN, near, CLUSTER_SECRET, sent_sig, signed.rsplit('sig="', 1)[1].rstrip('"')):
            assert secret not in text


# -- anonymous (development) mode ------------------------------------------------------------------------

async def test_anonymous_mode_serves_unsigned_requests(h: Harness) -> None:
    await send(h, "PUT", "/v1/kv/anything", encode({"value": 1}), expect=200)
    await send(h, "PUT", "/v1/roles/r", encode({"permissions": []}), expect=200)
    await send(h, "POST", "/v1/agents", encode({"id": "carol", "type": "worker"}), expect=201)
    await send(h, "POST", "/v1/agents/carol/heartbeat", expect=200)


async def test_anonymous_mode_still_refuses_a_bad_signature(h: Harness) -> None:
    await send(h, "POST", "/v1/agents", encode({"id": "carol", "type": "worker",
                                                "public_key": CAROL.keys.public_key}), expect=201)
    await refused(h, 401, "PUT", "/v1/kv/x", {"value": 1}, who=CAROL, keys=MALLORY.keys)
    await refused(h, 401, "PUT", "/v1/kv/x", {"value": 1}, who=GHOST)
    await refused(h, 401, "PUT", "/v1/kv/x", {"value": 1}, headers={"Authorization": "Bearer anything"})
    await refused(h, 401, "PUT", "/v1/kv/x", {"value": 1}, headers={"Authorization": "Coord-Ed25519 junk"})
    # a good signature is fine, and permissions are not checked
    await as_agent(h, CAROL, "PUT", "/v1/kv/x", {"value": 1}, expect=200)
    await as_agent(h, CAROL, "PUT", "/v1/roles/mine", {"permissions": []}, expect=200)


# -- the Python client as an agent ---------------------------------------------------------------------

async def test_the_client_signs_as_an_agent_and_seals_to_another(world: World) -> None:
    """CoordinatorClient(agent_id=, keys=) signs every request; publish(seal_to=)
    names the sealing agent as the source, so the recipient's open() accepts it."""
    h = world.h
    url = str(h.http.make_url(""))
    async with CoordinatorClient(url, agent_id="alice", keys=ALICE.keys, timeout_s=3) as alice, \
            CoordinatorClient(url, agent_id="bob", keys=BOB.keys, timeout_s=3) as bob, \
            CoordinatorClient(url, token=ADMIN_TOKEN, timeout_s=3) as admin:
        sub = await bob.subscribe("orders.sealed")
        await alice.publish("orders.sealed", {"id": "s1", "payload": {"secret": 42}}, seal_to=["bob"])
        await alice.publish("orders.sealed", messages=[{"id": "s2", "payload": [1]}], seal_to=["bob", "alice"])
        deliveries = await bob.fetch(sub, max=10)
        assert [d["message"]["source"] for d in deliveries] == ["alice", "alice"]
        assert [await bob.open(d["message"]) for d in deliveries] == [{"secret": 42}, [1]]
        assert await alice.open(deliveries[1]["message"]) == [1]  # she sealed that one to herself too
        stored = await admin.topic_messages("orders.sealed")
        assert is_sealed(stored[0]["message"]["payload"]) and "secret" not in json.dumps(stored[0]["message"])
        with pytest.raises(SealError, match="not a recipient"):
            await alice.open(deliveries[0]["message"])
        with pytest.raises(Forbidden) as denied:
            await alice.publish("payments.eu", {"payload": 1})
        assert (denied.value.permission, denied.value.resource) == ("send", "payments.eu")
    async with CoordinatorClient(url, agent_id="carol", keys=CAROL.keys, timeout_s=3) as carol:
        with pytest.raises(Unauthenticated):
            await carol.agents()
        async with serving(h, "carol"):
            registration = await carol.join("worker", ttl_s=30)  # signed by the key it registers
        assert registration.id == "carol"
        assert (await carol.heartbeat("carol"))["id"] == "carol"
        with pytest.raises(Forbidden):
            await carol.heartbeat("alice")


async def test_an_agent_registered_without_a_key_cannot_be_claimed_by_a_self_signed_join(world: World) -> None:
    """The admin registered svc without a key (it acts for it): the id is taken.
    A newcomer signing with its own key must not become svc (and get its roles)."""
    h = world.h
    await as_admin(h, "POST", "/v1/agents", {"id": "svc", "type": "worker"}, expect=201)
    await as_admin(h, "PUT", "/v1/agents/svc/roles", {"roles": ["alice-worker"]}, expect=200)
    error = await refused(h, 401, "POST", "/v1/agents", {"id": "svc", "type": "worker",
                                                          "public_key": MALLORY.keys.public_key},
                          who=Agent("svc", MALLORY.keys))
    assert "joining needs" in error["message"]
    assert h.applier.machine.registry.agents["svc"].public_key is None
    # the admin gives it a key; from then on svc signs for itself
    await as_admin(h, "POST", "/v1/agents", {"id": "svc", "type": "worker", "public_key": CAROL.keys.public_key},
                   expect=201)
    await as_agent(h, Agent("svc", CAROL.keys), "PUT", "/v1/kv/alice/svc", {"value": 1}, expect=200)


async def test_an_unknown_subscription_is_404_not_a_permission_question(world: World) -> None:
    for method, suffix in (("GET", "/messages"), ("POST", "/ack"), ("GET", "/dlq")):
        body = {"delivery_ids": ["d-1"]} if method == "POST" else None
        reply = await as_agent(world.h, MALLORY, method, f"/v1/subscriptions/sub-999999{suffix}", body)
        assert reply.status == 404, reply.text


def test_the_nonce_cache_forgets_after_twice_the_skew() -> None:
    """A nonce is kept as long as a request carrying it can pass the timestamp
    check (its ts may lie clock_skew_s ahead): 2 * clock_skew_s."""
    state = AuthState(AuthSettings(clock_skew_s=1.0), clock=lambda: 0.0)
    assert state.remember_nonce("alice/n1", 0.0)
    assert not state.remember_nonce("alice/n1", 1.9)
    assert state.remember_nonce("bob/n1", 1.9)  # per agent
    assert state.remember_nonce("alice/n2", 2.5)  # evicts alice/n1, which expired at 2.0
    assert state.remember_nonce("alice/n1", 2.5)
    assert not state.remember_nonce("bob/n1", 2.5)  # kept until 3.9


# -- serving a type, endpoints the leader may call -------------------------------------------------------

async def test_registering_as_a_type_needs_serve_on_it(world: World) -> None:
    """Anyone who could join could claim any type and receive its callers'
    bodies and saga steps: an agent needs ``serve`` on the type."""
    h = world.h
    body = {"id": "mallory", "type": "payments", "public_key": MALLORY.keys.public_key, "weight": 1_000_000}
    error = await refused(h, 403, "POST", "/v1/agents", body, who=MALLORY)
    assert (error["permission"], error["resource"]) == ("serve", "payments")
    error = await refused(h, 403, "POST", "/v1/agents", {**body, "id": "carol", "public_key": CAROL.keys.public_key},
                          who=CAROL)  # a new agent, self-signed, the same
    assert (error["permission"], error["resource"]) == ("serve", "payments")
    await as_admin(h, "PUT", "/v1/roles/pay", {"permissions": [{"action": "serve", "pattern": "payments.*"}]},
                   expect=200)
    await as_admin(h, "PUT", "/v1/agents/mallory/roles", {"roles": ["pay"]}, expect=200)
    error = await refused(h, 403, "POST", "/v1/agents", body, who=MALLORY)  # payments.* is not payments
    assert error["resource"] == "payments"
    await as_agent(h, MALLORY, "POST", "/v1/agents", {**body, "type": "payments.eu"}, expect=201)
    assert h.applier.machine.registry.agents["mallory"].type == "payments.eu"
    await as_admin(h, "POST", "/v1/agents", {"id": "pay-1", "type": "payments"}, expect=201)  # the admin may


SPECIAL_ENDPOINTS = ["127.0.0.1:9", "localhost:8080", "http://localhost.:8080", "api.localhost:80",
                     "169.254.169.254:80", "http://169.254.169.254/latest/meta-data", "metadata.google.internal:80",
                     "10.0.0.5:80", "192.168.1.1:80", "172.16.0.1:80", "100.64.0.1:80", "0.0.0.0:80", "[::1]:80",
                     "http://[::ffff:127.0.0.1]:80", "[fe80::1]:80", "[fd00:ec2::254]:80", "224.0.0.1:80"]


@pytest.mark.parametrize("endpoint", SPECIAL_ENDPOINTS)
async def test_a_loopback_link_local_private_or_metadata_endpoint_is_403(world: World, endpoint: str) -> None:
    """The leader POSTs to and health-checks what is registered (blind SSRF):
    special addresses need the admin's allow-list; the admin is held to it too."""
    h = world.h
    for who, body in ((ALICE, {"id": "alice", "type": "worker", "endpoint": endpoint}),):
        async with serving(h, who.id):
            error = await refused(h, 403, "POST", "/v1/agents", body, who=who)
        assert (error["permission"], error["resource"]) == ("endpoint", endpoint)
    error = await refused(h, 403, "PATCH", "/v1/agents/alice", {"endpoint": endpoint}, who=ALICE)
    assert error["permission"] == "endpoint"
    error = await refused(h, 403, "POST", "/v1/agents", {"id": "x", "type": "worker", "endpoint": endpoint},
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert error["permission"] == "endpoint"


async def test_the_admins_endpoint_allow_list(world: World) -> None:
    h = world.h
    async with serving(h, "alice"):
        for endpoint in ("agent.example.com:8080", "https://agent.example.com/base", "93.184.216.34:80"):
            await as_agent(h, ALICE, "POST", "/v1/agents", {"id": "alice", "type": "worker", "endpoint": endpoint},
                           expect=201)  # public names and addresses, while the list is empty
    for bad, field in (({"endpoint_allow": "127.0.0.1"}, "endpoint_allow"),
                       ({"endpoint_allow": ["127.0.0.1", "not a name!"]}, "endpoint_allow[1]"),
                       ({"endpoint_allow": ["10.0.0.0/33"]}, "endpoint_allow[0]"),
                       ({"endpoint_allow": ["x"] * 257}, "endpoint_allow"),
                       ({"endpoint_alow": []}, "endpoint_alow")):
        error = await refused(h, 400, "PUT", "/v1/security", bad, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert error["field"] == field, error
    await refused(h, 403, "PUT", "/v1/security", {"endpoint_allow": ["127.0.0.0/8"]}, who=ALICE)
    reply = await as_admin(h, "PUT", "/v1/security", {"endpoint_allow": ["*.svc.example.com", "127.0.0.1",
                                                                         "fd00::/8"]}, expect=200)
    assert reply.body == {"pow_difficulty": 0, "endpoint_allow": ["*.svc.example.com", "127.0.0.1/32", "fd00::/8"]}
    assert (await as_agent(h, ALICE, "GET", "/v1/security", expect=200)).body == reply.body
    for endpoint in ("127.0.0.1:9", "a.svc.example.com:80", "http://b.a.svc.example.com", "[fd00::1]:80"):
        await as_agent(h, ALICE, "PATCH", "/v1/agents/alice", {"endpoint": endpoint}, expect=200)
    for endpoint in ("127.0.0.2:9", "agent.example.com:8080", "svc.example.com:80", "93.184.216.34:80",
                     "169.254.169.254:80", "localhost:9"):
        error = await refused(h, 403, "PATCH", "/v1/agents/alice", {"endpoint": endpoint}, who=ALICE)
        assert (error["permission"], error["resource"]) == ("endpoint", endpoint)
    for endpoint in ("http://user:pw@a.svc.example.com", "ftp://a.svc.example.com", "http://", "a.svc.example.com:0x"):
        error = await refused(h, 400, "PATCH", "/v1/agents/alice", {"endpoint": endpoint}, who=ALICE)
        assert error["field"] == "endpoint", error


async def test_the_403s_keep_their_place_among_the_field_checks(world: World) -> None:
    """The agent commands' parse checks every field, and the auth checks come
    where they always did: serve on the type after ttl_s and before the
    endpoint, weight and key; the allow-list after the endpoint's string
    and (on update) the weight, before the weight (register) and metadata."""
    h = world.h
    body = {"id": "mallory", "type": "payments", "public_key": MALLORY.keys.public_key, "weight": 0}
    error = await refused(h, 403, "POST", "/v1/agents", body, who=MALLORY)
    assert error["permission"] == "serve"
    error = await refused(h, 400, "POST", "/v1/agents", {**body, "ttl_s": 0}, who=MALLORY)
    assert error["field"] == "ttl_s"
    error = await refused(h, 400, "POST", "/v1/agents", {**body, "metadata": None, "ttl_s": 0}, who=MALLORY)
    assert (error["field"], error["message"]) == ("metadata", "metadata: must be an object")
    async with serving(h, "alice"):
        alice = {"id": "alice", "type": "worker", "weight": 0}
        error = await refused(h, 403, "POST", "/v1/agents", {**alice, "endpoint": "10.0.0.5:80"}, who=ALICE)
        assert error["permission"] == "endpoint"
        error = await refused(h, 400, "POST", "/v1/agents", {**alice, "endpoint": ""}, who=ALICE)
        assert error["field"] == "endpoint"
        error = await refused(h, 400, "POST", "/v1/agents", {**alice, "endpoint": "agent.example.com:80"}, who=ALICE)
        assert error["field"] == "weight"
    error = await refused(h, 403, "PATCH", "/v1/agents/alice", {"endpoint": "10.0.0.5:80", "metadata": 1}, who=ALICE)
    assert error["permission"] == "endpoint"
    error = await refused(h, 400, "PATCH", "/v1/agents/alice", {"endpoint": "10.0.0.5:80", "weight": 0}, who=ALICE)
    assert error["field"] == "weight"
    error = await refused(h, 400, "PATCH", "/v1/agents/alice", {"weight": None}, who=ALICE)
    assert (error["field"], error["message"]) == ("body", "body: give at least one of weight, endpoint and metadata")


# -- lock holders and candidates ----------------------------------------------------------------------

async def test_an_agent_holds_locks_and_campaigns_only_as_itself(world: World) -> None:
    """Holders are not free strings for an agent: with ``lock`` on the name,
    bob still cannot refresh, take the fencing token of, or release alice's
    lock, nor campaign or resign as her. The admin names any holder."""
    h = world.h
    shared = [{"action": "lock", "pattern": "shared-*"}, {"action": "lock", "pattern": "election/shared-*"}]
    await as_admin(h, "PUT", "/v1/roles/locker", {"permissions": shared}, expect=200)
    await as_admin(h, "PUT", "/v1/agents/alice/roles", {"roles": [*sorted(ROLES), "locker"]}, expect=200)
    await as_admin(h, "PUT", "/v1/agents/bob/roles", {"roles": ["locker", "orders-clerk"]}, expect=200)
    held = await as_agent(h, ALICE, "POST", "/v1/locks/shared-1", {"holder": "alice", "ttl_s": 60}, expect=200)
    lock = await as_admin(h, "GET", "/v1/locks/shared-1", expect=200)
    assert lock.body["holder"] == "alice"
    for method, path, body in (("POST", "/v1/locks/shared-1", {"holder": "alice", "ttl_s": 60}),
                               ("DELETE", "/v1/locks/shared-1", {"holder": "alice"})):
        error = await refused(h, 403, method, path, body, who=BOB)
        assert (error["permission"], error["resource"]) == ("self", "alice") and "holder" in error["message"]
    await as_agent(h, BOB, "POST", "/v1/locks/shared-1", {"ttl_s": 60}, expect=409)  # as himself: it is held
    await as_agent(h, ALICE, "POST", "/v1/elections/shared-e/campaign", {"candidate": "alice"}, expect=200)
    for path, body in (("/v1/elections/shared-e/campaign", {"candidate": "alice"}),
                       ("/v1/elections/shared-e/resign", {"candidate": "alice"})):
        error = await refused(h, 403, "POST", path, body, who=BOB)
        assert (error["permission"], error["resource"]) == ("self", "alice") and "candidate" in error["message"]
    assert (await as_admin(h, "GET", "/v1/elections/shared-e", expect=200)).body["leader"] == "alice"
    # alice releases her own; the admin may release anyone's
    await as_agent(h, ALICE, "DELETE", "/v1/locks/shared-1", {"holder": "alice"}, expect=200)
    await as_agent(h, BOB, "POST", "/v1/locks/shared-1", {"ttl_s": 60}, expect=200)  # holder left out: bob
    assert (await as_admin(h, "GET", "/v1/locks/shared-1", expect=200)).body["fencing_token"] \
        > held.body["fencing_token"]
    await as_admin(h, "DELETE", "/v1/locks/shared-1", {"holder": "bob"}, expect=200)
    await as_admin(h, "POST", "/v1/elections/shared-e/resign", {"candidate": "alice"}, expect=200)


# -- a message's sender --------------------------------------------------------------------------


async def test_an_agents_messages_carry_its_id_as_source_and_it_cannot_claim_another(world: World) -> None:
    h = world.h
    error = await refused(h, 403, "POST", "/v1/topics/orders.eu/messages", {"source": "bob", "payload": 1},
                          who=ALICE)
    assert (error["permission"], error["resource"]) == ("source", "bob")
    await refused(h, 403, "POST", "/v1/topics/orders.eu/messages",
                  {"messages": [{"payload": 1}, {"source": "bob", "payload": 2}]}, who=ALICE)
    await as_agent(h, ALICE, "POST", "/v1/topics/orders.eu/messages", {"payload": 3}, expect=200)
    await as_agent(h, ALICE, "POST", "/v1/topics/orders.eu/messages", {"source": "alice", "payload": 4},
                   expect=200)
    got = await as_admin(h, "GET", f"/v1/subscriptions/{world.sub}/messages?max=10", expect=200)
    sources = {str(d["message"]["payload"]): d["message"]["source"] for d in got.body["messages"]}
    assert sources["3"] == sources["4"] == "alice"


async def test_the_admins_messages_carry_admin_as_source_on_every_publish_path(
        make_harness: HarnessFactory) -> None:
    """Published with the admin token, a message says ``admin`` (not
    ``anonymous``): one message, a batch, a forwarded publish, a request and
    its reply, and a direct topic's message at the broker. A source the admin
    names is kept."""
    from transports.memory import InMemoryTransport

    transport = InMemoryTransport(namespace="t")
    h = await make_harness(auth=AuthSettings(admin_token=ADMIN_TOKEN, cluster_secret=CLUSTER_SECRET),
                           transports={"memory": transport})
    sub = (await as_admin(h, "POST", "/v1/subscriptions", {"topic": "orders.eu"}, expect=201)).body["id"]
    await as_admin(h, "POST", "/v1/topics/orders.eu/messages", {"payload": "one"}, expect=200)
    await as_admin(h, "POST", "/v1/topics/orders.eu/messages",
                   {"messages": [{"payload": "batch"}, {"payload": "named", "source": "billing"}]}, expect=200)
    path, raw = "/v1/topics/orders.eu/messages", encode({"payload": "forwarded"})
    await send(h, "POST", path, raw, {PRINCIPAL_HEADER: "admin",
                                      FORWARD_SIG_HEADER: forwarded(h, "admin", "POST", path, raw)}, expect=200)
    got = await as_admin(h, "GET", f"/v1/subscriptions/{sub}/messages?max=10", expect=200)
    assert {d["message"]["payload"]: d["message"]["source"] for d in got.body["messages"]} == {
        "one": "admin", "batch": "admin", "named": "billing", "forwarded": "admin"}

    asks = (await as_admin(h, "POST", "/v1/subscriptions", {"topic": "svc.echo"}, expect=201)).body["id"]

    async def responder() -> dict[str, Any]:
        got = await as_admin(h, "GET", f"/v1/subscriptions/{asks}/messages?max=1&wait_s=5", expect=200)
        request = got.body["messages"][0]["message"]
        await as_admin(h, "POST", f"/v1/topics/{request['replyTo']}/messages",
                       {"type": "response", "correlationId": request["id"], "payload": "pong"}, expect=200)
        return request

    answering = asyncio.create_task(responder())
    try:
        async with asyncio.timeout(10):
            answer = await as_admin(h, "POST", "/v1/topics/svc.echo/request", {"payload": "ping", "timeout_s": 5},
                                    expect=200)
            request = await answering
    finally:
        answering.cancel()
    assert request["source"] == "admin" and answer.body["response"]["source"] == "admin"

    await as_admin(h, "PUT", "/v1/topics/jobs/binding", {"transport": "memory", "mode": "direct"}, expect=200)
    await as_admin(h, "POST", "/v1/topics/jobs/messages", {"payload": "direct"}, expect=200)
    assert [e.message["source"] for e in transport._topics["jobs"]] == ["admin"]


async def test_an_agent_that_left_keeps_its_id_until_the_admin_releases_it(world: World) -> None:
    """Roles are granted by agent id: when bob leaves, his key stays bound to
    his id, so mallory cannot join as bob (and inherit his roles); bob can
    come back with his key; the admin can release the id."""
    h = world.h
    await as_agent(h, BOB, "DELETE", "/v1/agents/bob", expect=200)
    impostor = Agent("bob", MALLORY.keys)
    await refused(h, 401, "POST", "/v1/agents", {"id": "bob", "type": "worker", "public_key": MALLORY.keys.public_key},
                  who=impostor)
    await join(h, BOB)  # the real bob, with his own key
    await as_agent(h, BOB, "DELETE", "/v1/agents/bob", expect=200)
    await refused(h, 403, "DELETE", "/v1/keys/bob", who=ALICE)
    await as_admin(h, "DELETE", "/v1/keys/bob", expect=200)
    await join(h, BOB, key=MALLORY.keys, signer=impostor)  # released: a new key may take the id
    await as_admin(h, "DELETE", "/v1/keys/nobody", expect=404)
