"""HTTP routes of access control: roles and the roles each agent holds
(the admin's; an agent reads the roles it holds)."""

from __future__ import annotations

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.auth import AUTH, CHALLENGE_TTL_S, issue_challenge
from coordinator.api.routes import checked, node_of, ok
from coordinator.api.visibility import visibility
from coordinator.state.access import Access

access_routes = web.RouteTableDef()


@access_routes.put("/v1/roles/{name}")
async def put_role(request: web.Request) -> web.Response:
    name = s.name(request.match_info["name"], "name")
    body = await s.json_body(request, {"permissions", "request_id"})
    args = {"name": name, "permissions": body.get("permissions")}
    checked(lambda: Access().put_role(args))
    return ok(await node_of(request).write("role.put", args, s.origin(request, body)))


@access_routes.delete("/v1/roles/{name}")
async def delete_role(request: web.Request) -> web.Response:
    name = s.name(request.match_info["name"], "name")
    body = await s.json_body(request, {"request_id"}, required=False)
    return ok(await node_of(request).write("role.delete", {"name": name}, s.origin(request, body)))


@access_routes.get("/v1/roles")
async def list_roles(request: web.Request) -> web.Response:
    await node_of(request).read_barrier(s.consistency(request))  # then the caller's visibility reads the replica
    return ok(visibility(request).roles())


@access_routes.put("/v1/agents/{id}/roles")
async def grant_roles(request: web.Request) -> web.Response:
    agent_id = s.name(request.match_info["id"], "id")
    body = await s.json_body(request, {"roles", "request_id"})
    args = {"agent": agent_id, "roles": body.get("roles")}
    checked(lambda: node_of(request).local_view.check_grant(args))
    return ok(await node_of(request).write("role.grant", args, s.origin(request, body)))


@access_routes.get("/v1/join/challenge")
async def join_challenge(request: web.Request) -> web.Response:
    """A proof-of-work challenge for joining, and the difficulty the cluster asks."""
    node = node_of(request)
    return ok({"challenge": issue_challenge(request.app[AUTH]),
               "difficulty": node.local_view.pow_difficulty, "expires_in_s": CHALLENGE_TTL_S})


@access_routes.get("/v1/security")
async def get_security(request: web.Request) -> web.Response:
    return ok((await node_of(request).view(s.consistency(request))).security_settings())


@access_routes.put("/v1/security")
async def put_security(request: web.Request) -> web.Response:
    body = await s.json_body(request, {"pow_difficulty", "endpoint_allow", "request_id"})
    args = {k: v for k, v in body.items() if k != "request_id"}
    checked(lambda: Access().configure(args))  # bad input costs no log entry
    return ok(await node_of(request).write("security.configure", args, s.origin(request, body)))


@access_routes.delete("/v1/keys/{id}")
async def unpin_key(request: web.Request) -> web.Response:
    """Forget the key kept for an agent id that left, so another key may join as it (admin)."""
    agent_id = s.name(request.match_info["id"], "id")
    body = await s.json_body(request, {"request_id"}, required=False)
    return ok(await node_of(request).write("access.unpin", {"agent": agent_id}, s.origin(request, body)))
