"""The one place where errors become HTTP status codes.

Every error body is ``{"error": {"code", "message"}}`` (plus ``field`` for
bad input and ``leader`` when a 503 knows where the leader is).
"""

from __future__ import annotations

import json
import math

from aiohttp import web

from coordinator.errors import CoordinatorError, Forbidden, InvalidInput, RateLimited, Unauthenticated, Unavailable

STATUS_BY_CODE = {
    "invalid": 400,
    "unauthenticated": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "compacted": 410,
    "too_large": 413,
    "rate_limited": 429,
    "bad_gateway": 502,
    "quota_exceeded": 507,
    "unavailable": 503,
    "not_leader": 503,
    "outcome_unknown": 504,
    "timeout": 504,
}


def error_response(status: int, code: str, message: str, **extra: object) -> web.Response:
    body = {"error": {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


def render_error(exc: CoordinatorError) -> web.Response:
    status = STATUS_BY_CODE.get(exc.code, 500)
    extra: dict[str, object] = {}
    if isinstance(exc, InvalidInput):
        extra["field"] = exc.field
    for key in ("compact_revision", "first_seq", "dropped_through", "line", "column", "limit", "field"):
        if key in exc.details:
            extra[key] = exc.details[key]
    headers = {}
    if isinstance(exc, Forbidden):
        extra["permission"] = exc.permission
        extra["resource"] = exc.resource
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer, Coord-Ed25519'
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        extra["retry_after_s"] = round(exc.retry_after_s, 3)
    if status == 503:
        retry_after = exc.retry_after_s if isinstance(exc, Unavailable) else 1.0
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        leader = exc.leader if isinstance(exc, Unavailable) else None
        if leader:
            extra["leader"] = leader
            headers["X-Coord-Leader"] = leader
    response = error_response(status, exc.code if status != 500 else "internal",
                              exc.message if status != 500 else "internal error", **extra)
    response.headers.update(headers)
    return response
