"""A blocking facade over the async client, for scripts and notebooks:

    from coordinator.sync_client import SyncClient

    with SyncClient(["127.0.0.1:7001"], token=token) as client:
        client.put("config/mode", "fast")
        with client.lock("jobs/nightly", "script-1") as held:
            ...
        for change in client.watch("config/", count=10):
            print(change)

Every coroutine method of ``CoordinatorClient`` is there with the same
arguments and answers, run on a private event loop in a background thread
and waited for. Async iterators (``watch``, ``stream``...) become
iterators; closing one (or leaving its ``for`` loop) closes the stream.
``lock`` and ``agent`` become ``with`` blocks. One instance per thread that
calls it at a time is the simple rule; calls from several threads are
serialised through the one loop and work too.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

from coordinator.client import CoordinatorClient

T = TypeVar("T")


class SyncClient:
    def __init__(self, endpoints: list[str] | str, **options: Any) -> None:
        """The arguments of ``CoordinatorClient``."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="coordinator-sync-client", daemon=True)
        self._thread.start()
        self._client: CoordinatorClient = self._run(self._make(endpoints, options))

    @staticmethod
    async def _make(endpoints: list[str] | str, options: dict[str, Any]) -> CoordinatorClient:
        return CoordinatorClient(endpoints, **options)  # its session belongs to the loop it is made on

    def _run(self, awaitable: Awaitable[T]) -> T:
        if self._loop.is_closed():
            raise RuntimeError("this SyncClient is closed")
        future = asyncio.run_coroutine_threadsafe(_wrap(awaitable), self._loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if inspect.isasyncgenfunction(attribute):
            return lambda *args, **kwargs: self._iterate(attribute(*args, **kwargs))
        if inspect.iscoroutinefunction(attribute):
            return lambda *args, **kwargs: self._run(attribute(*args, **kwargs))
        return attribute

    def _iterate(self, stream: Any) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield self._run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._run(stream.aclose())

    def watch(self, prefix: str = "", *, from_revision: int | None = None, count: int | None = None
              ) -> Iterator[dict[str, Any]]:
        """``CoordinatorClient.watch``; stops after ``count`` changes when given."""
        changes = self._iterate(self._client.watch(prefix, from_revision=from_revision))
        if count is None:
            return changes
        return _first(changes, count)

    @contextlib.contextmanager
    def lock(self, name: str, holder: str | None = None, **options: Any) -> Iterator[Any]:
        """``CoordinatorClient.lock`` as a ``with`` block (the lease is renewed
        on the background loop while the block runs)."""
        with self._entered(self._client.lock(name, holder, **options)) as held:
            yield held

    @contextlib.contextmanager
    def agent(self, agent_type: str, **options: Any) -> Iterator[Any]:
        """``CoordinatorClient.agent`` as a ``with`` block (it heartbeats on the background loop)."""
        with self._entered(self._client.agent(agent_type, **options)) as registration:
            yield registration

    @contextlib.contextmanager
    def _entered(self, manager: Any) -> Iterator[Any]:
        value = self._run(manager.__aenter__())
        try:
            yield value
        except BaseException as exc:
            if not self._run(manager.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            self._run(manager.__aexit__(None, None, None))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _wrap(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _first(items: Iterator[T], count: int) -> Iterator[T]:
    try:
        for n, item in enumerate(items):
            yield item
            if n + 1 >= count:
                return
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()
