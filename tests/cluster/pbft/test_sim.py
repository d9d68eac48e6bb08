"""Whole clusters in the deterministic simulation (cluster/pbft/sim.py):
Byzantine replicas of every kind, lagging replicas, f+1 faults, and random
networks over many seeds. Safety is always "the correct replicas' executed
sequences are prefixes of one another" plus "every result a client accepted
(on f+1 matching signed replies) is the one the correct replicas computed"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.pbft.sim import (
    EquivocatingNode,
    ForgerNode,
    NodeContext,
    NodeFactory,
    SilentNode,
    SimConfig,
    Simulation,
    SplitBrainNode,
    StoppingNode,
)

ROOT = Path(__file__).resolve().parents[3]


def _run(n: int, faulty: dict[int, NodeFactory] | None = None, *, ops: int = 10, clients: int = 2,
         limit_ms: int = 30_000, **config: object) -> Simulation:
    sim = Simulation(SimConfig(n=n, clients=clients, **config), faulty)  # type: ignore[arg-type]
    for c in range(clients):
        sim.submit(c, *[b"add:%d" % k for k in range(1, ops + 1)])
    sim.run_until(sim.all_done, limit_ms)
    return sim


def _assert_safe_and_answered(sim: Simulation, ops: int) -> None:
    assert sim.all_done(), f"clients still waiting at {sim.now_ms} ms (seed {sim.config.seed})"
    assert sim.check_safety() == []
    assert sim.check_clients() == []
    assert len(sim.completed()) == ops * len(sim.clients)


def _stop(at_ms: int) -> NodeFactory:
    return lambda ctx: StoppingNode(ctx, at_ms)


def _split(ctx: NodeContext) -> EquivocatingNode:
    return EquivocatingNode(ctx, "split")


# -- normal case --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 7])
def test_normal_case_every_replica_executes_the_same_sequence(n: int) -> None:
    sim = _run(n, ops=12, clients=3)
    _assert_safe_and_answered(sim, 12)
    sim.run(sim.now_ms + 500)
    histories = {tuple(sim.app(i).ordered()) for i in range(n)}
    assert len(histories) == 1 and len(histories.pop()) == 36
    assert all(sim.replica(i).view == 0 and not sim.replica(i).dropped.keys() - {"out_of_watermark"}
               for i in range(n))
    # Each client saw its own additions applied in order on one shared counter.
    final = {sim.app(i).value for i in range(n)}
    assert final == {3 * sum(range(1, 13))}


def test_requests_are_batched_when_they_arrive_together() -> None:
    sim = _run(4, ops=1, clients=8, inflight_max=1, batch_max=4)
    _assert_safe_and_answered(sim, 1)
    sizes = [len(e.requests) for e in sim.records[1].executed]
    assert sum(sizes) == 8 and max(sizes) == 4 and len(sizes) < 8


def test_checkpoints_become_stable_and_logs_are_truncated() -> None:
    sim = _run(4, ops=40, clients=1, checkpoint_interval=4)
    _assert_safe_and_answered(sim, 40)
    sim.run(sim.now_ms + 500)
    for i in range(4):
        replica = sim.replica(i)
        assert replica.stable_seq == 40 and replica.last_executed == 40
        assert replica.log_size <= replica.L
        assert all(seq > replica.stable_seq for seq in replica._checkpoint_votes)
        assert all(seq >= replica.stable_seq for seq in replica._snapshots)


# -- one Byzantine replica on n=4, two on n=7 ----------------------------------------------------

SCENARIOS: dict[str, tuple[dict[int, NodeFactory], dict[int, NodeFactory]]] = {
    "silent_backup": ({3: SilentNode}, {3: SilentNode, 6: SilentNode}),
    "stopped_primary": ({0: _stop(150)}, {0: _stop(150), 1: _stop(0)}),
    "equivocating_primary": ({0: EquivocatingNode}, {0: EquivocatingNode, 1: EquivocatingNode}),
    "forger": ({2: ForgerNode}, {2: ForgerNode, 4: ForgerNode}),
    "forging_primary": ({0: ForgerNode}, {0: ForgerNode, 1: ForgerNode}),
}


@pytest.mark.parametrize("n", [4, 7])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_byzantine_replicas_do_not_break_safety_or_liveness(scenario: str, n: int) -> None:
    faulty = SCENARIOS[scenario][0 if n == 4 else 1]
    sim = _run(n, faulty, ops=8, clients=2)
    _assert_safe_and_answered(sim, 8)
    correct = sim.correct_ids
    if scenario in ("stopped_primary", "equivocating_primary", "forging_primary"):
        # The faulty primaries are voted out; the new primary is correct and ordered requests.
        views = {sim.replica(i).view for i in correct}
        assert len(views) == 1 and (view := views.pop()) >= 1 and view % n in correct
        entered_ms = min(at for i in correct for at, event in sim.records[i].views if event.active)
        assert all(r.active for r in map(sim.replica, correct))
        # Writes continued under the new primary: requests were sent and answered after it took over.
        assert any(done.invoked_ms > entered_ms for done in sim.completed())
    else:
        assert {sim.replica(i).view for i in correct} == {0}


def test_equivocation_is_seen_as_conflicting_pre_prepares() -> None:
    sim = _run(4, {0: EquivocatingNode}, ops=4)
    _assert_safe_and_answered(sim, 4)
    assert sim.nodes[0].equivocations > 0  # type: ignore[attr-defined]
    assert sum(sim.replica(i).dropped["conflict"] for i in (1, 2, 3)) > 0
    assert {sim.replica(i).view for i in (1, 2, 3)} == {1}


def test_forged_messages_are_dropped_and_counted_by_reason() -> None:
    sim = _run(4, {2: ForgerNode}, ops=8)
    _assert_safe_and_answered(sim, 8)
    forger = sim.nodes[2]
    assert isinstance(forger, ForgerNode)
    for i in (0, 1, 3):
        dropped = sim.replica(i).dropped
        for reason in ("bad_signature", "unsigned", "malformed", "sender_mismatch"):
            assert dropped[reason] > 0, (i, reason, dict(dropped))
        assert dropped["bad_client_signature"] > 0
    # Every forgery that arrived is accounted for by some reason; a genuine message from 2 never is.
    assert forger.forged["bad_signature"] > 0 and forger.forged["client_lie"] > 0
    # Clients saw the forger's false or badly signed replies and accepted none of them.
    assert sum(c.dropped["bad_signature"] for c in sim.clients) > 0
    assert all(not done.result.startswith(b"forged") for done in sim.completed())


def test_split_equivocation_leaves_one_backup_behind_until_state_transfer() -> None:
    """The primary gives quorum-1 backups the real batch and the last a null
    request: the first group commits (with the primary), the last cannot, and
    catches up from a stable checkpoint instead."""
    sim = _run(4, {0: _split}, ops=12, checkpoint_interval=4)
    _assert_safe_and_answered(sim, 12)
    sim.run(sim.now_ms + 2_000)
    assert sim.check_safety() == []
    assert sim.replica(3).dropped["conflict"] > 0
    assert sim.records[3].transfers, "the odd backup out should have fetched a checkpoint"
    assert sim.app(3).ordered()[: len(sim.app(1).ordered())] == sim.app(1).ordered()[: len(sim.app(3).ordered())]


def test_a_lagging_replica_catches_up_through_state_transfer() -> None:
    sim = Simulation(SimConfig(n=4, clients=2, seed=3, checkpoint_interval=4))
    sim.isolate(3, 0, 1_500)
    for c in range(2):
        sim.submit(c, *[b"add:%d" % k for k in range(1, 21)])
    assert sim.run_until(sim.all_done, 30_000)
    assert sim.now_ms < 1_500 and sim.app(3).history == []
    sim.run(3_000)
    assert sim.records[3].transfers and sim.records[3].fetches
    assert sim.app(3).ordered() == sim.app(0).ordered() and len(sim.app(3).history) == 40
    assert sim.check_safety() == [] and sim.records[3].gaps == []
    # It then takes part again: the next requests are executed by it normally.
    sim.submit(0, b"add:100")
    assert sim.run_until(lambda: len(sim.app(3).history) == 41, 10_000)
    assert sim.records[3].executed[-1].requests[0].operation == b"add:100"


# -- f+1 faulty replicas: beyond the promise ---------------------------------------------------------


def test_f_plus_1_colluding_replicas_break_safety() -> None:
    """Replicas 0 and 1 (f+1 = 2 of 4) each run two faces: one with replica 2
    and client c0, one with replica 3 and client c1. Each face forms quorums
    of 2f+1 = 3 with its correct replica, so 2 and 3 commit different
    requests at seq 1 and both clients accept their result on f+1 replies."""

    def colluder(ctx: NodeContext) -> SplitBrainNode:
        return SplitBrainNode(ctx, group_a={2}, group_b={3}, colluders={0, 1}, clients_a={"c0"})

    sim = Simulation(SimConfig(n=4, clients=2), {0: colluder, 1: colluder})
    sim.submit(0, b"add:5")
    sim.submit(1, b"add:7")
    assert sim.run_until(sim.all_done, 10_000)
    violations = sim.check_safety()
    assert violations and "replicas 2 and 3 diverge at position 0" in violations[0]
    assert sim.app(2).ordered() == [("c0", 1, b"add:5")] and sim.app(3).ordered() == [("c1", 1, b"add:7")]
    # Not linearizable: on one counter, one of the two additions must have seen the other.
    results = {done.client: done.result for done in sim.completed()}
    assert results == {"c0": b"5", "c1": b"7"}


def test_f_plus_1_silent_replicas_break_liveness_but_not_safety() -> None:
    sim = _run(4, {2: SilentNode, 3: SilentNode}, ops=1, clients=1, limit_ms=10_000)
    assert not sim.all_done() and sim.completed() == []
    assert sim.app(0).history == sim.app(1).history == []
    assert sim.check_safety() == []
    # They keep trying to change views, and never get a quorum of 2f+1 = 3.
    assert any(not sim.replica(i).active for i in (0, 1))


# -- determinism and random networks ------------------------------------------------------------------


REPLAY = """
from cluster.pbft.sim import SimConfig, Simulation, StoppingNode
sim = Simulation(SimConfig(n=4, clients=2, seed=11, drop_rate=0.2, duplicate_rate=0.1, heal_at_ms=1000,
                           max_delay_ms=40), {0: lambda ctx: StoppingNode(ctx, 100)})
for c in range(2):
    sim.submit(c, b"add:1", b"add:2", b"add:3")
assert sim.run_until(sim.all_done, 30000)
print(sim.trace_digest)
"""


def test_a_replay_does_not_depend_on_the_interpreter_hash_seed() -> None:
    """Nothing iterates a hash-ordered collection in a way that changes what is sent."""
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([sys.executable, "-c", REPLAY], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60, check=True)
        digests.add(proc.stdout.strip())
    assert len(digests) == 1


def test_a_run_replays_exactly_from_its_seed() -> None:
    def digest(seed: int) -> str:
        sim = _run(4, {0: _stop(100)}, ops=5, seed=seed, drop_rate=0.2, duplicate_rate=0.1, heal_at_ms=1_000,
                   max_delay_ms=40)
        return sim.trace_digest

    assert digest(7) == digest(7)
    assert digest(7) != digest(8)


FAULTS: dict[str, dict[int, NodeFactory]] = {
    "none": {},
    "silent_backup": {2: SilentNode},
    "silent_primary": {0: SilentNode},
    "stopped_primary": {0: _stop(200)},
    "equivocating_primary": {0: EquivocatingNode},
    "split_equivocation": {0: _split},
    "forger": {1: ForgerNode},
}

network = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "drop_rate": st.sampled_from([0.0, 0.05, 0.2, 0.4]),
    "duplicate_rate": st.sampled_from([0.0, 0.1]),
    "max_delay_ms": st.sampled_from([5, 30, 120]),
    "heal_at_ms": st.sampled_from([500, 2_000, 4_000]),
    "checkpoint_interval": st.sampled_from([2, 4, 8]),
    "batch_max": st.sampled_from([1, 4]),
})


@given(net=network, fault=st.sampled_from(sorted(FAULTS)))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_networks_are_safe_and_live_once_they_deliver(net: dict[str, object], fault: str) -> None:
    """Drops, duplicates and reordering until ``heal_at_ms``, then a network
    that delivers: safety must hold throughout, and every request completes."""
    sim = _run(4, FAULTS[fault], ops=5, clients=3, limit_ms=60_000, **net)
    assert sim.check_safety() == [], f"seed {net['seed']}"
    assert sim.check_clients() == [], f"seed {net['seed']}"
    assert sim.all_done(), f"not live: seed {net['seed']}, clients waiting at {sim.now_ms} ms"


@given(seed=st.integers(0, 2**32 - 1), drop_rate=st.sampled_from([0.3, 0.6]),
       fault=st.sampled_from(["none", "equivocating_primary", "forger"]))
@settings(max_examples=10, deadline=None)
def test_a_network_that_never_heals_may_stall_but_is_always_safe(seed: int, drop_rate: float, fault: str) -> None:
    sim = _run(4, FAULTS[fault], ops=4, clients=2, limit_ms=8_000, seed=seed, drop_rate=drop_rate,
               duplicate_rate=0.2, max_delay_ms=60)
    assert sim.check_safety() == [], f"seed {seed}"
    assert sim.check_clients() == [], f"seed {seed}"


