"""The bus workload: its check over hand-made histories (loss, duplicates,
unknown publishes, redeliveries), its publishers' and consumers' own logic
against fakes, and one short real run under partitions and kills."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chaos.bus_workload import BusConsumer, BusPublisher, BusTracker, check_bus
from chaos.report import bus_report
from chaos.workload import History

ALO, EO = "chaos.alo", "chaos.eo"
GUARANTEE = {ALO: "at-least-once", EO: "exactly-once"}


def publish(process: int, topic: str, ids: list[str], kind: str | None, start: int, end: int,
            **extra: Any) -> list[dict[str, Any]]:
    """One publish attempt: its invoke and (unless ``kind`` is None) its completion."""
    events = [{"process": process, "type": "invoke", "f": "publish", "topic": topic, "guarantee": GUARANTEE[topic],
               "ids": ids, "attempt": 1, "batch": len(ids) > 1, "time": start}]
    if kind is not None:
        events.append({"process": process, "type": kind, "f": "publish", "topic": topic, "ids": ids,
                       "time": end, **extra})
    return events


def receive(topic: str, id_: str, delivery_id: str, at: int, *, attempt: int = 1, processed: bool = True,
            fetch_invoked: int | None = None, n: int | None = None) -> dict[str, Any]:
    publisher, number = id_[1:].split("-")
    return {"type": "receive", "process": 20_000, "topic": topic, "delivery_id": delivery_id, "id": id_,
            "attempt": attempt, "n": int(number) if n is None else n, "publisher": int(publisher),
            "processed": processed, "fetch_invoked": at - 1 if fetch_invoked is None else fetch_invoked, "time": at}


def h(*parts: list[dict[str, Any]] | dict[str, Any]) -> list[dict[str, Any]]:
    """A history from publish attempts (lists of events) and single events, in order."""
    out: list[dict[str, Any]] = []
    for part in parts:
        out.extend(part if isinstance(part, list) else [part])
    return out


def kinds(verdict: dict[str, Any]) -> list[str]:
    return [p["kind"] for p in verdict["examples"]]


# -- the check -------------------------------------------------------------------------------------


def test_every_message_processed_once_is_valid() -> None:
    events = h(publish(1, ALO, ["p0-1", "p0-2"], "ok", 0, 1), publish(2, EO, ["p0-1"], "ok", 0, 1),
               receive(ALO, "p0-1", "5.1", 2), receive(ALO, "p0-2", "5.2", 3), receive(EO, "p0-1", "7.1", 2))
    verdict = check_bus(events)
    assert verdict["valid"], verdict["examples"]
    assert verdict["counts"]["published"] == 3 and verdict["counts"]["processed"] == 3
    assert verdict["lost"] == 0 and verdict["duplicated"] == 0
    assert verdict["topics"][EO]["guarantee"] == "exactly-once"


@pytest.mark.parametrize("topic", [ALO, EO])
def test_an_acknowledged_message_never_processed_is_lost(topic: str) -> None:
    events = h(publish(1, topic, ["p0-1", "p0-2"], "ok", 0, 1), receive(topic, "p0-1", "5.1", 2))
    verdict = check_bus(events)
    assert not verdict["valid"]
    assert verdict["lost"] == 1 and verdict["topics"][topic]["lost"] == 1
    assert verdict["examples"][0]["kind"] == "lost" and verdict["examples"][0]["id"] == "p0-2"


def test_a_message_received_but_not_processed_is_lost_too() -> None:
    events = h(publish(1, ALO, ["p0-1"], "ok", 0, 1), receive(ALO, "p0-1", "5.1", 2, processed=False))
    assert check_bus(events)["lost"] == 1


def test_an_at_least_once_duplicate_is_counted_and_allowed() -> None:
    events = h(publish(1, ALO, ["p0-1"], "ok", 0, 1),
               receive(ALO, "p0-1", "5.1", 2), receive(ALO, "p0-1", "5.1", 9, attempt=2))
    verdict = check_bus(events)
    assert verdict["valid"]
    row = verdict["topics"][ALO]
    assert row["duplicates_allowed"] == 1 and row["redelivered"] == 1 and row["processed"] == 2


def test_an_at_least_once_message_stored_twice_is_allowed() -> None:
    events = h(publish(1, ALO, ["p0-1", "p0-2"], "info", 0, 1), publish(1, ALO, ["p0-1", "p0-2"], "ok", 2, 3),
               receive(ALO, "p0-1", "5.1", 4), receive(ALO, "p0-2", "5.2", 4),
               receive(ALO, "p0-1", "5.3", 5), receive(ALO, "p0-2", "5.4", 5))
    verdict = check_bus(events)
    assert verdict["valid"]
    assert verdict["topics"][ALO]["stored_more_than_once"] == 2


def test_an_exactly_once_message_processed_twice_is_a_duplicate() -> None:
    events = h(publish(1, EO, ["p0-1"], "ok", 0, 1),
               receive(EO, "p0-1", "7.1", 2), receive(EO, "p0-1", "7.1", 9, attempt=2))
    verdict = check_bus(events)
    assert not verdict["valid"]
    assert verdict["duplicated"] == 1 and kinds(verdict) == ["processed twice"]


def test_an_exactly_once_redelivery_skipped_by_the_consumer_is_fine() -> None:
    events = h(publish(1, EO, ["p0-1"], "ok", 0, 1),
               receive(EO, "p0-1", "7.1", 2), receive(EO, "p0-1", "7.1", 9, attempt=2, processed=False))
    verdict = check_bus(events)
    assert verdict["valid"]
    assert verdict["topics"][EO]["redelivered"] == 1 and verdict["topics"][EO]["processed"] == 1


def test_two_delivery_ids_for_one_exactly_once_message_mean_the_server_stored_it_twice() -> None:
    """Each copy processed once: the consumer's dedupe by delivery id cannot
    help, the server's dedupe by message id failed."""
    events = h(publish(1, EO, ["p0-1"], "info", 0, 1), publish(1, EO, ["p0-1"], "ok", 2, 3),
               receive(EO, "p0-1", "7.1", 4), receive(EO, "p0-1", "7.2", 5))
    verdict = check_bus(events)
    assert not verdict["valid"]
    assert verdict["duplicated"] == 1 and kinds(verdict) == ["stored twice"]
    assert verdict["examples"][0]["delivery_ids"] == ["7.1", "7.2"]
    assert verdict["topics"][EO]["stored_more_than_once"] == 1


def test_a_retry_after_the_dedupe_window_is_a_new_message() -> None:
    second = 10**9
    events = h(publish(1, EO, ["p0-1"], "info", 0, second), publish(1, EO, ["p0-1"], "ok", 200 * second, 201 * second),
               receive(EO, "p0-1", "7.1", 2 * second), receive(EO, "p0-1", "7.2", 202 * second))
    assert check_bus(events, dedupe_window_s=120)["valid"]
    assert not check_bus(events, dedupe_window_s=300)["valid"]


def test_unknown_publishes_may_be_processed_once_or_not_at_all() -> None:
    events = h(publish(1, EO, ["p0-1"], "info", 0, 1),  # timed out, never retried
               publish(2, EO, ["p1-1"], None, 0, 0),    # no completion at all
               publish(3, ALO, ["p2-1"], "info", 0, 1),
               receive(EO, "p0-1", "7.1", 3), receive(ALO, "p2-1", "5.1", 3), receive(ALO, "p2-1", "5.1", 9))
    verdict = check_bus(events)
    assert verdict["valid"], verdict["examples"]
    assert verdict["topics"][EO]["published"] == {"ok": 0, "fail": 0, "unknown": 2}
    assert verdict["lost"] == 0


def test_an_unknown_exactly_once_publish_is_never_processed_twice() -> None:
    events = h(publish(1, EO, ["p0-1"], "info", 0, 1),
               receive(EO, "p0-1", "7.1", 3), receive(EO, "p0-1", "7.1", 9, attempt=2))
    verdict = check_bus(events)
    assert not verdict["valid"] and kinds(verdict) == ["processed twice"]


def test_a_retried_publish_is_ok_once_any_attempt_is() -> None:
    events = (publish(1, ALO, ["p0-1"], "fail", 0, 1, status=503) + publish(1, ALO, ["p0-1"], "info", 2, 3)
              + publish(1, ALO, ["p0-1"], "ok", 4, 5))
    verdict = check_bus(events)
    assert verdict["topics"][ALO]["published"]["ok"] == 1 and verdict["topics"][ALO]["attempts"] == 3
    assert kinds(verdict) == ["lost"]


def test_a_message_whose_every_publish_failed_must_not_be_delivered() -> None:
    events = h(publish(1, ALO, ["p0-1"], "fail", 0, 1, status=503), publish(1, ALO, ["p0-1"], "fail", 2, 3),
               receive(ALO, "p0-1", "5.1", 4))
    verdict = check_bus(events)
    assert verdict["topics"][ALO]["published"]["fail"] == 1
    assert kinds(verdict) == ["failed publish delivered"]


def test_an_acked_delivery_fetched_again_after_the_ack_is_caught() -> None:
    ack = {"type": "ack", "process": 20_000, "topic": ALO, "delivery_ids": ["5.1"], "gone": ["5.1"], "invoked": 3,
           "time": 4}
    base = h(publish(1, ALO, ["p0-1"], "ok", 0, 1), receive(ALO, "p0-1", "5.1", 2), ack)
    concurrent = check_bus(h(base, receive(ALO, "p0-1", "5.1", 8, attempt=2, fetch_invoked=3)))
    assert concurrent["valid"]  # the fetch began before the ack was answered: it may have won
    after = check_bus(h(base, receive(ALO, "p0-1", "5.1", 8, attempt=2, fetch_invoked=5)))
    assert kinds(after) == ["acked delivery came back"]


def test_receptions_of_unpublished_or_mismatched_messages_are_caught() -> None:
    events = h(publish(1, ALO, ["p0-1"], "ok", 0, 1),
               receive(ALO, "p0-1", "5.1", 2, n=7), receive(ALO, "p9-9", "5.2", 3))
    assert sorted(kinds(check_bus(events))) == ["corrupted", "unknown message"]


def test_counts_during_faults_use_the_nemesis_windows() -> None:
    events = h({"type": "nemesis", "name": "kill", "phase": "start", "time": 10},
               {"type": "nemesis", "name": "kill", "phase": "end", "time": 20},
               publish(1, ALO, ["p0-1"], "ok", 0, 5), publish(1, ALO, ["p0-2"], "ok", 11, 12),
               receive(ALO, "p0-1", "5.1", 13), receive(ALO, "p0-1", "5.1", 15, attempt=2),
               receive(ALO, "p0-2", "5.2", 25))
    verdict = check_bus(events)
    assert verdict["during_faults"] == {"published": 1, "received": 2, "redelivered": 1}


def test_the_report_names_the_problems() -> None:
    events = h(publish(1, EO, ["p0-1"], "ok", 0, 10**6), receive(EO, "p0-1", "7.1", 2 * 10**6),
               receive(EO, "p0-1", "7.2", 3 * 10**6))
    verdict = check_bus(events)
    report = bus_report(events, 0, verdict, title="t", recovery_s=1.0, drain={"seconds": 1.0, "missing": 0})
    assert "verdict: INVALID (stored twice 1)" in report and '"p0-1"' in report
    clean = check_bus(events[:-1])
    assert "verdict: valid" in bus_report(events[:-1], 0, clean, title="t", recovery_s=None)


# -- the workload's clients, against fakes --------------------------------------------------------


class FakeBusClient:
    """Hands out queued fetch answers and records acks."""

    def __init__(self, answers: list[list[dict[str, Any]]]) -> None:
        self.answers = answers
        self.acked: list[list[str]] = []

    async def fetch(self, subscription: str, *, max: int, wait_s: float) -> list[dict[str, Any]]:
        return self.answers.pop(0) if self.answers else []

    async def ack(self, subscription: str, delivery_ids: list[str]) -> dict[str, Any]:
        self.acked.append(list(delivery_ids))
        return {"acked": list(delivery_ids), "unknown": []}


def _delivery(delivery_id: str, id_: str, attempt: int = 1) -> dict[str, Any]:
    publisher, n = id_[1:].split("-")
    return {"delivery_id": delivery_id, "attempt": attempt, "guarantee": "exactly-once",
            "message": {"id": id_, "payload": {"n": int(n), "publisher": int(publisher)}}}


async def test_an_exactly_once_group_processes_a_delivery_id_once_across_its_consumers() -> None:
    history, tracker = History(), BusTracker()
    first = FakeBusClient([[_delivery("7.1", "p0-1")]])
    second = FakeBusClient([[_delivery("7.1", "p0-1", attempt=2)]])
    a = BusConsumer(1, EO, "sub-a", first, history, random.Random(1), tracker, skip_ack=1.0)  # type: ignore[arg-type]
    b = BusConsumer(2, EO, "sub-b", second, history, random.Random(2), tracker, skip_ack=0.0)  # type: ignore[arg-type]
    await a.one()  # processed, then "crashed" before the ack
    await b.one()  # the redelivery reaches the other member: acked, not processed again
    assert first.acked == [] and second.acked == [["7.1"]]
    got = [(e["process"], e["processed"]) for e in history.events if e["type"] == "receive"]
    assert got == [(1, True), (2, False)]
    assert tracker.counts["redelivered"] == 1 and tracker.processed == {(EO, "p0-1")}


async def test_an_at_least_once_consumer_processes_every_reception_and_acks_all_when_draining() -> None:
    history, tracker = History(), BusTracker()
    client = FakeBusClient([[_delivery("5.1", "p0-1")], [_delivery("5.1", "p0-1", attempt=2)]])
    consumer = BusConsumer(1, ALO, "sub-a", client, history, random.Random(1), tracker,  # type: ignore[arg-type]
                           skip_ack=1.0)
    await consumer.one()
    consumer.draining = True
    await consumer.one()
    assert client.acked == [["5.1"]]
    assert [e["processed"] for e in history.events if e["type"] == "receive"] == [True, True]
    assert [e["gone"] for e in history.events if e["type"] == "ack"] == [["5.1"]]


async def test_publish_outcomes_and_idempotency_keys() -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from chaos.workload import make_session

    seen: list[tuple[str | None, str | None, int]] = []
    statuses = [503, 504, 200]

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.headers.get("Idempotency-Key"), body.get("request_id"), len(body.get("messages", [1]))))
        status = statuses.pop(0) if statuses else 200
        if status != 200:
            return web.json_response({"error": {"code": "x", "message": "no"}}, status=status)
        if "messages" in body:
            return web.json_response({"topic": EO, "messages": [{"id": m["id"], "offset": 1, "duplicate": True}
                                                                 for m in body["messages"]]})
        return web.json_response({"id": body["id"], "offset": 1, "routed": 1})

    app = web.Application()
    app.router.add_post("/v1/topics/{topic}/messages", handler)
    history, tracker = History(), BusTracker()
    async with TestServer(app, host="127.0.0.1") as server, make_session() as session:
        endpoint = str(server.make_url("")).rstrip("/")
        publisher = BusPublisher(10_000, 0, EO, [endpoint], history, session, random.Random(0), op_timeout_s=2.0,
                                 batch_max=1, interval_s=0.0, tracker=tracker)
        await publisher._publish_until_ok([1], time.monotonic() + 60)
        batcher = BusPublisher(10_001, 1, EO, [endpoint], history, session, random.Random(0), op_timeout_s=2.0,
                               batch_max=3, interval_s=0.0, tracker=tracker)
        await batcher._publish_until_ok([1, 2], time.monotonic() + 60)
        await batcher._publish_until_ok([3, 4], time.monotonic() + 60)
    kinds_seen = [e["type"] for e in history.events if e["f"] == "publish" and e["type"] != "invoke"]
    assert kinds_seen == ["fail", "info", "ok", "ok", "ok"]  # 503 certain, 504 unknown
    keys = [key for key, _, _ in seen[:3]]
    assert keys == ["chaos-chaos.eo-p0-1"] * 3  # one key for every retry of one message
    batch_ids = [request_id for _, request_id, _ in seen[3:]]
    assert None not in batch_ids and len(set(batch_ids)) == 2  # batches: a fresh request id each
    last = history.events[-1]
    assert last["duplicates"] == ["p1-3", "p1-4"] and tracker.ok == {(EO, "p0-1"), (EO, "p1-1"), (EO, "p1-2"),
                                                                      (EO, "p1-3"), (EO, "p1-4")}
    verdict = check_bus(history.events)
    assert verdict["topics"][EO]["server_dedupes"] == 4 and verdict["lost"] == 5  # published, never consumed


# -- one real run ----------------------------------------------------------------------------------


@pytest.mark.cluster
def test_bus_messages_survive_leader_isolation_and_kills(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "chaos.run", "--workload", "bus", "--out", str(tmp_path),
                             "--duration", "16", "--nemesis", "kill,isolate-leader", "--fault-s", "4",
                             "--quiet-s", "3", "--seed", "404", "--drain-s", "20", "--progress-s", "5"],
                            capture_output=True, text=True, timeout=150)
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert runs, result.stdout + result.stderr
    report = (runs[-1] / "report.txt").read_text() if (runs[-1] / "report.txt").exists() else "(no report)"
    assert result.returncode == 0, f"exit {result.returncode}\n{report}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    verdict = json.loads((runs[-1] / "verdict.json").read_text())["bus"]
    assert verdict["valid"], report
    assert verdict["lost"] == 0 and verdict["duplicated"] == 0, report
    faults = verdict["during_faults"]
    assert faults["published"] > 0 and faults["received"] > 0 and faults["redelivered"] > 0, report
    assert verdict["topics"]["chaos.eo"]["published"]["ok"] > 100, report
    assert verdict["topics"]["chaos.alo"]["published"]["ok"] > 100, report
    assert "isolate-leader" in report and "kill" in report
