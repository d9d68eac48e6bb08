"""Replica behaviours (cluster/pbft/faults.py): built by name, and run by real
``PbftNode``s on loopback TCP. One of four nodes is Byzantine; the other
three must still answer every client (f+1 matching replies) with what they
computed, and execute identical sequences."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from cluster.pbft.faults import (
    FAULT_KINDS,
    CorrectNode,
    EquivocatingNode,
    ForgerNode,
    SilentNode,
    make_behaviour,
)
from cluster.pbft.node import NodeError, PbftNode
from cluster.pbft.replica import Replica
from cluster.pbft.sim import CounterApp
from tests.cluster.pbft.test_node import KEYS, POLL_S, PUBLIC, Cluster, N
from tests.waiting import eventually


def _replica(i: int) -> Replica:
    return Replica(i, N, KEYS[i], PUBLIC, app=CounterApp(), client_keys={})


def test_make_behaviour_builds_each_kind_around_the_given_replica() -> None:
    assert FAULT_KINDS == ("silent", "equivocate", "forge")
    expected = {"correct": CorrectNode, "silent": SilentNode, "equivocate": EquivocatingNode, "forge": ForgerNode}
    for kind, cls in expected.items():
        replica = _replica(2)
        node = make_behaviour(kind, replica, KEYS[2])
        assert type(node) is cls and node.id == 2
        assert node.replica is replica  # type: ignore[attr-defined]
    equivocating = make_behaviour("equivocate", _replica(0), KEYS[0])
    assert isinstance(equivocating, EquivocatingNode) and equivocating.mode == "distinct"


def test_a_silent_behaviour_never_feeds_its_replica() -> None:
    replica = _replica(1)
    node = make_behaviour("silent", replica, KEYS[1])
    assert node.on_tick(10_000) == [] and node.on_message(0, b"garbage", 10_000) == []
    assert replica.dropped == {} and replica.view == 0 and replica.last_executed == 0


def test_make_behaviour_refuses_unknown_kinds() -> None:
    for kind in ("", "Silent", "split", "byzantine"):
        with pytest.raises(ValueError, match="correct, silent, equivocate, forge"):
            make_behaviour(kind, _replica(0), KEYS[0])


def test_a_node_refuses_a_behaviour_for_another_replica() -> None:
    addresses = [("127.0.0.1", 1)] * N
    replica = _replica(0)
    for behaviour in (make_behaviour("forge", _replica(1), KEYS[1]), make_behaviour("correct", _replica(0), KEYS[0])):
        with pytest.raises(NodeError):
            PbftNode(replica, addresses, PUBLIC, client_keys={}, client_homes={}, behaviour=behaviour)


# -- real nodes ---------------------------------------------------------------------------------


class FaultyCluster(Cluster):
    """test_node's four-node cluster, with ``faults[i]`` the behaviour of node i."""

    def __init__(self, faults: dict[int, str]) -> None:
        self.faults = faults
        super().__init__()

    def make(self, i: int) -> PbftNode:
        node = super().make(i)
        if i in self.faults:
            # Before start(): nothing has driven the replica yet.
            node.behaviour = make_behaviour(self.faults[i], node.replica, KEYS[i])
        return node

    @property
    def correct(self) -> list[int]:
        return [i for i in range(N) if i not in self.faults]

    def assert_identical_prefixes(self) -> None:
        histories = self.histories(self.correct)
        for a in histories:
            for b in histories:
                assert a[: len(b)] == b[: len(a)]


@asynccontextmanager
async def _running(faults: dict[int, str]) -> AsyncIterator[FaultyCluster]:
    c = FaultyCluster(faults)
    try:
        for node in c.nodes:
            await node.start()
        yield c
        assert [node.failure for node in c.nodes] == [None] * N
    finally:
        for node in c.nodes:
            await node.stop()


async def _submit_all(c: FaultyCluster, ids: list[int]) -> list[int]:
    """One ``add:1`` from each listed node's client; the results, checked
    against what the correct replicas computed for those very requests."""
    before = max(len(h) for h in c.histories(c.correct))
    async with asyncio.timeout(4):
        results = await asyncio.gather(*(c.nodes[i].submit(b"add:1", f"c{i}") for i in ids))
    await eventually(lambda: all(len(h) == before + len(ids) for h in c.histories(c.correct)),
                     "the correct replicas to execute them", 3, interval_s=POLL_S)
    c.assert_identical_prefixes()
    # Each client's last executed request is the one just submitted.
    computed = {client: result for _, client, _, _, result in c.apps[c.correct[0]].history}
    assert {f"c{i}": r for i, r in zip(ids, results, strict=True)} == computed
    return sorted(int(r) for r in results)


async def test_an_equivocating_primary_is_replaced() -> None:
    async with _running({0: "equivocate"}) as c:
        assert await _submit_all(c, [1, 2, 3]) == [1, 2, 3]
        assert any(c.nodes[i].replica.view > 0 for i in c.correct)
        behaviour = c.nodes[0].behaviour
        assert isinstance(behaviour, EquivocatingNode) and behaviour.equivocations > 0
        assert await _submit_all(c, [1, 2, 3]) == [4, 5, 6]  # and the new view goes on ordering


async def test_a_forging_primary_is_outvoted_and_replaced() -> None:
    async with _running({0: "forge"}) as c:
        # c0 is hosted by the forger: its client side is honest and outvotes its own replica's lies.
        assert await _submit_all(c, [0, 1, 2, 3]) == [1, 2, 3, 4]
        assert any(c.nodes[i].replica.view > 0 for i in c.correct)
        forger = c.nodes[0]
        assert isinstance(forger.behaviour, ForgerNode) and forger.counters["raw_sent"] > 0
        for i in c.correct:
            dropped = c.nodes[i].replica.dropped
            assert dropped["bad_signature"] > 0 and dropped["malformed"] > 0
            assert c.nodes[i].counters["frame_malformed"] > 0  # the raw garbage cut the forger's link
        # Once its replica executes c0's request, its forged replies reach c0's waiter and are refused.
        await eventually(lambda: forger.counters["reply_bad_signature"] > 0, "a forged reply refused", 3,
                         interval_s=POLL_S)


async def test_a_silent_backup_changes_nothing_for_the_clients() -> None:
    async with _running({3: "silent"}) as c:
        # c3 too: its home node is mute, but its retry reaches the others (OSDI 4.1).
        assert await _submit_all(c, [0, 1, 2, 3]) == [1, 2, 3, 4]
        assert c.nodes[3].replica.last_executed == 0 and c.apps[3].history == []
        assert all(c.nodes[i].replica.view == 0 for i in c.correct)
