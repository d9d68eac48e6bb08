"""HTTP routes of stream processors (windows and patterns over committed
events). A definition is parsed into its command before it is proposed (400
naming the field); the state machine runs the same parse when it applies it."""

from __future__ import annotations

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.routes import checked, node_of, ok
from coordinator.api.spec import ANY, REQUEST_ID, Op, p, string, with_consistency
from coordinator.api.visibility import visibility
from coordinator.commands.streams import DEFINITION_FIELDS, MAX_NAME_LEN, ProcessorDelete, ProcessorPut, check_name
from coordinator.errors import NotFound

stream_routes = web.RouteTableDef()

NAME = string(MAX_NAME_LEN, pattern="^[^/]*$")
# The body is the processor's definition (``commands.streams.DEFINITION_FIELDS``): its parse checks every part.
PUT = Op("Define a stream processor (a window or a pattern)", tags=("eventstore",), path={"name": NAME},
         body={**{f: p(ANY, required=f == "source") for f in DEFINITION_FIELDS}, "request_id": p(REQUEST_ID)})
LIST = Op("Stream processors", tags=("eventstore",), query=with_consistency())
GET = Op("One stream processor", tags=("eventstore",), path={"name": NAME}, query=with_consistency())
DELETE = Op("Delete a stream processor", tags=("eventstore",), path={"name": NAME}, body_required=False,
            body={"request_id": p(REQUEST_ID)})


def _name(request: web.Request) -> str:
    return checked(lambda: check_name(request.match_info["name"]))


@stream_routes.put("/v1/processors/{name}")
@PUT
async def put_processor(request: web.Request) -> web.Response:
    name = _name(request)
    body = await s.json_body(request, PUT)
    definition = {k: v for k, v in body.items() if k != "request_id"}
    command = s.command(ProcessorPut, {"name": name, "definition": definition})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@stream_routes.get("/v1/processors")
@LIST
async def list_processors(request: web.Request) -> web.Response:
    node = node_of(request)
    view = await node.view(s.consistency(request))
    readable = visibility(request).readable(view.processors())
    return ok({"processors": [p.describe() for p in readable], "applied_index": view.applied_index})


@stream_routes.get("/v1/processors/{name}")
@GET
async def get_processor(request: web.Request) -> web.Response:
    name = _name(request)
    node = node_of(request)
    view = await node.view(s.consistency(request))
    processor = view.processor(name)
    if processor is None:
        raise NotFound(f"stream processor {name!r} does not exist")
    visibility(request).check_source(request, f"stream processor {name!r}", processor.definition["source"])
    return ok({**processor.describe(), "applied_index": view.applied_index})


@stream_routes.delete("/v1/processors/{name}")
@DELETE
async def delete_processor(request: web.Request) -> web.Response:
    name = _name(request)
    body = await s.json_body(request, DELETE)
    return ok(await node_of(request).write_command(ProcessorDelete(name), s.origin(request, body)))
