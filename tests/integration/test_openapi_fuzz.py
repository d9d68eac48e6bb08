"""Fuzz a real three-node cluster from its own OpenAPI document (schemathesis).

The cluster is secure and the fuzzer holds the admin token, so its requests
reach the handlers (not the 401 in front of them). Each operation gets a
fixed number of schema-valid (positive) and schema-invalid (negative)
examples, sent round-robin to the three nodes (followers forward writes), then
a few more with path parameters naming things that exist (a key, an agent
with an inbox, a lock, a topic, a subscription with messages, a stream), all
within one time budget. What must hold for every response:

- no 5xx but 503 (with Retry-After) and 504, each with the error body;
- every 4xx has the error body, and every 400 names the field (``error.field``);
- a response of a declared operation conforms to its declared schema.

And afterwards: all three nodes still answer ``/healthz`` and reach one state
digest at one index.

Left out, and why (``EXCLUDED``): membership changes (they would reshape the
cluster under test), the Server-Sent Events routes (a stream does not end, so
a request cannot complete), and the node-to-node gossip route (not for clients;
it answers 401 to anything unsigned, tested in tests/coordinator/api/test_gossip.py).
Long waits are clamped (``wait_s``, ``timeout_s``) so the budget goes to breadth.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import FailureGroup, response_schema_conformance

from devcluster.cluster import LocalCluster, fetch_json
from tests.waiting import CLUSTER_POLL_S, wait_until

pytestmark = pytest.mark.cluster

SEED = int(os.environ.get("COORD_FUZZ_SEED", "24"))
POSITIVE_EXAMPLES = int(os.environ.get("COORD_FUZZ_POSITIVE", "20"))
NEGATIVE_EXAMPLES = int(os.environ.get("COORD_FUZZ_NEGATIVE", "10"))
BUDGET_S = float(os.environ.get("COORD_FUZZ_BUDGET_S", "45"))  # CI stays under 20 min; raise it locally
REQUEST_TIMEOUT_S = 15.0

EXCLUDED = {
    ("POST", "/v1/members"),  # adds a member that will never start: the cluster under test changes shape
    ("DELETE", "/v1/members/{id}"),  # could remove a node under test
    ("GET", "/v1/watch"),  # SSE: never ends
    ("GET", "/v1/watch/events"),
    ("GET", "/v1/subscriptions/{sub}/stream"),
    ("GET", "/v1/agents/{agent}/stream"),
    ("GET", "/v1/categories/{category}/watch"),
    ("POST", "/v1/internal/gossip"),  # node to node, signed with the cluster's gossip key
}
CLAMPED = {"wait_s": 0.2, "timeout_s": 0.5}  # a long poll or a request/reply wait, at most this
KNOWN_EXAMPLES = int(os.environ.get("COORD_FUZZ_KNOWN", "5"))


def _seed_state(url: str, headers: dict[str, str]) -> dict[str, str]:
    """Things that exist, so a third pass reaches past the 404s: a key, an
    agent with an inbox, a lock, a topic with messages and a subscription, a
    stream. Returns a value for each path parameter name."""
    def call(method: str, path: str, body: Any) -> Any:
        response = requests.request(method, url + path, json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
        assert response.status_code in (200, 201), (method, path, response.status_code, response.text)
        return response.json()

    call("PUT", "/v1/kv/fuzzkey", {"value": {"n": 1}})
    call("POST", "/v1/agents", {"id": "fuzz-agent", "type": "fuzztype", "ttl_s": 3600})
    call("POST", "/v1/locks/fuzzlock", {"holder": "fuzz-agent", "ttl_s": 3600})
    sub = call("POST", "/v1/subscriptions", {"topic": "fuzz.topic", "group": "fuzzgroup", "start": "beginning"})
    call("POST", "/v1/topics/fuzz.topic/messages", {"messages": [{"payload": i} for i in range(20)]})
    call("POST", "/v1/topics/fuzz.topic/messages", {"destination": ["fuzz-agent"], "payload": "hi"})
    call("POST", "/v1/streams/fuzz-1", {"events": [{"type": "created", "data": {"n": 1}}]})
    return {"key": "fuzzkey", "id": "fuzz-agent", "agent": "fuzz-agent", "name": "fuzzlock", "topic": "fuzz.topic",
            "sub": sub["id"], "group": "fuzzgroup", "type": "fuzztype", "stream": "fuzz-1", "category": "fuzz",
            "file": "index.html"}


class Findings:
    """What broke, one line per failure (the test reports them all at once)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, case: Any, response: requests.Response, why: str) -> None:
        self.lines.append(f"{case.method} {case.formatted_path} query={case.query} body={_short(case.body)} -> "
                          f"{response.status_code} {response.text[:300]!r}: {why}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:300] + "..."


def _error_of(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    ok = isinstance(error, dict) and isinstance(error.get("code"), str) and isinstance(error.get("message"), str)
    return error if ok else None


def check(case: Any, response: requests.Response, findings: Findings) -> None:
    status = response.status_code
    if status >= 500:
        if status not in (503, 504):
            findings.add(case, response, "a server error")
        elif _error_of(response) is None and case.path != "/readyz":
            findings.add(case, response, "a 503/504 without the error body")
        if status == 503 and "retry-after" not in {name.lower() for name in response.headers}:
            findings.add(case, response, "a 503 without Retry-After")
        return
    if status >= 400:
        error = _error_of(response)
        if error is None:
            findings.add(case, response, "a 4xx without the error body")
        elif status == 400 and not (isinstance(error.get("field"), str) and error["field"]):
            findings.add(case, response, "a 400 that names no field")
        elif status == 401 and "forwarded" in error["message"]:  # the fuzzer always sends the admin token
            findings.add(case, response, "the leader refused what a follower forwarded")
        return
    if case.operation.definition.raw.get("x-coord-declared"):
        try:
            case.validate_response(response, checks=[response_schema_conformance])
        except (AssertionError, FailureGroup) as exc:  # one failure, or schemathesis' group of them
            findings.add(case, response, f"does not conform to its declared schema: {str(exc)[:300]}")


def _clamp(case: Any) -> None:
    if case.path == "/v1/topics/{topic}/request" and isinstance(case.body, dict):
        case.body.setdefault("timeout_s", CLAMPED["timeout_s"])  # not the default 30 s
    for where in (case.query, case.body):
        if isinstance(where, dict):
            for name, high in CLAMPED.items():
                value = where.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > high:
                    where[name] = high


def _same_digest(cluster: LocalCluster) -> set[tuple[int, str]] | None:
    seen = [cluster.status(n) for n in cluster.members]
    if not all(seen):
        return None
    found = {(st["digest"]["index"], st["digest"]["value"]) for st in seen}
    return found if len({index for index, _ in found}) == 1 else None


def test_fuzz_a_three_node_cluster_from_its_openapi_document(make_cluster: Any) -> None:
    cluster = make_cluster(secure=True)
    token = cluster.admin_token
    assert token
    urls = [cluster.url(n) for n in cluster.members]
    document = fetch_json(urls[0] + "/v1/openapi.json")
    schema = schemathesis.openapi.from_dict(document)
    headers = {"Authorization": f"Bearer {token}"}
    session = requests.Session()
    findings = Findings()
    deadline = time.monotonic() + BUDGET_S
    sent = {"requests": 0}
    tried: list[str] = []
    statuses: Counter[int] = Counter()

    def run(operation: Any, mode: GenerationMode, examples: int, share_ends: float,
            path_parameters: dict[str, str] | None = None) -> None:
        """Up to ``examples`` cases of ``operation``; after ``share_ends`` only its first."""
        sent_before = sent["requests"]

        @seed(SEED)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=False)
        @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
        def fuzz(case: Any) -> None:
            if sent["requests"] > sent_before and time.monotonic() > share_ends:
                return  # this operation's share of the budget is spent
            _clamp(case)
            base = urls[sent["requests"] % len(urls)]
            sent["requests"] += 1
            response = case.call(base_url=base, session=session, headers=headers, timeout=REQUEST_TIMEOUT_S)
            statuses[response.status_code] += 1
            check(case, response, findings)

        try:
            fuzz()
        except Unsatisfiable:
            if mode is GenerationMode.POSITIVE:
                raise
            # nothing of the operation can be made invalid (no parameters, no body)

    known = _seed_state(urls[0], headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    fuzzed = [op for op in operations if (op.method.upper(), op.path) not in EXCLUDED]
    for i, operation in enumerate(fuzzed):
        tried.append(f"{operation.method.upper()} {operation.path}")
        # Every operation gets an equal share of what is left of the budget (and at least one case per mode).
        share_s = max(0.0, deadline - time.monotonic()) / (len(fuzzed) - i)
        started = time.monotonic()
        run(operation, GenerationMode.POSITIVE, POSITIVE_EXAMPLES, started + share_s * 0.5)
        run(operation, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES, started + share_s * 0.8)
        names = [p["name"] for p in operation.definition.raw.get("parameters", []) if p["in"] == "path"]
        if names and all(n in known for n in names):  # the same operation on things that exist
            run(operation, GenerationMode.POSITIVE, KNOWN_EXAMPLES, started + share_s, {n: known[n] for n in names})
    print(f"fuzzed {len(tried)} operations with {sent['requests']} requests (seed {SEED}): "
          f"statuses {dict(sorted(statuses.items()))}")

    for url in urls:  # no node crashed
        assert fetch_json(url + "/healthz", timeout=5.0)["status"] == "alive"
    wait_until(lambda: _same_digest(cluster), "one digest at one index on every node", 30.0,
               interval_s=CLUSTER_POLL_S)
    assert findings.lines == [], f"seed {SEED}:\n" + "\n".join(findings.lines[:40])
    assert len(fuzzed) == len(operations) - len(EXCLUDED), "an excluded operation is gone: update EXCLUDED"
