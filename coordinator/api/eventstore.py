"""HTTP routes of the event store and its projections (CQRS).

Parse → one service call → render. Appends, snapshots, deletions and
projection definitions are parsed into their commands before they are
proposed (400 naming the field, as ``events[2].type``); the state machine
runs the same parse when it applies them.
Reads wait for a read barrier unless ``consistency=stale``, so a read
reflects every write acknowledged before it; the answer carries the log
``index`` it reflects.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.routes import checked, node_of, ok, sse, sse_resume
from coordinator.api.visibility import visibility
from coordinator.commands.eventstore import (
    MAX_POSITION,
    MAX_STREAM_ID_LEN,
    MAX_VERSION,
    SNAPSHOT_FIELDS,
    EsAppend,
    EsDelete,
    EsSnapshot,
    check_category,
)
from coordinator.commands.projections import (
    DEFINITION_FIELDS,
    ProjectionDelete,
    ProjectionPut,
    ProjectionRebuild,
    check_name,
)
from coordinator.errors import InvalidInput, NotFound

es_routes = web.RouteTableDef()

READ_LIMIT_MAX = 1000
LIST_LIMIT_MAX = 1000


def _stream_id(request: web.Request) -> str:
    return s.name(request.match_info["stream"], "stream", MAX_STREAM_ID_LEN)


def _category(request: web.Request) -> str:
    category = s.name(request.match_info["category"], "category", MAX_STREAM_ID_LEN)
    return checked(lambda: check_category(category, "category"))


# -- streams ----------------------------------------------------------------------------------


@es_routes.post("/v1/streams/{stream}")
async def append(request: web.Request) -> web.Response:
    stream = _stream_id(request)
    body = await s.json_body(request, {"expected_version", "events", "request_id"})
    args: dict[str, Any] = {"stream": stream, "events": body.get("events")}
    if "expected_version" in body:
        args["expected_version"] = body["expected_version"]
    command = s.command(EsAppend, args)
    node = node_of(request)
    view = node.local_view  # only the store's limits: nothing here depends on the log's position
    checked(lambda: view.check_append(command))
    result = await node.write_command(command, s.origin(request, body))
    return ok(result, status=200 if result.get("duplicate") else 201)


@es_routes.get("/v1/streams/{stream}")
async def read_stream(request: web.Request) -> web.Response:
    stream = _stream_id(request)
    direction = request.query.get("direction", "forward")
    if direction not in ("forward", "backward"):
        raise InvalidInput("direction: must be forward or backward", field="direction")
    backward = direction == "backward"
    from_version = s.query_int(request, "from_version", MAX_VERSION if backward else 0, 0, MAX_VERSION)
    limit = s.query_int(request, "limit", 100, 1, READ_LIMIT_MAX)
    node = node_of(request)
    view = await node.view(s.consistency(request))
    page = view.stream_page(stream, from_version or 0, limit or 100, backward)
    if page is None:
        raise NotFound(f"stream {stream!r} does not exist")
    return ok({**page, "index": view.applied_index})


@es_routes.delete("/v1/streams/{stream}")
async def delete_stream(request: web.Request) -> web.Response:
    stream = _stream_id(request)
    body = await s.json_body(request, {"expected_version", "request_id"}, required=False)
    args: dict[str, Any] = {"stream": stream}
    raw = body.get("expected_version", request.query.get("expected_version"))
    if raw is not None:
        if isinstance(raw, str) and raw.lstrip("-").isdigit():
            raw = int(raw)
        args["expected_version"] = raw
    command = s.command(EsDelete, args)
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@es_routes.put("/v1/streams/{stream}/snapshot")
async def put_snapshot(request: web.Request) -> web.Response:
    stream = _stream_id(request)
    body = await s.json_body(request, {*SNAPSHOT_FIELDS, "request_id"} - {"stream"})
    command = s.command(EsSnapshot, {"stream": stream, **{k: v for k, v in body.items() if k != "request_id"}})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@es_routes.get("/v1/streams")
async def list_streams(request: web.Request) -> web.Response:
    category = request.query.get("category")
    if category is not None:
        category = s.name(category, "category", MAX_STREAM_ID_LEN)
    after = request.query.get("after", "")
    limit = s.query_int(request, "limit", 100, 1, LIST_LIMIT_MAX) or 100
    node = node_of(request)
    view = await node.view(s.consistency(request))
    page = view.stream_list(category, after, limit)
    return ok({"streams": page, "next": page[-1]["stream"] if len(page) == limit else None,
               "index": view.applied_index})


@es_routes.get("/v1/eventstore")
async def describe_store(request: web.Request) -> web.Response:
    node = node_of(request)
    view = await node.view(s.consistency(request))
    return ok({**view.event_store_summary(), "index": view.applied_index})


# -- categories -------------------------------------------------------------------------------


@es_routes.get("/v1/categories/{category}/events")
async def read_category(request: web.Request) -> web.Response:
    category = _category(request)
    from_position = s.query_int(request, "from_position", 1, 1, MAX_POSITION) or 1
    limit = s.query_int(request, "limit", 100, 1, READ_LIMIT_MAX) or 100
    node = node_of(request)
    view = await node.view(s.consistency(request))
    page = view.category_page(category, from_position, limit)
    return ok({**page, "index": view.applied_index})


@es_routes.get("/v1/categories/{category}/watch")
async def watch_category(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: every event appended to the category from
    ``from_position`` on (default: from now), ``id:`` its position, so a
    reconnecting client resumes with ``Last-Event-ID``."""
    category = _category(request)
    from_position = sse_resume(request, "from_position")
    stream = node_of(request).local_view.watch_category(category, from_position)
    return await sse(request, stream, _event_frame)


def _event_frame(event: Any) -> tuple[int, str, dict[str, Any]]:
    return event.position, event.type, event.describe()


# -- projections ------------------------------------------------------------------------------


def _projection_name(request: web.Request) -> str:
    return checked(lambda: check_name(request.match_info["name"]))


@es_routes.put("/v1/projections/{name}")
async def put_projection(request: web.Request) -> web.Response:
    name = _projection_name(request)
    body = await s.json_body(request, {*DEFINITION_FIELDS, "request_id"})
    definition = {k: v for k, v in body.items() if k != "request_id"}
    command = s.command(ProjectionPut, {"name": name, "definition": definition})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@es_routes.get("/v1/projections/{name}")
async def get_projection(request: web.Request) -> web.Response:
    name = _projection_name(request)
    node = node_of(request)
    view = await node.view(s.consistency(request))
    projection = view.projection(name)
    if projection is None:
        raise NotFound(f"projection {name!r} does not exist")
    visibility(request).check_source(request, f"projection {name!r}", projection.definition["source"])
    return ok({**projection.describe(), "applied_index": view.applied_index})


@es_routes.get("/v1/projections")
async def list_projections(request: web.Request) -> web.Response:
    node = node_of(request)
    view = await node.view(s.consistency(request))
    readable = visibility(request).readable(view.projections())
    return ok({"projections": [p.describe() for p in readable], "applied_index": view.applied_index})


@es_routes.post("/v1/projections/{name}/rebuild")
async def rebuild_projection(request: web.Request) -> web.Response:
    name = _projection_name(request)
    body = await s.json_body(request, {"request_id"}, required=False)
    return ok(await node_of(request).write_command(ProjectionRebuild(name), s.origin(request, body)))


@es_routes.delete("/v1/projections/{name}")
async def delete_projection(request: web.Request) -> web.Response:
    name = _projection_name(request)
    body = await s.json_body(request, {"request_id"}, required=False)
    return ok(await node_of(request).write_command(ProjectionDelete(name), s.origin(request, body)))
