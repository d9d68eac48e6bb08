"""The client commands: each takes the parsed arguments and the resolved
``Settings``, talks to the cluster through ``CoordinatorClient``, prints
with ``output`` and returns an exit code (``exits``). A refusal the
client raises (``CoordinatorError``) or ``exits.Failed`` propagates to
``main``, which says it on stderr and picks the exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from coordinator.cli import exits
from coordinator.cli.output import emit, emit_line
from coordinator.cli.settings import Settings
from coordinator.client import CoordinatorClient
from coordinator.errors import CoordinatorError, InvalidInput, NotFound, OutcomeUnknown, Unavailable

MAX_INPUT_BYTES = 1 << 20  # a node takes request bodies up to 1 MiB
MAX_HEADERS = 64
FETCH_WAIT_S = 5.0  # one long poll of ``subscribe``

T = TypeVar("T")

MEMBER_COLUMNS = ("id", "http", "raft", "leader", "connected")
STATUS_COLUMNS = ("id", "http", "raft", "role", "term", "commit_index", "applied_index", "healthy")
KV_COLUMNS = ("key", "value", "revision")
WATCH_COLUMNS = ("revision", "type", "key", "value")
AGENT_COLUMNS = ("id", "type", "health", "endpoint", "weight", "ttl_s")
SAGA_COLUMNS = ("id", "name", "state", "reason", "created_ms", "updated_ms")
STEP_COLUMNS = ("id", "status", "attempts", "compensation_attempts")
DELIVERY_COLUMNS = ("topic", "offset", "id", "type", "payload")


# -- helpers -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def interruptible() -> Iterator[tuple[asyncio.Event, list[int]]]:
    """An event set by SIGINT or SIGTERM while inside (and the signals that
    came), for commands that wait: they stop, clean up, and exit 130."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(number: int) -> None:
        received.append(number)
        stop.set()

    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, on_signal, number)
    try:
        yield stop, received
    finally:
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)


async def until(stop: asyncio.Event, work: Awaitable[T]) -> T:
    """``work``'s result, or ``exits.Interrupted`` (``work`` cancelled) once
    ``stop`` is set."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise exits.Interrupted()
    return task.result()


def read_input(value: str, field: str) -> str:
    """``value``, or standard input (bounded) when it is ``-``."""
    if value != "-":
        return value
    raw = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    if len(raw) > MAX_INPUT_BYTES:
        raise InvalidInput(f"{field}: standard input holds more than {MAX_INPUT_BYTES} bytes", field=field)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidInput(f"{field}: standard input is not UTF-8 text", field=field) from None


def prepare(args: argparse.Namespace) -> None:
    """Read what comes from standard input (``-``) before the event loop
    runs, so nothing blocks it."""
    for field in ("value", "payload"):
        if getattr(args, field, None) == "-":
            setattr(args, field, read_input("-", field))


def parse_value(text: str, as_json: bool, field: str) -> Any:
    if not as_json:
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"{field}: not JSON ({exc.msg} at character {exc.pos})", field=field) from None


async def _member_status(settings: Settings, scheme: str, member: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"id": member["id"], "http": member["http"], "raft": member["raft"]}
    try:
        if not member["http"]:
            raise CoordinatorError("unknown HTTP address")
        one = settings.client([f"{scheme}://{member['http']}"])
        one.timeout_s = one.request_timeout_s = min(2.0, settings.timeout_s)  # one member: no waiting for others
        async with one:
            st = await one.status()
        row.update(role=st["role"], term=st["term"], commit_index=st["commit_index"],
                   applied_index=st["applied_index"], healthy=st["healthy"])
    except CoordinatorError as exc:
        row.update(role="unreachable", error=exc.message)
    return row


# -- cluster -----------------------------------------------------------------------------------------

async def status(args: argparse.Namespace, settings: Settings) -> int:
    """Every member as it reports itself; exit 1 when one is unreachable."""
    async with settings.client() as client:
        first = await client.status()
        scheme = client.endpoint.partition("://")[0]  # members serve what this one serves
        rows = list(await asyncio.gather(*(_member_status(settings, scheme, m) for m in first["members"])))
    emit({"leader": first["leader"], "members": rows}, settings.write_out, rows, STATUS_COLUMNS)
    unreachable = [r["id"] for r in rows if r["role"] == "unreachable"]
    if unreachable:
        raise exits.Failed(f"unreachable: {', '.join(unreachable)}")
    return exits.OK


async def members(args: argparse.Namespace, settings: Settings) -> int:
    async with settings.client() as client:
        if args.action == "list":
            listed = await client.members()
            emit({"members": listed}, settings.write_out, listed, MEMBER_COLUMNS)
            return exits.OK
        if args.action == "add":
            result = await client.add_member(args.id, args.raft, args.http)
        else:
            result = await client.remove_member(args.id)
    emit(result, settings.write_out)
    return exits.OK


# -- key/value ---------------------------------------------------------------------------------------

async def kv(args: argparse.Namespace, settings: Settings) -> int:
    async with settings.client() as client:
        if args.action == "get":
            item = await client.get(args.key, consistency=args.consistency)
            if item is None:
                raise exits.Failed(f"key {args.key!r} not found")
            if args.value_only:
                value = item["value"]
                sys.stdout.write((value if isinstance(value, str) else json.dumps(value)) + "\n")
                sys.stdout.flush()
            else:
                emit(item, settings.write_out, [item], KV_COLUMNS)
        elif args.action == "put":
            value = parse_value(args.value, args.json, "value")
            revision = await client.put(args.key, value)
            emit({"key": args.key, "revision": revision}, settings.write_out)
        elif args.action == "del":
            if not await client.delete(args.key):
                raise exits.Failed(f"key {args.key!r} not found")
            emit({"key": args.key, "deleted": True}, settings.write_out)
        elif args.action == "list":
            items = await client.list(args.prefix, limit=args.limit)
            emit({"items": items}, settings.write_out, items, KV_COLUMNS)
        else:
            return await _watch(client, args, settings)
    return exits.OK


async def _watch(client: CoordinatorClient, args: argparse.Namespace, settings: Settings) -> int:
    """One line per change under the prefix, until ``--count`` changes or a signal."""
    seen = 0
    with interruptible() as (stop, _):
        changes: AsyncIterator[dict[str, Any]] = client.watch(args.prefix, from_revision=args.from_revision)
        try:
            while args.count is None or seen < args.count:
                change = await until(stop, changes.__anext__())
                emit_line(change, settings.write_out, WATCH_COLUMNS)
                seen += 1
        finally:
            await changes.aclose()  # type: ignore[attr-defined]
    return exits.OK


# -- elections (the read side; campaign holds: see holding.py) ---------------------------------------

async def elect(args: argparse.Namespace, settings: Settings) -> int:
    async with settings.client() as client:
        if args.action == "leader":
            leader = await client.leader(args.election)
            if leader is None:
                raise exits.Failed(f"election {args.election!r} has no leader")
            emit({"election": args.election, **leader}, settings.write_out)
        else:
            if not await client.resign(args.election, args.candidate):
                raise exits.Failed(f"{args.candidate!r} does not lead election {args.election!r}")
            emit({"election": args.election, "resigned": args.candidate}, settings.write_out)
    return exits.OK


# -- bus ---------------------------------------------------------------------------------------------

def _headers(pairs: list[str] | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidInput(f"header: {pair!r} is not NAME=VALUE", field="header")
        headers[name] = value
    if len(headers) > MAX_HEADERS:
        raise InvalidInput(f"header: at most {MAX_HEADERS}", field="header")
    return headers


async def publish(args: argparse.Namespace, settings: Settings) -> int:
    message: dict[str, Any] = {"payload": parse_value(args.payload, args.json, "payload")}
    if args.type is not None:
        message["type"] = args.type
    headers = _headers(args.header)
    if headers:
        message["headers"] = headers
    async with settings.client() as client:
        answer = await client.publish(args.topic, message)
    emit({"topic": args.topic, **answer}, settings.write_out)
    return exits.OK


async def subscribe(args: argparse.Namespace, settings: Settings) -> int:
    """Print each delivery, then ack it; stop after ``--count``, after
    ``--max-wait-s`` in all (exit 1 when fewer than ``--count`` came), or at
    a signal. The subscription made here is removed on the way out (a
    ``--group`` stays, with what it has not delivered)."""
    deadline = None if args.max_wait_s is None else time.monotonic() + args.max_wait_s
    seen = 0
    async with settings.client() as client:
        subscription = await client.subscribe(args.topic, group=args.group, filter=args.filter, start=args.start)
        try:
            with interruptible() as (stop, _):
                while args.count is None or seen < args.count:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    wait_s = FETCH_WAIT_S if left is None else max(0.0, min(FETCH_WAIT_S, left))
                    want = 100 if args.count is None else min(100, args.count - seen)
                    try:
                        deliveries = await until(stop, client.fetch(subscription, max=want, wait_s=wait_s))
                    except (Unavailable, OutcomeUnknown):
                        continue  # the client already retried across nodes; keep waiting until the deadline
                    acks = []
                    for delivery in deliveries:
                        message = delivery["message"]
                        emit_line(delivery if settings.write_out == "json" else
                                  {"topic": delivery["topic"], "offset": delivery["offset"], "id": message.get("id"),
                                   "type": message.get("type"), "payload": message.get("payload")},
                                  settings.write_out, DELIVERY_COLUMNS)
                        if delivery["guarantee"] != "at-most-once":
                            acks.append(delivery["delivery_id"])
                    if acks:
                        await client.ack(subscription, acks)
                    seen += len(deliveries)
        finally:
            with contextlib.suppress(CoordinatorError):
                await asyncio.wait_for(client.unsubscribe(subscription), timeout=min(5.0, settings.timeout_s))
    if args.count is not None and seen < args.count:
        raise exits.Failed(f"{seen} of {args.count} deliveries within {args.max_wait_s:g} s")
    return exits.OK


# -- agents and sagas --------------------------------------------------------------------------------

async def agents(args: argparse.Namespace, settings: Settings) -> int:
    async with settings.client() as client:
        if args.action == "list":
            listed = await client.agents(args.type)
            emit({"agents": listed}, settings.write_out, listed, AGENT_COLUMNS)
            return exits.OK
        agent = await client.describe_agent(args.id)
    if agent is None:
        raise exits.Failed(f"agent {args.id!r} is not registered")
    emit(agent, settings.write_out, [agent], (*AGENT_COLUMNS, "lease_id", "public_key"))
    return exits.OK


async def saga(args: argparse.Namespace, settings: Settings) -> int:
    async with settings.client() as client:
        if args.action == "list":
            listed = await client.sagas(args.state, limit=args.limit)
            emit({"sagas": listed}, settings.write_out, listed, SAGA_COLUMNS)
            return exits.OK
        if args.action == "cancel":
            try:
                answer = await client.cancel_saga(args.id, args.reason)
            except NotFound:
                raise exits.Failed(f"saga {args.id!r} does not exist") from None
            emit({"id": args.id, **answer}, settings.write_out)
            return exits.OK
        found = await client.saga(args.id)
    if found is None:
        raise exits.Failed(f"saga {args.id!r} does not exist")
    emit(found, settings.write_out, [found], SAGA_COLUMNS)
    if settings.write_out == "table" and found.get("steps"):
        sys.stdout.write("\n")
        emit(found, "table", found["steps"], STEP_COLUMNS)
    return exits.OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Awaitable[int]]] = {
    "status": status, "members": members, "kv": kv, "elect": elect, "publish": publish, "subscribe": subscribe,
    "agents": agents, "saga": saga,
}
