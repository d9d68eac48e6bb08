"""HTTP routes of the bus: topics, subscriptions, deliveries, acks, dead
letters, agents' inboxes and request/reply. Parse → one service call → render.

Fetches, streams, requests and at-most-once publishes are served by the
leader; on a follower they are forwarded to it (``_here_or_leader``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from coordinator.api import schemas as s
from coordinator.api.auth import forward_signer, principal_of
from coordinator.api.routes import compact_json, node_of, ok
from coordinator.api.spec import (
    ANY,
    REQUEST_ID,
    Op,
    Schema,
    array,
    boolean,
    integer,
    number,
    obj,
    one_of,
    p,
    string,
    with_consistency,
)
from coordinator.api.visibility import visibility
from coordinator.commands.base import MAX_KEY_LEN
from coordinator.commands.bus import (
    BINDING_MODES,
    MAX_ACK_IDS,
    MAX_ATTEMPTS,
    MAX_BACKLOG,
    MAX_BATCH,
    MAX_DELAY_MS,
    MAX_DELIVERY_ID_LEN,
    MAX_FETCH,
    MAX_OFFSET,
    MAX_RETAINED_AGE_MS,
    MAX_RETAINED_MESSAGES,
    MAX_TRANSPORT_KEY_LEN,
    MAX_TRANSPORT_NAME_LEN,
    MAX_URL_LEN,
    MIN_ACK_TIMEOUT_MS,
    MIN_RETAINED_AGE_MS,
    START_KINDS,
    BusBind,
    BusDlqPurge,
    BusDlqRedrive,
    BusGroupDelete,
    BusSubscribe,
    BusTopicConfigure,
    BusTransportConfigure,
    BusUnbind,
    BusUnsubscribe,
)
from coordinator.commands.filters import MAX_FILTER_LEN
from coordinator.commands.messages import FIELDS as MESSAGE_FIELDS
from coordinator.commands.messages import GUARANTEES, MAX_ID_LEN
from coordinator.commands.messages import TYPES as MESSAGE_TYPES
from coordinator.commands.topics import MAX_TOPIC_LEN
from coordinator.errors import CoordinatorError, Forbidden, InvalidInput, NotFound, OutcomeUnknown, Unavailable
from coordinator.redact import redact_url
from coordinator.services.bus import MESSAGE_JSON, NotLeader
from coordinator.services.node import FORWARD_HEADER, CoordinatorNode

bus_routes = web.RouteTableDef()

WAIT_MAX_S = 60.0
FORWARD_MARGIN_S = 5.0
DLQ_LIMIT_MAX = 10_000
STREAM_WAIT_S = 10.0
READ_LIMIT_MAX = 10_000
REQUEST_TIMEOUT_MIN_S = 0.1
REQUEST_TIMEOUT_MAX_S = 300.0


# -- declarations (``api.spec``): what each route takes; the handlers read their body fields from them -----

TOPIC = string(MAX_TOPIC_LEN)
CONSUMER_ID = string(MAX_ID_LEN)
_RID = {"request_id": p(REQUEST_ID)}
_DELIVERY_IDS = array(string(MAX_DELIVERY_ID_LEN), 1, MAX_ACK_IDS)
# A message's own fields (``commands.messages.FIELDS``): the bus's parse checks them (``prepare``).
_MESSAGE_SCHEMAS: dict[str, Schema] = {"type": one_of(*MESSAGE_TYPES), "payload": ANY, "headers": obj(),
                                       "deliveryOptions": obj(), "id": string(MAX_ID_LEN)}
MESSAGE_BODY = {f: p(_MESSAGE_SCHEMAS.get(f, ANY)) for f in sorted(MESSAGE_FIELDS)}

TOPICS_LIST = Op("Topics with messages or settings", tags=("bus",),
                 query=with_consistency({"prefix": p(string(MAX_KEY_LEN, 0))}))
TOPICS_GET = Op("One topic", tags=("bus",), path={"topic": TOPIC}, query=with_consistency())
TOPICS_CONFIGURE = Op("A topic's retention", tags=("bus",), path={"topic": TOPIC}, body={
    "max_messages": p(integer(1, MAX_RETAINED_MESSAGES)),
    "max_age_s": p(number(MIN_RETAINED_AGE_MS // 1000, MAX_RETAINED_AGE_MS // 1000)), **_RID})
TOPICS_READ = Op("Read retained messages from an offset (no subscription, no acks)", tags=("bus",),
                 path={"topic": TOPIC}, query=with_consistency({
                     "from_offset": p(integer(0, MAX_OFFSET)), "limit": p(integer(1, READ_LIMIT_MAX))}))
TOPICS_PUBLISH = Op("Publish one message (its fields) or a batch (messages)", tags=("bus",), path={"topic": TOPIC},
                    body={**MESSAGE_BODY, "messages": p(array(obj(), 1, MAX_BATCH)), **_RID})
TOPICS_REQUEST = Op("Publish a request and answer with its response (504 when none comes in time)",
                    tags=("bus",), path={"topic": TOPIC},
                    body={**MESSAGE_BODY, "timeout_s": p(number(REQUEST_TIMEOUT_MIN_S, REQUEST_TIMEOUT_MAX_S))})
BINDINGS_BIND = Op("Carry a topic's messages through a broker transport", tags=("bus",), path={"topic": TOPIC},
                   body={"transport": p(string(MAX_TRANSPORT_NAME_LEN), required=True),
                         "backlog_max": p(integer(1, MAX_BACKLOG)), "mode": p(one_of(*BINDING_MODES)), **_RID})
BINDINGS_UNBIND = Op("Stop carrying a topic through a transport", tags=("bus",), path={"topic": TOPIC},
                     body={"drop_backlog": p(boolean()), **_RID}, body_required=False)
BINDINGS_LIST = Op("Bindings with their backlog and transport health", tags=("bus",), query=with_consistency())
TRANSPORTS_CONFIGURE = Op("A broker URL for the whole cluster", tags=("bus",),
                          path={"name": string(MAX_TRANSPORT_NAME_LEN)},
                          body={"url": p(string(MAX_URL_LEN), required=True), **_RID})
TRANSPORTS_REMOVE = Op("Remove a cluster transport URL", tags=("bus",), path={"name": string(MAX_TRANSPORT_NAME_LEN)},
                       body=_RID, body_required=False)
TRANSPORTS_LIST = Op("Transports, where their URL comes from, their health", tags=("bus",),
                     query=with_consistency())
SUBSCRIPTIONS_CREATE = Op("Subscribe to a topic pattern", tags=("bus",), responses={201: None}, body={
    "topic": p(TOPIC, "a topic or a pattern (* one token, > the rest)", required=True),
    "group": p(string(MAX_ID_LEN)), "filter": p(string(MAX_FILTER_LEN)),
    "guarantee": p(one_of(*GUARANTEES)),
    "ack_timeout_s": p(number(MIN_ACK_TIMEOUT_MS / 1000, MAX_DELAY_MS // 1000)),
    "max_attempts": p(integer(1, MAX_ATTEMPTS)), "start": p(one_of("new", "beginning")),
    "start_offset": p(integer(0, MAX_OFFSET)), "start_time_ms": p(integer(0, MAX_OFFSET)),
    "agent": p(string(MAX_ID_LEN)), "key": p(string(MAX_TRANSPORT_KEY_LEN)), **_RID})
SUBSCRIPTIONS_LIST = Op("Subscriptions", tags=("bus",), query=with_consistency())
SUBSCRIPTIONS_GET = Op("One subscription", tags=("bus",), path={"sub": CONSUMER_ID}, query=with_consistency())
SUBSCRIPTIONS_DELETE = Op("Unsubscribe", tags=("bus",), path={"sub": CONSUMER_ID}, body=_RID, body_required=False)
GROUPS_DELETE = Op("Delete a consumer group", tags=("bus",), path={"group": CONSUMER_ID}, body=_RID,
                   body_required=False)
_CONSUMER = {"sub": CONSUMER_ID, "agent": CONSUMER_ID}
FETCH = Op("Fetch deliveries (long poll up to wait_s)", tags=("bus",), path=_CONSUMER, query={
    "max": p(integer(1, MAX_FETCH)), "wait_s": p(number(0, WAIT_MAX_S))})
STREAM = Op("Deliveries as Server-Sent Events", tags=("bus",), path=_CONSUMER, content="text/event-stream",
            query={"max": p(integer(1, MAX_FETCH)), "auto_ack": p(one_of("true", "false"))})
ACK = Op("Acknowledge deliveries", tags=("bus",), path=_CONSUMER,
         body={"delivery_ids": p(_DELIVERY_IDS, required=True), **_RID})
NACK = Op("Give deliveries back (after delay_s), or dead-letter them", tags=("bus",), path=_CONSUMER, body={
    "delivery_ids": p(_DELIVERY_IDS, required=True), "delay_s": p(number(0, MAX_DELAY_MS // 1000)),
    "dead_letter": p(boolean()), **_RID})
DLQ_LIST = Op("Dead letters", tags=("bus",), path=_CONSUMER,
              query=with_consistency({"limit": p(integer(1, DLQ_LIMIT_MAX))}))
DLQ_REDRIVE = Op("Deliver dead letters again (the chosen ones, or all)", tags=("bus",), path=_CONSUMER,
                 body={"delivery_ids": p(_DELIVERY_IDS), **_RID}, body_required=False)
DLQ_PURGE = Op("Drop dead letters (the chosen ones, or all)", tags=("bus",), path=_CONSUMER,
               body={"delivery_ids": p(_DELIVERY_IDS), **_RID}, body_required=False)


async def _here_or_leader(request: web.Request, call: Any, timeout_s: float, render: Any = ok) -> web.Response:
    """Serve ``call()`` on this node (its result as ``render`` makes it a
    response), or forward the request to the leader when the service says
    only the leader can serve it."""
    node = node_of(request)
    try:
        return render(await call())
    except NotLeader:
        if request.headers.get(FORWARD_HEADER) == "1":
            raise Unavailable("this node is not the leader", retry_after_s=0.3, leader=node.leader_http()) from None
    body = await request.read() if request.body_exists else None  # read() returns the bytes json_body read
    status, raw, headers = await node.forward(request.method, request.raw_path, body, timeout_s,
                                              forward_signer(request))
    return web.Response(status=status, body=raw, headers=headers)


def _topic(request: web.Request) -> str:
    return s.name(request.match_info["topic"], "topic", MAX_TOPIC_LEN)


def _selector(request: web.Request) -> dict[str, str]:
    """Which consumer a route names: a subscription, or an agent's inbox."""
    if "sub" in request.match_info:
        return {"sub": s.name(request.match_info["sub"], "id", MAX_ID_LEN)}
    return {"agent": s.name(request.match_info["agent"], "id", MAX_ID_LEN)}


def _delivery_ids(body: dict[str, Any], required: bool = True) -> list[str] | None:
    ids = body.get("delivery_ids")
    if ids is None and not required:
        return None
    if not isinstance(ids, list) or not ids:
        raise InvalidInput("delivery_ids: must be a non-empty list of delivery ids", field="delivery_ids")
    return ids


# -- topics ------------------------------------------------------------------------------

@bus_routes.get("/v1/topics")
@TOPICS_LIST
async def topics_list(request: web.Request) -> web.Response:
    node = node_of(request)
    view = await node.view(s.consistency(request))
    prefix = s.prefix(request)
    return ok({"topics": view.topics(prefix, visibility(request).topic)})


@bus_routes.get("/v1/topics/{topic}")
@TOPICS_GET
async def topics_get(request: web.Request) -> web.Response:
    node = node_of(request)
    name = _topic(request)
    view = await node.view(s.consistency(request))
    sees = visibility(request)
    if not sees.topic(name):
        sees.refuse(request, "receive", name, f"it holds none of send, receive and subscribe on topic {name!r}")
    topic = view.topic(name)
    if topic is None:
        raise NotFound(f"topic {name!r} has no messages and no settings")
    return ok(topic)


@bus_routes.put("/v1/topics/{topic}")
@TOPICS_CONFIGURE
async def topics_configure(request: web.Request) -> web.Response:
    body = await s.json_body(request, TOPICS_CONFIGURE)
    args: dict[str, Any] = {"topic": _topic(request)}
    if body.get("max_messages") is not None:
        args["max_messages"] = body["max_messages"]
    if body.get("max_age_s") is not None:
        args["max_age_ms"] = int(s.number(body["max_age_s"], "max_age_s", MIN_RETAINED_AGE_MS // 1000,
                                          MAX_RETAINED_AGE_MS // 1000) * 1000)
    command = s.command(BusTopicConfigure, args)
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@bus_routes.get("/v1/topics/{topic}/messages")
@TOPICS_READ
async def topics_read(request: web.Request) -> web.Response:
    """Read retained messages directly, from an offset (no subscription, no acks)."""
    node = node_of(request)
    name = _topic(request)
    from_offset = s.query_int(request, "from_offset", 1, 0, MAX_OFFSET)
    limit = s.query_int(request, "limit", 100, 1, READ_LIMIT_MAX)
    page = (await node.view(s.consistency(request))).retained(name, from_offset, limit)
    if page is None:
        return ok({"topic": name, "messages": [], "next_offset": 1, "first_offset": None})
    return ok({"topic": name, "messages": page.messages, "first_offset": page.first_offset,
               "next_offset": page.next_offset})


def _sourced(request: web.Request, raw: list[Any]) -> list[Any]:
    """A message's ``source`` is its publisher's name unless it says otherwise:
    an agent's messages carry its own id (the node fills it in, and refuses
    (403) a message that claims another sender); the admin's say ``admin``
    unless they name a source (the admin may speak for anyone); an anonymous
    caller's get ``BusService.prepare``'s default, ``anonymous``."""
    principal = principal_of(request)
    if principal is not None and principal.kind == "admin":
        return [{"source": "admin", **m} if isinstance(m, dict) else m for m in raw]
    if principal is None or principal.kind != "agent":
        return raw
    out = []
    for message in raw:
        if isinstance(message, dict):
            source = message.get("source", principal.agent_id)
            if source != principal.agent_id:
                raise Forbidden(f"{principal} may not send as {source!r}", permission="source",
                                resource=str(source))
            message = {**message, "source": principal.agent_id}
        out.append(message)
    return out


@bus_routes.post("/v1/topics/{topic}/messages")
@TOPICS_PUBLISH
async def topics_publish(request: web.Request) -> web.Response:
    node = node_of(request)
    topic = _topic(request)
    body = await s.json_body(request, TOPICS_PUBLISH)
    origin = s.origin(request, body)
    body.pop("request_id", None)
    if "messages" in body:
        if set(body) != {"messages"}:
            extra = sorted(set(body) - {"messages"})[0]
            raise InvalidInput(f"{extra}: a batch carries only messages (and request_id)", field=extra)
        if not isinstance(body["messages"], list):
            raise InvalidInput("messages: must be a list of messages", field="messages")
        raw, single = body["messages"], False
    else:
        raw, single = [body], True
    messages = node.bus.prepare(topic, _sourced(request, raw))

    async def publish() -> dict[str, Any]:
        result = await node.bus.publish(topic, messages, origin)
        return {"topic": topic, **result["messages"][0]} if single else result  # a routed message: its new topic

    timeout = node.proposer.timeout_s + FORWARD_MARGIN_S
    if node.bus.needs_leader(topic, messages):
        return await _here_or_leader(request, publish, timeout)
    return ok(await publish())


@bus_routes.post("/v1/topics/{topic}/request")
@TOPICS_REQUEST
async def topics_request(request: web.Request) -> web.Response:
    """Publish a request and answer with the response (504 when none comes in time)."""
    node = node_of(request)
    topic = _topic(request)
    body = await s.json_body(request, TOPICS_REQUEST)
    timeout_s = s.number(body.pop("timeout_s", 30.0), "timeout_s", REQUEST_TIMEOUT_MIN_S, REQUEST_TIMEOUT_MAX_S)
    body["type"] = body.get("type", "request")
    if body["type"] != "request":
        raise InvalidInput("type: a request has type request", field="type")
    body.setdefault("replyTo", node.bus.reply_topic())
    message = node.bus.prepare(topic, _sourced(request, [body]))[0]
    return await _here_or_leader(request, lambda: node.bus.request(topic, message, timeout_s),
                                 timeout_s + FORWARD_MARGIN_S)


# -- transport bindings ---------------------------------------------------------------------

@bus_routes.put("/v1/topics/{topic}/binding")
@BINDINGS_BIND
async def bindings_bind(request: web.Request) -> web.Response:
    """Carry the topic's messages from now on through a broker transport."""
    node = node_of(request)
    body = await s.json_body(request, BINDINGS_BIND)
    transport = s.name(body.get("transport"), "transport", MAX_TRANSPORT_NAME_LEN)
    configured = sorted(node.transports.transports)
    if transport not in configured:
        raise InvalidInput(f"transport: {transport!r} is not configured on this node (configured: "
                           f"{', '.join(configured) or 'none'})", field="transport")
    args: dict[str, Any] = {"topic": _topic(request), "transport": transport}
    if body.get("backlog_max") is not None:
        args["backlog_max"] = body["backlog_max"]
    if body.get("mode") is not None:
        args["mode"] = body["mode"]
    return ok(await node.write_command(s.command(BusBind, args), s.origin(request, body)))


@bus_routes.delete("/v1/topics/{topic}/binding")
@BINDINGS_UNBIND
async def bindings_unbind(request: web.Request) -> web.Response:
    body = await s.json_body(request, BINDINGS_UNBIND)
    args: dict[str, Any] = {"topic": _topic(request)}
    if body.get("drop_backlog") is not None:
        args["drop_backlog"] = body["drop_backlog"]
    return ok(await node_of(request).write_command(s.command(BusUnbind, args), s.origin(request, body)))


@bus_routes.get("/v1/bindings")
@BINDINGS_LIST
async def bindings_list(request: web.Request) -> web.Response:
    """Bindings with their backlog (messages the broker has not confirmed) and
    this node's view of each transport's health (the leader's is the one that drives)."""
    node = node_of(request)
    await node.read_barrier(s.consistency(request))  # then the transport driver reads the replica
    sees = visibility(request)
    return ok({"bindings": [b for b in node.transports.bindings() if sees.topic(b["topic"])],
               "transports": await node.transports.health()})


@bus_routes.put("/v1/transports/{name}")
@TRANSPORTS_CONFIGURE
async def transports_configure(request: web.Request) -> web.Response:
    """A broker URL for the whole cluster (committed); a node's own config wins."""
    body = await s.json_body(request, TRANSPORTS_CONFIGURE)
    name = s.name(request.match_info["name"], "name", MAX_TRANSPORT_NAME_LEN)
    url = body.get("url")
    if url is None:  # a PUT sets a URL; DELETE removes it
        raise InvalidInput("url: must be a URL such as redis://127.0.0.1:6379/0", field="url")
    command = s.command(BusTransportConfigure, {"name": name, "url": url})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@bus_routes.delete("/v1/transports/{name}")
@TRANSPORTS_REMOVE
async def transports_remove(request: web.Request) -> web.Response:
    body = await s.json_body(request, TRANSPORTS_REMOVE)
    name = s.name(request.match_info["name"], "name", MAX_TRANSPORT_NAME_LEN)
    command = s.command(BusTransportConfigure, {"name": name, "url": None})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@bus_routes.get("/v1/transports")
@TRANSPORTS_LIST
async def transports_list(request: web.Request) -> web.Response:
    """Transports this node has, where their URL comes from (passwords hidden), and their health."""
    node = node_of(request)
    view = await node.view(s.consistency(request))
    driver = node.transports
    cluster_urls = view.cluster_transport_urls()
    health = await driver.health()
    out = []
    for name in sorted(set(driver.transports) | set(cluster_urls) | set(driver.config_errors)):
        source = "node" if name in driver.local else "cluster"
        url = cluster_urls.get(name) if source == "cluster" else None
        out.append({"name": name, "source": source, "url": redact_url(url) if url else None,
                    "error": driver.config_errors.get(name), **health.get(name, {"ok": False})})
    return ok({"transports": out})


# -- subscriptions -------------------------------------------------------------------------

@bus_routes.post("/v1/subscriptions")
@SUBSCRIPTIONS_CREATE
async def subscriptions_create(request: web.Request) -> web.Response:
    node = node_of(request)
    body = await s.json_body(request, SUBSCRIPTIONS_CREATE)
    # The API's own checks: a topic named as a string first (its tokens are the
    # parse's), the seconds of ack_timeout_s, and which of the start fields is given.
    args: dict[str, Any] = {"topic": s.name(body.get("topic"), "topic", MAX_TOPIC_LEN)}
    for name in ("key", "group", "filter"):
        if body.get(name) is not None:
            args[name] = body[name]
    args["guarantee"] = body.get("guarantee", "at-least-once")
    if body.get("ack_timeout_s") is not None:
        args["ack_timeout_ms"] = int(s.number(body["ack_timeout_s"], "ack_timeout_s", MIN_ACK_TIMEOUT_MS / 1000,
                                              MAX_DELAY_MS // 1000) * 1000)
    for name in ("max_attempts", "agent"):
        if body.get(name) is not None:
            args[name] = body[name]
    args.update(_start(body))
    result = await node.write_command(s.command(BusSubscribe, args), s.origin(request, body))
    return ok(result, status=201)


def _start(body: dict[str, Any]) -> dict[str, Any]:
    given = [f for f in ("start", "start_offset", "start_time_ms") if body.get(f) is not None]
    if len(given) > 1:
        raise InvalidInput(f"{given[1]}: give only one of start, start_offset and start_time_ms", field=given[1])
    if body.get("start_offset") is not None:
        return {"start": "offset", "start_value": s.integer(body["start_offset"], "start_offset", 0, MAX_OFFSET)}
    if body.get("start_time_ms") is not None:
        return {"start": "time", "start_value": s.integer(body["start_time_ms"], "start_time_ms", 0, MAX_OFFSET)}
    start = body.get("start", "new")
    if start not in ("new", "beginning"):
        kinds = ", ".join(k for k in START_KINDS if k in ("new", "beginning"))
        raise InvalidInput(f"start: must be {kinds} (or give start_offset or start_time_ms)", field="start")
    return {"start": start}


@bus_routes.get("/v1/subscriptions")
@SUBSCRIPTIONS_LIST
async def subscriptions_list(request: web.Request) -> web.Response:
    node = node_of(request)
    view = await node.view(s.consistency(request))
    sees = visibility(request)
    return ok({"subscriptions": [sub.describe() for sub in view.subscriptions()
                                 if sees.consumer(sub.owner, sub.pattern)]})


@bus_routes.get("/v1/subscriptions/{sub}")
@SUBSCRIPTIONS_GET
async def subscriptions_get(request: web.Request) -> web.Response:
    node = node_of(request)
    sub_id = _selector(request)["sub"]
    sub = (await node.view(s.consistency(request))).subscription(sub_id)
    if sub is None:
        raise NotFound(f"subscription {sub_id!r} does not exist")
    pattern = sub.pattern
    sees = visibility(request)
    if not sees.consumer(sub.owner, pattern):
        sees.refuse(request, "receive", pattern or sub_id, f"subscription {sub_id!r} is another agent's, "
                    f"on {pattern!r}, where it may not receive")
    return ok(sub.describe())


@bus_routes.delete("/v1/subscriptions/{sub}")
@SUBSCRIPTIONS_DELETE
async def subscriptions_delete(request: web.Request) -> web.Response:
    body = await s.json_body(request, SUBSCRIPTIONS_DELETE)
    command = s.command(BusUnsubscribe, _selector(request))
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


@bus_routes.delete("/v1/groups/{group}")
@GROUPS_DELETE
async def groups_delete(request: web.Request) -> web.Response:
    body = await s.json_body(request, GROUPS_DELETE)
    group = s.name(request.match_info["group"], "group", MAX_ID_LEN)
    command = s.command(BusGroupDelete, {"group": group})
    return ok(await node_of(request).write_command(command, s.origin(request, body)))


# -- deliveries (a subscription's, or an agent's inbox) ------------------------------------------

async def _at_group_reader(node: CoordinatorNode, selector: dict[str, str], method: str, path_qs: str,
                           body: bytes | None, timeout_s: float, sign: Any
                           ) -> tuple[int, bytes, dict[str, str]] | None:
    """A direct group that one node must read (Kafka, ``ReadsGroupsOnOneNode``)
    is read by the first member in the ranking of its consumer key that this
    node reaches: the request goes there, marked as forwarded, and its answer
    is returned (this node then forgets what it read of the group). None
    when this node serves it: another kind of consumer, or this node ranks
    first among the members it reaches. A member that cannot be connected
    to (nothing sent) is skipped; one that fails after that answers 503 or
    504 like a forward to the leader."""
    key = node.bus.one_reader_group(selector)
    if key is None:
        return None
    for _member, http, connected, me in node.ranked_members(key):
        if me:
            return None
        if not connected or not http:
            continue
        try:
            answer = await node.forward(method, path_qs, body, timeout_s, sign, to=http)
        except Unavailable:
            continue
        await node.bus.release_group(selector)
        return answer
    return None


async def _forward_to_group_reader(request: web.Request, selector: dict[str, str], timeout_s: float
                                   ) -> web.Response | None:
    if request.headers.get(FORWARD_HEADER) == "1":  # sent here by another node: served here
        return None
    body = await request.read() if request.body_exists else None
    answer = await _at_group_reader(node_of(request), selector, request.method, request.raw_path, body, timeout_s,
                                    forward_signer(request))
    if answer is None:
        return None
    status, raw, headers = answer
    return web.Response(status=status, body=raw, headers=headers)


@FETCH
async def fetch(request: web.Request) -> web.Response:
    node = node_of(request)
    selector = _selector(request)
    max_n = s.query_int(request, "max", 10, 1, MAX_FETCH)
    wait_s = s.query_float(request, "wait_s", 0.0, 0.0, WAIT_MAX_S)
    forwarded = await _forward_to_group_reader(request, selector, wait_s + FORWARD_MARGIN_S)
    if forwarded is not None:
        return forwarded
    return await _here_or_leader(request, lambda: node.bus.fetch(selector, max_n, wait_s), wait_s + FORWARD_MARGIN_S,
                                 render_fetched)


def render_fetched(result: dict[str, Any]) -> web.Response:
    """A fetch's response. Where the service passed a message's JSON text as
    the broker holds it (``MESSAGE_JSON``), that text is copied into the
    delivery instead of encoding the parsed message again (a tenth of a
    direct-mode node's CPU per message went to that); the JSON a client reads
    is the same."""
    texts = result.pop(MESSAGE_JSON, None)
    if not texts:
        return ok(result)
    parts = []
    for delivery, text in zip(result["messages"], texts, strict=True):
        if text:
            envelope = compact_json({k: v for k, v in delivery.items() if k != "message"})
            parts.append(b"".join((envelope[:-1].encode(), b',"message":', text, b"}")))
        else:
            parts.append(compact_json(delivery).encode())
    rest = compact_json({k: v for k, v in result.items() if k != "messages"})
    body = b"".join((b'{"messages":[', b",".join(parts), b"]", b"," if len(rest) > 2 else b"", rest[1:].encode()))
    return web.Response(body=body, content_type="application/json", charset="utf-8")


@STREAM
async def stream(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: one ``message`` event per delivery (its id is the
    delivery id). ``auto_ack=true`` acks each batch once written."""
    node = node_of(request)
    selector = _selector(request)
    max_n = s.query_int(request, "max", 100, 1, MAX_FETCH)
    auto_ack = request.query.get("auto_ack", "false")
    if auto_ack not in ("true", "false"):
        raise InvalidInput("auto_ack: must be true or false", field="auto_ack")
    base = request.raw_path.split("?")[0].rsplit("/", 1)[0]
    sign = forward_signer(request)
    first = await _fetch_anywhere(node, selector, base, max_n, 0.0, sign)  # errors before the stream starts are JSON
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write(b": connected\n\n")
    batch = first
    try:
        while not node.bus.closing:
            if batch:
                chunks = [f"id: {d['delivery_id']}\nevent: message\ndata: {json.dumps(d, separators=(',', ':'))}\n\n"
                          for d in batch]
                await response.write("".join(chunks).encode())
                acks = [d["delivery_id"] for d in batch if d["guarantee"] != "at-most-once"]
                if auto_ack == "true" and acks:
                    await _ack_anywhere(node, base, selector, acks, sign)
            else:
                await response.write(b": keepalive\n\n")
            try:
                batch = await _fetch_anywhere(node, selector, base, max_n, STREAM_WAIT_S, sign)
            except CoordinatorError as exc:
                if exc.code in ("unavailable", "not_leader", "outcome_unknown"):
                    await asyncio.sleep(0.3)  # an election: try again
                    batch = []
                    continue
                payload = json.dumps({"code": exc.code, "message": exc.message})
                await response.write(f"event: error\ndata: {payload}\n\n".encode())
                break
    except ConnectionResetError:
        pass  # the client went away; what it did not ack comes back after the ack timeout
    return response


async def _fetch_anywhere(node: CoordinatorNode, selector: dict[str, str], base: str, max_n: int,
                          wait_s: float, sign: Any) -> list[dict[str, Any]]:
    """A fetch served here when this node is the leader (or serves the
    consumer's direct group), else by the leader (or the group's reader)."""
    path_qs = f"{base}/messages?max={max_n}&wait_s={wait_s}"
    answer = await _at_group_reader(node, selector, "GET", path_qs, None, wait_s + FORWARD_MARGIN_S, sign)
    if answer is None:
        try:
            return (await node.bus.fetch(selector, max_n, wait_s))["messages"]
        except NotLeader:
            pass
        answer = await node.forward("GET", path_qs, None, wait_s + FORWARD_MARGIN_S, sign)
    status, raw, _ = answer
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    if status == 200 and isinstance(body, dict) and isinstance(body.get("messages"), list):
        return body["messages"]
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = str(error.get("message", f"the leader answered {status}"))
    if status == 404:
        raise NotFound(message)
    if status == 504:
        raise OutcomeUnknown(message)
    raise Unavailable(message, retry_after_s=0.5) if status >= 500 else CoordinatorError(message)


async def _ack_anywhere(node: CoordinatorNode, base: str, selector: dict[str, str], ids: list[str],
                        sign: Any) -> None:
    body = json.dumps({"delivery_ids": ids}).encode()
    timeout_s = node.proposer.timeout_s + FORWARD_MARGIN_S
    answer = await _at_group_reader(node, selector, "POST", f"{base}/ack", body, timeout_s, sign)
    try:
        if answer is None:
            await node.bus.ack(selector, ids)
    except NotLeader:
        answer = await node.forward("POST", f"{base}/ack", body, timeout_s, sign)
    if answer is not None:
        status = answer[0]
        if status == 504:
            raise OutcomeUnknown("the node serving the ack answered 504: it may have been applied") from None
        if status != 200:
            raise Unavailable(f"the node serving the ack answered {status}", retry_after_s=0.5) from None


@ACK
async def ack(request: web.Request) -> web.Response:
    node = node_of(request)
    body = await s.json_body(request, ACK)
    selector, ids, origin = _selector(request), _delivery_ids(body), s.origin(request, body)
    forwarded = await _forward_to_group_reader(request, selector, node.proposer.timeout_s + FORWARD_MARGIN_S)
    if forwarded is not None:
        return forwarded
    return await _here_or_leader(request, lambda: node.bus.ack(selector, ids or [], origin),
                                 node.proposer.timeout_s + FORWARD_MARGIN_S)


@NACK
async def nack(request: web.Request) -> web.Response:
    body = await s.json_body(request, NACK)
    args: dict[str, Any] = {**_selector(request), "delivery_ids": _delivery_ids(body)}
    if body.get("delay_s") is not None:
        args["delay_ms"] = int(s.number(body["delay_s"], "delay_s", 0, MAX_DELAY_MS // 1000) * 1000)
    if body.get("dead_letter") is not None:
        # BusNack.parse checks it too; a transport subscription's nack is not a command
        if not isinstance(body["dead_letter"], bool):
            raise InvalidInput("dead_letter: must be true or false", field="dead_letter")
        args["dead_letter"] = body["dead_letter"]
    node = node_of(request)
    selector = _selector(request)
    del args["sub" if "sub" in selector else "agent"]
    origin = s.origin(request, body)
    forwarded = await _forward_to_group_reader(request, selector, node.proposer.timeout_s + FORWARD_MARGIN_S)
    if forwarded is not None:
        return forwarded
    return await _here_or_leader(request, lambda: node.bus.nack(selector, args, origin),
                                 node.proposer.timeout_s + FORWARD_MARGIN_S)


@DLQ_LIST
async def dlq_list(request: web.Request) -> web.Response:
    node = node_of(request)
    selector = _selector(request)
    limit = s.query_int(request, "limit", 100, 1, DLQ_LIMIT_MAX)
    view = await node.view(s.consistency(request))
    found = view.dead_letters(node.bus.consumer_key(selector), limit)
    if found is None and not view.is_registered(selector.get("agent", "")):
        raise NotFound(f"agent {selector['agent']!r} is not registered")
    letters, count = found or ([], 0)
    return ok({"dead_letters": letters, "count": count})


async def _dlq_write(request: web.Request, command_type: type[BusDlqRedrive], op: Op) -> web.Response:
    """Redrive or purge dead letters: the chosen ``delivery_ids``, or all."""
    body = await s.json_body(request, op)
    args: dict[str, Any] = dict(_selector(request))
    ids = _delivery_ids(body, required=False)
    if ids is not None:
        args["delivery_ids"] = ids
    return ok(await node_of(request).write_command(s.command(command_type, args), s.origin(request, body)))


@DLQ_REDRIVE
async def dlq_redrive(request: web.Request) -> web.Response:
    return await _dlq_write(request, BusDlqRedrive, DLQ_REDRIVE)


@DLQ_PURGE
async def dlq_purge(request: web.Request) -> web.Response:
    return await _dlq_write(request, BusDlqPurge, DLQ_PURGE)


for _prefix in ("/v1/subscriptions/{sub}", "/v1/agents/{agent}"):
    bus_routes.get(_prefix + "/messages")(fetch)
    bus_routes.get(_prefix + "/stream")(stream)
    bus_routes.post(_prefix + "/ack")(ack)
    bus_routes.post(_prefix + "/nack")(nack)
    bus_routes.get(_prefix + "/dlq")(dlq_list)
    bus_routes.post(_prefix + "/dlq/redrive")(dlq_redrive)
    bus_routes.post(_prefix + "/dlq/purge")(dlq_purge)
