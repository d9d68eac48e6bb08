"""An HTTP test harness: ``make_app(node)`` served by ``aiohttp_client`` over a
``CoordinatorNode`` backed by ``SimEngine`` (an in-memory, single-replica log).

Time is a ``ManualClock``: leases move only when a test calls ``advance``,
and expiry happens only when it calls ``tick``. Waits are deadline-based
(``tests.waiting.eventually``): they poll a condition and fail the test after 5 s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from coordinator.api.app import make_app
from coordinator.api.auth import AUTH, AuthSettings
from coordinator.client import CoordinatorClient
from coordinator.clock import ManualClock, SeededRng
from coordinator.services.applier import Applier
from coordinator.services.node import CoordinatorNode, Identity
from coordinator.state import Limits
from tests.fakes import SimEngine
from tests.waiting import eventually

NODE_ID = "n1"
RAFT = "127.0.0.1:17101"
HTTP = "127.0.0.1:17001"


@dataclass
class Harness:
    node: CoordinatorNode
    engine: SimEngine
    applier: Applier
    clock: ManualClock
    http: TestClient

    # -- state, for "bad input changed nothing" -------------------------------------

    def fingerprint(self) -> tuple[int, int, int, int]:
        """(log length, applied index, kv revision, last event seq)."""
        machine = self.applier.machine
        return (len(self.engine.log), machine.applied_index, machine.kv.revision, machine.events.last_seq)

    # -- HTTP helpers -------------------------------------------------------------------

    async def call(self, method: str, path: str, body: Any = None, *, raw: Any = None,
                   headers: dict[str, str] | None = None, expect: int | None = None) -> tuple[int, Any]:
        """One request; returns (status, parsed JSON body or None). Closes the response."""
        kwargs: dict[str, Any] = {"headers": headers}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        async with self.http.request(method, path, **kwargs) as response:
            text = await response.text()
            status = response.status
        data = json.loads(text) if text else None
        if expect is not None:
            assert status == expect, f"{method} {path}: {status} {text}"
        return status, data

    async def put(self, key: str, value: Any, **extra: Any) -> int:
        _, data = await self.call("PUT", f"/v1/kv/{key}", {"value": value, **extra}, expect=200)
        return data["revision"]

    async def get(self, key: str) -> dict[str, Any] | None:
        status, data = await self.call("GET", f"/v1/kv/{key}")
        if status == 404:
            return None
        assert status == 200, data
        return data

    async def register(self, agent_type: str = "worker", **fields: Any) -> dict[str, Any]:
        _, data = await self.call("POST", "/v1/agents", {"type": agent_type, **fields}, expect=201)
        return data

    async def events(self, types: str | None = None) -> list[dict[str, Any]]:
        path = "/v1/events" + (f"?types={types}" if types else "")
        _, data = await self.call("GET", path, expect=200)
        return data["events"]

    # -- time -----------------------------------------------------------------------------

    async def advance_and_tick(self, seconds: float) -> None:
        """Move the clock, run the lease keeper once and let any expiry it
        proposed commit (a linearizable read is ordered after it)."""
        self.clock.advance(seconds)
        self.node.leases.tick()
        await eventually(lambda: not self.node.leases._expiring, "expiry proposals to finish")


HarnessFactory = Callable[..., Awaitable[Harness]]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_unhandled_errors() -> Iterator[None]:
    """Fail any test during which (or during whose teardown) the app turned an
    exception into a 500: bad input and disconnects must never end there."""
    handler = _Records()
    logger = logging.getLogger("coordinator.api.app")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in handler.records] == []


@pytest.fixture
async def make_harness(aiohttp_client: Any) -> AsyncIterator[HarnessFactory]:
    """``await make_harness(limits=None, inflight_max=1024, proposal_timeout_s=2.0)``. The simulated
    engine commits at once: a proposal times out only when a test holds it, or when the loop
    is starved on a busy machine, which the 2 s leave room for."""
    nodes: list[CoordinatorNode] = []

    async def make(*, limits: Limits | None = None, inflight_max: int = 1024,
                   proposal_timeout_s: float = 2.0, unsafe_stale_reads: bool = False,
                   transports: dict[str, Any] | None = None, transport_factory: Any = None,
                   auth: AuthSettings | None = None) -> Harness:
        applier = Applier(limits)
        engine = SimEngine(applier, RAFT)
        clock = ManualClock()
        node = CoordinatorNode(Identity(NODE_ID, RAFT, HTTP), engine, applier, clock, SeededRng(1),
                               proposal_timeout_s=proposal_timeout_s, inflight_max=inflight_max,
                               unsafe_stale_reads=unsafe_stale_reads, transports=transports,
                               transport_factory=transport_factory,
                               # as main.py does: a secure node calls agents only where the admin allows
                               check_endpoints=auth is not None and not auth.allow_anonymous)
        await node.start()
        nodes.append(node)
        http = await aiohttp_client(make_app(node, auth or AuthSettings(allow_anonymous=True)))
        # The test server listens on a port of its own: signatures for it name this node.
        http.app[AUTH].add_host(f"{http.host}:{http.port}")
        # Ready: the lease keeper committed its barrier and this node registered itself.
        await eventually(lambda: node.leases.active, "the lease keeper to become active")
        await eventually(lambda: NODE_ID in applier.machine.members.members, "the node to register itself")
        await eventually(lambda: node.duties.active and any(e.type == "system.leader.elected"
                                                         for e in applier.machine.events.since(1, 100)),
                         "the bus to become active and the election to be reported")
        return Harness(node, engine, applier, clock, http)

    yield make
    for node in nodes:
        await node.stop()


@pytest.fixture
async def h(make_harness: HarnessFactory) -> Harness:
    return await make_harness()


@pytest.fixture
async def client(h: Harness) -> AsyncIterator[CoordinatorClient]:
    """The Python client talking to the harness's node."""
    async with CoordinatorClient([str(h.http.make_url(""))], timeout_s=3) as c:
        yield c
