"""HTTP routes of v1: parse → one call on ``CoordinatorNode`` → render."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.auth import AUTH, check_proof, forward_signer, principal_of
from coordinator.api.keys import NODE
from coordinator.api.spec import (
    ANY,
    REQUEST_ID,
    Op,
    array,
    boolean,
    integer,
    number,
    obj,
    one_of,
    p,
    string,
    with_consistency,
)
from coordinator.api.visibility import visibility
from coordinator.commands.access import MAX_PUBLIC_KEY_LEN
from coordinator.commands.agents import (
    HEALTH_STATES,
    MAX_ENDPOINT_LEN,
    MAX_WEIGHT,
    AgentDeregister,
    AgentRegister,
    AgentUpdate,
    check_agent_id,
    check_agent_type,
    check_endpoint,
    check_metadata,
    check_weight,
)
from coordinator.commands.base import (
    MAX_KEY_LEN,
    MAX_NAME_LEN,
    MAX_TOKEN,
    MAX_TTL_MS,
    MIN_TTL_MS,
    DomainCommand,
    Rejected,
)
from coordinator.commands.cluster import MemberRegister, MemberRemove, check_address, check_node_id
from coordinator.commands.endpoints import endpoint_refusal
from coordinator.commands.kv import KvCas, KvDelete, KvPut
from coordinator.commands.locks import ELECTION_PREFIX, MAX_ELECTION_NAME_LEN, LockAcquire, LockRelease, check_holder
from coordinator.commands.locks import check_name as check_lock_name
from coordinator.crypto import SCHEME_AGENT
from coordinator.errors import CoordinatorError, Forbidden, InvalidInput, NotFound, TooLarge, Unauthenticated
from coordinator.services import gossip, watch
from coordinator.services.node import FORWARD_HEADER, CoordinatorNode, ttl_ms_from
from coordinator.services.proposals import state_error

routes = web.RouteTableDef()

DEFAULT_AGENT_TTL_S = 10.0
DEFAULT_LOCK_TTL_S = 15.0
LIST_LIMIT_MAX = 10_000
EVENT_TYPE_MAX_LEN = 128  # one name in /v1/events?types=
SSE_KEEPALIVE_S = 15.0
LEASES_TIMEOUT_S = 1.0
SNAPSHOT_CHUNK_BYTES = 1 << 20


# -- declarations (``api.spec``): what each route takes; the handlers read their body fields from them -----

KEY = string(MAX_KEY_LEN)
AGENT_ID = string(MAX_NAME_LEN)
LOCK_NAME = string(MAX_NAME_LEN)
ELECTION_NAME = string(MAX_ELECTION_NAME_LEN)
TTL_S = number(MIN_TTL_MS / 1000, MAX_TTL_MS / 1000)
FENCE = obj({"lock": string(MAX_NAME_LEN), "token": integer(0, MAX_TOKEN)}, ("lock", "token"), additional=False)
KV_ITEM = obj({"key": KEY, "value": ANY, "revision": integer(0), "create_revision": integer(0),
               "version": integer(0)}, ("key", "value", "revision"))
_ADDRESS = string(MAX_NAME_LEN, pattern=r"^.+:[0-9]{1,5}$", description="host:port")
REVISION = obj({"revision": integer(0)}, ("revision",))
LEASE = obj({"id": string(MAX_NAME_LEN), "lease_id": integer(0), "ttl_s": number(0, MAX_TTL_MS / 1000),
             "heartbeat_udp": obj({"key": string(64, description="hex: this lease's heartbeat datagram key"),
                                   "addresses": array(string(MAX_NAME_LEN))}, ("key", "addresses"))},
            ("id", "lease_id", "ttl_s"))
FENCING = obj({"fencing_token": integer(0)}, ("fencing_token",))
EVENT = obj({"seq": integer(1), "type": string(EVENT_TYPE_MAX_LEN), "data": ANY, "time_ms": integer(0),
             "index": integer(0)}, ("seq", "type", "data", "time_ms"))
MEMBER = obj({"id": string(MAX_NAME_LEN), "raft": string(MAX_NAME_LEN), "http": string(MAX_NAME_LEN)},
             ("id", "raft", "http"))

MEMBERS_ADD = Op("Add a member (it joins as a voter once caught up)", tags=("cluster",), body={
    "id": p(string(MAX_NAME_LEN, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"), required=True),
    "raft": p(_ADDRESS, "its Raft address", required=True),
    "http": p(_ADDRESS, "its HTTP address", required=True)}, responses={201: None})
KV_LIST = Op("List keys (by prefix, paged)", tags=("kv",), query=with_consistency({
    "prefix": p(string(MAX_KEY_LEN, 0)), "limit": p(integer(1, LIST_LIMIT_MAX)),
    "start_after": p(string(MAX_KEY_LEN, 0))}),
    responses={200: obj({"items": array(KV_ITEM), "more": boolean(), "revision": integer(0)},
                        ("items", "more", "revision"))})
_KV_WRITE = {"fence": p(FENCE, "a lock and its fencing token: refused unless current"), "request_id": p(REQUEST_ID)}
KV_PUT = Op("Write a key", tags=("kv",), path={"key": KEY}, body={"value": p(ANY, required=True), **_KV_WRITE},
            responses={200: REVISION})
KV_CAS = Op("Compare and set a key", tags=("kv",), path={"key": KEY}, body={
    "value": p(ANY, required=True), "expected": p(ANY, "the current value (null: the key must not exist)"),
    "expected_revision": p(integer(0, MAX_TOKEN)), **_KV_WRITE}, responses={200: REVISION})
KV_DELETE = Op("Delete a key", tags=("kv",), path={"key": KEY}, body=_KV_WRITE, body_required=False,
               responses={200: REVISION})
AGENTS_REGISTER = Op("Register (join as) an agent; public: the handler checks the self-signature and proof",
                     tags=("agents",), responses={201: LEASE}, body={
    "id": p(AGENT_ID, "default: a random id"), "type": p(string(MAX_NAME_LEN), required=True),
    "metadata": p(obj()), "ttl_s": p(TTL_S, f"lease, default {DEFAULT_AGENT_TTL_S}"),
    "endpoint": p(string(MAX_ENDPOINT_LEN), "a URL the leader may call"),
    "weight": p(integer(1, MAX_WEIGHT)), "public_key": p(string(MAX_PUBLIC_KEY_LEN), "base64 Ed25519 public key"),
    "proof": p(obj(), "a solved join challenge, when the admin set a difficulty"), "request_id": p(REQUEST_ID)})
AGENTS_LIST = Op("Registered agents", tags=("agents",), query=with_consistency({
    "type": p(string(MAX_NAME_LEN, 0)), "leases": p(one_of("local", "leader"))}))
AGENTS_UPDATE = Op("Change an agent's weight, endpoint or metadata", tags=("agents",), path={"id": AGENT_ID}, body={
    "weight": p(integer(1, MAX_WEIGHT)), "endpoint": p(string(MAX_ENDPOINT_LEN)), "metadata": p(obj()),
    "request_id": p(REQUEST_ID)})
AGENTS_HEARTBEAT = Op("Renew an agent's lease", tags=("agents",), path={"id": AGENT_ID}, body_required=False,
                      body={"health": p(one_of(*HEALTH_STATES))})
AGENTS_DEREGISTER = Op("Deregister an agent", tags=("agents",), path={"id": AGENT_ID}, body_required=False,
                       body={"request_id": p(REQUEST_ID)})
_HOLDER = string(MAX_NAME_LEN)
LOCKS_ACQUIRE = Op("Acquire a lock (a fencing token)", tags=("locks",), path={"name": LOCK_NAME}, body={
    "holder": p(_HOLDER, "required of the admin; an agent's own id by default"),
    "ttl_s": p(TTL_S, f"default {DEFAULT_LOCK_TTL_S}"), "request_id": p(REQUEST_ID)}, responses={200: FENCING})
LOCKS_RELEASE = Op("Release a lock", tags=("locks",), path={"name": LOCK_NAME},
                   body={"holder": p(_HOLDER, "required of the admin"), "request_id": p(REQUEST_ID)})
ELECTIONS_CAMPAIGN = Op("Campaign to lead an election", tags=("locks",), path={"name": ELECTION_NAME}, body={
    "candidate": p(_HOLDER, "required of the admin"), "ttl_s": p(TTL_S), "request_id": p(REQUEST_ID)},
    responses={200: obj({"elected": boolean(), "leader": _HOLDER, "fencing_token": integer(0)},
                        ("elected", "leader", "fencing_token"))})
ELECTIONS_RESIGN = Op("Resign an election", tags=("locks",), path={"name": ELECTION_NAME},
                      body={"candidate": p(_HOLDER, "required of the admin"), "request_id": p(REQUEST_ID)})
_TYPES = p(string(LIST_LIMIT_MAX, 0), f"comma-separated event types (each at most {EVENT_TYPE_MAX_LEN})")
EVENTS_LIST = Op("The event log", tags=("events",), query=with_consistency({
    "from_seq": p(integer(1)), "limit": p(integer(1, LIST_LIMIT_MAX)), "types": _TYPES}),
    responses={200: obj({"events": array(EVENT), "last_seq": integer(0)}, ("events", "last_seq"))})
EVENTS_WATCH = Op("Watch the event log (Server-Sent Events; Last-Event-ID resumes)", tags=("events",),
                  content="text/event-stream", query={"from_seq": p(integer(1)), "types": _TYPES})
KV_WATCH = Op("Watch keys under a prefix (Server-Sent Events; Last-Event-ID resumes)", tags=("kv",),
              content="text/event-stream", query={"prefix": p(string(MAX_KEY_LEN, 0)), "from_revision": p(integer(1))})


def checked(attempt: Callable[[], Any]) -> Any:
    """Run a state check before proposing (bad input must not cost a log
    entry that changes nothing): its refusal becomes this request's error."""
    try:
        return attempt()
    except Rejected as exc:
        raise state_error(exc.code, exc.message) from None


def node_of(request: web.Request) -> CoordinatorNode:
    return request.app[NODE]


def ok(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=compact_json)


compact_json = json.JSONEncoder(separators=(",", ":")).encode  # one encoder, not one per response


# -- cluster ---------------------------------------------------------------------

@routes.get("/v1/status")
@Op("This node's status: role, leader, members, log indexes, state digest", tags=("cluster",))
async def status(request: web.Request) -> web.Response:
    return ok(node_of(request).status())


@routes.get("/v1/cluster")
@Op("Every member's status as it reports it", tags=("cluster",))
async def cluster(request: web.Request) -> web.Response:
    """Every member's status as it reports it (the dashboard's cluster panel)."""
    return ok(await node_of(request).cluster_view())


@routes.get("/healthz")
@Op("Liveness: the process answers", tags=("cluster",),
    responses={200: obj({"status": ANY, "node": ANY}, ("status", "node"))})
async def healthz(request: web.Request) -> web.Response:
    return ok({"status": "alive", "node": node_of(request).identity.node_id})


@routes.get("/readyz")
@Op("Readiness: 503 (with Retry-After) until the node can serve", tags=("cluster",))
async def readyz(request: web.Request) -> web.Response:
    ready, reason = node_of(request).readiness()
    if ready:
        return ok({"status": "ready"})
    response = ok({"status": "not ready", "reason": reason}, status=503)
    response.headers["Retry-After"] = "1"
    return response


@routes.get("/v1/members")
@Op("The members of the cluster", tags=("cluster",),
    responses={200: obj({"members": array(MEMBER)}, ("members",))})
async def members_list(request: web.Request) -> web.Response:
    return ok({"members": node_of(request).status()["members"]})


@routes.post("/v1/members")
@MEMBERS_ADD
async def members_add(request: web.Request) -> web.Response:
    body = await s.json_body(request, MEMBERS_ADD)
    node_id = checked(lambda: check_node_id(body.get("id")))
    if not NODE_ID.fullmatch(node_id):
        raise InvalidInput("id: a member id is letters, digits, '.', '_' or '-', starting with a letter or digit",
                           field="id")
    command = s.command(MemberRegister, {"id": node_id, "raft": _address(body.get("raft"), "raft"),
                                         "http": _address(body.get("http"), "http")})
    return ok(await node_of(request).add_member(command), status=201)


@routes.delete("/v1/members/{id}")
@Op("Remove a member", tags=("cluster",), responses={200: None})
async def members_remove(request: web.Request) -> web.Response:
    command = s.command(MemberRemove, {"id": request.match_info["id"]})
    return ok(await node_of(request).remove_member(command))


@routes.get("/v1/snapshot")
@Op("Download a consistent snapshot file (admin)", tags=("cluster",), content="application/octet-stream")
async def snapshot(request: web.Request) -> web.StreamResponse:
    """A consistent snapshot file (``coordinator.snapshot_file``), admin only:
    the state as of at least this request, its index, term, digest and checksum
    also in headers. 429 while this node takes another."""
    taken = await node_of(request).snapshots.take()
    header = taken.header
    response = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="coordinator-{header["index"]}.snap"',
        "X-Coord-Snapshot-Index": str(header["index"]),
        "X-Coord-Snapshot-Term": str(header["term"]),
        "X-Coord-Snapshot-Digest": header["digest"]["value"],
        "X-Coord-Snapshot-Sha256": taken.checksum,
        "X-Coord-Snapshot-Took-Ms": f"{taken.snapshot_ms:.1f}",
    })
    response.content_length = len(taken.data)
    await response.prepare(request)
    view = memoryview(taken.data)
    for start in range(0, len(view), SNAPSHOT_CHUNK_BYTES):
        await response.write(view[start:start + SNAPSHOT_CHUNK_BYTES])
    await response.write_eof()
    return response


NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a new member's id (the log takes any string it always took)


def _address(value: Any, field: str) -> str:
    """A member's address: the command's check, then ``host:port`` (the API's
    rule), field by field as always."""
    address = checked(lambda: check_address(value, field))
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"{field}: must be host:port", field=field)
    return address


# -- key/value ---------------------------------------------------------------------

def _kv_item(key: str, entry: Any) -> dict[str, Any]:
    return {"key": key, "value": entry.value, "revision": entry.mod_revision,
            "create_revision": entry.create_revision, "version": entry.version}


@routes.get("/v1/kv")
@KV_LIST
async def kv_list(request: web.Request) -> web.Response:
    node = node_of(request)
    prefix = s.prefix(request)
    limit = s.query_int(request, "limit", 1000, 1, LIST_LIMIT_MAX)
    start_after = request.query.get("start_after") or None
    view = await node.view(s.consistency(request))
    items, revision = view.kv_range(prefix, limit + 1, start_after)
    return ok({"items": [_kv_item(k, e) for k, e in items[:limit]], "more": len(items) > limit,
               "revision": revision})


# Path patterns use (?s:.+): "." alone stops at a newline, and a key or name with
# one must be answered as bad input (400) by the schema, not as an unknown route.
@routes.get("/v1/kv/{key:(?s:.+)}")
@Op("Read a key", tags=("kv",), query=with_consistency(), path={"key": KEY}, responses={200: KV_ITEM})
async def kv_get(request: web.Request) -> web.Response:
    node = node_of(request)
    key = s.key(request)
    entry = (await node.view(s.consistency(request))).kv_get(key)
    if entry is None:
        raise NotFound(f"key {key!r} does not exist")
    return ok(_kv_item(key, entry))


async def _kv_write(request: web.Request, command_type: type[DomainCommand], op: Op) -> web.Response:
    """The shared shape of kv writes: the key from the path, the body's
    fields (``value``, ``expected``..., an optional fence) and request id;
    the command's parse checks them all."""
    key = s.key(request)  # a bad path is answered before the body
    body = await s.json_body(request, op)
    args = {"key": key} | {f: v for f, v in body.items() if f != "request_id"}
    command = s.command(command_type, args)
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@routes.put("/v1/kv/{key:(?s:.+)}")
@KV_PUT
async def kv_put(request: web.Request) -> web.Response:
    return await _kv_write(request, KvPut, KV_PUT)


@routes.post("/v1/kv/{key:(?s:.+)}/cas")
@KV_CAS
async def kv_cas(request: web.Request) -> web.Response:
    return await _kv_write(request, KvCas, KV_CAS)


@routes.delete("/v1/kv/{key:(?s:.+)}")
@KV_DELETE
async def kv_delete(request: web.Request) -> web.Response:
    return await _kv_write(request, KvDelete, KV_DELETE)


# -- agents -----------------------------------------------------------------------------

@routes.post("/v1/agents")
@AGENTS_REGISTER
async def agents_register(request: web.Request) -> web.Response:
    """The checks run in the order they always did: the auth checks (joining,
    ``serve`` on the type, the endpoint allow-list) sit between the
    command's checks of the fields before them and its parse of the rest."""
    node = node_of(request)
    body = await s.json_body(request, AGENTS_REGISTER)
    given_id = body.get("id")
    agent_id = checked(lambda: check_agent_id(given_id)) if given_id is not None else \
        f"agent-{node.rng.token_hex(8)}"
    _may_join(request, agent_id, body)
    agent_type = checked(lambda: check_agent_type(body.get("type")))
    checked(lambda: check_metadata(body.get("metadata", {})))
    args: dict[str, Any] = {"id": agent_id, "type": agent_type, "metadata": body.get("metadata", {}),
                            "ttl_ms": ttl_ms_from(body, "ttl_s", DEFAULT_AGENT_TTL_S)}
    _may_serve(request, agent_type)
    if body.get("endpoint") is not None:
        args["endpoint"] = _endpoint(request, body["endpoint"])
    for field in ("weight", "public_key"):
        if body.get(field) is not None:
            args[field] = body[field]
    command = s.command(AgentRegister, args)
    # a copy: the result may be the one the state keeps for a retried request_id
    answer = dict(await node.write_command(command, s.origin(request, body)))
    grant = node.heartbeat_grant(answer["lease_id"])  # only here: the caller just proved the agent's rights
    if grant is not None:
        answer["heartbeat_udp"] = grant
    return ok(answer, status=201)


def _may_join(request: web.Request, agent_id: str, body: dict[str, Any]) -> None:
    """Who may register ``agent_id``: anyone when anonymous access is allowed;
    else the admin, or the agent itself, signing with the key it registers
    (a new agent) or with the key it registered before (an existing one).
    When the admin set a proof-of-work difficulty, everyone but the admin
    brings a solved challenge."""
    principal = principal_of(request)
    difficulty = node_of(request).local_view.pow_difficulty
    if difficulty and (principal is None or principal.kind != "admin"):
        check_proof(request.app[AUTH], body.get("proof"), agent_id, str(body.get("public_key") or ""), difficulty)
    if request.app[AUTH].settings.allow_anonymous:
        return
    if principal is None:
        raise Unauthenticated("joining needs the admin token or a request signed with the key being registered "
                              f"({SCHEME_AGENT}, with public_key in the body)")
    if principal.kind == "agent" and principal.agent_id != agent_id:
        raise Forbidden(f"{principal} may register only itself, not {agent_id!r}", permission="self",
                        resource=agent_id)


def _may_serve(request: web.Request, agent_type: str) -> None:
    """Registering as a type receives its callers' requests and saga steps:
    an agent needs ``serve`` on the type (the admin grants it; the admin
    itself, and everyone on an anonymous node, needs nothing)."""
    principal = principal_of(request)
    if request.app[AUTH].settings.allow_anonymous or principal is None or principal.kind != "agent":
        return
    if not node_of(request).local_view.can(principal.agent_id or "", "serve", agent_type):
        request.app[AUTH].denied["serve"] += 1
        raise Forbidden(f"{principal} lacks the permission serve on {agent_type!r} (the admin grants it)",
                        permission="serve", resource=agent_type)


def _endpoint(request: web.Request, value: Any) -> str:
    """An endpoint the leader may call (``coordinator.commands.endpoints``): on
    a secure node, a loopback, link-local, private or metadata address, or a
    name off the admin's allow-list, is a 403 for ``endpoint`` (after the
    command's own check of the string)."""
    endpoint = checked(lambda: check_endpoint(value))
    if request.app[AUTH].settings.allow_anonymous:
        return endpoint
    refusal = checked(lambda: endpoint_refusal(endpoint, node_of(request).local_view.endpoint_allow))
    if refusal is not None:
        request.app[AUTH].denied["endpoint"] += 1
        raise Forbidden(f"endpoint: {refusal} (the admin allows networks and names with PUT /v1/security "
                        "{\"endpoint_allow\": [...]})", permission="endpoint", resource=endpoint)
    return endpoint


@routes.get("/v1/agents")
@AGENTS_LIST
async def agents_list(request: web.Request) -> web.Response:
    """The registered agents (of ``type``). Leases live on the leader: a
    follower shows ``lease_remaining_s: null`` unless asked ``leases=leader``,
    then it asks the leader for them (``leases_from``: the leader's id, or
    null when it could not be asked)."""
    node = node_of(request)
    agent_type = request.query.get("type") or None
    leases = request.query.get("leases", "local")
    if leases not in ("local", "leader"):
        raise InvalidInput("leases: must be local or leader", field="leases")
    view = await node.view(s.consistency(request))
    agents = [_agent(node, a) for a in view.agents(agent_type)]
    body: dict[str, Any] = {"agents": agents}
    if leases == "leader":
        body["leases_from"] = await _leases_from_leader(request, agents)
    return ok(body)


async def _leases_from_leader(request: web.Request, agents: list[dict[str, Any]]) -> str | None:
    """Fill in ``lease_remaining_s`` from the leader's listing; the leader's id, or None."""
    node = node_of(request)
    leader = node.engine.status().leader
    if leader == node.identity.raft:
        return node.identity.node_id
    try:
        status, raw, _ = await node.forward("GET", "/v1/agents?consistency=stale", None, LEASES_TIMEOUT_S,
                                            forward_signer(request))
        remaining = {a["id"]: a["lease_remaining_s"] for a in json.loads(raw)["agents"]} if status == 200 else None
    except (CoordinatorError, ValueError, KeyError, TypeError):
        remaining = None
    if remaining is None:
        return None
    for agent in agents:
        agent["lease_remaining_s"] = remaining.get(agent["id"])
    member = node.member_of(leader)
    return member.id if member is not None else leader


@routes.get("/v1/agents/{id}")
@Op("One agent", tags=("agents",), query=with_consistency(), path={"id": AGENT_ID})
async def agents_get(request: web.Request) -> web.Response:
    node = node_of(request)
    agent_id = s.name(request.match_info["id"], "id")
    agent = (await node.view(s.consistency(request))).agent(agent_id)
    if agent is None:
        raise NotFound(f"agent {agent_id!r} is not registered")
    return ok(_agent(node, agent))


def _agent(node: CoordinatorNode, agent: Any) -> dict[str, Any]:
    out = agent.describe()
    out["liveness"] = agent.liveness  # the leader's committed verdict: alive or suspect
    out["lease_remaining_s"] = node.leases.remaining_s("agent", agent.id)
    return out


@routes.patch("/v1/agents/{id}")
@AGENTS_UPDATE
async def agents_update(request: web.Request) -> web.Response:
    """Change an agent's weight, endpoint or metadata without a new lease."""
    agent_id = checked(lambda: check_agent_id(request.match_info["id"]))
    body = await s.json_body(request, AGENTS_UPDATE)
    args = {"id": agent_id} | {f: body[f] for f in ("weight", "endpoint", "metadata") if body.get(f) is not None}
    if "endpoint" in args:  # the allow-list (403) after the weight and the endpoint's string, as always
        if "weight" in args:
            checked(lambda: check_weight(args["weight"]))
        _endpoint(request, args["endpoint"])
    command = s.command(AgentUpdate, args)
    node = node_of(request)
    answer = await node.write_command(command, s.origin(request, body))
    agent = node.local_view.agent(agent_id)  # applied here: the write waited for it
    answer["liveness"] = agent.liveness if agent is not None else "alive"
    return ok(answer)


@routes.post("/v1/agents/{id}/heartbeat")
@AGENTS_HEARTBEAT
async def agents_heartbeat(request: web.Request) -> web.Response:
    node = node_of(request)
    agent_id = checked(lambda: check_agent_id(request.match_info["id"]))
    body = await s.json_body(request, AGENTS_HEARTBEAT)
    health = body.get("health")
    if health is not None and health not in HEALTH_STATES:
        raise InvalidInput(f"health: must be {', '.join(HEALTH_STATES[:-1])} or {HEALTH_STATES[-1]}",
                           field="health")
    forwarded = request.headers.get(FORWARD_HEADER) == "1"
    return ok(await node.heartbeat(agent_id, health, forwarded, forward_signer(request)))


@routes.post(gossip.PATH)
@Op("Heartbeats heard by another node (node to node, signed with the cluster's gossip key)", tags=("internal",))
async def gossip_receive(request: web.Request) -> web.Response:
    """Heard heartbeats from another node (``coordinator.services.gossip``):
    public to the router, refused (401) unless signed with the cluster's
    gossip key; bounded before it is read (413)."""
    if request.content_length is not None and request.content_length > gossip.BODY_MAX_BYTES:
        raise TooLarge(f"body: at most {gossip.BODY_MAX_BYTES} bytes")
    body = await request.content.read(gossip.BODY_MAX_BYTES + 1)
    if len(body) > gossip.BODY_MAX_BYTES:
        raise TooLarge(f"body: at most {gossip.BODY_MAX_BYTES} bytes")
    return ok(node_of(request).gossip.receive(body, request.headers.get(gossip.SIG_HEADER, "")))


@routes.delete("/v1/agents/{id}")
@AGENTS_DEREGISTER
async def agents_deregister(request: web.Request) -> web.Response:
    command = s.command(AgentDeregister, {"id": request.match_info["id"]})
    body = await s.json_body(request, AGENTS_DEREGISTER)
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


# -- locks and elections ----------------------------------------------------------------------

def _lock_name(request: web.Request) -> str:
    """Lock names (checked as the lock commands check them, before the body is
    read); the election namespace is reachable only through /v1/elections."""
    name = checked(lambda: check_lock_name(request.match_info["name"]))
    if name.startswith(ELECTION_PREFIX):
        raise InvalidInput(f"name: {ELECTION_PREFIX!r} is reserved for /v1/elections", field="name")
    return name


def _holder(request: web.Request, body: dict[str, Any], field: str) -> str:
    """Who holds (or campaigns for) a lock: for an agent caller its own id
    (``field`` may be left out; naming another is a 403 for ``self``, so no
    agent can release, refresh or take the fencing token of another's lock);
    the admin, and anyone on an anonymous node, names any holder (checked as
    the lock commands check it, naming ``field``, before ``ttl_s`` as always)."""
    principal = principal_of(request)
    if principal is None or principal.kind != "agent" or request.app[AUTH].settings.allow_anonymous:
        return checked(lambda: check_holder(body.get(field), field))
    given = body.get(field, principal.agent_id)
    if given != principal.agent_id:
        request.app[AUTH].denied["self"] += 1
        raise Forbidden(f"{field}: {principal} may hold locks and campaign only as itself, not as {given!r}",
                        permission="self", resource=str(given))
    return principal.agent_id or ""


@routes.post("/v1/locks/{name:(?s:.+)}")
@LOCKS_ACQUIRE
async def locks_acquire(request: web.Request) -> web.Response:
    name = _lock_name(request)
    body = await s.json_body(request, LOCKS_ACQUIRE)
    command = s.command(LockAcquire, {"name": name, "holder": _holder(request, body, "holder"),
                                      "ttl_ms": ttl_ms_from(body, "ttl_s", DEFAULT_LOCK_TTL_S)})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@routes.delete("/v1/locks/{name:(?s:.+)}")
@LOCKS_RELEASE
async def locks_release(request: web.Request) -> web.Response:
    name = _lock_name(request)
    body = await s.json_body(request, LOCKS_RELEASE)
    command = s.command(LockRelease, {"name": name, "holder": _holder(request, body, "holder")})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@routes.get("/v1/locks/{name:(?s:.+)}")
@Op("A held lock", tags=("locks",), query=with_consistency(), path={"name": LOCK_NAME},
    responses={200: obj({"name": LOCK_NAME, "holder": _HOLDER, "fencing_token": integer(0)},
                        ("name", "holder", "fencing_token"))})
async def locks_get(request: web.Request) -> web.Response:
    node = node_of(request)
    name = _lock_name(request)
    lock = (await node.view(s.consistency(request))).lock(name)
    if lock is None:
        raise NotFound(f"lock {name!r} is not held")
    out = lock.describe()
    out["lease_remaining_s"] = node.leases.remaining_s("lock", name)
    return ok(out)


@routes.post("/v1/elections/{name:(?s:.+)}/campaign")
@ELECTIONS_CAMPAIGN
async def elections_campaign(request: web.Request) -> web.Response:
    name = s.name(request.match_info["name"], "name", MAX_ELECTION_NAME_LEN)
    body = await s.json_body(request, ELECTIONS_CAMPAIGN)
    command = s.command(LockAcquire, {"name": ELECTION_PREFIX + name, "holder": _holder(request, body, "candidate"),
                                      "ttl_ms": ttl_ms_from(body, "ttl_s", DEFAULT_LOCK_TTL_S)})
    result = await node_of(request).write_command(command, s.origin(request, body))
    return ok({"elected": True, "leader": command.holder, "fencing_token": result["fencing_token"]})


@routes.post("/v1/elections/{name:(?s:.+)}/resign")
@ELECTIONS_RESIGN
async def elections_resign(request: web.Request) -> web.Response:
    name = s.name(request.match_info["name"], "name", MAX_ELECTION_NAME_LEN)
    body = await s.json_body(request, ELECTIONS_RESIGN)
    command = s.command(LockRelease, {"name": ELECTION_PREFIX + name, "holder": _holder(request, body, "candidate")})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@routes.get("/v1/elections/{name:(?s:.+)}")
@Op("An election's leader", tags=("locks",), query=with_consistency(), path={"name": ELECTION_NAME},
    responses={200: obj({"leader": _HOLDER, "fencing_token": integer(0), "since_ms": integer(0)},
                        ("leader", "fencing_token", "since_ms"))})
async def elections_leader(request: web.Request) -> web.Response:
    node = node_of(request)
    name = s.name(request.match_info["name"], "name", MAX_ELECTION_NAME_LEN)
    lock = (await node.view(s.consistency(request))).election_leader(name)
    if lock is None:
        raise NotFound(f"election {name!r} has no leader")
    return ok({"leader": lock.holder, "fencing_token": lock.token, "since_ms": lock.acquired_ms})


# -- events and watches ---------------------------------------------------------------------------

def _event(e: Any) -> dict[str, Any]:
    return {"seq": e.seq, "type": e.type, "data": e.data, "time_ms": e.time_ms, "index": e.index}


def _change(c: Any) -> dict[str, Any]:
    return {"revision": c.revision, "key": c.key, "type": c.kind, "value": c.value, "index": c.index}


def _types(request: web.Request) -> tuple[str, ...]:
    raw = request.query.get("types", "")
    types = tuple(t for t in raw.split(",") if t)
    for t in types:
        s.name(t, "types", EVENT_TYPE_MAX_LEN)
    return types


@routes.get("/v1/events")
@EVENTS_LIST
async def events_list(request: web.Request) -> web.Response:
    node = node_of(request)
    from_seq = s.query_int(request, "from_seq", 1, 1, 2**63 - 1)
    limit = s.query_int(request, "limit", 1000, 1, LIST_LIMIT_MAX)
    types = _types(request)
    view = await node.view(s.consistency(request))
    sees = visibility(request)
    selected = [e for e in view.events_since(from_seq, limit)
                if watch.event_matches(e.type, types) and sees.event(e.type, e.data)]
    return ok({"events": [_event(e) for e in selected], "last_seq": view.last_event_seq})


@routes.get("/v1/watch/events")
@EVENTS_WATCH
async def events_watch(request: web.Request) -> web.StreamResponse:
    node = node_of(request)
    from_seq = sse_resume(request, "from_seq")
    types = _types(request)
    sees = visibility(request)
    shown = None if sees.everything else (lambda e: sees.event(e.type, e.data))
    stream = node.local_view.watch_events(from_seq, types, shown)
    return await sse(request, stream, lambda e: (e.seq, e.type, _event(e)))


@routes.get("/v1/watch")
@KV_WATCH
async def kv_watch(request: web.Request) -> web.StreamResponse:
    node = node_of(request)
    prefix = s.prefix(request)
    from_revision = sse_resume(request, "from_revision")
    stream = node.local_view.watch_kv(prefix, from_revision)
    return await sse(request, stream, lambda c: (c.revision, c.kind, _change(c)))


def sse_resume(request: web.Request, field: str) -> int | None:
    """The cursor: ``Last-Event-ID`` + 1 when a client reconnects, else the query."""
    last = request.headers.get("Last-Event-ID")
    if last is not None:
        try:
            return s.integer(int(last), "Last-Event-ID", 0, 2**63 - 2) + 1
        except ValueError:
            raise InvalidInput("Last-Event-ID: must be an integer", field="Last-Event-ID") from None
    return s.query_int(request, field, None, 1, 2**63 - 1)


async def sse(request: web.Request, stream: AsyncIterator[list[Any]], render: Any) -> web.StreamResponse:
    """Serve ``stream`` as Server-Sent Events. Errors before the first byte
    are normal JSON errors; a compaction later is an ``error`` event."""
    iterator = stream.__aiter__()
    first: asyncio.Task[list[Any]] = asyncio.ensure_future(iterator.__anext__())
    done, _ = await asyncio.wait({first}, timeout=0.01)
    if first in done and first.exception() is not None:
        raise first.exception()  # type: ignore[misc]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write(b": connected\n\n")
    pending: asyncio.Task[list[Any]] | None = first
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=SSE_KEEPALIVE_S)
            if not done:
                await response.write(b": keepalive\n\n")
                continue
            batch_task, pending = pending, None
            try:
                batch = batch_task.result()
            except CoordinatorError as exc:
                payload = json.dumps({"code": exc.code, "message": exc.message, **exc.details})
                await response.write(f"event: error\ndata: {payload}\n\n".encode())
                break
            chunks = []
            for item in batch:
                event_id, event_type, data = render(item)
                chunks.append(f"id: {event_id}\nevent: {event_type}\ndata: {compact_json(data)}\n\n")
            await response.write("".join(chunks).encode())
    except ConnectionResetError:
        pass  # the client went away
    finally:
        if pending is not None:
            # The generator is still running inside ``pending``: it must finish
            # (cancelled) before it can be closed, else aclose() raises RuntimeError.
            pending.cancel()
            await asyncio.wait({pending})
        await iterator.aclose()  # type: ignore[attr-defined]
    return response
