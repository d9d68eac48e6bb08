"""``lock`` and ``elect campaign`` keep their lock alive by re-acquiring it;
these check how the keeper judges the answers (the cluster half is in
tests/integration/test_cli_cluster.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from coordinator.cli.holding import _keep
from coordinator.errors import Unavailable
from tests.waiting import eventually

TTL_S = 0.3  # refreshes every 0.1 s


def _answers(*answers: int | Exception | None) -> tuple[Callable[[], Awaitable[int | None]], list[int]]:
    """An acquire that gives ``answers`` in turn (then the last forever) and counts its calls."""
    calls = [0]

    async def acquire() -> int | None:
        answer = answers[min(calls[0], len(answers) - 1)]
        calls[0] += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    return acquire, calls


async def _keeper(acquire: Callable[[], Awaitable[int | None]],
                  ttl_s: float = TTL_S) -> tuple[asyncio.Task[None], list[str], asyncio.Event]:
    lost: list[str] = []
    event = asyncio.Event()
    return asyncio.create_task(_keep(acquire, 5, ttl_s, lost, event)), lost, event


async def test_refreshing_with_the_same_token_keeps_holding() -> None:
    acquire, calls = _answers(5)
    task, lost, event = await _keeper(acquire)
    await eventually(lambda: calls[0] >= 3, "three refreshes", 10)
    assert not event.is_set() and lost == []
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_another_token_or_none_means_the_lock_was_lost() -> None:
    for answer, said in ((9, "granted again with token 9"), (None, "another holder has it")):
        acquire, _ = _answers(5, answer)
        task, lost, event = await _keeper(acquire)
        await asyncio.wait_for(event.wait(), 10)
        assert said in lost[0]
        await task  # it returned by itself


async def test_a_cluster_that_cannot_answer_for_a_whole_ttl_loses_the_lock_but_a_short_outage_does_not() -> None:
    # One failed refresh, then fine: a third of the TTL without an answer is no loss
    # (a long TTL, so a loaded machine's late timers cannot stretch it to a whole one).
    acquire, calls = _answers(Unavailable("no quorum"), 5)
    task, lost, event = await _keeper(acquire, ttl_s=3.0)
    await eventually(lambda: calls[0] >= 2, "a refresh after the outage", 10)
    assert not event.is_set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    acquire, _ = _answers(Unavailable("no quorum"))
    task, lost, event = await _keeper(acquire)
    await asyncio.wait_for(event.wait(), 10)
    assert lost[0].startswith(f"not refreshed for {TTL_S:g} s (no quorum")
    await task
