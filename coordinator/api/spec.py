"""Declarations of what each route takes and answers, attached to its
handler, read by the handler itself and by ``api.openapi``.

An ``Op`` names a route's JSON body fields (with JSON Schemas built from
the same limits the parsers check), its query parameters and its main
responses. Decorating a handler with it attaches it; the handler passes it
to ``schemas.json_body`` (which takes nothing else), so the fields the code
accepts and the fields the document describes are one set and cannot drift
apart. Where a command type lists its fields (``DEFINITION_FIELDS``,
``POLICY_FIELDS``, ``messages.FIELDS``...), the declaration is built from
that list.

Pure data: nothing here parses a request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

ATTR = "__coord_op__"
MAX_INT = 2**63 - 1

Schema = dict[str, Any]
F = TypeVar("F", bound=Callable[..., Any])


# -- schema builders (JSON Schema 2020-12, as OpenAPI 3.1 takes it) ---------------------------

def string(max_len: int, min_len: int = 1, **extra: Any) -> Schema:
    return {"type": "string", "minLength": min_len, "maxLength": max_len, **extra}


def integer(low: int, high: int = MAX_INT) -> Schema:
    return {"type": "integer", "minimum": low, "maximum": high}


def number(low: float, high: float) -> Schema:
    return {"type": "number", "minimum": low, "maximum": high}


def boolean() -> Schema:
    return {"type": "boolean"}


def one_of(*values: str) -> Schema:
    return {"type": "string", "enum": list(values)}


def array(items: Schema, min_items: int = 0, max_items: int | None = None) -> Schema:
    out: Schema = {"type": "array", "items": items, "minItems": min_items}
    if max_items is not None:
        out["maxItems"] = max_items
    return out


def obj(properties: Mapping[str, Schema] | None = None, required: tuple[str, ...] = (),
        additional: bool = True) -> Schema:
    out: Schema = {"type": "object"}
    if properties:
        out["properties"] = dict(properties)
    if required:
        out["required"] = list(required)
    if not additional:
        out["additionalProperties"] = False
    return out


ANY: Schema = {}  # any JSON value
REQUEST_ID_MAX_LEN = 128  # schemas.MAX_REQUEST_ID_LEN (schemas imports this module)
REQUEST_ID = string(REQUEST_ID_MAX_LEN, description="idempotency key: a retry with the same id is applied once")
CONSISTENCY = one_of("linearizable", "stale")


@dataclass(frozen=True)
class Param:
    """One query parameter (or a body field): its schema, whether it is required."""

    schema: Schema
    required: bool = False
    description: str = ""


def p(schema: Schema, description: str = "", *, required: bool = False) -> Param:
    return Param(schema, required, description)


@dataclass(frozen=True)
class Op:
    """What one route takes and answers.

    ``body``: the JSON object's fields (``None``: the route reads no body);
    ``body_required``: an empty body is a 400. ``query``: its parameters.
    ``responses``: status -> schema of the JSON body (``None``: any object).
    ``content``: the success media type when it is not JSON (an SSE stream, a file).
    """

    summary: str
    body: Mapping[str, Param] | None = None
    body_required: bool = True
    query: Mapping[str, Param] = field(default_factory=dict)
    responses: Mapping[int, Schema | None] = field(default_factory=lambda: {200: None})
    content: str = "application/json"
    path: Mapping[str, Schema] = field(default_factory=dict)  # path parameters' schemas (else a string)
    tags: tuple[str, ...] = ()

    @property
    def fields(self) -> set[str]:
        """The body fields a handler accepts (``schemas.json_body``'s allowed set)."""
        return set(self.body or ())

    def __call__(self, handler: F) -> F:
        setattr(handler, ATTR, self)
        return handler


def op_of(handler: Any) -> Op | None:
    """The declaration attached to ``handler`` (or ``None``)."""
    return getattr(handler, ATTR, None)


def with_consistency(query: Mapping[str, Param] | None = None) -> dict[str, Param]:
    return {"consistency": p(CONSISTENCY, "linearizable (default: read through the leader) or stale (this node)"),
            **(query or {})}
