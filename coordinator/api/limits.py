"""Caps on what one caller, and all callers together, may hold open on a node.

Two kinds of things are held open:

* Connections. Every open socket costs a file descriptor; when a process runs
  out of them (EMFILE), accepting, forwarding, opening the journal and
  rebuilding the Raft engine all fail together. ``BoundedServer`` refuses a
  connection over ``connections_max`` at once with a 503 and closes it, and
  the cap is kept below the process's descriptor limit with room for the
  node's own files and peer links.
* Long requests: Server-Sent Events streams and long polls (a fetch with
  ``wait_s`` > 0). Each holds a task, a connection and often a consumer on the
  leader for minutes. ``take_slot`` counts them per principal
  (an agent, the admin, or an anonymous caller by its address) and in total:
  over the caller's share is a 429, over the node's total a 503, both with
  ``Retry-After`` and ``limit`` naming the cap. A request that is refused
  holds nothing.

Loop thread only. The counts are this node's: a follower that forwards a long
poll to the leader holds one slot, and the leader one for the forwarded call,
counted against the same principal.
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, InvalidHeader, InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from coordinator.api.auth import principal_of
from coordinator.errors import RateLimited, Unavailable

# Routes that hold the request open: SSE streams, and fetches when they wait.
STREAM_ROUTES = frozenset({
    "/v1/watch", "/v1/watch/events", "/v1/categories/{category}/watch",
    "/v1/subscriptions/{sub}/stream", "/v1/agents/{agent}/stream",
})
POLL_ROUTES = frozenset({"/v1/subscriptions/{sub}/messages", "/v1/agents/{agent}/messages"})
FD_RESERVE = 256  # descriptors kept for the journal, snapshots, peers, brokers and forwarding


@dataclass(frozen=True, slots=True)
class OpenLimits:
    long_requests_per_principal: int = 64
    long_requests_max: int = 1024
    connections_max: int = 8192


def connections_cap(configured: int) -> int:
    """``configured``, but never above what the descriptor limit leaves after ``FD_RESERVE``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, soft - FD_RESERVE))


class OpenRequests:
    """Who holds how many long requests on this node. Held by the app under ``OPEN``."""

    def __init__(self, limits: OpenLimits) -> None:
        self.limits = limits
        self.by_principal: dict[str, int] = {}
        self.total = 0
        self.refused = {"per_principal": 0, "total": 0, "connections": 0}

    def acquire(self, who: str) -> None:
        held = self.by_principal.get(who, 0)
        if held >= self.limits.long_requests_per_principal:
            self.refused["per_principal"] += 1
            raise RateLimited(f"{who} already holds {held} streams and long polls on this node "
                              f"(long_requests_per_principal is {self.limits.long_requests_per_principal})",
                              retry_after_s=1.0, limit="long_requests_per_principal")
        if self.total >= self.limits.long_requests_max:
            self.refused["total"] += 1
            raise Unavailable(f"this node holds {self.total} streams and long polls "
                              f"(long_requests_max is {self.limits.long_requests_max})", retry_after_s=1.0,
                              limit="long_requests_max")
        self.by_principal[who] = held + 1
        self.total += 1

    def release(self, who: str) -> None:
        held = self.by_principal.get(who, 0) - 1
        if held > 0:
            self.by_principal[who] = held
        else:
            self.by_principal.pop(who, None)
        self.total -= 1


OPEN: web.AppKey[OpenRequests] = web.AppKey("open_requests", OpenRequests)


def is_long(request: web.Request) -> bool:
    route = request.match_info.route.resource
    canonical = route.canonical if route is not None else ""
    if canonical in STREAM_ROUTES:
        return True
    # A malformed wait_s counts as waiting: the handler refuses it with a 400 anyway.
    return canonical in POLL_ROUTES and request.query.get("wait_s", "0") not in ("0", "0.0", "")


def _holder(request: web.Request) -> str:
    principal = principal_of(request)
    if principal is None or principal.kind == "anonymous":
        peer = request.remote or "unknown"
        return f"anonymous caller {peer}"
    return str(principal)


def take_slot(request: web.Request) -> str | None:
    """After authentication: a long request takes a slot for its whole life.
    The holder to ``release`` when it ends; None for a short request."""
    if not is_long(request):
        return None
    who = _holder(request)
    request.app[OPEN].acquire(who)
    return who


_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class BoundedRunner(web.AppRunner):
    """An ``AppRunner`` whose server refuses connections over ``connections_max``
    (kept under the descriptor limit) with a 503 and closes them."""

    def __init__(self, app: web.Application, *, connections_max: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.connections_max = connections_cap(connections_max)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonRefusingServer  # its handlers answer parser refusals as JSON (no new state)
        admit = server.connection_made
        slots = self._app[OPEN]
        cap = self.connections_max

        def connection_made(handler: RequestHandler, transport: Any) -> None:
            admit(handler, transport)  # registered either way: connection_lost unregisters it
            if len(server.connections) > cap:
                slots.refused["connections"] += 1
                body = (b'{"error": {"code": "unavailable", "limit": "connections_max", '
                        b'"message": "this node holds its maximum of %d connections"}}' % cap)
                transport.write(_REFUSAL % (len(body), body))
                transport.close()

        server.connection_made = connection_made  # type: ignore[method-assign]
        return server



# What a refusal of aiohttp's parser names: the part of the request at fault.
_PARSER_FIELDS: dict[type, str] = {InvalidURLError: "url", BadHttpMethod: "method", InvalidHeader: "headers"}

class _JsonRefusingHandler(RequestHandler):
    """aiohttp's answer to a request its parser refuses (a request line or a
    header over ``max_line_size``, a malformed request: 400, before any
    handler) given as the error body every other refusal has, naming the
    field: ``url`` for the request line, ``headers`` for the rest. Other
    statuses stay aiohttp's (the edge middleware answers whatever a handler raises)."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)  # logs; refuses once bytes went out
        if status != 400:
            return response
        text = str(getattr(exc, "message", None) or message or "bad request")
        reading = text.partition("when reading: ")[2]
        if isinstance(exc, LineTooLong):  # the request line's, or a header's
            field = "url" if reading.startswith(("bytearray(b'/", "b'/")) else "headers"
        else:
            field = _PARSER_FIELDS.get(type(exc), "request")
        summary = text.split(":", 1)[0] if reading else text.strip().split("\n")[0][:200].rstrip(": ")
        body = json.dumps({"error": {"code": "invalid", "message": f"{field}: {summary}", "field": field}})
        refusal = web.Response(status=400, text=body, content_type="application/json")
        refusal.force_close()
        return refusal


class _JsonRefusingServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonRefusingHandler(self, loop=self._loop, **self._kwargs)
