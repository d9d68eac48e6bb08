"""The client as issue 24 asked: list() pages past the API's page, an
unknown outcome carries its request id and a safe retry, retries back off
with jitter, a held lock keeps its lease, and a blocking facade for
scripts. Against the test server (one node, simulated engine)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from coordinator import client as client_module
from coordinator.client import CoordinatorClient, RetriableOutcomeUnknown, backoff_s
from coordinator.errors import Conflict, OutcomeUnknown, QuotaExceeded
from coordinator.state import Limits
from coordinator.sync_client import SyncClient
from tests.coordinator.api.conftest import Harness, HarnessFactory
from tests.waiting import eventually


async def test_list_reads_every_page(h: Harness, client: CoordinatorClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "LIST_PAGE", 3)
    for i in range(8):
        await client.put(f"p/{i}", i)
    await client.put("q/other", 0)
    assert [i["key"] for i in await client.list("p/")] == [f"p/{i}" for i in range(8)]
    assert [i["key"] for i in await client.list("p/", limit=5)] == [f"p/{i}" for i in range(5)]
    assert await client.list("none/") == []


async def test_an_unknown_outcome_carries_its_request_id_and_retries_it_safely(make_harness: HarnessFactory) -> None:
    h = await make_harness(proposal_timeout_s=0.1)
    h.engine.hold = True  # accepted, never committed: the caller cannot know
    async with CoordinatorClient([str(h.http.make_url(""))], timeout_s=0.4) as client:
        with pytest.raises(OutcomeUnknown) as unknown:
            await client.put("once", "v")
        error = unknown.value
        assert isinstance(error, RetriableOutcomeUnknown)
        assert error.request_id is not None and len(error.request_id) >= 16
        h.engine.release()  # every held attempt commits now: the same request, applied once
        answer = await error.retry()
        assert answer["revision"] > 0
        assert (await client.get("once"))["version"] == 1
        assert (await client.get("once"))["revision"] == answer["revision"]


async def test_a_read_that_got_no_answer_has_no_request_id(make_harness: HarnessFactory) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    try:
        async with CoordinatorClient(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout_s=0.2,
                                     request_timeout_s=0.2) as client:
            with pytest.raises(RetriableOutcomeUnknown) as unknown:
                await client.get("k")
            assert unknown.value.request_id is None
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


def test_retries_back_off_with_jitter() -> None:
    for attempt in range(1, 8):
        waits = [backoff_s(attempt) for _ in range(200)]
        ceiling = min(0.05 * 2 ** min(attempt, 5), 1.0)
        assert all(0 <= w <= ceiling for w in waits)
        assert len(set(waits)) == len(waits)  # no two clients' schedules line up
        assert max(waits) > ceiling / 2 and min(waits) < ceiling / 2
    asked = [backoff_s(3, 0.5) for _ in range(200)]
    assert all(0.5 <= w <= 0.6 for w in asked) and len(set(asked)) == len(asked)
    assert all(1.0 <= backoff_s(1, 30.0) <= 1.2 for _ in range(50))


async def test_a_held_lock_is_renewed_and_released(h: Harness, client: CoordinatorClient) -> None:
    async with client.lock("jobs/a", "w1", ttl_s=1.0) as held:
        assert held.token > 0 and not held.lost.is_set()
        assert await client.acquire("jobs/a", "w2") is None  # held by w1
        h.clock.advance(0.9)
        # the keeper renews a third of the TTL in: the lease moves past the old deadline
        await eventually(lambda: (h.node.leases.remaining_s("lock", "jobs/a") or 0.0) > 0.5,
                         "the lock's lease renewed by the keeper", timeout_s=5)
    assert await client.acquire("jobs/a", "w2") is not None  # released on the way out


async def test_a_lock_held_by_another_is_a_conflict_after_waiting(h: Harness, client: CoordinatorClient) -> None:
    assert await client.acquire("jobs/b", "other", ttl_s=30) is not None
    with pytest.raises(Conflict):
        async with client.lock("jobs/b", "w1", wait_s=0.3, poll_s=0.1):
            pass


async def test_the_blocking_facade(h: Harness) -> None:
    url = str(h.http.make_url(""))
    results: dict[str, object] = {}

    def script() -> None:
        with SyncClient([url], timeout_s=3) as client:
            results["revision"] = client.put("s/a", "x")
            results["value"] = client.get("s/a")["value"]
            results["keys"] = [i["key"] for i in client.list("s/")]
            with client.lock("s/lock", "script") as held:
                results["token"] = held.token
            results["missing"] = client.get("s/missing")

    thread = threading.Thread(target=script)
    thread.start()
    await eventually(lambda: not thread.is_alive(), "the script to finish", timeout_s=10)
    assert results["value"] == "x" and results["keys"] == ["s/a"] and results["missing"] is None
    assert isinstance(results["revision"], int) and isinstance(results["token"], int)


async def test_a_lock_that_expired_and_was_taken_is_marked_lost(h: Harness, client: CoordinatorClient) -> None:
    async with client.lock("jobs/c", "w1", ttl_s=3.0) as held:
        h.clock.advance(5.0)  # the lease runs out before the keeper's first renewal (1 s in)
        await eventually(lambda: h.applier.machine.locks.locks.get("jobs/c") is None, "the lease to expire")
        assert await client.acquire("jobs/c", "w2", ttl_s=30) is not None
        await eventually(held.lost.is_set, "the keeper to notice the lock is gone")
    assert await client.acquire("jobs/c", "w3") is None  # leaving did not release w2's lock


async def test_a_full_store_is_quota_exceeded_naming_the_limit(make_harness: HarnessFactory) -> None:
    h = await make_harness(limits=Limits(kv_bytes_max=200))
    async with CoordinatorClient([str(h.http.make_url(""))], timeout_s=3) as client:
        with pytest.raises(QuotaExceeded) as full:
            await client.put("big", "x" * 500)
    assert full.value.details.get("limit") == "kv_bytes_max"
