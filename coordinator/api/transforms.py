"""HTTP routes of transform rules: define, read, delete, and try a rule on a
message without defining it. A rule is parsed before it is proposed: a
syntax error is a 400 naming ``rule`` with its ``line`` and ``column``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.routes import node_of, ok
from coordinator.api.spec import REQUEST_ID, Op, obj, p, string, with_consistency
from coordinator.api.visibility import visibility
from coordinator.commands.base import Rejected
from coordinator.commands.messages import normalize
from coordinator.commands.topics import MAX_TOPIC_LEN, check_topic
from coordinator.commands.transforms import (
    MAX_NAME_LEN,
    MAX_RULE_LEN,
    RuleError,
    TransformDelete,
    TransformPut,
    check_name,
    parse,
)
from coordinator.errors import InvalidInput, NotFound
from coordinator.services.proposals import state_error
from coordinator.services.transforms import try_rule_on

transform_routes = web.RouteTableDef()

NAME = string(MAX_NAME_LEN, pattern="^[^/]*$")
RULE = string(MAX_RULE_LEN, description="the rule (docs/bus.md#transforms); a syntax error names line and column")
PUT = Op("Define a transform rule on a topic pattern", tags=("bus",), path={"name": NAME}, body={
    "topic": p(string(MAX_TOPIC_LEN), required=True), "rule": p(RULE, required=True), "request_id": p(REQUEST_ID)})
LIST = Op("Transform rules", tags=("bus",), query=with_consistency())
GET = Op("One transform rule", tags=("bus",), path={"name": NAME}, query=with_consistency())
DELETE = Op("Delete a transform rule", tags=("bus",), path={"name": NAME}, body_required=False,
            body={"request_id": p(REQUEST_ID)})
TRY = Op("Run a rule on a message here (nothing is stored)", tags=("bus",), body={
    "rule": p(RULE, required=True), "message": p(obj()), "topic": p(string(MAX_TOPIC_LEN), "default: try")})


def _checked(attempt: Any) -> Any:
    """Like ``routes.checked``, and a rule's syntax error is a 400 with its line and column."""
    try:
        return attempt()
    except RuleError as exc:
        error = InvalidInput(exc.message, field="rule")
        error.details.update(line=exc.line, column=exc.column)
        raise error from None
    except Rejected as exc:
        raise state_error(exc.code, exc.message) from None


@transform_routes.put("/v1/transforms/{name}")
@PUT
async def put_transform(request: web.Request) -> web.Response:
    name = _checked(lambda: check_name(request.match_info["name"]))
    body = await s.json_body(request, PUT)
    command = _checked(lambda: TransformPut.parse({"name": name, "topic": body.get("topic"), "rule": body.get("rule")}))
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@transform_routes.get("/v1/transforms")
@LIST
async def list_transforms(request: web.Request) -> web.Response:
    node = node_of(request)
    view = await node.view(s.consistency(request))
    sees = visibility(request)
    return ok({"transforms": [t.describe() for t in view.transforms() if sees.topic(t.topic)]})


@transform_routes.get("/v1/transforms/{name}")
@GET
async def get_transform(request: web.Request) -> web.Response:
    name = _checked(lambda: check_name(request.match_info["name"]))
    node = node_of(request)
    transform = (await node.view(s.consistency(request))).transform(name)
    if transform is None:
        raise NotFound(f"transform {name!r} does not exist")
    sees = visibility(request)
    if not sees.topic(transform.topic):
        sees.refuse(request, "receive", transform.topic, f"transform {name!r} is on topics {transform.topic!r}, "
                    "where it holds none of send, receive and subscribe")
    return ok(transform.describe())


@transform_routes.delete("/v1/transforms/{name}")
@DELETE
async def delete_transform(request: web.Request) -> web.Response:
    name = _checked(lambda: check_name(request.match_info["name"]))
    body = await s.json_body(request, DELETE)
    return ok(await node_of(request).write_command(TransformDelete(name), s.origin(request, body)))


@transform_routes.post("/v1/transforms/try")
@TRY
async def try_rule(request: web.Request) -> web.Response:
    """Run ``rule`` on ``message`` here and answer what it made of it (nothing is stored)."""
    body = await s.json_body(request, TRY)
    program = _checked(lambda: parse(body.get("rule")))
    topic = _checked(lambda: check_topic(body.get("topic", "try"), "topic"))
    raw = s.obj(body.get("message", {}), "message")
    now_ms = node_of(request).clock.now_ms()
    message = _checked(lambda: normalize({"id": "try", "type": "event", "source": "try", **raw}, now_ms))
    return ok(try_rule_on(program, topic, message))
