"""Proposer: encode → submit → wait for the local apply; the three outcomes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from coordinator.errors import Conflict, CoordinatorError, InvalidInput, NotFound, OutcomeUnknown, TooLarge, Unavailable
from coordinator.ports import Done, Failure
from coordinator.services.proposals import Proposer, raise_for, request_key
from coordinator.types import Result
from tests.coordinator.services.conftest import Sim
from tests.waiting import eventually


async def test_propose_returns_the_applied_result(sim: Sim) -> None:
    result = await sim.propose("kv.put", {"key": "k", "value": 1})
    assert result.ok and result.value == {"revision": 1}
    assert result.index == sim.applier.applied_index
    assert [c.key for c in result.changes] == ["k"]
    assert sim.node.proposer.inflight == 0


async def test_state_rejections_are_results_mapped_by_raise_for(sim: Sim) -> None:
    result = await sim.propose("kv.delete", {"key": "missing"})
    assert result.error is not None and result.error[0] == "not_found"
    with pytest.raises(NotFound):
        raise_for(result)
    await sim.propose("lock.acquire", {"name": "l", "holder": "a", "ttl_ms": 5000})
    with pytest.raises(Conflict):
        raise_for(await sim.propose("lock.acquire", {"name": "l", "holder": "b", "ttl_ms": 5000}))
    with pytest.raises(InvalidInput) as invalid:
        raise_for(await sim.propose("kv.put", {"key": "k"}))
    assert invalid.value.field == "value"


def test_raise_for_unknown_codes_is_a_coordinator_error() -> None:
    with pytest.raises(CoordinatorError):
        raise_for(Result(index=1, error=("weird", "something")))
    assert raise_for(Result(index=1, value={"a": 1})) == {"a": 1}


async def test_no_leader_is_unavailable_with_the_leader_hint(sim: Sim) -> None:
    sim.engine.no_leader = True
    with pytest.raises(Unavailable) as refused:
        await sim.propose("kv.put", {"key": "k", "value": 1})
    assert refused.value.leader == "127.0.0.1:17001"
    assert sim.node.proposer.outcomes["unavailable"] == 1
    assert sim.node.proposer.inflight == 0
    assert sim.applier.machine.kv.get("k") is None


async def test_no_commit_in_time_is_outcome_unknown_and_a_late_commit_is_harmless(sim: Sim) -> None:
    sim.engine.hold = True
    with pytest.raises(OutcomeUnknown):
        await sim.propose("kv.put", {"key": "late", "value": 1}, request_key("agent:a", "r1", "put late"))
    assert sim.node.proposer.outcomes["timeout"] == 1
    assert sim.node.proposer.inflight == 0
    sim.engine.release()
    await eventually(lambda: sim.applier.machine.kv.get("late") is not None, "the late commit")
    # The retry with the same request_id answers the first outcome.
    retry = await sim.propose("kv.put", {"key": "late", "value": 1}, request_key("agent:a", "r1", "put late"))
    assert retry.value == {"revision": sim.applier.machine.kv.get("late").mod_revision}
    assert sim.applier.machine.kv.get("late").version == 1


@pytest.mark.parametrize(("reason", "error"), [(Failure.LEADER_CHANGED, OutcomeUnknown),
                                               (Failure.UNKNOWN, OutcomeUnknown),
                                               (Failure.NOT_LEADER, Unavailable),
                                               (Failure.QUEUE_FULL, Unavailable),
                                               (Failure.DISCARDED, Unavailable)])
async def test_engine_failures_map_to_definite_or_unknown(sim: Sim, monkeypatch: pytest.MonkeyPatch,
                                                          reason: str, error: type[Exception]) -> None:
    def fail(blob: bytes, done: Done) -> None:
        asyncio.get_running_loop().call_soon(done, reason)

    monkeypatch.setattr(sim.engine, "submit", fail)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(error):
        await sim.propose("kv.put", {"key": "k", "value": 1})
    assert loop.time() - started < 0.4  # at once, not after the proposal timeout


async def test_done_before_apply_still_waits_for_the_result(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines may report the commit before the local replica applies it."""
    index = len(sim.engine.log)

    def commit_then_apply(blob: bytes, done: Done) -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(done, None)
        loop.call_later(0.05, sim.applier.apply, index + 1, blob)

    monkeypatch.setattr(sim.engine, "submit", commit_then_apply)
    result = await sim.propose("kv.put", {"key": "k", "value": "v"})
    assert result.ok and sim.applier.machine.kv.get("k").value == "v"


@pytest.mark.parametrize("confirmation", [None, Failure.UNKNOWN])
async def test_an_engine_that_confirms_results_is_awaited_after_the_apply(
        sim: Sim, monkeypatch: pytest.MonkeyPatch, confirmation: str | None) -> None:
    """PBFT: the local replica applies first, f+1 replies arrive later. The
    answer waits for them; a disagreement (UNKNOWN after the apply) is not
    answered with the local result."""
    index = len(sim.engine.log)
    seen: dict[str, float] = {}

    def apply_then_confirm(blob: bytes, done: Done) -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(sim.applier.apply, index + 1, blob)

        def confirm() -> None:
            seen["confirmed"] = loop.time()
            done(confirmation)

        loop.call_later(0.1, confirm)

    monkeypatch.setattr(sim.engine, "submit", apply_then_confirm)
    proposer = Proposer(sim.engine, sim.applier, sim.clock, sim.node.rng, timeout_s=2.0)
    assert not proposer.confirms_results  # the plain SimEngine does not confirm
    monkeypatch.setattr(proposer, "confirms_results", True)
    if confirmation is None:
        result = await proposer.propose("kv.put", {"key": "k", "value": "v"})
        assert result.ok and "confirmed" in seen
    else:
        with pytest.raises(OutcomeUnknown):
            await proposer.propose("kv.put", {"key": "k", "value": "v"})
        assert sim.applier.machine.kv.get("k").value == "v"  # applied locally, yet not answered
    assert proposer.inflight == 0


def test_confirming_engines_are_recognised() -> None:
    class Confirming:
        confirms_results = True

    from coordinator.ports import ConfirmsResults

    assert isinstance(Confirming(), ConfirmsResults) and not isinstance(object(), ConfirmsResults)


async def test_inflight_bound(sim: Sim) -> None:
    proposer = Proposer(sim.engine, sim.applier, sim.clock, sim.node.rng, inflight_max=2, timeout_s=5)
    sim.engine.hold = True
    held = [asyncio.create_task(proposer.propose("kv.put", {"key": f"k{i}", "value": i})) for i in range(2)]
    await eventually(lambda: proposer.inflight == 2, "two proposals in flight")
    with pytest.raises(Unavailable):
        await proposer.propose("kv.put", {"key": "k9", "value": 9})
    assert proposer.outcomes == {"overloaded": 1}
    sim.engine.release()
    assert all(r.ok for r in await asyncio.gather(*held))
    assert proposer.inflight == 0
    assert (await proposer.propose("kv.put", {"key": "k9", "value": 9})).ok


async def test_too_large_command_is_refused_before_submitting(sim: Sim) -> None:
    proposer = Proposer(sim.engine, sim.applier, sim.clock, sim.node.rng, command_max_bytes=200)
    before = len(sim.engine.log)
    with pytest.raises(TooLarge):
        await proposer.propose("kv.put", {"key": "k", "value": "x" * 500})
    assert len(sim.engine.log) == before
    assert proposer.inflight == 0


async def test_commands_carry_the_clock_and_ids(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.codec import decode_command

    seen: list[Any] = []
    submit = sim.engine.submit

    def spy(blob: bytes, done: Done) -> None:
        seen.append(decode_command(blob))
        submit(blob, done)

    monkeypatch.setattr(sim.engine, "submit", spy)
    sim.clock.advance(12.5)
    await sim.propose("kv.put", {"key": "k", "value": 1}, request_key("admin", "rid", "put k"))
    await sim.propose("kv.put", {"key": "k", "value": 2})
    assert seen[0].now_ms == sim.clock.now_ms()
    assert seen[0].request_id == "admin/rid" and seen[1].request_id is None
    assert seen[0].request_digest == request_key("admin", "other", "put k").digest  # what was asked, not the id
    assert seen[0].proposal_id != seen[1].proposal_id
