"""HTTP routes of access control: roles and the roles each agent holds
(the admin's; an agent reads the roles it holds)."""

from __future__ import annotations

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.auth import AUTH, CHALLENGE_TTL_S, issue_challenge
from coordinator.api.routes import checked, node_of, ok
from coordinator.api.visibility import visibility
from coordinator.commands.access import AccessUnpin, RoleDelete, RoleGrant, RolePut, SecurityConfigure, check_role_name
from coordinator.commands.agents import check_agent_id

access_routes = web.RouteTableDef()


@access_routes.put("/v1/roles/{name}")
async def put_role(request: web.Request) -> web.Response:
    name = checked(lambda: check_role_name(request.match_info["name"]))  # a bad path before the body
    body = await s.json_body(request, {"permissions", "request_id"})
    command = s.command(RolePut, {"name": name, "permissions": body.get("permissions")})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@access_routes.delete("/v1/roles/{name}")
async def delete_role(request: web.Request) -> web.Response:
    command = s.command(RoleDelete, {"name": request.match_info["name"]})
    body = await s.json_body(request, {"request_id"}, required=False)
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@access_routes.get("/v1/roles")
async def list_roles(request: web.Request) -> web.Response:
    await node_of(request).read_barrier(s.consistency(request))  # then the caller's visibility reads the replica
    return ok(visibility(request).roles())


@access_routes.put("/v1/agents/{id}/roles")
async def grant_roles(request: web.Request) -> web.Response:
    agent_id = checked(lambda: check_agent_id(request.match_info["id"]))
    body = await s.json_body(request, {"roles", "request_id"})
    command = s.command(RoleGrant, {"agent": agent_id, "roles": body.get("roles")})
    checked(lambda: node_of(request).local_view.check_grant(command))  # a role that does not exist: no log entry
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


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
    command = s.command(SecurityConfigure, {k: v for k, v in body.items() if k != "request_id"})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@access_routes.delete("/v1/keys/{id}")
async def unpin_key(request: web.Request) -> web.Response:
    """Forget the key kept for an agent id that left, so another key may join as it (admin)."""
    agent_id = checked(lambda: check_agent_id(request.match_info["id"]))
    body = await s.json_body(request, {"request_id"}, required=False)
    command = s.command(AccessUnpin, {"agent": agent_id})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))
