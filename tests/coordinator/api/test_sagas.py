"""Sagas over HTTP (coordinator/api/sagas.py) driven by the leader's
orchestrator (coordinator/services/sagas.py), and the client's saga methods.

Agents are small aiohttp apps on 127.0.0.1 that record every call they get
and answer what the test tells them. The coordinator's clock is manual, so a
retry waits until the test advances it; the agents' HTTP and ``timeout_s``
are real time. Every wait is a condition with a deadline (``eventually``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from coordinator.client import CoordinatorClient
from coordinator.commands.sagas import FINAL_STATES
from coordinator.errors import Conflict, NotFound, RequestTimeout
from coordinator.state.sagas import StepRun
from tests.coordinator.api.conftest import Harness
from tests.waiting import DEADLINE_S, eventually

# -- test agents ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    path: str
    key: str | None  # the Idempotency-Key header
    body: dict[str, Any]

    @property
    def step(self) -> str:
        return self.body["step"]

    @property
    def phase(self) -> str:
        return self.body["phase"]


Answer = Callable[[Call], Awaitable[tuple[int, Any] | web.Response]]  # (status, JSON body) or a response


async def default_answer(call: Call) -> tuple[int, Any]:
    if call.phase == "compensation":
        return 200, {"undid": call.step}
    return 200, {"did": call.step, "attempt": call.body["attempt"]}


class Agent:
    """An agent endpoint: records every call (in arrival order) and answers
    with ``answer``. ``hold`` blocks a handler until the test (or the
    teardown) sets ``release``, never longer than the deadline."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.answer: Answer = default_answer
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def hold(self) -> None:
        await asyncio.wait_for(self.release.wait(), DEADLINE_S)

    def steps(self, phase: str = "action") -> list[str]:
        return [c.step for c in self.calls if c.phase == phase]

    async def _handle(self, request: web.Request) -> web.Response:
        call = Call(request.path, request.headers.get("Idempotency-Key"), await request.json())
        self.calls.append(call)
        answer = await self.answer(call)
        if isinstance(answer, web.Response):
            return answer
        status, body = answer
        return web.json_response(body, status=status)


def scripted(*statuses: int) -> Answer:
    """Answer the actions with these statuses in turn (then 200); compensations succeed."""
    left = list(statuses)

    async def answer(call: Call) -> tuple[int, Any]:
        if call.phase == "action" and left:
            status = left.pop(0)
            if status >= 300:
                return status, {"error": f"scripted {status}"}
        return await default_answer(call)

    return answer


StartAgent = Callable[[], Awaitable[Agent]]


@pytest.fixture
async def start_agent() -> AsyncIterator[StartAgent]:
    agents: list[Agent] = []

    async def start() -> Agent:
        agent = Agent()
        await agent.server.start_server()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.release.set()  # a held handler must not stall the server's shutdown
    for agent in agents:
        await agent.server.close()


# -- helpers -------------------------------------------------------------------------------


async def register(h: Harness, agent_id: str, agent_type: str = "worker", agent: Agent | None = None) -> None:
    fields: dict[str, Any] = {"id": agent_id, "ttl_s": 3600}  # the manual clock moves: no expiry mid-test
    if agent is not None:
        fields["endpoint"] = agent.endpoint
    await h.register(agent_type, **fields)


def agent_step(step_id: str, agent_id: str = "w1", *, undo: bool = True, **extra: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"id": step_id, "action": {"kind": "agent", "agent_id": agent_id,
                                                      "payload": {"op": step_id}}, **extra}
    if undo:
        step["compensation"] = {"kind": "agent", "agent_id": agent_id, "path": "/undo"}
    return step


def topic_step(step_id: str, topic: str, **action: Any) -> dict[str, Any]:
    return {"id": step_id, "action": {"kind": "topic", "topic": topic, **action}}


async def start(h: Harness, steps: list[dict[str, Any]], **fields: Any) -> str:
    _, data = await h.call("POST", "/v1/sagas", {"steps": steps, **fields}, expect=201)
    return data["id"]


async def get_saga(h: Harness, saga_id: str) -> dict[str, Any]:
    _, data = await h.call("GET", f"/v1/sagas/{saga_id}", expect=200)
    return data


def run_of(h: Harness, saga_id: str, step_id: str) -> StepRun:
    return h.applier.machine.sagas.sagas[saga_id].steps[step_id]


def state_of(h: Harness, saga_id: str) -> str:
    return h.applier.machine.sagas.sagas[saga_id].state


async def settled(h: Harness, saga_id: str) -> dict[str, Any]:
    await eventually(lambda: state_of(h, saga_id) in FINAL_STATES, f"saga {saga_id} to finish")
    return await get_saga(h, saga_id)


async def waiting(h: Harness, saga_id: str, step_id: str) -> int:
    """Wait until the step waits for a retry; its due time (ms)."""
    await eventually(lambda: run_of(h, saga_id, step_id).status == "waiting", f"{step_id} to wait for a retry")
    due = run_of(h, saga_id, step_id).retry_at_ms
    assert due is not None and due > h.clock.now_ms()
    return due


def advance_past(h: Harness, due_ms: int) -> None:
    h.clock.advance((due_ms - h.clock.now_ms() + 10) / 1000)


def steps_by_id(saga: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in saga["steps"]}


def history(saga: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(e["event"], e["step"], e["phase"], e["attempt"]) for e in saga["history"]]


async def saga_events(h: Harness, saga_id: str) -> list[dict[str, Any]]:
    return [e for e in await h.events("saga.*") if e["data"]["sagaId"] == saga_id]


# -- the happy path ---------------------------------------------------------------------------


async def test_three_steps_complete_in_order(h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent()
    await register(h, "w1", agent=agent)
    saga_id = await start(h, [agent_step("reserve"), agent_step("charge"), agent_step("ship")],
                          id="order-1", name="order", input={"order": 7})
    saga = await settled(h, saga_id)

    assert saga["state"] == "completed" and saga["reason"] is None and saga["finished_ms"] is not None
    assert agent.steps() == ["reserve", "charge", "ship"]
    assert agent.steps("compensation") == []
    done: dict[str, Any] = {}
    for call in agent.calls:
        key = f"order-1/{call.step}/action/1"
        assert call.path == "/saga"
        assert call.key == call.body["idempotency_key"] == key
        assert call.body == {"saga_id": "order-1", "saga_name": "order", "step": call.step, "phase": "action",
                             "attempt": 1, "idempotency_key": key, "input": {"order": 7},
                             "payload": {"op": call.step}, "results": done}
        done = {**done, call.step: {"did": call.step, "attempt": 1}}  # each step sees the ones before it

    steps = steps_by_id(saga)
    for step_id in ("reserve", "charge", "ship"):
        assert steps[step_id]["status"] == "succeeded" and steps[step_id]["attempts"] == 1
        assert steps[step_id]["result"] == {"did": step_id, "attempt": 1}
        assert steps[step_id]["compensation_attempts"] == 0 and steps[step_id]["has_compensation"]
    assert steps["charge"]["depends_on"] == ["reserve"]
    expected = [("saga.started", None, None, None)]
    for step_id in ("reserve", "charge", "ship"):
        expected += [("saga.step.started", step_id, "action", 1), ("saga.step.succeeded", step_id, "action", 1)]
    expected.append(("saga.completed", None, None, None))
    assert history(saga) == expected
    indexes = [e["index"] for e in saga["history"]]
    assert indexes == sorted(indexes)

    events = await saga_events(h, saga_id)
    assert [e["type"] for e in events] == [row[0] for row in expected]
    assert [e["index"] for e in events] == indexes
    assert events[1]["data"] == {"sagaId": "order-1", "name": "order", "step": "reserve", "phase": "action",
                                 "attempt": 1}


# -- failure and compensation ---------------------------------------------------------------


async def test_failure_compensates_in_reverse_with_the_action_results(
        h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent()

    async def answer(call: Call) -> tuple[int, Any]:
        if call.step == "charge" and call.phase == "action":
            return 422, {"error": "card declined"}
        return await default_answer(call)

    agent.answer = answer
    await register(h, "w1", agent=agent)
    steps = [agent_step("reserve"), agent_step("book"), agent_step("charge", retry={"max_attempts": 3}),
             agent_step("ship")]
    saga_id = await start(h, steps, id="trip")
    saga = await settled(h, saga_id)

    assert saga["state"] == "compensated"
    assert agent.steps() == ["reserve", "book", "charge"]  # ship never started
    assert agent.steps("compensation") == ["book", "reserve"]  # reverse order; the failed step is not undone
    for call in agent.calls:
        if call.phase == "compensation":
            assert call.path == "/undo"
            assert call.key == call.body["idempotency_key"] == f"trip/{call.step}/compensation/1"
            assert call.body["result"] == {"did": call.step, "attempt": 1}
            assert call.body["payload"] is None
    runs = steps_by_id(saga)
    assert {k: v["status"] for k, v in runs.items()} == {"reserve": "compensated", "book": "compensated",
                                                        "charge": "failed", "ship": "abandoned"}
    assert runs["charge"]["attempts"] == 1  # a 422 is permanent: no retry despite max_attempts 3
    assert "422" in runs["charge"]["error"] and "card declined" in runs["charge"]["error"]
    assert "charge" in saga["reason"]
    tail = [row for row in history(saga) if row[2] == "compensation" or row[0] == "saga.compensated"]
    assert tail == [("saga.step.started", "book", "compensation", 1),
                    ("saga.step.compensated", "book", "compensation", 1),
                    ("saga.step.started", "reserve", "compensation", 1),
                    ("saga.step.compensated", "reserve", "compensation", 1),
                    ("saga.compensated", None, None, None)]
    failed = [e for e in await saga_events(h, saga_id) if e["type"] == "saga.step.failed"]
    assert [(e["data"]["step"], e["data"]["permanent"]) for e in failed] == [("charge", True)]


async def test_retries_wait_for_the_clock_then_complete(
        h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent()
    agent.answer = scripted(503, 503, 200)
    await register(h, "w1", agent=agent)
    saga_id = await start(h, [agent_step("flaky", retry={"max_attempts": 3, "backoff_s": 1})], id="retry-1")

    for attempt in (1, 2):
        due = await waiting(h, saga_id, "flaky")
        saga = await get_saga(h, saga_id)
        assert saga["state"] == "running"
        assert steps_by_id(saga)["flaky"]["retry_at_ms"] == due
        assert "503" in steps_by_id(saga)["flaky"]["error"]
        h.clock.advance((due - h.clock.now_ms() - 10) / 1000)  # just before it is due
        h.node.sagas.step()  # an orchestrator round now: nothing is due yet
        assert not h.node.sagas._retries
        assert len(agent.calls) == attempt
        advance_past(h, due)
        await eventually(lambda n=attempt: len(agent.calls) == n + 1, f"attempt {attempt + 1}")

    saga = await settled(h, saga_id)
    assert saga["state"] == "completed"
    assert steps_by_id(saga)["flaky"]["attempts"] == 3
    assert steps_by_id(saga)["flaky"]["result"] == {"did": "flaky", "attempt": 3}
    assert [(c.key, c.body["attempt"]) for c in agent.calls] == [(f"retry-1/flaky/action/{n}", n) for n in (1, 2, 3)]
    failures = [e for e in saga["history"] if e["event"] == "saga.step.failed"]
    assert [(e["attempt"], e["detail"]["retry_at_ms"] is not None) for e in failures] == [(1, True), (2, True)]


async def test_a_compensation_that_always_fails_leaves_the_saga_failed_stuck(
        h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent()

    async def answer(call: Call) -> tuple[int, Any]:
        if call.step == "pay" and call.phase == "action":
            return 422, {"error": "no"}
        if call.step == "book" and call.phase == "compensation":
            return 500, {"error": "cannot undo"}
        return await default_answer(call)

    agent.answer = answer
    await register(h, "w1", agent=agent)
    saga_id = await start(h, [agent_step("hold"), agent_step("book"), agent_step("pay")], id="stuck-1",
                          compensation_retry={"max_attempts": 2, "backoff_s": 0.5, "backoff_max_s": 0.5})
    advance_past(h, await waiting(h, saga_id, "book"))
    saga = await settled(h, saga_id)

    assert saga["state"] == "failed-stuck"
    runs = steps_by_id(saga)
    assert runs["book"]["status"] == "stuck" and runs["book"]["compensation_attempts"] == 2
    assert "500" in runs["book"]["error"]
    assert runs["hold"]["status"] == "compensated"  # the others are still compensated
    assert agent.steps("compensation") == ["book", "book", "hold"]
    assert [c.key for c in agent.calls if c.step == "book" and c.phase == "compensation"] == [
        "stuck-1/book/compensation/1", "stuck-1/book/compensation/2"]
    events = await saga_events(h, saga_id)
    stuck = [e for e in events if e["type"] == "saga.step.stuck"]
    assert [(e["data"]["step"], e["data"]["phase"], e["data"]["attempt"]) for e in stuck] == [
        ("book", "compensation", 2)]
    assert events[-1]["type"] == "saga.failed" and events[-1]["data"]["state"] == "failed-stuck"


# -- concurrency, agent selection, timeouts --------------------------------------------------


async def test_parallel_branches_are_invoked_concurrently(
        h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent()
    both_arrived = asyncio.Event()
    calls_seen_when_answering: list[int] = []

    async def answer(call: Call) -> tuple[int, Any]:
        if call.step in ("left", "right"):
            if {"left", "right"} <= set(agent.steps()):
                both_arrived.set()
            await asyncio.wait_for(both_arrived.wait(), DEADLINE_S)  # sequential calls would time out here
            calls_seen_when_answering.append(len(agent.calls))
        return await default_answer(call)

    agent.answer = answer
    await register(h, "w1", agent=agent)
    steps = [agent_step("left"), agent_step("right", depends_on=[]), agent_step("join", depends_on=["left", "right"])]
    saga_id = await start(h, steps)
    saga = await settled(h, saga_id)

    assert saga["state"] == "completed"
    assert sorted(agent.steps()[:2]) == ["left", "right"] and agent.steps()[2] == "join"
    assert calls_seen_when_answering == [2, 2]  # both calls were in before either answered
    join = agent.calls[2]
    assert join.body["results"] == {"left": {"did": "left", "attempt": 1}, "right": {"did": "right", "attempt": 1}}
    assert steps_by_id(saga)["join"]["depends_on"] == ["left", "right"]


async def test_a_branch_failing_while_its_sibling_runs_waits_and_undoes_the_late_success(
        h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent()

    async def answer(call: Call) -> tuple[int, Any]:
        if call.phase == "action" and call.step == "left":
            return 404, {"error": "no such thing"}
        if call.phase == "action" and call.step == "right":
            await agent.hold()
        return await default_answer(call)

    agent.answer = answer
    await register(h, "w1", agent=agent)
    steps = [agent_step("first"), agent_step("left"), agent_step("right", depends_on=["first"]),
             agent_step("join", depends_on=["left", "right"])]
    saga_id = await start(h, steps)
    await eventually(lambda: run_of(h, saga_id, "left").status == "failed", "left to fail")
    assert state_of(h, saga_id) == "compensating"
    assert run_of(h, saga_id, "right").status == "running"
    assert agent.steps("compensation") == []  # first is not undone while right is in flight

    agent.release.set()
    saga = await settled(h, saga_id)
    assert saga["state"] == "compensated"
    assert agent.steps("compensation") == ["right", "first"]
    assert {k: v["status"] for k, v in steps_by_id(saga).items()} == {
        "first": "compensated", "left": "failed", "right": "compensated", "join": "abandoned"}


async def test_agent_type_picks_healthy_agents_with_an_endpoint(
        h: Harness, start_agent: StartAgent) -> None:
    good, other_good, sick = await start_agent(), await start_agent(), await start_agent()
    await register(h, "p1", "pay")  # no endpoint
    await register(h, "p2", "pay", sick)
    await register(h, "p3", "pay", good)
    await register(h, "p4", "pay", other_good)
    await register(h, "o1", "other", sick)
    await h.call("POST", "/v1/agents/p2/heartbeat", {"health": "unhealthy"}, expect=200)
    _, p2 = await h.call("GET", "/v1/agents/p2", expect=200)
    assert p2["health"] == "unhealthy"

    by_type = [{"id": f"s{i}", "action": {"kind": "agent", "agent_type": "pay"}} for i in range(4)]
    saga = await settled(h, await start(h, by_type))
    assert saga["state"] == "completed"
    assert len(good.calls) == len(other_good.calls) == 2  # in turn
    assert sorted(good.steps() + other_good.steps()) == ["s0", "s1", "s2", "s3"]
    assert sick.calls == []


async def test_no_agent_of_the_type_fails_the_attempt_and_retries(
        h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent()
    await register(h, "lonely", "ghost")  # of the type, but without an endpoint
    step = {"id": "haunt", "action": {"kind": "agent", "agent_type": "ghost"}, "retry": {"max_attempts": 2}}
    saga_id = await start(h, [step])
    due = await waiting(h, saga_id, "haunt")
    error = steps_by_id(await get_saga(h, saga_id))["haunt"]["error"]
    assert "'ghost'" in error and "no agent" in error

    await register(h, "g1", "ghost", agent)  # one shows up before the retry
    advance_past(h, due)
    saga = await settled(h, saga_id)
    assert saga["state"] == "completed"
    assert [(c.step, c.body["attempt"]) for c in agent.calls] == [("haunt", 2)]


async def test_how_agent_answers_are_read(h: Harness, start_agent: StartAgent) -> None:
    """2xx: the JSON body (text when not JSON, None when empty, a marker when
    too large); 409 is worth a retry; any other 4xx fails the step for good."""
    agent = await start_agent()

    async def answer(call: Call) -> tuple[int, Any] | web.Response:
        if call.step == "text":
            return web.Response(text="all done")
        if call.step == "empty":
            return web.Response(status=204)
        if call.step == "big":
            return 200, {"blob": "x" * (70 * 1024)}
        if call.step == "busy" and call.body["attempt"] == 1:
            return 409, {"error": "locked"}
        if call.step == "gone":
            return 404, {"error": "unknown order"}
        return 200, {"did": call.step}

    agent.answer = answer
    await register(h, "w1", agent=agent)
    retry = {"max_attempts": 2, "backoff_s": 0.1, "backoff_max_s": 0.1}
    saga_id = await start(h, [agent_step(n, undo=False) for n in ("text", "empty", "big")]
                          + [agent_step("busy", undo=False, retry=retry)])
    advance_past(h, await waiting(h, saga_id, "busy"))
    saga = await settled(h, saga_id)
    assert saga["state"] == "completed"
    results = {k: v["result"] for k, v in steps_by_id(saga).items()}
    assert results["text"] == "all done" and results["empty"] is None
    assert results["big"]["truncated"] is True and results["big"]["bytes"] > 64 * 1024
    assert results["busy"] == {"did": "busy"} and steps_by_id(saga)["busy"]["attempts"] == 2

    gone_id = await start(h, [agent_step("gone", undo=False, retry={"max_attempts": 5})])
    gone = steps_by_id(await settled(h, gone_id))["gone"]
    assert (gone["status"], gone["attempts"]) == ("failed", 1)
    assert "404" in gone["error"] and "unknown order" in gone["error"]


async def test_an_unreachable_agent_fails_the_attempt(
        h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent()
    await register(h, "w9", agent=agent)
    await agent.server.close()  # nothing listens there any more
    saga_id = await start(h, [agent_step("call", "w9", undo=False)])
    step = steps_by_id(await settled(h, saga_id))["call"]
    assert step["status"] == "failed" and "'w9' unreachable" in step["error"]


async def test_an_agent_that_does_not_answer_in_time_fails_the_attempt(
        h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent()

    async def answer(call: Call) -> tuple[int, Any]:
        if call.step == "slow":
            await agent.hold()
        return await default_answer(call)

    agent.answer = answer
    await register(h, "w1", agent=agent)
    saga_id = await start(h, [agent_step("fast"), agent_step("slow", timeout_s=0.2)])
    saga = await settled(h, saga_id)

    assert saga["state"] == "compensated"
    runs = steps_by_id(saga)
    assert runs["slow"]["status"] == "failed"
    assert "did not answer within 0.2 s" in runs["slow"]["error"]
    assert runs["fast"]["status"] == "compensated"
    assert agent.steps("compensation") == ["fast"]


# -- topic actions -------------------------------------------------------------------------


async def test_topic_action_publishes_a_message(h: Harness) -> None:
    _, sub = await h.call("POST", "/v1/subscriptions", {"topic": "orders.created"}, expect=201)
    saga_id = await start(h, [topic_step("announce", "orders.created", payload={"order": 9})], id="pub-1")
    saga = await settled(h, saga_id)
    assert saga["state"] == "completed"
    assert steps_by_id(saga)["announce"]["result"] is None

    _, got = await h.call("GET", f"/v1/subscriptions/{sub['id']}/messages?max=10", expect=200)
    [delivery] = got["messages"]
    message = delivery["message"]
    assert message["id"] == "pub-1/announce/action/1" and message["type"] == "command"
    assert message["payload"]["saga_id"] == "pub-1" and message["payload"]["step"] == "announce"
    assert message["payload"]["idempotency_key"] == "pub-1/announce/action/1"
    assert message["payload"]["payload"] == {"order": 9}


async def respond(client: CoordinatorClient, sub: str, payload: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Answer the first request on the subscription; the request message."""
    delivery = (await eventually(lambda: client.fetch(sub, wait_s=0.2), "a request", interval_s=0))[0]
    request = delivery["message"]
    await client.reply(request, payload(request))
    await client.ack(sub, [delivery["delivery_id"]])
    return request


async def test_topic_request_stores_the_response_as_the_result(h: Harness, client: CoordinatorClient) -> None:
    sub = await client.subscribe("svc.price")
    responder = asyncio.create_task(respond(client, sub, lambda r: {"price": 42, "for": r["payload"]["step"]}))
    saga_id = await start(h, [topic_step("quote", "svc.price", reply=True)], id="ask-1")
    request = await asyncio.wait_for(responder, DEADLINE_S)
    saga = await settled(h, saga_id)

    assert saga["state"] == "completed"
    assert steps_by_id(saga)["quote"]["result"] == {"price": 42, "for": "quote"}
    assert request["type"] == "request" and request["id"] == "ask-1/quote/action/1"
    assert request["payload"]["idempotency_key"] == "ask-1/quote/action/1"


async def test_topic_response_that_says_no_fails_the_step(h: Harness, client: CoordinatorClient) -> None:
    sub = await client.subscribe("svc.stock")
    responder = asyncio.create_task(respond(client, sub, lambda r: {"ok": False, "error": "out of stock"}))
    saga_id = await start(h, [topic_step("reserve", "svc.stock", reply=True)])
    await asyncio.wait_for(responder, DEADLINE_S)
    saga = await settled(h, saga_id)

    assert saga["state"] == "compensated"
    step = steps_by_id(saga)["reserve"]
    assert step["status"] == "failed" and step["error"] == "out of stock" and step["result"] is None


async def test_topic_request_without_responders_fails_the_attempt(h: Harness) -> None:
    saga_id = await start(h, [topic_step("ask", "svc.nobody", reply=True)])
    step = steps_by_id(await settled(h, saga_id))["ask"]
    assert step["status"] == "failed" and "no responders" in step["error"]


# -- cancel ------------------------------------------------------------------------------


async def test_cancel_a_running_saga_compensates_once_the_step_answers(
        h: Harness, start_agent: StartAgent) -> None:
    agent = await start_agent()

    async def answer(call: Call) -> tuple[int, Any]:
        if call.step == "book" and call.phase == "action":
            await agent.hold()
        return await default_answer(call)

    agent.answer = answer
    await register(h, "w1", agent=agent)
    saga_id = await start(h, [agent_step("hold"), agent_step("book"), agent_step("pay")], id="c-1")
    await eventually(lambda: agent.steps() == ["hold", "book"], "book to be called")

    _, cancelled = await h.call("POST", f"/v1/sagas/{saga_id}/cancel", {"reason": "changed my mind"}, expect=200)
    assert cancelled == {"id": "c-1", "state": "compensating"}
    saga = await get_saga(h, saga_id)
    assert saga["reason"] == "cancelled: changed my mind"
    assert {k: v["status"] for k, v in steps_by_id(saga).items()} == {"hold": "succeeded", "book": "running",
                                                                      "pay": "abandoned"}
    assert agent.steps("compensation") == []  # nothing is undone while book is in flight
    _, again = await h.call("POST", f"/v1/sagas/{saga_id}/cancel", expect=200)  # already stopping: no change
    assert again["state"] == "compensating"

    agent.release.set()
    saga = await settled(h, saga_id)
    assert saga["state"] == "compensated"
    assert agent.steps("compensation") == ["book", "hold"]  # the late success is undone first
    assert [c.body["result"] for c in agent.calls if c.phase == "compensation"] == [
        {"did": "book", "attempt": 1}, {"did": "hold", "attempt": 1}]
    assert [e["type"] for e in await saga_events(h, saga_id)].count("saga.cancelled") == 1

    status, body = await h.call("POST", f"/v1/sagas/{saga_id}/cancel")
    assert status == 409 and body["error"]["code"] == "conflict"
    status, _ = await h.call("POST", "/v1/sagas/no-such-saga/cancel")
    assert status == 404


# -- bad input -----------------------------------------------------------------------------

GOOD = {"id": "a", "action": {"kind": "topic", "topic": "t"}}


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "x"}, "steps"),
    ({"steps": []}, "steps"),
    ({"steps": "a"}, "steps"),
    ({"steps": [{"id": "a", "action": {"kind": "carrier-pigeon"}}]}, "steps[0].action.kind"),
    ({"steps": [{"id": "a", "action": {"kind": "agent"}}]}, "steps[0].action"),
    ({"steps": [{"id": "a", "action": {"kind": "agent", "agent_id": "w", "path": "saga"}}]}, "steps[0].action.path"),
    ({"steps": [{"id": "a", "action": {"kind": "topic", "topic": "t", "colour": 1}}]}, "steps[0].action.colour"),
    ({"steps": [{"id": "a"}]}, "steps[0].action"),
    ({"steps": [GOOD], "colour": "red"}, "colour"),
    ({"steps": [{**GOOD, "colour": 1}]}, "steps[0].colour"),
    ({"steps": [GOOD, GOOD]}, "steps[1].id"),
    ({"steps": [{**GOOD, "depends_on": ["ghost"]}]}, "steps[0].depends_on"),
    ({"steps": [{**GOOD, "depends_on": ["b"]}, {**GOOD, "id": "b"}]}, "steps"),  # a -> b -> a
    ({"steps": [{**GOOD, "timeout_s": 1e9}]}, "steps[0].timeout_s"),
    ({"steps": [{**GOOD, "timeout_s": 0}]}, "steps[0].timeout_s"),
    ({"steps": [{**GOOD, "retry": {"max_attempts": 0}}]}, "steps[0].retry.max_attempts"),
    ({"steps": [GOOD], "compensation_retry": {"backoff_s": 5, "backoff_max_s": 1}},
     "compensation_retry.backoff_max_s"),
    ({"steps": [GOOD], "id": ""}, "id"),
    ({"steps": [GOOD], "id": "saga-12"}, "id"),  # reserved for generated ids
])
async def test_bad_definitions_are_refused_before_proposing(h: Harness, body: dict[str, Any], field: str) -> None:
    before = h.fingerprint()
    status, data = await h.call("POST", "/v1/sagas", body)
    assert status == 400, data
    assert data["error"]["field"] == field, data
    assert h.fingerprint() == before
    assert h.applier.machine.sagas.sagas == {}


async def test_bad_requests_name_the_field(h: Harness) -> None:
    before = h.fingerprint()
    for raw in (b"", b"[]", b"{"):
        status, data = await h.call("POST", "/v1/sagas", raw=raw, headers={"Content-Type": "application/json"})
        assert (status, data["error"]["field"]) == (400, "body")
    for query, field in (("state=done", "state"), ("limit=0", "limit"), ("limit=5000", "limit"),
                         ("limit=ten", "limit"), ("after=s2", "after"), ("after=-1", "after")):
        status, data = await h.call("GET", f"/v1/sagas?{query}")
        assert (status, data["error"]["field"]) == (400, field), query
    status, data = await h.call("POST", "/v1/sagas/x/cancel", {"reason": 7})
    assert (status, data["error"]["field"]) == (400, "reason")
    assert h.fingerprint() == before
    status, data = await h.call("GET", "/v1/sagas/unknown")
    assert status == 404 and data["error"]["code"] == "not_found"


# -- listing -------------------------------------------------------------------------------


async def test_list_filters_by_state_and_pages(h: Harness) -> None:
    """s1, s3, s5 complete (a topic publish); s2, s4 keep waiting for an
    agent that is not registered (the clock never reaches their retry)."""
    for n in range(1, 6):
        if n % 2:
            step = topic_step("a", "done.here")
        else:
            step = {"id": "a", "action": {"kind": "agent", "agent_id": "nobody"}, "retry": {"max_attempts": 5}}
        await start(h, [step], id=f"s{n}")
        if n % 2:
            await settled(h, f"s{n}")
        else:
            await waiting(h, f"s{n}", "a")

    created = {sid: saga.created_index for sid, saga in h.applier.machine.sagas.sagas.items()}

    async def page(query: str) -> tuple[list[str], str | None, dict[str, int]]:
        _, data = await h.call("GET", f"/v1/sagas?{query}", expect=200)
        assert all("history" not in s and "steps" in s for s in data["sagas"])
        nxt = data["next"]
        return [s["id"] for s in data["sagas"]], (None if nxt is None else by_index[nxt]), data["counts"]

    by_index = {index: sid for sid, index in created.items()}
    ids, nxt, counts = await page("")
    assert (ids, nxt) == (["s1", "s2", "s3", "s4", "s5"], None)
    assert counts == {"running": 2, "compensating": 0, "completed": 3, "compensated": 0, "failed-stuck": 0}
    assert await page("limit=2") == (["s1", "s2"], "s2", counts)
    assert (await page(f"limit=2&after={created['s2']}"))[:2] == (["s3", "s4"], "s4")
    assert (await page(f"limit=2&after={created['s4']}"))[:2] == (["s5"], None)
    assert (await page("state=running"))[:2] == (["s2", "s4"], None)
    assert (await page("state=completed&limit=2"))[:2] == (["s1", "s3"], "s3")
    assert (await page(f"state=completed&limit=2&after={created['s3']}"))[:2] == (["s5"], None)
    assert (await page("state=compensated"))[:2] == ([], None)
    # the cursor is a log index: it stays valid when the saga it came from is gone
    del h.applier.machine.sagas.sagas["s2"]
    assert (await page(f"limit=2&after={created['s2']}"))[:2] == (["s3", "s4"], "s4")


# -- the client ----------------------------------------------------------------------------


async def test_client_starts_reads_lists_and_waits(h: Harness, client: CoordinatorClient) -> None:
    started = await client.start_saga([topic_step("a", "x.y")], saga_id="k-1", name="client", input={"n": 1})
    assert started["id"] == "k-1"
    with pytest.raises(Conflict):
        await client.start_saga([topic_step("a", "x.y")], saga_id="k-1")
    done = await client.wait_saga("k-1", timeout_s=DEADLINE_S, poll_s=0.01)
    assert done["state"] == "completed" and done["name"] == "client"
    assert done["definition"]["input"] == {"n": 1}
    assert (await client.saga("k-1"))["history"][0]["event"] == "saga.started"
    assert await client.saga("nope") is None
    with pytest.raises(NotFound):
        await client.wait_saga("nope", timeout_s=1)

    stalled = {"id": "a", "action": {"kind": "agent", "agent_id": "nobody"}, "retry": {"max_attempts": 5}}
    await client.start_saga([stalled], saga_id="k-2")
    with pytest.raises(RequestTimeout):
        await client.wait_saga("k-2", timeout_s=0.2, poll_s=0.05)
    assert [s["id"] for s in await client.sagas()] == ["k-1", "k-2"]
    assert [s["id"] for s in await client.sagas("running")] == ["k-2"]
    assert [s["id"] for s in await client.sagas(limit=1)] == ["k-1"]

    assert await client.cancel_saga("k-2", reason="enough") == {"id": "k-2", "state": "compensated"}
    assert (await client.saga("k-2"))["reason"] == "cancelled: enough"
    with pytest.raises(Conflict):
        await client.cancel_saga("k-2")


async def test_client_start_retried_with_one_request_id_starts_once(
        h: Harness, client: CoordinatorClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the client's own retry does after a lost answer: the same body
    and request id again. The second answer is the first one."""
    monkeypatch.setattr(client, "_request_id", lambda: "start-once")
    first = await client.start_saga([topic_step("a", "x.y")])
    again = await client.start_saga([topic_step("a", "x.y")])
    assert again == first
    assert [s["id"] for s in await client.sagas()] == [first["id"]]
    assert len([e for e in await h.events("saga.started")]) == 1
