"""Who is calling, and may they: authentication and access checks of the
HTTP API, in one place.

Credentials (the ``Authorization`` header):

- ``Bearer <admin token>``: the admin credential made at cluster bootstrap;
  it may do everything.
- ``Coord-Ed25519 agent="<id>", ts="<unix ms>", nonce="<16-64 of A-Za-z0-9_->",
  sig="<base64>"``: an agent's signed request. The signature (Ed25519, by the
  key the agent registered) covers ``COORD-ED25519-V1``, the method, the
  Host header, the path with its query exactly as sent, ts, nonce and the
  SHA-256 of the body, one per line. A timestamp more than ``clock_skew_s`` away from this
  node's clock, a nonce this node has seen within that window, or a Host
  that is not one of this node's own names (``AuthState.hosts``) is refused:
  a replay to this node fails its nonce, a replay to another node its Host.
  A node forgets its nonces when it restarts, so a signed write is also
  deduplicated by the state machine under a request id derived from its
  nonce (``IMPLIED_REQUEST_ID``, unless the caller gave one): replayed, it
  is answered with the first result and applies nothing again.
- ``Bearer <metrics token>``: may read ``/metrics`` and nothing else (a scraper).
- Nothing: anonymous. Allowed only when the node was started with
  ``--allow-anonymous`` (then nobody is checked: a development mode); else
  only the public routes answer (health, status, joining).

A request a follower forwards to the leader carries the principal the
follower established, with an HMAC over it, the method, the Host, the path,
the body, a timestamp, a nonce and the implied request id. Its key is
derived from the cluster secret (HKDF, ``crypto.KEY_FORWARDED_PRINCIPAL``),
as is the join challenges' (``crypto.KEY_JOIN_CHALLENGE``): the raw secret
keys nothing here. The leader trusts that, and nothing else.

Authorization: ``RULES`` names, for every route, what it needs: ``public``,
``any`` (authenticated), ``admin``, ``self`` (the agent in the path, or the
admin), or an action on a resource taken from the request (``send`` on the
topic, ``invoke`` on the agent type ...), checked against the replicated
roles (``coordinator.state.access``). A route without a rule needs the
admin. A denial is a 403 naming the missing permission, counted in
``/metrics``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import re
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from coordinator import crypto
from coordinator.api.keys import IMPLIED_REQUEST_ID, NODE
from coordinator.crypto import SCHEME_AGENT, signed_text
from coordinator.errors import Forbidden, InvalidInput, Unauthenticated

PRINCIPAL_HEADER = "X-Coord-Principal"
FORWARD_SIG_HEADER = "X-Coord-Forward-Sig"
FORWARD_REQUEST_ID_HEADER = "X-Coord-Forward-Request-Id"  # the implied request id, covered by the HMAC
NONCE_RE = re.compile(r"[A-Za-z0-9_\-]{16,64}\Z")
TS_RE = re.compile(r"[0-9]{1,16}\Z")  # ASCII digits: str.isdigit() also takes "²", which int() refuses
AUTH_HEADER_MAX = 1024
NONCES_MAX = 1_000_000


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # "admin" | "agent" | "anonymous" | "scraper" (the metrics token: /metrics only)
    agent_id: str | None = None

    def __str__(self) -> str:
        return f"agent {self.agent_id!r}" if self.kind == "agent" else self.kind

    def header(self) -> str:
        return f"agent:{self.agent_id}" if self.kind == "agent" else self.kind


@dataclass
class AuthSettings:
    """How a node authenticates. Secure by default: no anonymous access."""

    allow_anonymous: bool = False
    admin_token: str | None = field(default=None, repr=False)
    cluster_secret: str | None = field(default=None, repr=False)  # keys of forwarded principals, join challenges
    # other cluster secrets whose forwarded principals and join challenges are also
    # accepted (never used to sign): a secret being changed one node at a time
    accepted_secrets: tuple[str, ...] = field(default=(), repr=False)
    metrics_token: str | None = field(default=None, repr=False)  # reads /metrics only (a Prometheus scraper)
    clock_skew_s: float = 30.0
    # Host values (host[:port]) this node is also reached by, besides its own
    # HTTP address (a DNS name, a load balancer's): a signature for any other
    # Host is refused. Loopback aliases of a loopback address are added.
    hosts: tuple[str, ...] = ()


class AuthState:
    """One node's authentication state: settings, seen nonces, denial counts.
    The app holds it under ``AUTH``."""

    def __init__(self, settings: AuthSettings, clock: Callable[[], float] = time.time, own_http: str = "") -> None:
        """``own_http``: this node's HTTP address (``host:port``), a Host its
        signed requests may carry, with ``settings.hosts``."""
        self.settings = settings
        self.clock = clock
        self.denied: Counter[str] = Counter()  # permission -> 403s
        self.refused: Counter[str] = Counter()  # reason -> 401s
        self._nonces: OrderedDict[str, float] = OrderedDict()  # nonce -> expiry (seconds)
        self.hosts: set[str] = set()
        for host in (own_http, *settings.hosts):
            self.add_host(host)
        secret = settings.cluster_secret
        # Join challenges are keyed by the cluster secret, so any node checks them;
        # without one (a lone test node) by a random key of this node.
        self.challenge_key = crypto.derived_key(secret, crypto.KEY_JOIN_CHALLENGE) if secret \
            else secrets.token_bytes(32)
        self.forward_key = crypto.derived_key(secret, crypto.KEY_FORWARDED_PRINCIPAL) if secret else None
        # What is checked: the keys above first, then those of the accepted secrets.
        others = settings.accepted_secrets if secret else ()
        self.challenge_keys = (self.challenge_key,
                               *(crypto.derived_key(s, crypto.KEY_JOIN_CHALLENGE) for s in others))
        self.forward_keys = (*((self.forward_key,) if self.forward_key else ()),
                             *(crypto.derived_key(s, crypto.KEY_FORWARDED_PRINCIPAL) for s in others))

    def add_host(self, host: str) -> None:
        """Accept signatures made for ``host`` (``host:port``; a loopback one
        with every loopback spelling: ``127.0.0.1``, ``localhost``, ``[::1]``)."""
        if not host:
            return
        name, port = _split_host(host)
        names = LOOPBACK_NAMES if name in LOOPBACK_NAMES else (name,)
        self.hosts.update(f"{n}:{port}" if port else n for n in names)

    def host_allowed(self, host: str, secure: bool) -> bool:
        """Whether a request's Host header names this node (the port defaults by scheme)."""
        name, port = _split_host(host)
        default = "443" if secure else "80"
        return f"{name}:{port or default}" in self.hosts or (port in ("", default) and name in self.hosts)

    def remember_nonce(self, key: str, now: float) -> bool:
        """False when ``key`` was seen within the window (a replay)."""
        while self._nonces:
            oldest, expiry = next(iter(self._nonces.items()))
            if expiry > now and len(self._nonces) < NONCES_MAX:
                break
            del self._nonces[oldest]
        if key in self._nonces:
            return False
        self._nonces[key] = now + 2 * self.settings.clock_skew_s
        return True


AUTH: web.AppKey[AuthState] = web.AppKey("auth", AuthState)

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def _split_host(host: str) -> tuple[str, str]:
    """``(name, port)`` of a Host value, the name lowercased without a final
    dot, an IPv6 address in brackets; port "" when none is given."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else ""
    name, _, port = host.partition(":") if host.count(":") == 1 else (host, "", "")
    return name.rstrip("."), port


# -- parsing ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentCredential:
    agent_id: str
    ts_ms: int
    nonce: str
    signature: bytes


_PARAM = re.compile(r'\s*([a-z]+)="([^"\\]*)"\s*(?:,|\Z)')


def parse_authorization(value: str) -> tuple[str, Any]:
    """("bearer", token) or ("agent", AgentCredential); ``Unauthenticated``
    naming what is wrong otherwise. Never anything else, whatever the input."""
    if len(value) > AUTH_HEADER_MAX:
        raise Unauthenticated("Authorization: too long")
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() == "bearer":
        token = rest.strip()
        if not token:
            raise Unauthenticated("Authorization: Bearer needs a token")
        return "bearer", token
    if scheme != SCHEME_AGENT:
        raise Unauthenticated(f"Authorization: unknown scheme (use Bearer or {SCHEME_AGENT})")
    params: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None or match.end() == position:
            raise Unauthenticated(f"Authorization: cannot parse the {SCHEME_AGENT} parameters")
        name, raw = match.group(1), match.group(2)
        if name in params:
            raise Unauthenticated(f"Authorization: {name} is given twice")
        params[name] = raw
        position = match.end()
    missing = [k for k in ("agent", "ts", "nonce", "sig") if k not in params]
    if missing:
        raise Unauthenticated(f"Authorization: {missing[0]} is missing")
    unknown = sorted(set(params) - {"agent", "ts", "nonce", "sig"})
    if unknown:
        raise Unauthenticated(f"Authorization: unknown parameter {unknown[0]}")
    agent_id = params["agent"]
    if not agent_id or len(agent_id) > 256 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in agent_id):
        raise Unauthenticated("Authorization: agent is not a valid agent id")
    if not TS_RE.match(params["ts"]):
        raise Unauthenticated("Authorization: ts must be unix milliseconds")
    if not NONCE_RE.match(params["nonce"]):
        raise Unauthenticated("Authorization: nonce must be 16 to 64 of A-Z a-z 0-9 _ -")
    try:
        signature = base64.b64decode(params["sig"], validate=True)
    except (ValueError, binascii.Error):
        raise Unauthenticated("Authorization: sig is not base64") from None
    if len(signature) != 64:
        raise Unauthenticated("Authorization: sig is not an Ed25519 signature")
    return "agent", AgentCredential(agent_id, int(params["ts"]), params["nonce"], signature)


def forward_signature(key: bytes, principal: str, method: str, host: str, path_qs: str, body: bytes, ts_ms: int,
                      nonce: str, request_id: str = "") -> str:
    """``<ts_ms>.<nonce>.<hmac>``: the forwarding node's word for who is
    asking, for one node (``host``), valid for ``clock_skew_s`` around
    ``ts_ms`` and once (the receiver remembers ``nonce``), so a captured one
    cannot be replayed later nor to another node. ``key`` is
    ``AuthState.forward_key``; ``request_id`` the implied request id it carries."""
    text = _utf8("\n".join(("COORD-FORWARD-V2", principal, method.upper(), host.lower(), path_qs,
                            hashlib.sha256(body).hexdigest(), str(ts_ms), nonce, request_id)))
    return f"{ts_ms}.{nonce}.{hmac.new(key, text, hashlib.sha256).hexdigest()}"


def implied_request_id(agent_id: str, nonce: str) -> str:
    """The request id of a signed write whose caller gave none: fixed by the
    signature (agent and nonce), so its replay is the same write."""
    return "sig-" + hashlib.sha256(_utf8(f"{agent_id}\n{nonce}")).hexdigest()[:40]


def _utf8(text: str) -> bytes:
    """Header values and paths carry undecodable bytes as lone surrogates:
    encode those too (never raise), for comparing and signing."""
    return text.encode("utf-8", "surrogatepass")


# -- authenticating --------------------------------------------------------------------------


async def authenticate(request: web.Request, state: AuthState, public_key_of: Callable[[str], str | None]
                       ) -> Principal | None:
    """The request's principal; None when it carries no credential."""
    settings = state.settings
    forwarded = request.headers.get(PRINCIPAL_HEADER)
    if forwarded is not None:
        return await _forwarded_principal(request, state, forwarded)
    header = request.headers.get("Authorization")
    if header is None:
        return None
    kind, credential = parse_authorization(header)
    if kind == "bearer":
        token = _utf8(credential)
        if settings.admin_token is not None and hmac.compare_digest(token, settings.admin_token.encode()):
            return Principal("admin")
        if settings.metrics_token is not None and hmac.compare_digest(token, settings.metrics_token.encode()):
            return Principal("scraper")
        raise Unauthenticated("the admin token is not valid")
    now = state.clock()
    if abs(now - credential.ts_ms / 1000) > settings.clock_skew_s:
        raise Unauthenticated(f"the request's timestamp is more than {settings.clock_skew_s:g} s away from "
                              "this node's clock (stale or replayed)")
    if not state.host_allowed(request.host, request.secure):
        # The Host is signed: a request signed for another node (a replay there) names that node.
        raise Unauthenticated("the request's Host is not a name of this node (signed for another node, or "
                              "replayed to this one)")
    body = await request.read()
    key = public_key_of(credential.agent_id) or await _joining_key(request, credential.agent_id)
    if key is None:
        if _rule_of(request) == "public":
            return None  # an agent not registered yet may read what anyone may (a join challenge)
        raise Unauthenticated(f"agent {credential.agent_id!r} has no registered public key")
    try:
        text = signed_text(request.method, request.host, request.raw_path, credential.ts_ms, credential.nonce, body)
    except UnicodeEncodeError:  # undecodable bytes in the Host or the path: no client signed that
        raise Unauthenticated("the request's Host or path is not UTF-8, so it cannot carry a signature") from None
    if not crypto.verify(key, text, base64.b64encode(credential.signature).decode()):
        raise Unauthenticated(f"the signature of agent {credential.agent_id!r} does not verify")
    if not state.remember_nonce(f"{credential.agent_id}/{credential.nonce}", now):
        raise Unauthenticated("the nonce was already used (a replayed request)")
    if request.method not in ("GET", "HEAD"):
        request[IMPLIED_REQUEST_ID] = implied_request_id(credential.agent_id, credential.nonce)
    return Principal("agent", credential.agent_id)


async def _joining_key(request: web.Request, agent_id: str) -> str | None:
    """A new agent joining proves it holds the key it registers: its first
    request is signed by the ``public_key`` in its own registration body.
    Not for an agent registered without a key (by the admin): that id is
    taken, and only the admin may give it a key."""
    if request.method != "POST" or _route_of(request) != "/v1/agents":
        return None
    if request.app[NODE].local_view.is_registered(agent_id):
        return None
    body = await _json(request)
    if not isinstance(body, dict) or body.get("id") != agent_id or not isinstance(body.get("public_key"), str):
        return None
    return body["public_key"]


async def _forwarded_principal(request: web.Request, state: AuthState, forwarded: str) -> Principal:
    given = request.headers.get(FORWARD_SIG_HEADER, "")
    request_id = request.headers.get(FORWARD_REQUEST_ID_HEADER, "")
    body = await request.read()
    ts_text, _, rest = given.partition(".")
    nonce = rest.partition(".")[0]
    if not state.forward_keys or not TS_RE.match(ts_text) or not NONCE_RE.match(nonce) or not any(
            hmac.compare_digest(_utf8(given), _utf8(forward_signature(key, forwarded, request.method, request.host,
                                                                      request.raw_path, body, int(ts_text), nonce,
                                                                      request_id)))
            for key in state.forward_keys):
        raise Unauthenticated("a forwarded principal without a valid cluster signature")
    now = state.clock()
    if abs(now - int(ts_text) / 1000) > state.settings.clock_skew_s:
        raise Unauthenticated("a forwarded principal signed too long ago (stale or replayed)")
    if not state.host_allowed(request.host, request.secure):
        raise Unauthenticated("a forwarded principal for another node")
    if not state.remember_nonce(f"forwarded/{nonce}", now):
        raise Unauthenticated("a forwarded principal already used (a replayed request)")
    if request_id:
        request[IMPLIED_REQUEST_ID] = request_id
    if forwarded.startswith("agent:"):
        return Principal("agent", forwarded[len("agent:"):])
    if forwarded in ("admin", "anonymous"):
        return Principal(forwarded)
    raise Unauthenticated("a forwarded principal of an unknown kind")


# -- admission proof of work ----------------------------------------------------------------

CHALLENGE_TTL_S = 300.0


def issue_challenge(state: AuthState) -> str:
    """A join challenge any node of the cluster can check (an HMAC of the
    cluster secret over its expiry and a random part): no state is kept."""
    expires_ms = int((state.clock() + CHALLENGE_TTL_S) * 1000)
    head = f"{expires_ms}.{secrets.token_hex(8)}"
    return f"{head}.{_challenge_mac(state, head)}"


def _challenge_mac(state: AuthState, head: str, key: bytes | None = None) -> str:
    return hmac.new(key or state.challenge_key, head.encode(), hashlib.sha256).hexdigest()[:32]


def check_proof(state: AuthState, proof: Any, agent_id: str, public_key: str, difficulty: int) -> None:
    """A join's proof of work: a challenge from this cluster, not expired, and
    a nonce whose digest over the challenge, the agent id and its public key
    has ``difficulty`` leading zero bits. ``Forbidden`` (403) otherwise."""
    def refuse(why: str) -> None:
        state.denied["proof_of_work"] += 1
        raise Forbidden(f"proof of work: {why} (GET /v1/join/challenge, then solve it; difficulty {difficulty})",
                        permission="proof_of_work", resource=agent_id)

    if not isinstance(proof, dict) or not isinstance(proof.get("challenge"), str) \
            or not isinstance(proof.get("nonce"), str) or len(proof["nonce"]) > 64:
        refuse("this cluster asks for a proof {\"challenge\", \"nonce\"} with the join")
    challenge, nonce = proof["challenge"], proof["nonce"]
    head, _, mac = challenge.rpartition(".")
    expires, _, _ = head.partition(".")
    if not expires.isdigit() or not any(hmac.compare_digest(mac.encode(), _challenge_mac(state, head, key).encode())
                                        for key in state.challenge_keys):
        refuse("the challenge was not issued by this cluster")
    if int(expires) / 1000 < state.clock():
        refuse("the challenge expired")
    if crypto.leading_zero_bits(crypto.pow_digest(challenge, agent_id, public_key, nonce)) < difficulty:
        refuse("the nonce does not solve the challenge")


# -- authorizing -----------------------------------------------------------------------------

Resource = Callable[[web.Request], Awaitable[list[tuple[str, str]]]]
Rule = str | Resource  # "public" | "metrics" | "any" | "admin" | "self" | (request) -> [(action, resource)]


def _param(name: str, action: str, prefix: str = "") -> Resource:
    async def resource(request: web.Request) -> list[tuple[str, str]]:
        return [(action, prefix + request.match_info[name])]
    resource.__doc__ = f"{action} on {prefix}{{{name}}}"  # what api.openapi tells of the rule
    return resource


class Listing(str):
    """The resource of a listing or watch of every key under ``prefix``, named
    ``<prefix>*`` in a 403 but checked as what it is (a key may end in ``*``)."""

    prefix: str

    def __new__(cls, prefix: str) -> Listing:
        listing = super().__new__(cls, prefix + "*")
        listing.prefix = prefix
        return listing


def _query_prefix(action: str) -> Resource:
    async def resource(request: web.Request) -> list[tuple[str, str]]:
        return [(action, Listing(request.query.get("prefix", "")))]
    resource.__doc__ = f"{action} on <prefix>*"
    return resource


async def _stream_listing(request: web.Request) -> list[tuple[str, str]]:
    """stream on <category>-*, or on * without a category (listing stream ids)."""
    category = request.query.get("category")
    return [("stream", Listing(f"{category}-" if category else ""))]


async def _category_listing(request: web.Request) -> list[tuple[str, str]]:
    """stream on {category}-*"""
    return [("stream", Listing(request.match_info["category"] + "-"))]


async def _subscription_topic(request: web.Request) -> list[tuple[str, str]]:
    """subscribe on the body's topic"""
    body = await _json(request)
    topic = body.get("topic") if isinstance(body, dict) else None
    if not isinstance(topic, str):
        raise InvalidInput("topic: is required", field="topic")
    return [("subscribe", topic)]


def _of_subscription(action: str) -> Resource:
    async def resource(request: web.Request) -> list[tuple[str, str]]:
        sub = request.app[NODE].local_view.subscription(request.match_info["sub"])
        if sub is None or sub.pattern is None:
            return []  # unknown: the handler answers 404
        return [(action, sub.pattern)]
    resource.__doc__ = f"{action} on the subscription's topic pattern"
    return resource


async def _saga_start(request: web.Request) -> list[tuple[str, str]]:
    """saga on the body's name, and send or invoke on each step's topic or agent type"""
    body = await _json(request)
    if not isinstance(body, dict):
        return []  # the handler refuses it
    needs = [("saga", str(body.get("name") or "saga"))]
    steps = body.get("steps")
    view = request.app[NODE].local_view
    for step in steps if isinstance(steps, list) else []:  # anything else: the handler refuses it
        for part in ("action", "compensation"):
            action = step.get(part) if isinstance(step, dict) else None
            if not isinstance(action, dict):
                continue
            if action.get("kind") == "topic" and isinstance(action.get("topic"), str):
                needs.append(("send", action["topic"]))
            elif action.get("kind") == "agent" and isinstance(action.get("agent_type"), str):
                needs.append(("invoke", action["agent_type"]))
            elif action.get("kind") == "agent" and isinstance(action.get("agent_id"), str):
                # A named agent is called directly: that needs invoke on its type. One not
                # registered yet may register under any type, so it needs every type (">").
                agent = view.agent(action["agent_id"])
                needs.append(("invoke", agent.type if agent is not None else ">"))
    return needs


async def _saga_cancel(request: web.Request) -> list[tuple[str, str]]:
    """saga on the saga's name"""
    saga = request.app[NODE].local_view.saga(request.match_info["saga"])
    return [("saga", saga.definition["name"])] if saga is not None else []


async def _json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        return None  # the handler answers the 400


RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    ("GET", "/metrics"): "metrics",  # the admin or the metrics token (public on an anonymous node)
    ("GET", "/v1/status"): "public",
    ("GET", "/v1/openapi.json"): "public",  # the API's description: what docs/api.md already says
    ("GET", "/v1/cluster"): "any",
    # chaos runs (GET /v1/chaos/runs...) are the operator's: the admin's (paths and ports of the host)
    ("GET", "/ui"): "public",  # the page and its static files hold no data; what they fetch needs credentials
    ("GET", "/ui/{file}"): "public",
    ("POST", "/v1/agents"): "public",  # joining: the handler checks the self-signature and the proof
    ("GET", "/v1/join/challenge"): "public",
    ("GET", "/v1/security"): "any",
    ("GET", "/v1/agents"): "any",
    ("GET", "/v1/agents/{id}"): "any",
    ("PATCH", "/v1/agents/{id}"): "self",
    ("DELETE", "/v1/agents/{id}"): "self",
    ("POST", "/v1/agents/{id}/heartbeat"): "self",
    ("POST", "/v1/internal/gossip"): "public",  # between nodes: the handler checks the cluster's signature
    ("GET", "/v1/agents/{agent}/messages"): "self",
    ("GET", "/v1/agents/{agent}/stream"): "self",
    ("POST", "/v1/agents/{agent}/ack"): "self",
    ("POST", "/v1/agents/{agent}/nack"): "self",
    ("GET", "/v1/agents/{agent}/dlq"): "self",
    ("POST", "/v1/agents/{agent}/dlq/redrive"): "self",
    ("POST", "/v1/agents/{agent}/dlq/purge"): "self",
    ("GET", "/v1/events"): "any",
    ("GET", "/v1/watch/events"): "any",
    ("GET", "/v1/members"): "any",
    ("GET", "/v1/snapshot"): "admin",  # the whole state: every key, agent and secret setting
    ("GET", "/v1/kv"): _query_prefix("kv"),
    ("GET", "/v1/watch"): _query_prefix("kv"),
    ("GET", "/v1/kv/{key}"): _param("key", "kv"),
    ("PUT", "/v1/kv/{key}"): _param("key", "kv"),
    ("DELETE", "/v1/kv/{key}"): _param("key", "kv"),
    ("POST", "/v1/kv/{key}/cas"): _param("key", "kv"),
    ("GET", "/v1/locks/{name}"): "any",
    ("POST", "/v1/locks/{name}"): _param("name", "lock"),
    ("DELETE", "/v1/locks/{name}"): _param("name", "lock"),
    ("GET", "/v1/elections/{name}"): "any",
    ("POST", "/v1/elections/{name}/campaign"): _param("name", "lock", "election/"),
    ("POST", "/v1/elections/{name}/resign"): _param("name", "lock", "election/"),
    ("GET", "/v1/topics"): "any",
    ("GET", "/v1/topics/{topic}"): "any",
    ("GET", "/v1/topics/{topic}/messages"): _param("topic", "receive"),
    ("POST", "/v1/topics/{topic}/messages"): _param("topic", "send"),
    ("POST", "/v1/topics/{topic}/request"): _param("topic", "send"),
    ("GET", "/v1/bindings"): "any",
    ("GET", "/v1/transports"): "any",
    ("POST", "/v1/subscriptions"): _subscription_topic,
    ("GET", "/v1/subscriptions"): "any",
    ("GET", "/v1/subscriptions/{sub}"): "any",
    ("DELETE", "/v1/subscriptions/{sub}"): _of_subscription("subscribe"),
    ("GET", "/v1/subscriptions/{sub}/messages"): _of_subscription("receive"),
    ("GET", "/v1/subscriptions/{sub}/stream"): _of_subscription("receive"),
    ("POST", "/v1/subscriptions/{sub}/ack"): _of_subscription("receive"),
    ("POST", "/v1/subscriptions/{sub}/nack"): _of_subscription("receive"),
    ("GET", "/v1/subscriptions/{sub}/dlq"): _of_subscription("receive"),
    ("POST", "/v1/subscriptions/{sub}/dlq/redrive"): _of_subscription("receive"),
    ("POST", "/v1/subscriptions/{sub}/dlq/purge"): _of_subscription("receive"),
    ("GET", "/v1/sagas"): "any",
    ("GET", "/v1/sagas/{saga}"): "any",
    ("POST", "/v1/sagas"): _saga_start,
    ("POST", "/v1/sagas/{saga}/cancel"): _saga_cancel,
    ("GET", "/v1/services"): "any",
    ("GET", "/v1/services/{type}"): "any",
    ("POST", "/v1/services/{type}/invoke"): _param("type", "invoke"),
    ("GET", "/v1/roles"): "any",
    ("GET", "/v1/eventstore"): "any",
    ("GET", "/v1/streams"): _stream_listing,
    ("GET", "/v1/streams/{stream}"): _param("stream", "stream"),
    ("POST", "/v1/streams/{stream}"): _param("stream", "stream"),
    ("DELETE", "/v1/streams/{stream}"): _param("stream", "stream"),
    ("PUT", "/v1/streams/{stream}/snapshot"): _param("stream", "stream"),
    ("GET", "/v1/categories/{category}/events"): _category_listing,
    ("GET", "/v1/categories/{category}/watch"): _category_listing,
    ("GET", "/v1/projections"): "any",
    ("GET", "/v1/projections/{name}"): "any",
    ("GET", "/v1/transforms"): "any",
    ("GET", "/v1/transforms/{name}"): "any",
    ("POST", "/v1/transforms/try"): "any",
    ("GET", "/v1/processors"): "any",
    ("GET", "/v1/processors/{name}"): "any",
    # everything else (members, topic settings, bindings, transports, groups,
    # service policies, roles and grants) needs the admin
}


def _route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None:
        return ""
    return route_name(resource.canonical)


@functools.lru_cache(maxsize=1024)  # a few hundred routes; asked on every request
def route_name(canonical: str) -> str:
    """A route's pattern as RULES names it: ``{name:regex}`` becomes ``{name}``."""
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", canonical)


def _rule_of(request: web.Request) -> Rule:
    return RULES.get((request.method if request.method != "HEAD" else "GET", _route_of(request)), "admin")


async def authorize(request: web.Request, principal: Principal | None, state: AuthState) -> None:
    """Raise ``Unauthenticated`` (401) or ``Forbidden`` (403) unless ``principal`` may make this request."""
    rule = _rule_of(request)
    if rule == "public":
        return
    if principal is None:
        if state.settings.allow_anonymous:
            return
        state.refused["no credentials"] += 1
        raise Unauthenticated("this request needs credentials: an agent's signature or the admin token")
    if principal.kind == "admin" or (principal.kind == "anonymous" and state.settings.allow_anonymous):
        return
    if principal.kind == "scraper":
        if rule == "metrics":
            return
        _deny(state, "admin", "the metrics token may read /metrics only", "admin", request.path)
    if state.settings.allow_anonymous:
        return  # development mode: signatures are checked, permissions are not
    if rule == "metrics":
        _deny(state, "metrics", f"{principal} may not read /metrics (the admin token or the metrics token may)",
              "metrics", "/metrics")
    if rule == "any":
        return
    if rule == "admin":
        _deny(state, "admin", f"{principal} is not the admin", "admin", request.path)
    if rule == "self":
        target = request.match_info.get("id") or request.match_info.get("agent")
        if principal.agent_id == target:
            return
        _deny(state, "self", f"{principal} may act only for itself, not for agent {target!r}", "self",
              target or "")
    assert callable(rule)
    view = request.app[NODE].local_view
    for action, resource in await rule(request):
        allowed = view.can(principal.agent_id or "", action, resource.prefix, listing=True) \
            if isinstance(resource, Listing) else view.can(principal.agent_id or "", action, resource)
        if not allowed:
            _deny(state, action, f"{principal} lacks the permission {action} on {resource!r}", action, resource)


def _deny(state: AuthState, permission: str, message: str, action: str, resource: str) -> None:
    state.denied[permission] += 1
    raise Forbidden(message, permission=action, resource=resource)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def admit(request: web.Request) -> None:
    """Authenticate and authorize ``request`` (401, 403); its principal is then ``principal_of(request)``."""
    state: AuthState = request.app[AUTH]
    try:
        principal = await authenticate(request, state, request.app[NODE].local_view.public_key)
    except Unauthenticated as exc:
        state.refused[exc.message.split(" ")[0]] += 1
        raise
    await authorize(request, principal, state)
    request[PRINCIPAL_KEY] = principal


PRINCIPAL_KEY: web.RequestKey[Principal] = web.RequestKey("principal", Principal)


def principal_of(request: web.Request) -> Principal | None:
    return request.get(PRINCIPAL_KEY)


def forward_signer(request: web.Request) -> Callable[[str, str, bytes], dict[str, str]]:
    """Headers that carry this request's principal to the leader for one
    forwarded request, signed with the cluster secret (none when there is no
    principal or no secret)."""
    state: AuthState = request.app[AUTH]
    principal = principal_of(request)
    request_id = request.get(IMPLIED_REQUEST_ID, "")

    def sign(method: str, host: str, path_qs: str, body: bytes) -> dict[str, str]:
        if principal is None or state.forward_key is None:
            return {}
        name = principal.header()
        headers = {PRINCIPAL_HEADER: name,
                   FORWARD_SIG_HEADER: forward_signature(state.forward_key, name, method, host, path_qs, body,
                                                         int(state.clock() * 1000), secrets.token_urlsafe(18),
                                                         request_id)}
        if request_id:
            headers[FORWARD_REQUEST_ID_HEADER] = request_id
        return headers
    return sign


