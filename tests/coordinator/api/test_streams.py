"""Stream processors over HTTP: definitions checked (400 naming the field),
a window closed by the leader's tick when the clock passes its end."""

from __future__ import annotations

from coordinator.client import CoordinatorClient
from coordinator.codec import decode_command
from tests.coordinator.api.conftest import Harness
from tests.waiting import eventually

WINDOW = {"source": {"category": "job"}, "window": {"kind": "tumbling", "size_s": 5}, "fold": "count",
          "group_by": "kind", "emit": "stats.jobs"}


async def test_bad_definitions_name_the_field(h: Harness) -> None:
    before = h.fingerprint()
    for body, field in (({**WINDOW, "window": {"kind": "tumbling"}}, "window.size_s"),
                        ({**WINDOW, "emit": "system.x"}, "emit"),
                        ({**WINDOW, "bogus": 1}, "bogus"),
                        ({k: v for k, v in WINDOW.items() if k != "window"}, "window")):
        status, error = await h.call("PUT", "/v1/processors/p", body)
        assert status == 400 and error["error"]["field"] == field, (body, error)
    assert h.fingerprint() == before


async def test_the_leader_closes_a_window_when_its_clock_passes_the_end(h: Harness,
                                                                       client: CoordinatorClient) -> None:
    made = await client.put_processor("jobs", WINDOW)
    assert made["window"] == {"kind": "tumbling", "size_ms": 5000, "slide_ms": 5000}
    sub = await client.subscribe("stats.jobs")
    for kind in ("build", "build", "test"):
        await client.append("job-1", [{"type": "Ran", "data": {"kind": kind}}])
    assert await client.fetch(sub, max=10) == []
    h.clock.advance(6)  # nothing else is committed: the leader's streams.tick closes the window

    async def results() -> list:
        return await client.fetch(sub, max=10)

    deliveries = await eventually(results, "the window's results")
    assert sorted((d["message"]["payload"]["group"], d["message"]["payload"]["value"]) for d in deliveries) == [
        ("build", 2), ("test", 1)]
    described = await client.processor("jobs")
    assert described["emitted"] == 2 and described["open_windows"] == 0
    await client.delete_processor("jobs")
    assert await client.processor("jobs") is None


async def test_the_log_carries_the_definition_as_the_client_sent_it(h: Harness) -> None:
    """A processor's definition goes in the log unnormalized, its keys in the client's order."""
    body = {"emit": "stats.jobs", "window": {"size_s": 5, "kind": "tumbling"}, "fold": "count",
            "source": {"category": "job"}}
    await h.call("PUT", "/v1/processors/p", body, expect=200)
    assert list(decode_command(h.engine.log[-1]).args.items()) == [("name", "p"), ("definition", body)]
    assert list(decode_command(h.engine.log[-1]).args["definition"]) == list(body)
    await h.call("DELETE", "/v1/processors/p", expect=200)
    assert decode_command(h.engine.log[-1]).args == {"name": "p"}
