"""RabbitMQ's push consumer: what an instance prefetched goes back to the
queue when it stops fetching, and the redelivered flag stays truthful."""

from __future__ import annotations

import pytest

from tests.transports.conftest import TransportFactory
from tests.transports.test_contract import TOPIC, drain, entries
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.integration

# Longer than the transport's idle period plus a sweep, with room for a slow machine.
DEADLINE_S = 15.0


@pytest.fixture
def plugin() -> str:
    return "rabbitmq"


async def test_an_instance_that_stops_fetching_gives_its_prefetched_messages_to_another(
        make_transport: TransportFactory) -> None:
    idle = await make_transport()
    other = await make_transport()  # same namespace: a second node of the cluster
    await idle.bind(TOPIC)
    await idle.subscribe(TOPIC, "g")
    await idle.publish(entries(1, 20))
    first = await idle.fetch(TOPIC, "g", "c1", 1, 5.0)
    assert [d.offset for d in first] == [1]
    await idle.ack(TOPIC, "g", [first[0].delivery_id])

    async def held_by_idle() -> bool:  # nothing ready in the queue: the rest sits in idle's buffer
        return await other.lag(TOPIC, "g") == 0 and await idle.lag(TOPIC, "g") == 19

    await eventually(held_by_idle, "the broker pushed the other 19 to the fetching instance", DEADLINE_S,
                     interval_s=CLUSTER_POLL_S)
    got = await drain(other, "g", 19, deadline_s=DEADLINE_S)
    assert sorted(d.offset for d in got) == list(range(2, 21))
    assert await idle.lag(TOPIC, "g") == 0
    # The broker flags them redelivered; only the instance that gave them back
    # knows they were never handed out (the next test), so the flag is not checked here.


async def test_messages_given_back_unseen_are_not_redelivered_but_nacked_ones_are(
        make_transport: TransportFactory) -> None:
    transport = await make_transport()
    observer = await make_transport()  # sees the queue's ready count only
    await transport.bind(TOPIC)
    await transport.subscribe(TOPIC, "g")
    await transport.publish(entries(1, 10))
    first = await transport.fetch(TOPIC, "g", "c1", 1, 5.0)
    await transport.ack(TOPIC, "g", [d.delivery_id for d in first])

    async def buffered() -> bool:
        return await observer.lag(TOPIC, "g") == 0 and await transport.lag(TOPIC, "g") == 9

    async def given_back() -> bool:
        return await observer.lag(TOPIC, "g") == 9

    await eventually(buffered, "the broker pushed the other 9", DEADLINE_S, interval_s=CLUSTER_POLL_S)
    await eventually(given_back, "the idle instance gave its buffer back to the queue", DEADLINE_S,
                     interval_s=CLUSTER_POLL_S)
    again = await drain(transport, "g", 9, ack=False, deadline_s=DEADLINE_S)
    assert sorted(d.offset for d in again) == list(range(2, 11))
    assert not any(d.redelivered for d in again)  # only ever buffered: a first delivery

    await transport.nack(TOPIC, "g", [again[0].delivery_id])
    back = await drain(transport, "g", 1, ack=False, deadline_s=DEADLINE_S)
    assert [(d.offset, d.redelivered) for d in back] == [(again[0].offset, True)]


async def test_a_consumer_whose_queue_was_deleted_and_made_again_consumes_the_new_one(
        make_transport: TransportFactory) -> None:
    consumer = await make_transport()
    admin = await make_transport()
    await admin.bind(TOPIC)
    await admin.subscribe(TOPIC, "g")
    await admin.publish(entries(1, 3))
    assert sorted(d.offset for d in await drain(consumer, "g", 3)) == [1, 2, 3]
    # Another node deletes the group (the broker cancels consumer's consumer) and makes it again.
    await admin.unbind(TOPIC)
    await admin.bind(TOPIC)
    await admin.subscribe(TOPIC, "g")
    await admin.publish(entries(4, 6))
    got = await drain(consumer, "g", 3, deadline_s=DEADLINE_S)
    assert sorted(d.offset for d in got) == [4, 5, 6]
