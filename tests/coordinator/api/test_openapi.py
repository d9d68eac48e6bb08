"""The OpenAPI document (``coordinator.api.openapi``): served publicly, valid
OpenAPI 3.1, one operation per route of the router and nothing else, every
route declared but the listed ones, and every route the docs name present."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
from openapi_spec_validator import validate

from coordinator.api.auth import RULES, AuthSettings, route_name
from coordinator.api.spec import op_of
from tests.coordinator.api.conftest import Harness, HarnessFactory

DOCS = Path(__file__).resolve().parents[3] / "docs"

# Routes described by path, method and security only (no declaration of their
# body and query). Empty: every route is declared. The check is exact both ways,
# so a new route without a declaration fails until it is declared (or listed here).
UNDECLARED: set[tuple[str, str]] = set()


async def _document(h: Harness) -> dict[str, Any]:
    status, doc = await h.call("GET", "/v1/openapi.json")
    assert status == 200
    return doc


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method.upper(), path): op for path, ops in doc["paths"].items() for method, op in ops.items()}


def _router(h: Harness) -> dict[tuple[str, str], Any]:
    return {(r.method, route_name(r.resource.canonical)): r.handler for r in h.http.app.router.routes()
            if r.method != "HEAD" and r.resource is not None}


async def test_the_document_is_valid_openapi_3_1_and_public(make_harness: HarnessFactory) -> None:
    h = await make_harness(auth=AuthSettings(admin_token="t" * 32))  # asked without credentials: public
    assert RULES[("GET", "/v1/openapi.json")] == "public"
    doc = await _document(h)
    assert doc["openapi"].startswith("3.1")
    validate(doc)


async def test_one_operation_per_route_both_ways(h: Harness) -> None:
    assert set(_operations(await _document(h))) == set(_router(h))


async def test_every_route_is_declared_but_the_listed_ones(h: Harness) -> None:
    undeclared = {route for route, handler in _router(h).items() if op_of(handler) is None}
    assert undeclared - UNDECLARED == set(), "declare these routes (api.spec.Op)"
    assert UNDECLARED - undeclared == set(), "declared now: remove them from UNDECLARED"
    declared = {k for k, op in _operations(await _document(h)).items() if op["x-coord-declared"]}
    assert declared == set(_router(h)) - UNDECLARED


async def test_security_follows_the_auth_table(h: Harness) -> None:
    ops = _operations(await _document(h))
    assert ops[("GET", "/healthz")]["security"] == []
    assert ops[("POST", "/v1/members")]["security"] == [{"adminToken": []}]  # no rule: the admin's
    assert ops[("GET", "/v1/agents")]["x-coord-auth"] == "any"
    assert ops[("PATCH", "/v1/agents/{id}")]["x-coord-auth"] == "self"
    assert ops[("PUT", "/v1/kv/{key}")]["x-coord-auth"] == "permission"
    assert {"adminToken": []} in ops[("PUT", "/v1/kv/{key}")]["security"]
    assert ops[("PUT", "/v1/kv/{key}")]["x-coord-permission"] == "kv on {key}"
    assert ops[("POST", "/v1/elections/{name}/campaign")]["x-coord-permission"] == "lock on election/{name}"
    assert ops[("GET", "/v1/kv")]["x-coord-permission"] == "kv on <prefix>*"
    assert "x-coord-permission" not in ops[("GET", "/v1/agents")]
    missing = [k for k, op in ops.items() if op["x-coord-auth"] == "permission" and "x-coord-permission" not in op]
    assert missing == [], "a permission rule says what it asks in its docstring"


async def test_declared_bodies_are_what_the_handlers_accept(h: Harness) -> None:
    """The schema's properties are the handler's allowed fields (one set, api.spec),
    and a field outside them is refused naming it."""
    ops = _operations(await _document(h))
    body = ops[("PUT", "/v1/kv/{key}")]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"value", "fence", "request_id"}
    assert body["required"] == ["value"] and body["additionalProperties"] is False
    status, data = await h.call("PUT", "/v1/kv/a", {"value": 1, "nope": 2})
    assert (status, data["error"]["field"]) == (400, "nope")
    limit = ops[("GET", "/v1/kv")]["parameters"]
    assert {"name": "limit", "in": "query", "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 10_000}} in limit


_DOC_ROUTE = re.compile(r"`(GET|POST|PUT|DELETE|PATCH) (/[^\s`?\[]*)")


async def test_every_route_the_docs_name_is_in_the_document(h: Harness) -> None:
    """Each ``METHOD /path`` the docs name (a template or an example) matches an operation."""
    patterns = [(m, re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(p)) + r"\Z"))
                for m, p in _operations(await _document(h))]
    named = set()
    for page in sorted(DOCS.glob("*.md")):
        for method, path in _DOC_ROUTE.findall(page.read_text()):
            if "..." not in path and path.startswith(("/v1/", "/healthz", "/readyz", "/metrics", "/ui")):
                named.add((page.name, method, re.sub(r"\{[^}]*\}", "x", path.rstrip("/"))))
    assert len(named) > 40
    missing = sorted(n for n in named if not any(m == n[1] and p.match(n[2]) for m, p in patterns))
    assert missing == []


async def test_a_body_field_with_an_empty_name_is_refused_naming_the_body(h: Harness) -> None:
    """Found by tests/integration/test_openapi_fuzz.py: ``{"": 1}`` was a 400 naming the field ""."""
    before = h.fingerprint()
    status, data = await h.call("PUT", "/v1/kv/a", {"value": 1, "": 2})
    assert (status, data["error"]["field"]) == (400, "body")
    assert h.fingerprint() == before


async def test_answers_conform_to_their_declared_schemas(h: Harness) -> None:
    """A few real answers, checked against the document (the fuzz checks the rest on a cluster)."""
    ops = _operations(await _document(h))
    calls = [
        ("PUT", "/v1/kv/{key}", "/v1/kv/a", {"value": 1}),
        ("POST", "/v1/kv/{key}/cas", "/v1/kv/a/cas", {"value": 2, "expected": 1}),
        ("GET", "/v1/kv/{key}", "/v1/kv/a", None),
        ("GET", "/v1/kv", "/v1/kv", None),
        ("POST", "/v1/agents", "/v1/agents", {"type": "w", "id": "x"}),
        ("POST", "/v1/locks/{name}", "/v1/locks/l", {"holder": "x"}),
        ("GET", "/v1/locks/{name}", "/v1/locks/l", None),
        ("POST", "/v1/elections/{name}/campaign", "/v1/elections/e/campaign", {"candidate": "x"}),
        ("GET", "/v1/elections/{name}", "/v1/elections/e", None),
        ("GET", "/v1/events", "/v1/events", None),
        ("GET", "/v1/members", "/v1/members", None),
        ("DELETE", "/v1/kv/{key}", "/v1/kv/a", None),
        ("GET", "/healthz", "/healthz", None),
    ]
    for method, template, path, body in calls:
        status, answer = await h.call(method, path, body)
        schema = ops[(method, template)]["responses"][str(status)]["content"]["application/json"]["schema"]
        assert schema != {"type": "object"}, f"{method} {template}: no schema declared"
        jsonschema.validate(answer, schema)
