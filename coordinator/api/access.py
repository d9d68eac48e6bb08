"""HTTP routes of access control: roles and the roles each agent holds
(the admin's; reading roles needs any credential)."""

from __future__ import annotations

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.routes import node_of, ok

access_routes = web.RouteTableDef()


@access_routes.put("/v1/roles/{name}")
async def put_role(request: web.Request) -> web.Response:
    name = s.name(request.match_info["name"], "name")
    body = await s.json_body(request, {"permissions", "request_id"})
    return ok(await node_of(request).write("role.put", {"name": name, "permissions": body.get("permissions")},
                                           s.request_id(request, body)))


@access_routes.delete("/v1/roles/{name}")
async def delete_role(request: web.Request) -> web.Response:
    name = s.name(request.match_info["name"], "name")
    body = await s.json_body(request, {"request_id"}, required=False)
    return ok(await node_of(request).write("role.delete", {"name": name}, s.request_id(request, body)))


@access_routes.get("/v1/roles")
async def list_roles(request: web.Request) -> web.Response:
    node = node_of(request)
    await node.read_barrier(s.consistency(request))
    return ok(node.applier.machine.access.describe())


@access_routes.put("/v1/agents/{id}/roles")
async def grant_roles(request: web.Request) -> web.Response:
    agent_id = s.name(request.match_info["id"], "id")
    body = await s.json_body(request, {"roles", "request_id"})
    return ok(await node_of(request).write("role.grant", {"agent": agent_id, "roles": body.get("roles")},
                                           s.request_id(request, body)))
