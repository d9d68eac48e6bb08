"""The Python client's bus half (coordinator/client.py) against the test server."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any

import pytest

from coordinator.client import CoordinatorClient
from coordinator.errors import InvalidInput, NotFound, RequestTimeout, Unavailable
from tests.coordinator.api.conftest import Harness
from tests.waiting import eventually


async def test_publisher_batches_concurrent_messages_into_few_requests(h: Harness, client: CoordinatorClient) -> None:
    sub = await client.subscribe("jobs.created")
    entries_before = len(h.engine.log)
    async with client.publisher("jobs.created", max_batch=20, linger_s=0.01) as pub:
        answers = await asyncio.gather(*(pub.publish({"id": f"j{i}", "payload": {"i": i}}) for i in range(50)))
    assert [a["id"] for a in answers] == [f"j{i}" for i in range(50)]
    assert len({a["offset"] for a in answers}) == 50
    assert pub.batches == 3  # 20 + 20 + 10
    assert len(h.engine.log) - entries_before == 3  # one log entry per batch
    got = await client.fetch(sub, max=100)
    assert [d["message"]["payload"]["i"] for d in got] == list(range(50))


async def test_publisher_reports_a_bad_message_to_every_waiter(client: CoordinatorClient) -> None:
    async with client.publisher("t", max_batch=10, linger_s=0.01) as pub:
        results = await asyncio.gather(pub.publish({"payload": 1}), pub.publish({"priority": 99}),
                                       return_exceptions=True)
    assert all(isinstance(r, InvalidInput) for r in results)
    assert results[0].field == "messages[1].priority"


async def test_publish_one_or_many_and_read_the_topic(client: CoordinatorClient) -> None:
    one = await client.publish("audit.log", {"payload": {"n": 1}})
    many = await client.publish("audit.log", messages=[{"payload": {"n": 2}}, {"payload": {"n": 3}}])
    assert one["offset"] == 1 and [m["offset"] for m in many["messages"]] == [2, 3]
    retained = await client.topic_messages("audit.log", from_offset=2)
    assert [m["message"]["payload"]["n"] for m in retained] == [2, 3]
    with pytest.raises(InvalidInput):
        await client.publish("audit.log")


async def test_consume_acks_processed_and_nacks_failures(h: Harness, client: CoordinatorClient) -> None:
    sub = await client.subscribe("work", max_attempts=1)
    await client.publish("work", messages=[{"payload": {"ok": True}}, {"payload": {"ok": False}},
                                           {"payload": {"ok": True}}])
    seen: list[Any] = []
    stop = asyncio.Event()

    async def handler(delivery: dict[str, Any]) -> None:
        seen.append(delivery["message"]["payload"])
        if len(seen) == 3:
            stop.set()
        if not delivery["message"]["payload"]["ok"]:
            raise RuntimeError("cannot process")

    await asyncio.wait_for(client.consume(sub, handler, wait_s=0.5, stop=stop), 5)
    state = await client.subscription(sub)
    assert state["acked"] == 2 and state["nacked"] == 1
    letters = await client.dead_letters(sub)
    assert [(d["reason"], d["message"]["payload"]) for d in letters] == [("max_attempts", {"ok": False})]
    assert await client.redrive(sub) == [letters[0]["delivery_id"]]
    again = await client.fetch(sub)
    assert [d["delivery_id"] for d in again] == [letters[0]["delivery_id"]]
    await client.nack(sub, [again[0]["delivery_id"]], dead_letter=True)
    assert await client.purge(sub) == 1
    assert await client.dead_letters(sub) == []


async def test_consume_does_not_process_a_redelivery_twice(h: Harness, client: CoordinatorClient) -> None:
    """A lost ack: the delivery comes back with the same delivery id, and the
    consume loop acks it without calling the handler again."""
    sub = await client.subscribe("once", ack_timeout_s=1)
    await client.publish("once", {"id": "m1", "payload": 1, "deliveryOptions": {"guarantee": "exactly-once",
                                                                                "retry": {"backoff_ms": 0}}})
    calls: list[str] = []
    lost_first_ack = False
    real_ack = client.ack

    async def flaky_ack(subscription: str | None, ids: list[str], **kw: Any) -> dict[str, Any]:
        nonlocal lost_first_ack
        if not lost_first_ack:
            lost_first_ack = True
            raise Unavailable("the ack was lost")
        return await real_ack(subscription, ids, **kw)

    client.ack = flaky_ack  # type: ignore[method-assign]
    stop = asyncio.Event()

    async def handler(delivery: dict[str, Any]) -> None:
        calls.append(delivery["delivery_id"])

    task = asyncio.create_task(client.consume(sub, handler, wait_s=0.2, stop=stop))
    await eventually(lambda: calls and lost_first_ack, "the first delivery and its lost ack")
    h.clock.advance(2)  # past the ack timeout: the leader's tick requeues it
    await eventually(lambda: h.applier.machine.bus.consumers[f"s:{sub}"].counters["acked"] == 1,
                     "the redelivery to be acked")
    stop.set()
    await asyncio.wait_for(task, 5)
    state = await client.subscription(sub)
    assert state["redelivered"] == 1
    assert len(calls) == 1


async def test_call_and_reply(h: Harness, client: CoordinatorClient) -> None:
    sub = await client.subscribe("svc.add")

    async def responder() -> None:
        for _ in range(50):
            for delivery in await client.fetch(sub, wait_s=0.5):
                request = delivery["message"]
                await client.reply(request, {"sum": sum(request["payload"])})
                await client.ack(sub, [delivery["delivery_id"]])
                return

    task = asyncio.create_task(responder())
    response = await client.call("svc.add", [1, 2, 3], timeout_s=3)
    await task
    assert response["type"] == "response" and response["payload"] == {"sum": 6}


async def test_call_timeout_is_raised_once_not_retried(h: Harness, client: CoordinatorClient) -> None:
    sub = await client.subscribe("svc.silent")
    with pytest.raises(RequestTimeout):
        await client.call("svc.silent", {}, timeout_s=0.2)
    requests = await client.fetch(sub, max=10)
    assert len(requests) == 1  # one request published, no retry published another
    async with CoordinatorClient([client.endpoint], timeout_s=0.5) as impatient:
        with pytest.raises(Unavailable, match="no responders"):
            await impatient.call("svc.nobody", {}, timeout_s=0.2)


async def test_stream_delivers_and_auto_acks(h: Harness, client: CoordinatorClient) -> None:
    sub = await client.subscribe("feed")
    await client.publish("feed", messages=[{"payload": i} for i in range(3)])
    got = []
    async with aclosing(client.stream(sub, auto_ack=True)) as stream:
        async for delivery in stream:
            got.append(delivery["message"]["payload"])
            if len(got) == 3:
                break
    assert got == [0, 1, 2]
    await eventually(lambda: h.applier.machine.bus.consumers[f"s:{sub}"].counters["acked"] == 3, "auto acks")
    with pytest.raises(NotFound):
        async with aclosing(client.stream("sub-999")) as missing:
            await missing.__anext__()


async def test_inbox_of_an_agent(h: Harness, client: CoordinatorClient) -> None:
    await client.register("worker", agent_id="w1")
    await client.publish("anything", {"destination": ["w1"], "payload": "direct"})
    got = await client.fetch(agent="w1")
    assert [d["message"]["payload"] for d in got] == ["direct"]
    assert (await client.ack(None, [got[0]["delivery_id"]], agent="w1"))["acked"] == [got[0]["delivery_id"]]
    with pytest.raises(InvalidInput):
        await client.fetch("sub-1", agent="w1")


async def test_group_members_share_the_work(client: CoordinatorClient) -> None:
    a = await client.subscribe("tasks.>", group="workers")
    b = await client.subscribe("tasks.>", group="workers")
    await client.publish("tasks.x", messages=[{"payload": i} for i in range(6)])
    first = await client.fetch(a, max=4)
    second = await client.fetch(b, max=4)
    assert len(first) == 4 and len(second) == 2
    assert sorted(d["message"]["payload"] for d in first + second) == list(range(6))
    assert await client.unsubscribe(a) is True
    assert await client.unsubscribe(a) is False
