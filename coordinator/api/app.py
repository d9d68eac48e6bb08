"""``make_app(node)``: the aiohttp application of one node."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from coordinator.api.access import access_routes
from coordinator.api.auth import AUTH, AuthSettings, AuthState, admit
from coordinator.api.balancer import service_routes
from coordinator.api.bus import bus_routes
from coordinator.api.chaos import chaos_routes
from coordinator.api.errors import error_response, render_error
from coordinator.api.eventstore import es_routes
from coordinator.api.keys import CHAOS_DIR, METRICS, NODE
from coordinator.api.limits import OPEN, OpenLimits, OpenRequests, take_slot
from coordinator.api.metrics import CONTENT_TYPE, HttpMetrics
from coordinator.api.openapi import add_openapi_route
from coordinator.api.routes import routes
from coordinator.api.sagas import saga_routes
from coordinator.api.spec import Op
from coordinator.api.streams import stream_routes
from coordinator.api.transforms import transform_routes
from coordinator.api.ui import ui_routes
from coordinator.errors import CoordinatorError
from coordinator.services.node import CoordinatorNode

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """What every request goes through, in one layer: authentication and
    authorization (``api.auth``), a slot if it is a long request
    (``api.limits``), every failure rendered as the JSON error body of
    DESIGN.md (nothing escapes), and its latency and status counted."""
    started = time.perf_counter()
    try:
        await admit(request)
        held = take_slot(request)
        if held is None:
            response = await handler(request)
        else:
            try:
                response = await handler(request)
            finally:
                request.app[OPEN].release(held)
    except Exception as exc:
        response = _failure(request, exc)
    resource = request.match_info.route.resource
    request.app[METRICS].observe(request.method, "unmatched" if resource is None else resource.canonical,
                                 response.status, time.perf_counter() - started)
    return response


def _failure(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The error response for ``exc``; an ``HTTPException`` below 400 (a redirect) is raised again."""
    if isinstance(exc, CoordinatorError):
        return render_error(exc)
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(413, "too_large", f"body: larger than {MAX_BODY_BYTES} bytes", field="body")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        response = error_response(405, "method_not_allowed", f"{request.method} is not allowed here")
        response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
        return response
    if isinstance(exc, web.HTTPNotFound):
        return error_response(404, "not_found", f"no route for {request.method} {request.path}")
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return error_response(exc.status, "http", exc.reason)
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal", "internal error")


@Op("Prometheus metrics (the admin or the metrics token)", tags=("cluster",), content="text/plain")
async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def make_app(node: CoordinatorNode, auth: AuthSettings | None = None, *,
             chaos_dir: Path | None = None, limits: OpenLimits | None = None) -> web.Application:
    """The application for ``node``; the caller starts and stops the node.
    Without ``auth``, nothing but the public routes answers (secure by default)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[edge_middleware])
    app[NODE] = node
    app[CHAOS_DIR] = chaos_dir
    app[AUTH] = AuthState(auth or AuthSettings(), own_http=node.identity.http)
    app[OPEN] = OpenRequests(limits or OpenLimits())
    app[METRICS] = HttpMetrics(node, app[AUTH], app[OPEN])
    app.router.add_routes(routes)
    app.router.add_routes(bus_routes)
    app.router.add_routes(saga_routes)
    app.router.add_routes(service_routes)
    app.router.add_routes(access_routes)
    app.router.add_routes(es_routes)
    app.router.add_routes(transform_routes)
    app.router.add_routes(stream_routes)
    app.router.add_routes(ui_routes)
    app.router.add_routes(chaos_routes)
    app.router.add_get("/metrics", metrics_handler)
    add_openapi_route(app)  # last: it describes every route above
    return app
