"""HTTP routes of load-balanced invocation: ``POST /v1/services/{type}/invoke``
forwards the body to one agent of the type and passes its answer back; the
type's policy (strategy, health checks, breaker, limits, retries) is
committed with ``PUT /v1/services/{type}``.

An answer that came from an agent carries ``X-Coord-Agent`` (its id); an
answer without it is the node's own (a JSON error: 400, 429, 502, 503, 504).
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.auth import forward_signer
from coordinator.api.routes import checked, node_of, ok
from coordinator.api.spec import ANY, REQUEST_ID, Op, number, one_of, p, string, with_consistency
from coordinator.commands.balancer import (
    MAX_TIMEOUT_S,
    MIN_TIMEOUT_S,
    POLICY_FIELDS,
    ServiceConfigure,
    ServiceRemove,
    check_type,
)
from coordinator.commands.base import MAX_NAME_LEN
from coordinator.errors import InvalidInput
from coordinator.services.balancer.service import Invocation
from coordinator.services.node import CoordinatorNode
from coordinator.services.view import StateView

service_routes = web.RouteTableDef()

KEY_MAX = 1024  # a consistent-hash key (the API's own limit: an invocation is not a command)
TRUE = ("1", "true", "yes")
VIEW_FIELDS = ("breaker", "inflight", "latency_ms", "requests")  # what one node's balancer knows of an agent
CLUSTER_VIEW_TIMEOUT_S = 1.0

TYPE = string(MAX_NAME_LEN)
# A policy's fields (``commands.balancer.POLICY_FIELDS``): the command's parse checks each.
CONFIGURE = Op("A type's balancing policy", tags=("services",), path={"type": TYPE}, body_required=False,
               body={**{f: p(ANY) for f in POLICY_FIELDS}, "request_id": p(REQUEST_ID)})
REMOVE = Op("Remove a type's policy (the defaults apply)", tags=("services",), path={"type": TYPE},
            body_required=False, body={"request_id": p(REQUEST_ID)})
DESCRIBE = Op("One agent type: its policy, agents and this node's view of them", tags=("services",),
              path={"type": TYPE}, query=with_consistency())
LISTING = Op("Every agent type", tags=("services",),
             query=with_consistency({"scope": p(one_of("node", "cluster"), "cluster: every member's view too")}))
INVOKE = Op("Call one agent of the type (any body, passed through; the agent's answer comes back)",
            tags=("services",), path={"type": TYPE}, query={
                "key": p(string(KEY_MAX), "a consistent-hash key"),
                "timeout_s": p(number(MIN_TIMEOUT_S, MAX_TIMEOUT_S)),
                "idempotent": p(one_of(*TRUE, "false"), "the call may be retried on another agent")})


def _type(request: web.Request) -> str:
    """The path's agent type, checked as the service commands check it (before the body is read)."""
    return checked(lambda: check_type(request.match_info["type"]))


@service_routes.post("/v1/services/{type}/invoke")
@INVOKE
async def invoke(request: web.Request) -> web.Response:
    node = node_of(request)
    agent_type = _type(request)
    body = await request.read()
    key = request.query.get("key", request.headers.get("X-Coord-Key"))
    if key is not None:
        s.name(key, "key", KEY_MAX)
    timeout_s = _timeout(request.query.get("timeout_s", request.headers.get("X-Coord-Timeout")))
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None:
        s.name(idempotency_key, "Idempotency-Key")
    idempotent = (request.query.get("idempotent", request.headers.get("X-Coord-Idempotent", "")).lower() in TRUE)
    caller = request.headers.get("X-Coord-Caller")
    if caller is not None:
        s.name(caller, "X-Coord-Caller")
    request_id = request.headers.get("X-Request-Id") or f"req-{node.rng.token_hex(8)}"
    s.name(request_id, "X-Request-Id", s.MAX_REQUEST_ID_LEN)
    answer = await node.balancer.invoke(Invocation(
        agent_type, body, request.headers.get("Content-Type"), request_id, timeout_s=timeout_s, key=key,
        idempotent=idempotent, idempotency_key=idempotency_key, caller=caller))
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


def _timeout(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput("timeout_s: must be a number of seconds", field="timeout_s") from None
    if not math.isfinite(value) or not MIN_TIMEOUT_S <= value <= MAX_TIMEOUT_S:
        raise InvalidInput(f"timeout_s: must be between {MIN_TIMEOUT_S:g} and {MAX_TIMEOUT_S:g} seconds",
                           field="timeout_s")
    return value


@service_routes.put("/v1/services/{type}")
@CONFIGURE
async def configure(request: web.Request) -> web.Response:
    agent_type = _type(request)
    body = await s.json_body(request, CONFIGURE)
    command = s.command(ServiceConfigure, {"type": agent_type,
                                           "policy": {k: v for k, v in body.items() if k in POLICY_FIELDS}})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@service_routes.delete("/v1/services/{type}")
@REMOVE
async def remove(request: web.Request) -> web.Response:
    agent_type = _type(request)
    body = await s.json_body(request, REMOVE)
    command = s.command(ServiceRemove, {"type": agent_type})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@service_routes.get("/v1/services/{type}")
@DESCRIBE
async def describe(request: web.Request) -> web.Response:
    agent_type = _type(request)
    node = node_of(request)
    view = await node.view(s.consistency(request))
    return ok(_describe(node, view, agent_type))


@service_routes.get("/v1/services")
@LISTING
async def listing(request: web.Request) -> web.Response:
    """Every agent type with its agents, and this node's balancer view of
    each (load, breaker, latency: every node balances its own calls). With
    ``scope=cluster``, also every member's view (``by_node``), asked at once."""
    scope = request.query.get("scope", "node")
    if scope not in ("node", "cluster"):
        raise InvalidInput("scope: must be node or cluster", field="scope")
    node = node_of(request)
    view = await node.view(s.consistency(request))
    body: dict[str, Any] = {"services": [_describe(node, view, t) for t in view.service_types()]}
    if scope == "cluster":
        await _add_views_of_every_node(request, body)
    return ok(body)


async def _add_views_of_every_node(request: web.Request, body: dict[str, Any]) -> None:
    """``by_node`` on every agent: {node id: its breaker, inflight, latency_ms,
    requests}, from each member's own ``GET /v1/services`` (an agent a node
    has not applied yet is missing there); ``unreachable``: members that did
    not answer, with why."""
    node = node_of(request)
    # Stale on the members: this node's barrier already fixed the registry; a member's balancer view is
    # its own, never replicated, so a barrier there (an entry in the log each) would add nothing.
    answers = await node.ask_members("/v1/services?consistency=stale", body, sign=forward_signer(request),
                                     timeout_s=CLUSTER_VIEW_TIMEOUT_S)
    views: dict[str, dict[str, dict[str, Any]]] = {}  # agent id -> node id -> its view
    unreachable = []
    for member, answer, error in answers:
        name = member["id"] or member["raft"]
        if answer is None:
            unreachable.append({"node": name, "error": error})
            continue
        # A member's answer, but checked like any input: a malformed one adds nothing.
        services = answer.get("services") if isinstance(answer, dict) else None
        for service in services if isinstance(services, list) else []:
            agents = service.get("agents") if isinstance(service, dict) else None
            for agent in agents if isinstance(agents, list) else []:
                if isinstance(agent, dict) and isinstance(agent.get("id"), str):
                    views.setdefault(agent["id"], {})[name] = {k: agent.get(k) for k in VIEW_FIELDS}
    for service in body["services"]:
        for agent in service["agents"]:
            agent["by_node"] = dict(sorted(views.get(agent["id"], {}).items()))
    body["unreachable"] = unreachable


def _describe(node: CoordinatorNode, view: StateView, agent_type: str) -> dict[str, Any]:
    local = node.balancer.status()["agents"]
    agents = []
    for agent in view.agents(agent_type):
        row = {"id": agent.id, "endpoint": agent.endpoint, "weight": agent.weight, "health": agent.health}
        row.update(local.get(agent.id, {"breaker": {"state": "closed"}, "inflight": 0, "latency_ms": None,
                                        "requests": 0}))
        agents.append(row)
    return {"type": agent_type, "policy": view.policy(agent_type),
            "configured": view.has_policy(agent_type), "agents": agents}
