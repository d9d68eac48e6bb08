"""``lock`` and ``elect campaign``: take a lease-backed lock (an election is
a lock in the election namespace), keep it alive while held, and give it
back at the end, however the command ends.

Keeping alive is re-acquiring as the same holder every third of the TTL
(the holder re-acquiring refreshes its lease and keeps its fencing token).
An answer with another token, or none, means the lock was lost (it expired,
or someone released it for us) and was possibly granted again: the command
stops and exits 1; a lock that could not be refreshed for a whole TTL is
taken as lost as well.

``lock NAME -- COMMAND ...`` runs COMMAND while holding (its environment
carries ``COORD_LOCK_NAME`` and ``COORD_LOCK_TOKEN``, the fencing token, for
writes fenced with it) and exits with its status; a signal to this process
is passed on to COMMAND. Without COMMAND it prints the fencing token and
holds until Ctrl-C or SIGTERM (exit 130).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable

from coordinator.cli import exits
from coordinator.cli.commands import interruptible, until
from coordinator.cli.output import emit
from coordinator.cli.settings import Settings
from coordinator.client import CoordinatorClient
from coordinator.errors import CoordinatorError, InvalidInput

CHILD_GRACE_S = 10.0  # after passing a signal on, before SIGKILL
RELEASE_TIMEOUT_S = 5.0
RETRY_ACQUIRE_S = 0.5  # between tries while --wait-s lasts


async def _take(acquire: Callable[[], Awaitable[int | None]], wait_s: float, stop: asyncio.Event) -> int | None:
    """The fencing token, trying until ``wait_s`` passed; None if still held by another."""
    deadline = time.monotonic() + wait_s
    while True:
        token = await until(stop, acquire())
        if token is not None or time.monotonic() + RETRY_ACQUIRE_S > deadline:
            return token
        with contextlib.suppress(TimeoutError):
            await until(stop, asyncio.wait_for(stop.wait(), RETRY_ACQUIRE_S))


async def _keep(acquire: Callable[[], Awaitable[int | None]], token: int, ttl_s: float, lost: list[str],
                lost_event: asyncio.Event) -> None:
    """Refresh every ``ttl_s / 3`` until cancelled; on loss say why in
    ``lost`` and set ``lost_event``."""
    period = ttl_s / 3
    last_ok = time.monotonic()
    while True:
        await asyncio.sleep(period)
        try:
            async with asyncio.timeout(period):
                again = await acquire()
        except (CoordinatorError, TimeoutError) as exc:
            if time.monotonic() - last_ok < ttl_s:
                continue
            lost.append(f"not refreshed for {ttl_s:g} s ({getattr(exc, 'message', type(exc).__name__)})")
            lost_event.set()
            return
        if again != token:
            lost.append("it expired or was released, and another holder has it" if again is None else
                        f"it expired or was released, and was granted again with token {again}")
            lost_event.set()
            return
        last_ok = time.monotonic()


async def _run(command: list[str], env: dict[str, str], stop: asyncio.Event, received: list[int],
               lost: asyncio.Event) -> int:
    """COMMAND's exit status (128 + N when signal N ended it). A signal to
    us, or the loss of the lock, is passed on to it as SIGTERM (or the
    signal that came), then SIGKILL after ``CHILD_GRACE_S``."""
    try:
        child = await asyncio.create_subprocess_exec(*command, env=env)
    except OSError as exc:
        raise InvalidInput(f"command: {command[0]}: {exc.strerror}", field="command") from None
    waiting = asyncio.ensure_future(child.wait())
    stopped = asyncio.ensure_future(stop.wait())
    lost_wait = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({waiting, stopped, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(received[-1] if received else signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(waiting), CHILD_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await waiting
    finally:
        stopped.cancel()
        lost_wait.cancel()
    code = waiting.result()
    return 128 - code if code < 0 else code


async def hold(args: argparse.Namespace, settings: Settings) -> int:
    """``lock`` (``args.command == "lock"``) or ``elect campaign``."""
    is_lock = args.command == "lock"
    name = args.name if is_lock else args.election
    holder = (args.holder if is_lock else args.candidate) or settings.agent_id
    if not holder:
        field, how = ("holder", "--holder") if is_lock else ("candidate", "CANDIDATE")
        raise InvalidInput(f"{field}: give {how} (an agent holds as itself: --agent-id)", field=field)
    command = list(getattr(args, "run", None) or [])
    if command and command[0] == "--":
        command = command[1:]
    ttl_s = args.ttl
    async with settings.client() as client:
        def acquire() -> Awaitable[int | None]:
            return client.acquire(name, holder, ttl_s=ttl_s) if is_lock else \
                client.campaign(name, holder, ttl_s=ttl_s)

        with interruptible() as (stop, received):
            try:
                token = await _take(acquire, args.wait_s, stop)
            except exits.Interrupted:
                await _give_back(client, is_lock, name, holder)  # an acquire cut short may have been granted
                raise
            if token is None:
                what = f"lock {name!r} is held" if is_lock else f"election {name!r} is led"
                waited = f" (waited {args.wait_s:g} s)" if args.wait_s else ""
                raise exits.Failed(f"{what} by another holder{waited}")
            lost: list[str] = []
            lost_event = asyncio.Event()
            keeper = asyncio.create_task(_keep(acquire, token, ttl_s, lost, lost_event))
            try:
                if command:
                    env = dict(os.environ, COORD_LOCK_NAME=name, COORD_LOCK_TOKEN=str(token))
                    code = await _run(command, env, stop, received, lost_event)
                else:
                    document = {"name": name, "holder": holder, "fencing_token": token} if is_lock else \
                        {"election": name, "leader": holder, "fencing_token": token}
                    emit(document, settings.write_out)
                    await until(stop, lost_event.wait())
                    code = exits.OK
            except exits.Interrupted:
                code = exits.INTERRUPTED
            finally:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
                await _give_back(client, is_lock, name, holder)
        if lost:
            what = "lock" if is_lock else "leadership of"
            raise exits.Failed(f"{what} {name!r} lost: {lost[0]}" + ("; the command was stopped" if command else ""))
        if stop.is_set() and not command:
            return exits.INTERRUPTED
        return code


async def _give_back(client: CoordinatorClient, is_lock: bool, name: str, holder: str) -> None:
    """Release (resign) once, bounded; what fails here leaves the lease to expire."""
    with contextlib.suppress(CoordinatorError, TimeoutError):
        async with asyncio.timeout(RELEASE_TIMEOUT_S):
            if is_lock:
                await client.release(name, holder)
            else:
                await client.resign(name, holder)
