"""``GET /v1/snapshot``: a consistent, self-checking backup of the state
(the harness node allows anonymous access; who may call it is in
test_auth.py: the admin only)."""

from __future__ import annotations

import asyncio

from coordinator import snapshot_file
from coordinator.codec import decode_snapshot
from coordinator.services.applier import Applier
from tests.coordinator.api.conftest import Harness


async def _download(h: Harness) -> tuple[int, dict[str, str], bytes]:
    async with h.http.get("/v1/snapshot") as response:
        return response.status, dict(response.headers), await response.read()


async def test_the_snapshot_holds_every_write_before_it_with_its_index_and_checksum(h: Harness) -> None:
    for i in range(5):
        await h.put(f"k{i}", i)
    await h.register("worker", id="w1")
    status, headers, body = await _download(h)
    assert status == 200
    snap = snapshot_file.parse(body)
    assert snap.index == h.applier.applied_index == int(headers["X-Coord-Snapshot-Index"])
    assert snap.checksum == headers["X-Coord-Snapshot-Sha256"]
    assert snap.header["digest"]["value"] == h.applier.digest.value.hex() == headers["X-Coord-Snapshot-Digest"]
    assert snap.header["holds"]["keys"] == 5 and snap.header["holds"]["agents"] == 1
    assert decode_snapshot(snap.body)["applied_index"] == snap.index
    restored = Applier()
    restored.restore(snap.body)  # what restore seeds a new cluster with
    assert restored.machine.kv.get("k4").value == 4 and restored.digest.value == h.applier.digest.value
    async with h.http.get("/metrics") as response:
        metrics = await response.text()
    assert "coord_backup_snapshots_total 1.0" in metrics
    assert f"coord_backup_snapshot_last_bytes {float(len(body))}" in metrics


async def test_one_snapshot_at_a_time_per_node(h: Harness, monkeypatch) -> None:
    """While one is being taken, another request is refused at once (429 with
    Retry-After), and the node takes the next one afterwards."""
    taker = h.node.snapshots
    held = asyncio.Event()
    entered = asyncio.Event()
    barrier = taker._barrier

    async def slow_barrier(consistency: str) -> None:
        entered.set()
        await held.wait()
        await barrier(consistency)

    monkeypatch.setattr(taker, "_barrier", slow_barrier)
    first = asyncio.create_task(_download(h))
    await asyncio.wait_for(entered.wait(), 5)
    status, headers, body = await _download(h)
    assert status == 429 and headers["Retry-After"] == "1" and b"already being taken" in body
    held.set()
    status, _, _ = await first
    assert status == 200 and taker.refused_busy == 1
    status, _, _ = await _download(h)
    assert status == 200 and taker.taken == 2
