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
from coordinator.api.spec import ANY, REQUEST_ID, Op, array, integer, obj, one_of, p, string, with_consistency
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
from coordinator.commands.projections import MAX_NAME_LEN as PROJECTION_NAME_MAX_LEN
from coordinator.errors import InvalidInput, NotFound

es_routes = web.RouteTableDef()

READ_LIMIT_MAX = 1000
LIST_LIMIT_MAX = 1000

_RID = {"request_id": p(REQUEST_ID)}
STREAM = string(MAX_STREAM_ID_LEN)
CATEGORY = string(MAX_STREAM_ID_LEN)
PROJECTION = string(PROJECTION_NAME_MAX_LEN, pattern="^[^/]*$")
_EXPECTED = p(ANY, "the stream's current version (-1: it must not exist); 409 otherwise")
APPEND = Op("Append events to a stream", tags=("eventstore",), path={"stream": STREAM}, responses={201: None},
            body={"events": p(array(obj(), 1), required=True), "expected_version": _EXPECTED, **_RID})
READ = Op("Read a stream (with its snapshot)", tags=("eventstore",), path={"stream": STREAM},
          query=with_consistency({"direction": p(one_of("forward", "backward")),
                                  "from_version": p(integer(0, MAX_VERSION)),
                                  "limit": p(integer(1, READ_LIMIT_MAX))}))
DELETE = Op("Delete a stream", tags=("eventstore",), path={"stream": STREAM}, body_required=False,
            query={"expected_version": p(string(32), "as in the body")},
            body={"expected_version": _EXPECTED, **_RID})
# The snapshot's fields (``commands.eventstore.SNAPSHOT_FIELDS``), the stream from the path.
SNAPSHOT = Op("Snapshot a stream (and truncate it)", tags=("eventstore",), path={"stream": STREAM},
              body={**{f: p(ANY, required=f in ("version", "state")) for f in SNAPSHOT_FIELDS if f != "stream"},
                    **_RID})
LIST = Op("Stream ids (of a category), paged", tags=("eventstore",), query=with_consistency({
    "category": p(CATEGORY), "after": p(string(MAX_STREAM_ID_LEN, 0)), "limit": p(integer(1, LIST_LIMIT_MAX))}))
STORE = Op("The event store's totals and limits", tags=("eventstore",), query=with_consistency())
CATEGORY_READ = Op("A category's events in commit order", tags=("eventstore",), path={"category": CATEGORY},
                   query=with_consistency({"from_position": p(integer(1, MAX_POSITION)),
                                           "limit": p(integer(1, READ_LIMIT_MAX))}))
CATEGORY_WATCH = Op("A category's events, live (Server-Sent Events; Last-Event-ID resumes)", tags=("eventstore",),
                    path={"category": CATEGORY}, content="text/event-stream",
                    query={"from_position": p(integer(1, MAX_POSITION))})
# A projection's definition (``commands.projections.DEFINITION_FIELDS``): its parse checks every part.
PROJECTION_PUT = Op("Define a projection", tags=("eventstore",), path={"name": PROJECTION},
                    body={**{f: p(ANY) for f in DEFINITION_FIELDS}, **_RID})
PROJECTION_GET = Op("One projection and its state", tags=("eventstore",), path={"name": PROJECTION},
                    query=with_consistency())
PROJECTIONS = Op("Projections", tags=("eventstore",), query=with_consistency())
PROJECTION_REBUILD = Op("Rebuild a projection from the start", tags=("eventstore",), path={"name": PROJECTION},
                        body=_RID, body_required=False)
PROJECTION_DELETE = Op("Delete a projection", tags=("eventstore",), path={"name": PROJECTION}, body=_RID,
                       body_required=False)


def _stream_id(request: web.Request) -> str:
    return s.name(request.match_info["stream"], "stream", MAX_STREAM_ID_LEN)


def _category(request: web.Request) -> str:
    category = s.name(request.match_info["category"], "category", MAX_STREAM_ID_LEN)
    return checked(lambda: check_category(category, "category"))


# -- streams ----------------------------------------------------------------------------------


@es_routes.post("/v1/streams/{stream}")
@APPEND
async def append(request: web.Request) -> web.Response:
    stream = _stream_id(request)
    body = await s.json_body(request, APPEND)
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
@READ
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
@DELETE
async def delete_stream(request: web.Request) -> web.Response:
    stream = _stream_id(request)
    body = await s.json_body(request, DELETE)
    args: dict[str, Any] = {"stream": stream}
    raw = body.get("expected_version", request.query.get("expected_version"))
    if raw is not None:
        if isinstance(raw, str) and raw.lstrip("-").isdigit():
            raw = int(raw)
        args["expected_version"] = raw
    command = s.command(EsDelete, args)
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@es_routes.put("/v1/streams/{stream}/snapshot")
@SNAPSHOT
async def put_snapshot(request: web.Request) -> web.Response:
    stream = _stream_id(request)
    body = await s.json_body(request, SNAPSHOT)
    command = s.command(EsSnapshot, {"stream": stream, **{k: v for k, v in body.items() if k != "request_id"}})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@es_routes.get("/v1/streams")
@LIST
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
@STORE
async def describe_store(request: web.Request) -> web.Response:
    node = node_of(request)
    view = await node.view(s.consistency(request))
    return ok({**view.event_store_summary(), "index": view.applied_index})


# -- categories -------------------------------------------------------------------------------


@es_routes.get("/v1/categories/{category}/events")
@CATEGORY_READ
async def read_category(request: web.Request) -> web.Response:
    category = _category(request)
    from_position = s.query_int(request, "from_position", 1, 1, MAX_POSITION) or 1
    limit = s.query_int(request, "limit", 100, 1, READ_LIMIT_MAX) or 100
    node = node_of(request)
    view = await node.view(s.consistency(request))
    page = view.category_page(category, from_position, limit)
    return ok({**page, "index": view.applied_index})


@es_routes.get("/v1/categories/{category}/watch")
@CATEGORY_WATCH
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
@PROJECTION_PUT
async def put_projection(request: web.Request) -> web.Response:
    name = _projection_name(request)
    body = await s.json_body(request, PROJECTION_PUT)
    definition = {k: v for k, v in body.items() if k != "request_id"}
    command = s.command(ProjectionPut, {"name": name, "definition": definition})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@es_routes.get("/v1/projections/{name}")
@PROJECTION_GET
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
@PROJECTIONS
async def list_projections(request: web.Request) -> web.Response:
    node = node_of(request)
    view = await node.view(s.consistency(request))
    readable = visibility(request).readable(view.projections())
    return ok({"projections": [p.describe() for p in readable], "applied_index": view.applied_index})


@es_routes.post("/v1/projections/{name}/rebuild")
@PROJECTION_REBUILD
async def rebuild_projection(request: web.Request) -> web.Response:
    name = _projection_name(request)
    body = await s.json_body(request, PROJECTION_REBUILD)
    return ok(await node_of(request).write_command(ProjectionRebuild(name), s.origin(request, body)))


@es_routes.delete("/v1/projections/{name}")
@PROJECTION_DELETE
async def delete_projection(request: web.Request) -> web.Response:
    name = _projection_name(request)
    body = await s.json_body(request, PROJECTION_DELETE)
    return ok(await node_of(request).write_command(ProjectionDelete(name), s.origin(request, body)))
