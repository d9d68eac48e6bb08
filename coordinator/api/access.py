"""HTTP routes of access control: roles and the roles each agent holds
(the admin's; an agent reads the roles it holds)."""

from __future__ import annotations

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.auth import AUTH, CHALLENGE_TTL_S, issue_challenge
from coordinator.api.routes import checked, node_of, ok
from coordinator.api.spec import REQUEST_ID, Op, array, integer, obj, p, string, with_consistency
from coordinator.api.visibility import visibility
from coordinator.commands.access import (
    MAX_PERMISSIONS,
    MAX_POW_DIFFICULTY,
    MAX_ROLES_PER_AGENT,
    AccessUnpin,
    RoleDelete,
    RoleGrant,
    RolePut,
    SecurityConfigure,
    check_role_name,
)
from coordinator.commands.agents import check_agent_id
from coordinator.commands.base import MAX_NAME_LEN

access_routes = web.RouteTableDef()

_RID = {"request_id": p(REQUEST_ID)}
ROLE_NAME = string(MAX_NAME_LEN)
ROLE_PUT = Op("Define a role: its permissions (action and resource pattern)", tags=("access",),
              path={"name": ROLE_NAME},
              body={"permissions": p(array(obj(), 0, MAX_PERMISSIONS), required=True), **_RID})
ROLE_DELETE = Op("Delete a role", tags=("access",), path={"name": ROLE_NAME}, body=_RID, body_required=False)
ROLES = Op("Roles and grants (what the caller may see)", tags=("access",), query=with_consistency())
GRANT = Op("Grant an agent its roles (the whole list)", tags=("access",), path={"id": string(MAX_NAME_LEN)},
           body={"roles": p(array(ROLE_NAME, 0, MAX_ROLES_PER_AGENT), required=True), **_RID})
CHALLENGE = Op("A proof-of-work challenge for joining, and the difficulty asked", tags=("access",))
SECURITY_GET = Op("The cluster's security settings", tags=("access",), query=with_consistency())
SECURITY_PUT = Op("Proof-of-work difficulty and the endpoint allow-list", tags=("access",), body={
    "pow_difficulty": p(integer(0, MAX_POW_DIFFICULTY)), "endpoint_allow": p(array(string(MAX_NAME_LEN))), **_RID})
UNPIN = Op("Forget the key kept for an agent id that left", tags=("access",), path={"id": string(MAX_NAME_LEN)},
           body=_RID, body_required=False)


@access_routes.put("/v1/roles/{name}")
@ROLE_PUT
async def put_role(request: web.Request) -> web.Response:
    name = checked(lambda: check_role_name(request.match_info["name"]))  # a bad path before the body
    body = await s.json_body(request, ROLE_PUT)
    command = s.command(RolePut, {"name": name, "permissions": body.get("permissions")})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@access_routes.delete("/v1/roles/{name}")
@ROLE_DELETE
async def delete_role(request: web.Request) -> web.Response:
    command = s.command(RoleDelete, {"name": request.match_info["name"]})
    body = await s.json_body(request, ROLE_DELETE)
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@access_routes.get("/v1/roles")
@ROLES
async def list_roles(request: web.Request) -> web.Response:
    await node_of(request).read_barrier(s.consistency(request))  # then the caller's visibility reads the replica
    return ok(visibility(request).roles())


@access_routes.put("/v1/agents/{id}/roles")
@GRANT
async def grant_roles(request: web.Request) -> web.Response:
    agent_id = checked(lambda: check_agent_id(request.match_info["id"]))
    body = await s.json_body(request, GRANT)
    command = s.command(RoleGrant, {"agent": agent_id, "roles": body.get("roles")})
    checked(lambda: node_of(request).local_view.check_grant(command))  # a role that does not exist: no log entry
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@access_routes.get("/v1/join/challenge")
@CHALLENGE
async def join_challenge(request: web.Request) -> web.Response:
    """A proof-of-work challenge for joining, and the difficulty the cluster asks."""
    node = node_of(request)
    return ok({"challenge": issue_challenge(request.app[AUTH]),
               "difficulty": node.local_view.pow_difficulty, "expires_in_s": CHALLENGE_TTL_S})


@access_routes.get("/v1/security")
@SECURITY_GET
async def get_security(request: web.Request) -> web.Response:
    return ok((await node_of(request).view(s.consistency(request))).security_settings())


@access_routes.put("/v1/security")
@SECURITY_PUT
async def put_security(request: web.Request) -> web.Response:
    body = await s.json_body(request, SECURITY_PUT)
    command = s.command(SecurityConfigure, {k: v for k, v in body.items() if k != "request_id"})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@access_routes.delete("/v1/keys/{id}")
@UNPIN
async def unpin_key(request: web.Request) -> web.Response:
    """Forget the key kept for an agent id that left, so another key may join as it (admin)."""
    agent_id = checked(lambda: check_agent_id(request.match_info["id"]))
    body = await s.json_body(request, UNPIN)
    command = s.command(AccessUnpin, {"agent": agent_id})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))
