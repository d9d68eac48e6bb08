"""The bus workload: numbered messages published at-least-once and
exactly-once through faults, consumed by competing consumers, then checked.

Two topics, one guarantee each: ``chaos.alo`` (at-least-once) and
``chaos.eo`` (exactly-once). Publisher ``p`` publishes messages ``k = 1, 2,
...`` with id ``p{p}-{k}`` and payload ``{"n": k, "publisher": p}``. Each
topic has one consumer group (two subscriptions, so two competing consumers)
created before the first publish, with a short ack timeout so deliveries
whose ack is lost come back during the run.

Who talks how:

- **Publishers use raw aiohttp**, like ``chaos.workload``: the check needs
  to know, per attempt, whether a publish certainly failed (a 503, a 4xx, a
  refused connection on which nothing was sent) or may have been stored (a
  timeout, a 504, a reset). ``CoordinatorClient.publish`` retries inside and
  reports only the last error, which would turn an earlier unknown attempt
  into a "certain" failure. A message is retried until one attempt is
  acknowledged or the run ends (or a 4xx refuses it: retrying cannot help),
  always under the same message id, on the next node after a failure. A single
  message carries an ``Idempotency-Key`` that is the same on every retry (the
  state machine's request-id dedupe answers a retry); a batch (2 to
  ``batch_max`` messages) gets a fresh ``request_id`` per attempt, as a naive
  publisher would, so for exactly-once only the server's dedupe by
  ``(topic, message id)`` stands between a retried batch and a duplicate,
  and for at-least-once a retried batch may be stored twice (allowed).
- **Consumers use ``coordinator.client``** (``subscribe``, ``fetch``,
  ``ack``, ``subscription``): a reception is recorded when it arrives,
  whatever the client did to get it, so the client's own retries and node
  changes lose nothing the check needs, and the run exercises the public
  client the way agents use it.

Processing is recording the delivery in the history (a ``receive`` event
with ``processed: true``). At-least-once consumers process every reception.
Exactly-once consumers skip (and ack again) a delivery id their group has
already processed: the group shares one set of processed delivery ids,
which stands for a side-effect store keyed by delivery id (what docs/bus.md
asks of an exactly-once consumer; ``consume()`` keeps such a set per
process). While the nemesis runs, a consumer "crashes" between processing
and ack for a small seeded fraction of deliveries (it does not ack them), so
redeliveries of processed messages happen in every run, not only when a
fault eats an ack.

After the run the cluster heals and recovers; consumers keep going
(acking everything) until every acknowledged publish was processed and both
queues are empty, or ``drain_s`` passes. ``check_bus`` then judges the
history; it is pure, and its rules are in its docstring.

History events (JSON lines, with ``time`` in ``time.monotonic_ns()``):

- publish attempts: ``{"process", "type": "invoke", "f": "publish", "topic",
  "guarantee", "ids", "attempt", "batch"}`` then one completion ``{"process",
  "type": "ok"|"fail"|"info", "f": "publish", "topic", "ids", "status",
  "error"?, "offsets"?, "duplicates"?}``;
- ``{"type": "receive", "process", "topic", "delivery_id", "id", "attempt",
  "n", "publisher", "processed", "fetch_invoked"}`` per delivery received;
- ``{"type": "ack", "process", "topic", "delivery_ids", "gone", "invoked"}``
  when an ack was answered (``gone``: ids the cluster no longer holds);
- ``{"type": "nemesis", ...}`` from the nemesis, and ``{"type": "note", ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from typing import Any

import aiohttp

from chaos.workload import History, make_session
from coordinator.client import CoordinatorClient
from coordinator.errors import CoordinatorError

TOPICS = {"chaos.alo": "at-least-once", "chaos.eo": "exactly-once"}
DEDUPE_WINDOW_S = 120.0  # the bus's default exactly-once dedupe window
RETRY = {"max_attempts": 100, "backoff_ms": 200, "backoff_multiplier": 2.0, "max_backoff_ms": 1000}
FETCH_MAX = 50
FETCH_WAIT_S = 1.0
RETRY_PAUSE_S = 0.1
EXAMPLES_MAX = 10


def message_id(publisher: int, n: int) -> str:
    return f"p{publisher}-{n}"


def _message(topic: str, publisher: int, n: int) -> dict[str, Any]:
    return {"id": message_id(publisher, n), "type": "event", "source": f"chaos-publisher-{publisher}",
            "payload": {"n": n, "publisher": publisher},
            "deliveryOptions": {"guarantee": TOPICS[topic], "retry": RETRY}}


class BusRunError(Exception):
    """The workload could not run (no subscription could be made): exit 2, not a verdict."""


# -- publishers ------------------------------------------------------------------------------------


class BusPublisher:
    """One publisher on one topic: numbered messages, each retried until acknowledged."""

    def __init__(self, process: int, publisher: int, topic: str, endpoints: list[str], history: History,
                 session: aiohttp.ClientSession, rng: random.Random, *, op_timeout_s: float, batch_max: int,
                 interval_s: float, tracker: BusTracker) -> None:
        self.process = process
        self.publisher = publisher
        self.topic = topic
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.history = history
        self.session = session
        self.rng = rng
        self.timeout = aiohttp.ClientTimeout(total=op_timeout_s)
        self.batch_max = batch_max
        self.interval_s = interval_s
        self.tracker = tracker
        self._node = publisher % len(self.endpoints)
        self.next_n = 1

    async def run(self, stop_at: float, max_messages: int) -> None:
        while self.next_n <= max_messages and time.monotonic() < stop_at:
            size = 1 if self.batch_max < 2 or self.rng.random() < 0.5 else self.rng.randint(2, self.batch_max)
            numbers = list(range(self.next_n, min(self.next_n + size, max_messages + 1)))
            self.next_n = numbers[-1] + 1
            await self._publish_until_ok(numbers, stop_at)
            if self.interval_s:
                await asyncio.sleep(self.interval_s)

    async def _publish_until_ok(self, numbers: list[int], stop_at: float, max_attempts: int = 100_000) -> None:
        messages = [_message(self.topic, self.publisher, n) for n in numbers]
        ids = [m["id"] for m in messages]
        batch = len(messages) > 1
        key = f"chaos-{self.topic}-{ids[0]}"  # one key for every retry of a single message
        for attempt in range(1, max_attempts + 1):
            if attempt > 1 and time.monotonic() >= stop_at:
                return  # the run is over: the message stays failed or unknown
            self.history.add({"process": self.process, "type": "invoke", "f": "publish", "topic": self.topic,
                              "guarantee": TOPICS[self.topic], "ids": ids, "attempt": attempt, "batch": batch})
            done = await self._attempt(messages, batch, key)
            done.update(process=self.process, f="publish", topic=self.topic, ids=ids)
            self.history.add(done)
            if done["type"] == "ok":
                self.tracker.published_ok(self.topic, ids)
                return
            if done["status"] is not None and 400 <= done["status"] < 500:
                return  # refused as invalid: a retry cannot help (and the check sees a failed publish)
            self._node = (self._node + 1) % len(self.endpoints)  # a dead or cut-off node: try the next
            await asyncio.sleep(RETRY_PAUSE_S * (1 + self.rng.random()))

    async def _attempt(self, messages: list[dict[str, Any]], batch: bool, key: str) -> dict[str, Any]:
        url = f"{self.endpoints[self._node]}/v1/topics/{urllib.parse.quote(self.topic, safe='')}/messages"
        if batch:
            body: dict[str, Any] = {"messages": messages, "request_id": secrets.token_hex(10)}
            headers = {}
        else:
            body, headers = dict(messages[0]), {"Idempotency-Key": key}
        trace: dict[str, bool] = {}
        try:
            async with self.session.post(url, json=body, headers=headers, timeout=self.timeout,
                                         trace_request_ctx=trace) as response:
                status = response.status
                answer = await response.json(content_type=None)
        except aiohttp.ClientConnectorError:
            # refused: certainly not stored only if no attempt went out (see make_session)
            return {"type": "info" if trace.get("sent", False) else "fail", "status": None,
                    "error": "connection refused"}
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            return {"type": "info", "status": None, "error": type(exc).__name__}
        if status == 200 and isinstance(answer, dict):
            rows = answer.get("messages") if batch else [answer]
            if isinstance(rows, list) and len(rows) == len(messages):
                return {"type": "ok", "status": status, "offsets": [r.get("offset") for r in rows],
                        "duplicates": [r["id"] for r in rows if r.get("duplicate")]}
            return {"type": "info", "status": status, "error": "unexpected answer"}
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        message = str(error.get("message", ""))[:200] if isinstance(error, dict) else ""
        # 503: certainly not committed (DESIGN); 4xx: refused before anything was stored
        kind = "fail" if status == 503 or 400 <= status < 500 else "info"
        return {"type": kind, "status": status, "error": message}


# -- consumers -------------------------------------------------------------------------------------


class BusTracker:
    """What the run knows while it runs, to decide when draining is done."""

    def __init__(self) -> None:
        self.ok: set[tuple[str, str]] = set()
        self.processed: set[tuple[str, str]] = set()
        self.counts: Counter[str] = Counter()
        self.done: dict[str, set[str]] = {topic: set() for topic in TOPICS}  # per group: delivery ids processed

    def published_ok(self, topic: str, ids: Iterable[str]) -> None:
        for id_ in ids:
            if (topic, id_) not in self.ok:
                self.ok.add((topic, id_))
                self.counts["published"] += 1

    def missing(self) -> int:
        return len(self.ok - self.processed)


class BusConsumer:
    """One member of a topic's consumer group: fetch, process, ack."""

    def __init__(self, process: int, topic: str, subscription: str, client: CoordinatorClient, history: History,
                 rng: random.Random, tracker: BusTracker, *, skip_ack: float) -> None:
        self.process = process
        self.topic = topic
        self.subscription = subscription
        self.client = client
        self.history = history
        self.rng = rng
        self.tracker = tracker
        self.skip_ack = skip_ack
        self.draining = False
        self.exactly_once = TOPICS[topic] == "exactly-once"

    async def run(self, stop: asyncio.Event, max_rounds: int = 1_000_000) -> None:
        try:
            for _ in range(max_rounds):
                if stop.is_set():
                    return
                await self.one()
        except Exception as exc:  # a bug of the workload, not a verdict: the run reports it and fails
            self.history.add({"type": "note", "what": "consumer crashed", "consumer": self.process,
                              "error": repr(exc)[:500]})
            raise

    async def one(self) -> None:
        invoked = time.monotonic_ns()
        try:
            deliveries = await self.client.fetch(self.subscription, max=FETCH_MAX, wait_s=FETCH_WAIT_S)
        except CoordinatorError as exc:
            self.tracker.counts["fetch_failed"] += 1
            if exc.code not in ("unavailable", "outcome_unknown"):
                self.history.add({"type": "note", "what": "fetch refused", "topic": self.topic,
                                  "code": exc.code, "error": exc.message[:200]})
            await asyncio.sleep(RETRY_PAUSE_S)
            return
        acks = []
        for delivery in deliveries:
            if self._handle(delivery, invoked):
                acks.append(delivery["delivery_id"])
        if not acks:
            return
        started = time.monotonic_ns()
        try:
            answer = await self.client.ack(self.subscription, acks)
        except CoordinatorError:
            self.tracker.counts["ack_failed"] += 1
            return
        gone = list(answer.get("acked", [])) + list(answer.get("unknown", []))
        self.history.add({"type": "ack", "process": self.process, "topic": self.topic, "delivery_ids": acks,
                          "gone": gone, "invoked": started})

    def _handle(self, delivery: dict[str, Any], fetch_invoked: int) -> bool:
        """Record (and process) one delivery; True when it should be acked."""
        message = delivery.get("message") or {}
        payload = message.get("payload") if isinstance(message.get("payload"), dict) else {}
        delivery_id = delivery["delivery_id"]
        done = self.tracker.done[self.topic]
        process = not (self.exactly_once and delivery_id in done)
        self.history.add({"type": "receive", "process": self.process, "topic": self.topic,
                          "delivery_id": delivery_id, "id": message.get("id"), "attempt": delivery.get("attempt"),
                          "n": payload.get("n"), "publisher": payload.get("publisher"), "processed": process,
                          "fetch_invoked": fetch_invoked})
        self.tracker.counts["received"] += 1
        if delivery.get("attempt", 1) > 1:
            self.tracker.counts["redelivered"] += 1
        if process:
            done.add(delivery_id)
            self.tracker.processed.add((self.topic, message.get("id")))
        # a crash between processing and ack: the delivery must come back, and be skipped (exactly-once)
        return self.draining or self.rng.random() >= self.skip_ack


# -- the run ---------------------------------------------------------------------------------------


class BusWorkload:
    """Set up, run and drain the workload against ``endpoints``; the caller owns the cluster."""

    def __init__(self, endpoints: list[str], history: History, *, seed: int, publishers: int = 3,
                 consumers: int = 2, ack_timeout_s: float = 2.0, op_timeout_s: float = 3.0, batch_max: int = 5,
                 interval_s: float = 0.0, skip_ack: float = 0.05, max_messages: int = 100_000) -> None:
        self.endpoints = endpoints
        self.history = history
        self.rng = random.Random(seed)
        self.publishers = publishers
        self.consumers = consumers
        self.ack_timeout_s = ack_timeout_s
        self.op_timeout_s = op_timeout_s
        self.batch_max = batch_max
        self.interval_s = interval_s
        self.skip_ack = skip_ack
        self.max_messages = max_messages
        self.tracker = BusTracker()
        self.subscriptions: dict[str, list[str]] = {}
        self._clients: list[CoordinatorClient] = []
        self._members: list[BusConsumer] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _client(self, i: int) -> CoordinatorClient:
        shifted = self.endpoints[i % len(self.endpoints):] + self.endpoints[:i % len(self.endpoints)]
        # An attempt must be short next to the call's deadline: the client moves to another node only
        # between the attempts of one call, so a consumer whose single attempt used the whole deadline
        # would stay on a hung node (an isolated old leader) for as long as it hangs.
        client = CoordinatorClient(shifted, timeout_s=8.0, request_timeout_s=2.0)
        self._clients.append(client)
        return client

    async def setup(self) -> None:
        """One group per topic with ``consumers`` members, made before any publish."""
        i = 0
        for topic, guarantee in TOPICS.items():
            self.subscriptions[topic] = []
            for _ in range(self.consumers):
                client = self._client(i)
                try:
                    sub = await client.subscribe(topic, group=f"chaos-{guarantee}", guarantee=guarantee,
                                                 ack_timeout_s=self.ack_timeout_s, max_attempts=100, start="new")
                except CoordinatorError as exc:
                    raise BusRunError(f"could not subscribe to {topic}: {exc.message}") from exc
                self.subscriptions[topic].append(sub)
                self._members.append(BusConsumer(20_000 + i, topic, sub, client, self.history,
                                                 random.Random(self.rng.random()), self.tracker,
                                                 skip_ack=self.skip_ack))
                i += 1
        self.history.add({"type": "note", "what": "subscriptions", "subscriptions": self.subscriptions})

    def start_consumers(self) -> None:
        self._tasks = [asyncio.create_task(member.run(self._stop)) for member in self._members]

    async def publish(self, duration_s: float) -> None:
        stop_at = time.monotonic() + duration_s
        async with make_session() as session:
            workers = []
            for t, topic in enumerate(TOPICS):
                for p in range(self.publishers):
                    workers.append(BusPublisher(10_000 + t * 100 + p, p, topic, self.endpoints, self.history,
                                                session, random.Random(self.rng.random()),
                                                op_timeout_s=self.op_timeout_s, batch_max=self.batch_max,
                                                interval_s=self.interval_s, tracker=self.tracker))
            await asyncio.gather(*(w.run(stop_at, self.max_messages) for w in workers))

    async def drain(self, timeout_s: float) -> dict[str, Any]:
        """Consume (acking everything) until every acknowledged publish was
        processed and both queues are empty, or ``timeout_s`` passes."""
        for member in self._members:
            member.draining = True
        started = time.monotonic()
        queues: dict[str, Any] = {}
        while time.monotonic() - started < timeout_s:
            await asyncio.sleep(0.5)
            if self.tracker.missing():
                continue
            queues = await self._queues()
            if all(q is not None and q["backlog"] + q["pending"] + q["delayed"] == 0 for q in queues.values()):
                break
        drained_s = time.monotonic() - started
        queues = await self._queues()
        self.history.add({"type": "note", "what": "drained", "seconds": round(drained_s, 1),
                          "missing": self.tracker.missing(), "queues": queues})
        return {"seconds": drained_s, "missing": self.tracker.missing(), "queues": queues}

    async def _queues(self) -> dict[str, Any]:
        """Each group's counters as the cluster reports them (None when unreadable)."""
        out: dict[str, Any] = {}
        client = self._clients[0] if self._clients else None
        for topic, subs in self.subscriptions.items():
            try:
                out[topic] = await client.subscription(subs[0]) if client else None
            except CoordinatorError:
                out[topic] = None
        return out

    async def stats(self) -> dict[str, Any]:
        """Each topic's and group's own counters, for the report."""
        out: dict[str, Any] = {"groups": await self._queues(), "topics": {}}
        if self._clients:
            for topic in TOPICS:
                with contextlib.suppress(CoordinatorError):
                    out["topics"][topic] = await self._clients[0].request(
                        "GET", f"/v1/topics/{urllib.parse.quote(topic, safe='')}")
        return out

    def crashed(self) -> list[str]:
        """Why consumers stopped early (a bug of the workload): the run then failed."""
        return [repr(t.exception())[:300] for t in self._tasks
                if t.done() and not t.cancelled() and t.exception() is not None]

    async def close(self) -> None:
        self._stop.set()
        if self._tasks:
            _, running = await asyncio.wait(self._tasks, timeout=FETCH_WAIT_S + 10)
            for task in running:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients:
            await client.close()


# -- the check -------------------------------------------------------------------------------------


def _windows(events: list[dict[str, Any]]) -> list[tuple[int, int]]:
    windows, opened = [], None
    for event in events:
        if event.get("type") != "nemesis":
            continue
        if event.get("phase") == "start":
            opened = event["time"]
        elif opened is not None:
            windows.append((opened, event["time"]))
            opened = None
    if opened is not None:
        windows.append((opened, 2**63))
    return windows


def _inside(at: int, windows: list[tuple[int, int]]) -> bool:
    return any(start <= at <= end for start, end in windows)


def check_bus(events: list[dict[str, Any]], *, dedupe_window_s: float = DEDUPE_WINDOW_S) -> dict[str, Any]:
    """Judge a bus history. Pure.

    A message is ``(topic, id)``. Its publish outcome is *ok* when any attempt
    was acknowledged, *fail* when every attempt certainly failed, else
    *unknown* (an attempt timed out or never completed). Its guarantee is the
    one its publishes carried. Problems, each making the history invalid:

    - **lost**: an ok message never processed (both guarantees);
    - **duplicated** (exactly-once): a message processed more than once, or
      received under two delivery ids, which means the server stored it
      twice (only when its publish attempts span less than the dedupe
      window; later retries are new messages by contract). Unknown messages
      may be processed once or not at all, never twice;
    - **failed publish delivered**: a message whose every publish certainly
      failed was received;
    - **acked delivery came back**: a delivery id received from a fetch that
      started after an ack answered that the id is gone;
    - **unknown message** / **corrupted**: a reception of an id never
      published on that topic, or whose payload does not match its id.

    At-least-once messages processed more than once are counted
    (``duplicates_allowed``), never a problem.
    """
    open_invokes: dict[Any, dict[str, Any]] = {}
    outcomes: dict[tuple[str, str], list[str]] = {}
    first_ns: dict[tuple[str, str], int] = {}
    last_ns: dict[tuple[str, str], int] = {}
    guarantees: dict[str, str] = {}
    server_dedupes: Counter[str] = Counter()
    attempts: Counter[str] = Counter()
    receptions: dict[tuple[str, str], list[dict[str, Any]]] = {}
    gone_at: dict[tuple[str, str], int] = {}  # (topic, delivery id) -> earliest ack answer saying it is gone
    windows = _windows(events)
    faults: Counter[str] = Counter()
    problems: list[dict[str, Any]] = []

    def outcome(invoke: dict[str, Any], kind: str, at: int) -> None:
        for id_ in invoke.get("ids") or []:
            key = (invoke["topic"], id_)
            outcomes.setdefault(key, []).append(kind)
            last_ns[key] = max(last_ns.get(key, at), at)

    for event in events:
        kind = event.get("type")
        if event.get("f") == "publish" and kind == "invoke":
            topic = event["topic"]
            guarantees.setdefault(topic, event.get("guarantee") or TOPICS.get(topic, "at-least-once"))
            attempts[topic] += 1
            previous = open_invokes.pop(event["process"], None)
            if previous is not None:
                outcome(previous, "info", event["time"])
            open_invokes[event["process"]] = event
            for id_ in event.get("ids") or []:
                first_ns.setdefault((topic, id_), event["time"])
        elif event.get("f") == "publish" and kind in ("ok", "fail", "info"):
            invoke = open_invokes.pop(event.get("process"), None)
            if invoke is None:
                continue
            outcome(invoke, kind, event["time"])
            if kind == "ok":
                server_dedupes[invoke["topic"]] += len(event.get("duplicates") or [])
                if _inside(event["time"], windows):
                    faults["published"] += len(invoke.get("ids") or [])
        elif kind == "receive":
            receptions.setdefault((event["topic"], event.get("id")), []).append(event)
            if _inside(event["time"], windows):
                faults["received"] += 1
                if (event.get("attempt") or 1) > 1:
                    faults["redelivered"] += 1
        elif kind == "ack":
            for delivery_id in event.get("gone") or []:
                key = (event["topic"], delivery_id)
                gone_at[key] = min(gone_at.get(key, event["time"]), event["time"])
    for invoke in open_invokes.values():  # no completion: unknown
        outcome(invoke, "info", invoke["time"])

    def status(key: tuple[str, str]) -> str:
        seen = outcomes.get(key, [])
        if "ok" in seen:
            return "ok"
        return "fail" if seen and all(s == "fail" for s in seen) else "unknown"

    topics = sorted(set(guarantees) | {t for t, _ in receptions})
    per_topic: dict[str, dict[str, Any]] = {}
    for topic in topics:
        guarantee = guarantees.get(topic, TOPICS.get(topic, "at-least-once"))
        exactly_once = guarantee == "exactly-once"
        published = Counter(status(k) for k in outcomes if k[0] == topic)
        stats: Counter[str] = Counter()
        lost = duplicated = 0
        for key in sorted(k for k in outcomes.keys() | receptions.keys() if k[0] == topic):
            got = receptions.get(key, [])
            processed = [r for r in got if r.get("processed")]
            delivery_ids = sorted({str(r.get("delivery_id")) for r in got})
            stats["received"] += len(got)
            stats["processed"] += len(processed)
            stats["redelivered"] += sum(1 for r in got if (r.get("attempt") or 1) > 1)
            if got:
                stats["messages_received"] += 1
            if len(processed) > 1 and not exactly_once:
                stats["duplicates_allowed"] += len(processed) - 1
            if len(delivery_ids) > 1:
                stats["stored_more_than_once"] += 1
            publish = status(key) if key in outcomes else None
            detail = {"topic": topic, "id": key[1], "publish": publish, "attempts": outcomes.get(key, [])[:10],
                      "delivery_ids": delivery_ids[:5], "processed": len(processed)}
            if publish is None:
                problems.append({"kind": "unknown message", **detail})
                continue
            if publish == "ok" and not processed:
                lost += 1
                problems.append({"kind": "lost", **detail})
            if publish == "fail" and got:
                problems.append({"kind": "failed publish delivered", **detail})
            if exactly_once:
                # retries further apart than the dedupe window are new messages: each copy once is right
                in_window = last_ns[key] - first_ns[key] < dedupe_window_s * 1e9
                per_delivery = Counter(str(r.get("delivery_id")) for r in processed)
                if in_window and len(delivery_ids) > 1:
                    duplicated += 1
                    problems.append({"kind": "stored twice", **detail})
                elif (in_window and len(processed) > 1) or max(per_delivery.values(), default=0) > 1:
                    duplicated += 1
                    problems.append({"kind": "processed twice", **detail})
            for r in got:
                expected = f"p{r.get('publisher')}-{r.get('n')}"
                if expected != key[1]:
                    problems.append({"kind": "corrupted", **detail, "payload": [r.get("n"), r.get("publisher")]})
                    break
            for r in got:
                gone = gone_at.get((topic, str(r.get("delivery_id"))))
                if gone is not None and r.get("fetch_invoked", 0) > gone:
                    problems.append({"kind": "acked delivery came back", **detail,
                                     "delivery_id": r.get("delivery_id")})
                    break
        per_topic[topic] = {"guarantee": guarantee, "attempts": attempts[topic],
                            "published": {k: published[k] for k in ("ok", "fail", "unknown")},
                            "server_dedupes": server_dedupes[topic], "lost": lost, "duplicated": duplicated,
                            **{k: stats[k] for k in ("messages_received", "received", "processed", "redelivered",
                                                     "duplicates_allowed", "stored_more_than_once")},
                            "valid": not any(p["topic"] == topic for p in problems)}
    total: Counter[str] = Counter()
    for row in per_topic.values():
        total["published"] += row["published"]["ok"]
        total["publish_failed"] += row["published"]["fail"]
        total["publish_unknown"] += row["published"]["unknown"]
        for k in ("attempts", "server_dedupes", "received", "processed", "redelivered", "duplicates_allowed"):
            total[k] += row[k]
    kinds = Counter(p["kind"] for p in problems)
    return {"valid": not problems, "counts": dict(total),
            "during_faults": {k: faults[k] for k in ("published", "received", "redelivered")},
            "lost": sum(r["lost"] for r in per_topic.values()),
            "duplicated": sum(r["duplicated"] for r in per_topic.values()),
            "problems": dict(kinds), "topics": per_topic, "examples": problems[:EXAMPLES_MAX]}
