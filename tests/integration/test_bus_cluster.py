"""The message bus on a real three-node cluster: delivery guarantees through
followers and across a leader SIGKILL, exactly-once dedupe, at-most-once
routing by the leader, request/reply, replay, dead letters, SSE and groups."""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import aclosing
from typing import Any

import aiohttp
import pytest

from coordinator.client import CoordinatorClient
from coordinator.errors import RequestTimeout
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster

NO_BACKOFF = {"retry": {"backoff_ms": 0}}

def _roles(cluster) -> tuple[str, list[str]]:
    leader = cluster.wait_leader()
    return leader, [n for n in cluster.members if n != leader]


async def test_at_least_once_through_followers_across_a_leader_sigkill(make_cluster) -> None:
    cluster = make_cluster()
    leader, followers = _roles(cluster)
    follower_urls = [cluster.url(n) for n in followers]
    async with CoordinatorClient(follower_urls, timeout_s=20) as client:
        sub = await client.subscribe("orders", ack_timeout_s=2)
        async with client.publisher("orders", max_batch=20, linger_s=0.01) as pub:
            answers = await asyncio.gather(*(pub.publish({"id": f"o{i}", "payload": {"i": i}}) for i in range(50)))
        assert [a["id"] for a in answers] == [f"o{i}" for i in range(50)]
        assert sorted(a["offset"] for a in answers) == list(range(1, 51))
        assert all(a["routed"] == 1 for a in answers)
        assert pub.batches == 3  # 20 + 20 + 10 messages: three requests, three log entries

        first = await client.fetch(sub, max=20)
        assert [d["offset"] for d in first] == list(range(1, 21))  # offset order (the batches may commit in any order)
        assert all(d["attempt"] == 1 and d["guarantee"] == "at-least-once" for d in first)
        acked, unacked = first[:10], first[10:]
        assert (await client.ack(sub, [d["delivery_id"] for d in acked]))["unknown"] == []
        assert client.endpoints == follower_urls  # nothing so far sent it to the leader

        cluster.kill(leader)
        new_leader = await asyncio.to_thread(cluster.wait_leader, 30, followers)
        assert new_leader in followers

        acked_ids = {d["delivery_id"] for d in acked}
        unacked_ids = {d["delivery_id"]: d["message"]["id"] for d in unacked}
        seen: dict[str, set[str]] = {f"o{i}": set() for i in range(50)}
        for d in first:
            seen[d["message"]["id"]].add(d["delivery_id"])
        after: list[dict[str, Any]] = []

        def done() -> bool:
            redelivered = {d["delivery_id"] for d in after if d["attempt"] >= 2}
            return all(seen.values()) and set(unacked_ids) <= redelivered

        async def all_came_back() -> bool:
            if done():
                return True
            got = await client.fetch(sub, max=50, wait_s=1)
            for d in got:
                seen[d["message"]["id"]].add(d["delivery_id"])
            after.extend(got)
            if got:
                await client.ack(sub, [d["delivery_id"] for d in got])
            return done()

        await eventually(all_came_back, lambda: f"every message to come back, got {after}", 40, interval_s=0)

        assert not acked_ids & {d["delivery_id"] for d in after}  # acked before the kill: never again
        for d in after:
            if d["delivery_id"] in unacked_ids:  # the same delivery, retried
                assert d["message"]["id"] == unacked_ids[d["delivery_id"]]
                assert d["attempt"] >= 2 and d["redelivered"] is True
        assert all(len(ids) == 1 for ids in seen.values())  # one delivery id per message
        state = await client.subscription(sub)
        assert (state["backlog"], state["pending"], state["delayed"], state["dlq"]) == (0, 0, 0, 0)
        assert await client.fetch(sub, max=50) == []


async def test_exactly_once_publish_is_deduplicated_across_nodes(make_cluster) -> None:
    cluster = make_cluster()
    a, b, c = (CoordinatorClient(cluster.url(n), timeout_s=10) for n in cluster.members)
    async with a, b, c:
        sub = await c.subscribe("payments", guarantee="exactly-once", ack_timeout_s=1)

        def payment(message_id: str, amount: int) -> dict[str, Any]:
            return {"id": message_id, "payload": {"amount": amount},
                    "deliveryOptions": {"guarantee": "exactly-once", **NO_BACKOFF}}

        first = await a.publish("payments", payment("pay-1", 10))
        assert first["offset"] == 1 and not first.get("duplicate")
        again = await a.publish("payments", payment("pay-1", 10))  # a new request id, the same message id
        assert again["duplicate"] is True and again["offset"] == first["offset"]
        elsewhere = await b.publish("payments", payment("pay-1", 99))
        assert elsewhere["duplicate"] is True and elsewhere["offset"] == first["offset"]
        batch = await b.publish("payments", messages=[payment("pay-2", 20), payment("pay-2", 20),
                                                      payment("pay-3", 30)])
        offsets = [m["offset"] for m in batch["messages"]]
        assert [bool(m.get("duplicate")) for m in batch["messages"]] == [False, True, False]
        assert offsets[0] == offsets[1] and offsets[2] == offsets[0] + 1

        retained = await c.topic_messages("payments")
        assert [(m["message"]["id"], m["message"]["payload"]["amount"]) for m in retained] == \
            [("pay-1", 10), ("pay-2", 20), ("pay-3", 30)]

        deliveries = await c.fetch(sub, max=10)
        by_id = {d["message"]["id"]: d["delivery_id"] for d in deliveries}
        assert len(deliveries) == 3 and list(by_id) == ["pay-1", "pay-2", "pay-3"]
        assert all(d["guarantee"] == "exactly-once" for d in deliveries)
        # not acked: pay-1 comes back after the ack timeout under its one delivery id
        await a.ack(sub, [by_id["pay-2"], by_id["pay-3"]])
        again_delivered = await eventually(lambda: c.fetch(sub, max=10, wait_s=1), "pay-1 redelivered", 15,
                                           interval_s=CLUSTER_POLL_S)
        assert [(d["message"]["id"], d["delivery_id"], d["attempt"]) for d in again_delivered] == \
            [("pay-1", by_id["pay-1"], 2)]
        await b.ack(sub, [by_id["pay-1"]])
        state = await a.subscription(sub)
        assert (state["enqueued"], state["acked"], state["backlog"], state["pending"]) == (3, 3, 0, 0)


async def test_at_most_once_is_routed_by_the_leader_and_never_redelivered(make_cluster) -> None:
    cluster = make_cluster()
    _, (f1, f2) = _roles(cluster)
    async with CoordinatorClient(cluster.url(f1)) as publisher, CoordinatorClient(cluster.url(f2)) as consumer:
        sub = await consumer.subscribe("telemetry", ack_timeout_s=0.5)
        answer = await publisher.publish("telemetry", {"id": "t1", "payload": {"temp": 21},
                                                       "deliveryOptions": {"guarantee": "at-most-once",
                                                                           **NO_BACKOFF}})
        assert answer["offset"] is None and answer["routed"] == 1  # forwarded, routed in the leader's memory

        got = await consumer.fetch(sub, max=10, wait_s=5)
        assert [(d["message"]["id"], d["guarantee"], d["attempt"]) for d in got] == [("t1", "at-most-once", 1)]
        assert got[0]["delivery_id"].startswith("v.")
        # never acked; a logged delivery would be back after 0.5 s: wait four times that
        assert await consumer.fetch(sub, max=10, wait_s=2) == []
        assert await publisher.topic_messages("telemetry") == []  # never entered the log
        state = await publisher.subscription(sub)
        assert (state["delivered"], state["backlog"], state["pending"]) == (0, 0, 0)
        assert [c.endpoint for c in (publisher, consumer)] == [cluster.url(f1), cluster.url(f2)]


async def test_request_reply_across_nodes_and_timeout_without_a_responder(make_cluster) -> None:
    cluster = make_cluster()
    leader, (f1, f2) = _roles(cluster)
    responder = CoordinatorClient(cluster.url(f1))
    caller = CoordinatorClient(cluster.url(f2))  # its requests are forwarded to the leader
    other = CoordinatorClient(cluster.url(leader))
    async with responder, caller, other:
        sub = await responder.subscribe("svc.add")
        stop = asyncio.Event()
        served: list[str] = []

        async def serve() -> None:
            while not stop.is_set():
                for delivery in await responder.fetch(sub, max=10, wait_s=0.5):
                    request = delivery["message"]
                    await responder.reply(request, {"sum": sum(request["payload"])})
                    await responder.ack(sub, [delivery["delivery_id"]])
                    served.append(request["id"])

        task = asyncio.create_task(serve())
        try:
            responses = await asyncio.wait_for(asyncio.gather(
                caller.call("svc.add", [1, 2, 3], timeout_s=10, message_id="req-a"),
                other.call("svc.add", [10, 20], timeout_s=10, message_id="req-b")), 20)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        assert [(r["type"], r["correlationId"], r["payload"]) for r in responses] == \
            [("response", "req-a", {"sum": 6}), ("response", "req-b", {"sum": 30})]
        assert sorted(served) == ["req-a", "req-b"]

        started = time.monotonic()
        with pytest.raises(RequestTimeout):
            await caller.call("svc.add", [4], timeout_s=1.0, message_id="req-c")
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 5.0, elapsed
        unanswered = await other.fetch(sub, max=10)  # the request was published once, not retried
        assert [d["message"]["id"] for d in unanswered] == ["req-c"]


async def test_replay_from_the_beginning_and_dead_letters_across_nodes(make_cluster) -> None:
    cluster = make_cluster()
    a, b, c = (CoordinatorClient(cluster.url(n)) for n in cluster.members)
    async with a, b, c:
        for i in range(6):  # each through another node, one after the other
            await (a, b, c)[i % 3].publish("audit", {"id": f"e{i}", "payload": i})
        replay = await b.subscribe("audit", start="beginning")
        assert (await a.subscription(replay))["backlog"] == 6
        got = await c.fetch(replay, max=100)
        assert [(d["message"]["id"], d["offset"]) for d in got] == [(f"e{i}", i + 1) for i in range(6)]
        await a.ack(replay, [d["delivery_id"] for d in got])
        fresh = await a.subscribe("audit")  # start="new": nothing old
        assert await b.fetch(fresh, max=100) == []

        strict = await a.subscribe("audit", max_attempts=1)
        await b.publish("audit", {"id": "poison", "payload": "bad"})
        [delivery] = await c.fetch(strict, max=10, wait_s=5)
        assert delivery["message"]["id"] == "poison"
        assert (await a.nack(strict, [delivery["delivery_id"]]))["nacked"] == [delivery["delivery_id"]]
        letters = await b.dead_letters(strict)
        assert [(d["delivery_id"], d["reason"], d["attempts"], d["message"]["id"]) for d in letters] == \
            [(delivery["delivery_id"], "max_attempts", 1, "poison")]
        assert await c.fetch(strict, max=10) == []
        assert await c.redrive(strict) == [delivery["delivery_id"]]
        assert await a.dead_letters(strict) == []
        [back] = await b.fetch(strict, max=10, wait_s=5)
        assert (back["delivery_id"], back["attempt"], back["message"]["id"]) == (delivery["delivery_id"], 1, "poison")
        await c.ack(strict, [back["delivery_id"]])
        state = await a.subscription(strict)
        assert (state["dead_lettered"], state["redriven"], state["acked"], state["dlq"]) == (1, 1, 1, 0)


async def test_sse_stream_through_a_follower_delivers_and_auto_acks(make_cluster) -> None:
    cluster = make_cluster()
    leader, (follower, _) = _roles(cluster)
    async with CoordinatorClient(cluster.url(follower)) as client, CoordinatorClient(cluster.url(leader)) as pub:
        sub = await client.subscribe("feed")
        await pub.publish("feed", messages=[{"id": f"f{i}", "payload": i} for i in range(3)])
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(30), aclosing(client.stream(sub, auto_ack=True)) as stream:
            async for delivery in stream:
                got.append(delivery)
                if len(got) == 3:  # the backlog came; what follows is published while the stream waits
                    await pub.publish("feed", messages=[{"id": f"f{i}", "payload": i} for i in range(3, 5)])
                if len(got) == 5:
                    break
        assert [d["message"]["id"] for d in got] == [f"f{i}" for i in range(5)]
        assert len({d["delivery_id"] for d in got}) == 5 and all(d["attempt"] == 1 for d in got)
        assert client.endpoint == cluster.url(follower)

        async def all_acked() -> bool:
            state = await pub.subscription(sub)
            return state["acked"] == 5 and state["pending"] == 0 and state["backlog"] == 0

        await eventually(all_acked, "the stream's auto acks", 10, interval_s=CLUSTER_POLL_S)


async def test_group_members_on_different_nodes_never_share_a_pending_message(make_cluster) -> None:
    cluster = make_cluster()
    n1, n2, n3 = cluster.members
    one, two, reader = (CoordinatorClient(cluster.url(n)) for n in (n1, n2, n3))
    async with one, two, reader:
        m1 = await one.subscribe("jobs.>", group="workers", ack_timeout_s=60)
        m2 = await two.subscribe("jobs.>", group="workers", ack_timeout_s=60)
        await reader.publish("jobs.build", messages=[{"id": f"j{i}", "payload": i} for i in range(10)])
        first, second = await asyncio.gather(one.fetch(m1, max=6, wait_s=5), two.fetch(m2, max=6, wait_s=5))
        ids_one = {d["message"]["id"] for d in first}
        ids_two = {d["message"]["id"] for d in second}
        assert not ids_one & ids_two
        assert ids_one | ids_two == {f"j{i}" for i in range(10)}
        state = await reader.subscription(m1)
        assert (state["kind"], state["backlog"], state["pending"]) == ("group", 0, 10)
        assert sorted(state["members"]) == sorted([m1, m2])
        assert await one.fetch(m1, max=10) == [] and await two.fetch(m2, max=10) == []  # all pending

        # a member gives one back: only then may the other member have it, under the same delivery id
        given_back = first[0]
        assert (await one.nack(m1, [given_back["delivery_id"]], delay_s=0))["nacked"] == [given_back["delivery_id"]]
        [taken] = await two.fetch(m2, max=10, wait_s=5)
        assert (taken["delivery_id"], taken["attempt"]) == (given_back["delivery_id"], 2)
        await one.ack(m1, [d["delivery_id"] for d in first[1:]])
        await two.ack(m2, [d["delivery_id"] for d in second] + [taken["delivery_id"]])
        state = await reader.subscription(m2)
        assert (state["acked"], state["pending"], state["backlog"], state["delivered"]) == (10, 0, 0, 11)


async def test_a_closed_stream_takes_no_more_messages(make_cluster) -> None:
    cluster = make_cluster()
    _, (follower, _) = _roles(cluster)
    async with CoordinatorClient(cluster.url(follower)) as client:
        sub = await client.subscribe("feed", ack_timeout_s=30)
        await client.publish("feed", {"id": "m1", "payload": 1})
        async with asyncio.timeout(15), aclosing(client.stream(sub, auto_ack=True)) as stream:
            assert (await anext(stream))["message"]["id"] == "m1"
        await client.publish("feed", {"id": "m2", "payload": 2})  # after the stream was closed
        got = await client.fetch(sub, max=10, wait_s=5)
        assert [d["message"]["id"] for d in got] == ["m2"], await client.subscription(sub)


async def test_a_node_stops_promptly_on_sigterm_with_a_stream_open(make_cluster) -> None:
    cluster = make_cluster()
    leader = cluster.wait_leader()
    async with CoordinatorClient(cluster.url(leader)) as client:
        sub = await client.subscribe("feed")
    url = f"{cluster.url(leader)}/v1/subscriptions/{sub}/stream"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession() as http, http.get(url, timeout=timeout) as response:
        assert response.status == 200  # its handler runs: the stream is open
        cluster.signal(leader, signal.SIGTERM)

        async def gone() -> bool:
            return cluster.pid(leader) is None

        try:
            await eventually(gone, f"{leader} to exit after SIGTERM", 5, interval_s=CLUSTER_POLL_S)
        finally:
            await asyncio.to_thread(cluster.kill, leader)


async def test_a_member_down_and_back_is_published_as_system_events(make_cluster) -> None:
    """The leader's failure detector: a follower unreachable for 3 s becomes a
    committed system.failure on the bus, and system.recovered when it is back."""
    cluster = make_cluster()
    leader, followers = _roles(cluster)
    victim = followers[0]
    async with CoordinatorClient([cluster.url(leader), cluster.url(followers[1])], timeout_s=20) as client:
        sub = await client.subscribe("system.>")
        cluster.kill(victim)
        received: list[dict[str, Any]] = []

        async def seen(kind: str) -> bool:
            received.extend(await client.fetch(sub, max=50, wait_s=1))
            return any(d["topic"] == kind and d["message"]["payload"]["member"] == victim for d in received)

        await eventually(lambda: seen("system.failure"), f"system.failure of {victim}", 20, interval_s=CLUSTER_POLL_S)
        failure = next(d for d in received if d["topic"] == "system.failure")
        assert failure["message"]["type"] == "event" and failure["message"]["source"] == "coordinator"
        cluster.start(victim)
        await eventually(lambda: seen("system.recovered"), f"system.recovered of {victim}", 30,
                         interval_s=CLUSTER_POLL_S)
        await client.ack(sub, [d["delivery_id"] for d in received])
