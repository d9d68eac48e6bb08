"""A windowed aggregation on three real nodes with the leader killed while
windows are open: every window's result is emitted exactly once (none lost,
none twice), and together they count every event stored."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.client import CoordinatorClient
from coordinator.errors import CoordinatorError
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster

WINDOW_S = 2
MAX_EVENTS = 3000


async def _writer(endpoints: list[str], w: int, stop: asyncio.Event) -> None:
    """Appends to its own stream; after an unknown outcome, the same event
    again (same id, same expected version): stored exactly once."""
    async with CoordinatorClient(endpoints, timeout_s=15) as client:
        version = -1
        for i in range(MAX_EVENTS):
            if stop.is_set():
                return
            event = {"type": "Tick", "data": {"writer": f"w{w}"}, "id": f"w{w}/{i}"}
            while True:
                try:
                    version = (await client.append(f"tick-{w}", [event], expected_version=version))["version"]
                    break
                except CoordinatorError:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.01)


async def test_window_results_are_neither_lost_nor_duplicated_across_a_leader_kill(make_cluster) -> None:
    cluster = make_cluster()
    old = cluster.wait_leader()
    endpoints = [cluster.url(n) for n in cluster.members]
    async with CoordinatorClient(endpoints, timeout_s=15) as client:
        await client.put_processor("per-writer", {
            "source": {"category": "tick"}, "window": {"kind": "tumbling", "size_s": WINDOW_S}, "lateness_s": 1,
            "fold": "count", "group_by": "writer", "emit": "stats.ticks"})
        sub = await client.subscribe("stats.ticks", guarantee="at-least-once")
    stop = asyncio.Event()
    writers = [asyncio.create_task(_writer(endpoints[w % 3:] + endpoints[:w % 3], w, stop)) for w in range(3)]
    async with CoordinatorClient(endpoints, timeout_s=15) as client:

        async def windows(emitted: int) -> bool:
            """At least ``emitted`` window results out and a window open (events still coming)."""
            processor = await client.processor("per-writer")
            return processor["emitted"] >= emitted and processor["open_windows"] > 0

        await eventually(lambda: windows(1), "a window closed and others open before the kill", 30,
                         interval_s=CLUSTER_POLL_S)
        cluster.kill(old)
        survivors = [n for n in cluster.members if n != old]
        await asyncio.to_thread(cluster.wait_leader, 30, survivors)
        emitted = (await client.processor("per-writer"))["emitted"]
        await eventually(lambda: windows(emitted + 1), "a window closed by the new leader, others open", 30,
                         interval_s=CLUSTER_POLL_S)
    stop.set()
    await asyncio.gather(*writers)
    stopped_at = time.time()

    async with CoordinatorClient([cluster.url(n) for n in survivors], timeout_s=15) as client:
        stored = 0
        for w in range(3):
            page = await client.read_stream(f"tick-{w}", backward=True, limit=1)
            stored += page["version"] + 1
        results: dict[tuple[int, str], int] = {}
        duplicates: list[tuple[int, str]] = []

        async def drained() -> bool:
            """Until every stored event is in an emitted window (the new leader ticks them closed)."""
            deliveries = await client.fetch(sub, max=1000, wait_s=0.5)
            for d in deliveries:
                payload = d["message"]["payload"]
                key = (payload["window"]["start_ms"], payload["group"])
                if key in results:
                    duplicates.append(key)
                results[key] = payload["value"]
            if deliveries:
                await client.ack(sub, [d["delivery_id"] for d in deliveries])
            return sum(results.values()) >= stored

        await eventually(drained, "every window of the stored events to be emitted", 30, interval_s=CLUSTER_POLL_S)
        assert not duplicates, f"windows emitted twice: {duplicates[:5]}"
        assert sum(results.values()) == stored
        described = await client.processor("per-writer")
        assert described["late"] == 0 and described["emitted"] == len(results)
    assert all(start / 1000 <= stopped_at for start, _ in results)
    print(f"{stored} events in {len(results)} window results across the kill of {old}")
