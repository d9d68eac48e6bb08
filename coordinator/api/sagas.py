"""HTTP routes of sagas: start, read, list, cancel. Parse → one service
call → render. A start or a cancel is parsed into its command before it is
proposed (400 naming the field); every replica parses it again when applying."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.routes import checked, node_of, ok
from coordinator.api.spec import ANY, REQUEST_ID, Op, Schema, array, integer, obj, one_of, p, string, with_consistency
from coordinator.api.visibility import visibility
from coordinator.commands.base import MAX_NAME_LEN, MAX_TOKEN
from coordinator.commands.sagas import (
    DEFINITION_FIELDS,
    MAX_ERROR_LEN,
    MAX_STEP_ID_LEN,
    MAX_STEPS,
    SAGA_STATES,
    SagaCancel,
    SagaStart,
    check_saga_id,
)
from coordinator.errors import InvalidInput, NotFound

saga_routes = web.RouteTableDef()

LIST_LIMIT_MAX = 1000

SAGA_ID = string(MAX_STEP_ID_LEN)
# The body is the saga's definition (``commands.sagas.DEFINITION_FIELDS``): its parse checks every part.
_DEFINITION: dict[str, Schema] = {"id": SAGA_ID, "name": string(MAX_NAME_LEN),
                                  "steps": array(obj(), 1, MAX_STEPS), "input": ANY, "compensation_retry": obj()}
START = Op("Start a saga", tags=("sagas",), responses={201: None}, body={
    **{f: p(_DEFINITION[f], required=f == "steps") for f in DEFINITION_FIELDS}, "request_id": p(REQUEST_ID)})
GET = Op("A saga with its history", tags=("sagas",), path={"saga": SAGA_ID}, query=with_consistency())
LIST = Op("A page of sagas, with counts", tags=("sagas",), query=with_consistency({
    "state": p(one_of(*SAGA_STATES)), "limit": p(integer(1, LIST_LIMIT_MAX)), "after": p(integer(0, MAX_TOKEN)),
    "order": p(one_of("oldest", "newest"), "newest: the latest of every state, without state or after")}))
CANCEL = Op("Cancel a saga (409 once it ended)", tags=("sagas",), path={"saga": SAGA_ID}, body_required=False,
            body={"reason": p(string(MAX_ERROR_LEN)), "request_id": p(REQUEST_ID)})


def _saga_id(request: web.Request) -> str:
    """The path's saga id, checked as the saga commands check it (before the body is read)."""
    return checked(lambda: check_saga_id(request.match_info["saga"]))


@saga_routes.post("/v1/sagas")
@START
async def start_saga(request: web.Request) -> web.Response:
    body = await s.json_body(request, START)
    command = s.command(SagaStart, {"definition": {k: v for k, v in body.items() if k in DEFINITION_FIELDS}})
    return ok(await node_of(request).write_command(command, s.origin(request, body)), status=201)


@saga_routes.get("/v1/sagas/{saga}")
@GET
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
@LIST
async def list_sagas(request: web.Request) -> web.Response:
    state = request.query.get("state")
    if state is not None and state not in SAGA_STATES:
        raise InvalidInput(f"state: must be one of {', '.join(SAGA_STATES)}", field="state")
    limit = s.query_int(request, "limit", 100, 1, LIST_LIMIT_MAX) or 100
    after = s.query_int(request, "after", 0, 0, MAX_TOKEN) or 0
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
@CANCEL
async def cancel_saga(request: web.Request) -> web.Response:
    saga_id = _saga_id(request)
    body = await s.json_body(request, CANCEL)
    args: dict[str, Any] = {"saga": saga_id}
    if body.get("reason") is not None:
        args["reason"] = body["reason"]
    return ok(await node_of(request).write_command(s.command(SagaCancel, args), s.origin(request, body)))

