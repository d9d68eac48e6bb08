"""The OpenAPI 3.1 description of a node's HTTP API, built from the app
itself: every method and path of its router, each handler's declaration
(``api.spec.Op``) and the auth table (``api.auth.RULES``). Served at
``GET /v1/openapi.json`` (public: it says what docs/api.md says).

Nothing here is written by hand per route, so the document cannot list a
route the node lacks, or miss one it has. A route without a declaration is
still described (its path, method and security), marked
``x-coord-declared: false``; ``tests/coordinator/api/test_openapi.py`` keeps
the list of those explicit.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from coordinator import __version__
from coordinator.api.auth import RULES, route_name
from coordinator.api.spec import Op, Schema, obj, op_of

PATH = "/v1/openapi.json"
_PARAM = re.compile(r"\{(\w+)\}")
_METHODS = ("get", "put", "post", "delete", "patch")

ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string"},
            "message": {"type": "string"},
            "field": {"type": "string", "description": "the request field at fault (every 400 names one)"},
            "leader": {"type": "string", "description": "a 503's leader, when this node knows it"},
            "permission": {"type": "string"}, "resource": {"type": "string"},
            "retry_after_s": {"type": "number"}, "limit": {"type": "string"},
        },
    }},
}

SECURITY_SCHEMES: dict[str, Schema] = {
    "adminToken": {"type": "http", "scheme": "bearer",
                   "description": "The admin token made at cluster bootstrap: it may do everything."},
    "agentSignature": {
        "type": "apiKey", "in": "header", "name": "Authorization",
        "description": ('Coord-Ed25519 agent="<id>", ts="<unix ms>", nonce="<16-64 of A-Za-z0-9_->", '
                        'sig="<base64>": an Ed25519 signature, by the key the agent registered, over '
                        "COORD-ED25519-V1, the method, the Host header, the path with its query as sent, ts, "
                        "nonce and the hex SHA-256 of the body, one per line (docs/security.md)."),
    },
    "metricsToken": {"type": "http", "scheme": "bearer", "description": "Reads /metrics only (a scraper)."},
}


def _security(method: str, path: str) -> tuple[list[dict[str, list[str]]], str]:
    """The operation's security requirement and the auth table's rule, by name."""
    rule = RULES.get((method.upper(), path), "admin")
    if rule == "public":
        return [], "public"
    if rule == "admin":
        return [{"adminToken": []}], "admin"
    if rule == "metrics":
        return [{"adminToken": []}, {"metricsToken": []}], "metrics"
    name = rule if isinstance(rule, str) else "permission"  # a permission on a resource of the request
    return [{"adminToken": []}, {"agentSignature": []}], name


def _permission(method: str, path: str) -> str | None:
    """What a permission rule asks, in words (its first docstring line), e.g. ``kv on {key}``."""
    rule = RULES.get((method.upper(), path))
    doc = getattr(rule, "__doc__", None) if rule is not None and not isinstance(rule, str) else None
    return doc.strip().split("\n")[0] if doc else None


def _responses(op: Op | None) -> dict[str, Any]:
    declared = op.responses if op is not None else {200: None}
    out: dict[str, Any] = {}
    for status, schema in declared.items():
        if op is not None and op.content != "application/json" and status < 300:
            media = {op.content: {"schema": {"type": "string"}}}
        else:
            media = {"application/json": {"schema": schema if schema is not None else {"type": "object"}}}
        out[str(status)] = {"description": "success" if status < 300 else "see the body", "content": media}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    out.setdefault("4XX", {"description": "refused: the body names the code (a 400 names the field too)", **error})
    out.setdefault("5XX", {"description": "503 (with Retry-After: no leader, not ready) or 504 (the outcome "
                                          "is unknown: retry with the same request_id)", **error})
    return out


def _operation(method: str, path: str, handler: Any, seen_ids: set[str]) -> dict[str, Any]:
    op = op_of(handler)
    security, rule = _security(method, path)
    doc = (handler.__doc__ or "").strip().split("\n\n")[0]
    operation_id = handler.__name__
    if operation_id in seen_ids:  # one handler on two paths (a subscription's and an agent's inbox)
        operation_id = f"{operation_id}_{'_'.join(_PARAM.findall(path)) or len(seen_ids)}"
    seen_ids.add(operation_id)
    out: dict[str, Any] = {
        "operationId": operation_id,
        "summary": op.summary if op is not None else (doc.split(".")[0] or operation_id),
        "security": security,
        "x-coord-auth": rule,
        "x-coord-declared": op is not None,
        "responses": _responses(op),
    }
    permission = _permission(method, path)
    if permission is not None:
        out["x-coord-permission"] = permission
    if op is not None and op.tags:
        out["tags"] = list(op.tags)
    if doc and op is not None:
        out["description"] = " ".join(doc.split())
    params = [{"name": name, "in": "path", "required": True,
               "schema": (op.path.get(name) if op is not None else None) or {"type": "string", "minLength": 1}}
              for name in _PARAM.findall(path)]
    if op is not None:
        for name, param in op.query.items():
            entry = {"name": name, "in": "query", "required": param.required, "schema": param.schema}
            if param.description:
                entry["description"] = param.description
            params.append(entry)
    if params:
        out["parameters"] = params
    if op is not None and op.body is not None:
        properties = {name: ({**param.schema, "description": param.description} if param.description
                             else param.schema) for name, param in op.body.items()}
        required = tuple(sorted(name for name, param in op.body.items() if param.required))
        out["requestBody"] = {"required": op.body_required, "content": {"application/json": {
            "schema": obj(properties, required, additional=False)}}}
    elif op is None and method in ("post", "put", "patch"):
        out["requestBody"] = {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
    return out


def build(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes (HEAD, added beside each GET, is left out)."""
    paths: dict[str, dict[str, Any]] = {}
    seen_ids: set[str] = set()
    for route in app.router.routes():
        method = route.method.lower()
        if method not in _METHODS or route.resource is None:
            continue
        path = route_name(route.resource.canonical)
        paths.setdefault(path, {})[method] = _operation(method, path, route.handler, seen_ids)
    return {
        "openapi": "3.1.0",
        "info": {"title": "coordinator", "version": __version__,
                 "description": "The HTTP API of one node of the coordinator (docs/api.md). Any node answers; "
                                "writes a follower receives are forwarded to the leader."},
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": {"Error": ERROR}, "securitySchemes": SECURITY_SCHEMES},
    }


OPENAPI = Op("This OpenAPI document (public: it says what docs/api.md says)", tags=("cluster",),
             responses={200: {"type": "object", "required": ["openapi", "paths"]}})


def add_openapi_route(app: web.Application) -> None:
    """Serve ``build(app)`` at ``PATH``; call it after every other route is added.
    The document is built on the first request (the routes do not change while the app runs)."""
    built: list[bytes] = []

    @OPENAPI
    async def openapi(request: web.Request) -> web.Response:
        if not built:
            built.append(json.dumps(build(request.app), separators=(",", ":")).encode())
        return web.Response(body=built[0], content_type="application/json")

    app.router.add_get(PATH, openapi)
