"""The raft engine's bridge from pysyncobj's tick thread to the loop
(``cluster.raft_pysyncobj._Bridge``): everything in order, in budgeted
drains, nothing applied after a halt."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

from cluster.raft_pysyncobj import _Bridge


class _Fsm:
    def __init__(self, fail_at: int | None = None) -> None:
        self.applied: list[int] = []
        self.fail_at = fail_at

    def apply(self, index: int, blob: bytes) -> bytes:
        if index == self.fail_at:
            raise LookupError("handler bug")
        self.applied.append(index)
        return b""

    def snapshot(self) -> bytes:
        return b"S"

    def restore(self, blob: bytes) -> None: ...

    def reset(self) -> None: ...


async def _settled(bridge: _Bridge) -> None:
    done = asyncio.get_running_loop().create_future()
    bridge.post(("done", lambda _: done.set_result(None), None))
    async with asyncio.timeout(10):
        await done


async def test_items_from_a_thread_arrive_in_order_across_budgeted_drains() -> None:
    fsm = _Fsm()
    seen: list[Any] = []
    bridge = _Bridge(asyncio.get_running_loop(), fsm, on_role=seen.append)
    drains = 0
    drain = bridge._drain

    def counting(budget: int = 7) -> None:  # a small budget: many drains, each yielding
        nonlocal drains
        drains += 1
        drain(budget)

    bridge._drain = counting  # type: ignore[method-assign]

    def tick_thread() -> None:
        for index in range(1, 501):
            bridge.post(("apply", index, b"x"))
            if index % 100 == 0:
                bridge.post(("role", index))

    thread = threading.Thread(target=tick_thread)
    thread.start()
    thread.join()
    await _settled(bridge)
    assert fsm.applied == list(range(1, 501))
    assert seen == [100, 200, 300, 400, 500]
    assert bridge.applied_index == 500
    assert drains >= 500 // 7


async def test_a_failed_apply_halts_and_nothing_after_it_applies_even_in_the_same_drain() -> None:
    fsm = _Fsm(fail_at=3)
    problems: list[str] = []
    bridge = _Bridge(asyncio.get_running_loop(), fsm, on_role=lambda role: None, on_halt=problems.append)
    for index in range(1, 6):
        bridge.post(("apply", index, b"x"))
    snapshot: concurrent.futures.Future[bytes] = concurrent.futures.Future()
    bridge.post(("snapshot", snapshot))
    await _settled(bridge)
    assert fsm.applied == [1, 2]
    assert bridge.applied_index == 2
    assert problems == ["apply failed at index 3: LookupError"]
    assert snapshot.exception() is not None


async def test_an_exception_past_dispatch_keeps_the_rest_in_order() -> None:
    fsm = _Fsm()
    bridge = _Bridge(asyncio.get_running_loop(), fsm, on_role=lambda role: None)
    for index in range(1, 4):
        bridge.post(("apply", index, b"x"))

    def interrupt(_: Any) -> None:
        raise KeyboardInterrupt

    bridge._items.insert(1, ("done", interrupt, None))
    bridge._scheduled = True  # drained by hand below, not by the loop
    try:
        bridge._drain()
    except KeyboardInterrupt:
        pass
    assert fsm.applied == [1]
    assert [item[1] for item in bridge._items] == [2, 3]
    bridge._drain()
    assert fsm.applied == [1, 2, 3]
