"""The stream check: a windowed count over events appended while the nemesis acts.

A tumbling-window processor (``WINDOW_S`` s, lateness ``LATENESS_S`` s)
counts, per writer, the events that ``writers`` clients append to their own
streams (an unknown outcome is retried with the same event id and expected
version, so each event is stored once). Window time is committed time: the
wall clock of the leader that stamped each entry, which the clock-skew
nemesis moves. After the heal the results are drained from the emit topic
until every stored event is accounted for (folded into an emitted window or
counted ``late`` by the processor) or ``drain_s`` passes.

``check_streams``: valid when no window result (window start, group) was
emitted twice and every stored event is accounted for. Events counted late
are reported (``late``): each is missing from the window results; a clock
that jumps forward makes every event after the jump back late until real
time catches up.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from coordinator.client import CoordinatorClient
from coordinator.errors import CoordinatorError

WINDOW_S = 2
LATENESS_S = 1
PROCESSOR = "chaos-windows"
EMIT = "chaos.windows"
EVENTS_MAX = 5000  # per writer


class StreamWorkload:
    def __init__(self, endpoints: list[str], *, writers: int = 2, op_timeout_s: float = 2.0, run_id: str = "x") -> None:
        self.endpoints = endpoints
        self.writers = writers
        self.timeout_s = op_timeout_s
        self.category = f"chaosw{run_id}"
        self.subscription: str | None = None
        self.errors: list[str] = []

    async def setup(self) -> None:
        async with CoordinatorClient(self.endpoints, timeout_s=15) as client:
            await client.put_processor(PROCESSOR, {
                "source": {"category": self.category}, "window": {"kind": "tumbling", "size_s": WINDOW_S},
                "lateness_s": LATENESS_S, "fold": "count", "group_by": "writer", "emit": EMIT})
            self.subscription = await client.subscribe(EMIT, guarantee="at-least-once")

    async def _writer(self, w: int, stop_at: float) -> None:
        endpoints = self.endpoints[w % len(self.endpoints):] + self.endpoints[:w % len(self.endpoints)]
        async with CoordinatorClient(endpoints, timeout_s=self.timeout_s) as client:
            version = -1
            for i in range(EVENTS_MAX):
                if time.monotonic() >= stop_at:
                    return
                event = {"type": "Tick", "data": {"writer": f"w{w}"}, "id": f"w{w}/{i}"}
                while time.monotonic() < stop_at + 30:  # the same event until stored
                    try:
                        version = (await client.append(f"{self.category}-{w}", [event],
                                                       expected_version=version))["version"]
                        break
                    except CoordinatorError as exc:
                        if getattr(exc, "code", "") == "conflict":  # stored by an earlier try
                            version += 1
                            break
                        await asyncio.sleep(0.05)
                await asyncio.sleep(0.02)

    async def run(self, duration_s: float) -> None:
        stop_at = time.monotonic() + duration_s
        await asyncio.gather(*(self._writer(w, stop_at) for w in range(self.writers)))

    async def drain(self, drain_s: float) -> dict[str, Any]:
        """Collect window results until every stored event is accounted for."""
        results: dict[str, int] = {}
        duplicates: list[str] = []
        stored = late = 0
        described: dict[str, Any] = {}
        deadline = time.monotonic() + drain_s
        async with CoordinatorClient(self.endpoints, timeout_s=15) as client:
            for w in range(self.writers):
                try:
                    page = await client.read_stream(f"{self.category}-{w}", backward=True, limit=1)
                    stored += page["version"] + 1
                except CoordinatorError as exc:
                    if getattr(exc, "code", "") != "not_found":
                        raise
            while time.monotonic() < deadline:
                deliveries = await client.fetch(self.subscription, max=1000, wait_s=0.5)
                for d in deliveries:
                    payload = d["message"]["payload"]
                    key = f"{payload['window']['start_ms']}/{payload['group']}"
                    if key in results and results[key] != payload["value"]:
                        duplicates.append(key)
                    elif key in results:  # at-least-once: the same result delivered again
                        pass
                    results[key] = payload["value"]
                if deliveries:
                    await client.ack(self.subscription, [d["delivery_id"] for d in deliveries])
                described = await client.processor(PROCESSOR)
                late = described.get("late", 0)
                if sum(results.values()) + late >= stored and described.get("open_windows", 0) == 0:
                    break
        return {"stored": stored, "folded": sum(results.values()), "late": late, "windows": len(results),
                "emitted": described.get("emitted"), "duplicates": duplicates[:10]}


def check_streams(drained: dict[str, Any]) -> dict[str, Any]:
    problems = []
    if drained["duplicates"]:
        problems.append({"kind": "window result emitted twice", "windows": drained["duplicates"]})
    if drained["emitted"] is not None and drained["emitted"] != drained["windows"]:
        problems.append({"kind": "emitted count differs from the distinct results",
                         "emitted": drained["emitted"], "distinct": drained["windows"]})
    if drained["folded"] + drained["late"] != drained["stored"]:
        problems.append({"kind": "events unaccounted for", "stored": drained["stored"],
                         "folded": drained["folded"], "late": drained["late"]})
    return {"valid": not problems, **drained, "problems": problems}
