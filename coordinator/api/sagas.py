"""HTTP routes of sagas: start, read, list, cancel. Parse → one service
call → render. A definition is checked before it is proposed (400 naming
the field), and checked again by the state machine when applied."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.routes import node_of, ok
from coordinator.api.visibility import visibility
from coordinator.errors import InvalidInput, NotFound
from coordinator.services.proposals import state_error
from coordinator.state.base import Rejected
from coordinator.state.sagas import MAX_STEP_ID_LEN, SAGA_STATES, normalize_definition

saga_routes = web.RouteTableDef()

LIST_LIMIT_MAX = 1000
DEFINITION_FIELDS = {"id", "name", "steps", "input", "compensation_retry"}


def _saga_id(request: web.Request) -> str:
    return s.name(request.match_info["saga"], "saga", MAX_STEP_ID_LEN)


@saga_routes.post("/v1/sagas")
async def start_saga(request: web.Request) -> web.Response:
    body = await s.json_body(request, DEFINITION_FIELDS | {"request_id"})
    definition = {k: v for k, v in body.items() if k in DEFINITION_FIELDS}
    try:
        normalize_definition(definition)
    except Rejected as exc:
        raise state_error(exc.code, exc.message) from None
    result = await node_of(request).write("saga.start", {"definition": definition}, s.origin(request, body))
    return ok(result, status=201)


@saga_routes.get("/v1/sagas/{saga}")
async def get_saga(request: web.Request) -> web.Response:
    saga_id = _saga_id(request)
    node = node_of(request)
    saga = (await node.view(s.consistency(request))).saga(saga_id)
    if saga is None:
        raise NotFound(f"saga {saga_id!r} does not exist (or was finished long ago and dropped)")
    sees = visibility(request)
    name = saga.definition["name"]
    if not sees.saga(name):
        sees.refuse(request, "saga", name, f"saga {saga_id!r} is a {name!r} saga, which it may not start")
    return ok(saga.describe())


@saga_routes.get("/v1/sagas")
async def list_sagas(request: web.Request) -> web.Response:
    state = request.query.get("state")
    if state is not None and state not in SAGA_STATES:
        raise InvalidInput(f"state: must be one of {', '.join(SAGA_STATES)}", field="state")
    limit = s.query_int(request, "limit", 100, 1, LIST_LIMIT_MAX) or 100
    after = s.query_int(request, "after", 0, 0, 2**63 - 1) or 0
    order = request.query.get("order", "oldest")
    if order not in ("oldest", "newest"):
        raise InvalidInput("order: must be oldest or newest", field="order")
    if order == "newest" and (state is not None or after):
        raise InvalidInput("order: newest lists the latest sagas of every state, without a cursor", field="order")
    node = node_of(request)
    view = await node.view(s.consistency(request))
    sees = visibility(request)
    shown = None if sees.everything else (lambda saga: sees.saga(saga.definition["name"]))
    page = (view.sagas_newest_first(limit, shown) if order == "newest"
            else view.sagas_oldest_first(state, limit, after, shown))
    body: dict[str, Any] = {"sagas": [saga.describe(history=False) for saga in page],
                            "counts": view.saga_counts(shown)}
    body["next"] = page[-1].created_index if len(page) == limit and order == "oldest" else None
    return ok(body)


@saga_routes.post("/v1/sagas/{saga}/cancel")
async def cancel_saga(request: web.Request) -> web.Response:
    saga_id = _saga_id(request)
    body = await s.json_body(request, {"reason", "request_id"}, required=False)
    args: dict[str, Any] = {"saga": saga_id}
    if body.get("reason") is not None:
        args["reason"] = s.name(body["reason"], "reason", 1024)
    return ok(await node_of(request).write("saga.cancel", args, s.origin(request, body)))

