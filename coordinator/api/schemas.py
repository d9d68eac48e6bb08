"""Parsing of request bodies and query strings into plain, checked values.

Every failure is an ``InvalidInput`` naming the field, raised before
anything is proposed, so bad input never reaches the log.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web

from coordinator.api.auth import principal_of
from coordinator.api.keys import IMPLIED_REQUEST_ID
from coordinator.api.spec import REQUEST_ID_MAX_LEN, Op
from coordinator.codec import check_value
from coordinator.commands.base import MAX_KEY_LEN, MAX_NAME_LEN, DomainCommand, Rejected
from coordinator.commands.kv import check_key
from coordinator.errors import InvalidInput
from coordinator.services.proposals import request_key, state_error
from coordinator.types import RequestKey

MAX_REQUEST_ID_LEN = REQUEST_ID_MAX_LEN
MAX_DEPTH = 100  # JSON nesting; msgpack refuses ~500, json.loads ~1000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

C = TypeVar("C", bound=DomainCommand)


def command(command_type: type[C], args: Mapping[str, Any]) -> C:
    """``command_type.parse(args)``: the command's own validation, run before
    proposing; its refusal is this request's error (400 naming the field)."""
    try:
        return command_type.parse(args)
    except Rejected as exc:
        raise state_error(exc.code, exc.message) from None


async def json_body(request: web.Request, op: Op) -> dict[str, Any]:
    """The request's JSON object, every field one of ``op``'s: the route's
    declaration (``api.spec``), which the OpenAPI document describes, is the
    only list of the fields a handler accepts. Without a body: ``{}``, or a
    400 naming ``body`` when ``op.body_required``."""
    allowed, required = op.fields, op.body_required
    raw = await request.read()
    if not raw:
        if required:
            raise InvalidInput("body: a JSON object is required", field="body")
        return {}
    try:
        # json.loads(bytes) with these hooks, without building a decoder per request
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"body: not valid JSON ({exc.__class__.__name__})", field="body") from None
    except RecursionError:
        raise InvalidInput(f"body: nested deeper than {MAX_DEPTH} levels", field="body") from None
    if not isinstance(body, dict):
        raise InvalidInput("body: must be a JSON object", field="body")
    unknown = sorted(set(body) - allowed)
    if unknown:
        if not unknown[0]:  # "" sorts first: a 400 must name a field, and "" names none
            raise InvalidInput("body: a field with an empty name", field="body")
        raise InvalidInput(f"{unknown[0]}: unknown field", field=unknown[0])
    for field, value in body.items():
        check_value(value, field, MAX_DEPTH)
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf, which JSON cannot carry back
        raise ValueError(f"{text} is out of range")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def name(value: Any, field: str, max_len: int = MAX_NAME_LEN) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: must be a string", field=field)
    if not value or len(value) > max_len:
        raise InvalidInput(f"{field}: must have 1 to {max_len} characters", field=field)
    if _CONTROL.search(value) is not None:
        raise InvalidInput(f"{field}: must not contain control characters", field=field)
    check_value(value, field)  # headers and paths may carry undecodable bytes as surrogates
    return value


def integer(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field}: must be an integer", field=field)
    if not low <= value <= high:
        raise InvalidInput(f"{field}: must be between {low} and {high}", field=field)
    return value


def number(value: Any, field: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{field}: must be a number", field=field)
    if not low <= value <= high:
        raise InvalidInput(f"{field}: must be between {low} and {high}", field=field)
    return value


def obj(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{field}: must be an object", field=field)
    return value


def query_int(request: web.Request, field: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query.get(field)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"{field}: must be an integer", field=field) from None
    return integer(value, field, low, high)


def query_float(request: web.Request, field: str, default: float, low: float, high: float) -> float:
    raw = request.query.get(field)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"{field}: must be a number", field=field) from None
    return number(value, field, low, high)


def consistency(request: web.Request) -> str:
    value = request.query.get("consistency", "linearizable")
    if value not in ("linearizable", "stale"):
        raise InvalidInput("consistency: must be linearizable or stale", field="consistency")
    return value


def origin(request: web.Request, body: dict[str, Any]) -> RequestKey:
    """Who asks (its principal: what it stores is charged to it) and the
    request's idempotency key: ``request_id`` in the body, else the
    ``Idempotency-Key`` header, else a signed request's own (from its nonce,
    ``api.auth``). The key is scoped to the principal, with a digest of the
    method, path and body (without ``request_id``): a retry must repeat the
    request, or the log answers 409 naming request_id."""
    principal = principal_of(request)
    who = "anonymous" if principal is None else principal.header()
    value = body.get("request_id", request.headers.get("Idempotency-Key"))
    if value is None:
        value = request.get(IMPLIED_REQUEST_ID)
        if value is None:
            return RequestKey(who)
    else:
        value = name(value, "request_id", MAX_REQUEST_ID_LEN)
    rest = {k: v for k, v in body.items() if k != "request_id"}
    return request_key(who, value, request.method, request.path_qs,
                       json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def prefix(request: web.Request) -> str:
    """``?prefix=`` of list and watch: empty means everything."""
    value = request.query.get("prefix", "")
    if len(value) > MAX_KEY_LEN:
        raise InvalidInput(f"prefix: longer than {MAX_KEY_LEN} characters", field="prefix")
    return value


def key(request: web.Request) -> str:
    """The key in the path, checked as the kv commands check it (a bad path
    is answered before the body is read)."""
    try:
        return check_key(request.match_info["key"])
    except Rejected as exc:
        raise state_error(exc.code, exc.message) from None
