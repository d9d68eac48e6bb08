"""Four ``PbftEngine``s on loopback TCP in one process (cluster/pbft/engine.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cluster.pbft.engine import FsmApp, PbftEngine, entry_reply, parse_address, reply_index
from cluster.pbft.messages import Request
from cluster.pbft.sim import client_keys, replica_keys
from coordinator.codec import decode_record, encode_record
from coordinator.errors import InvalidInput, InvariantError, Unavailable
from coordinator.ports import ConsensusEngine, Failure
from tests.cluster.pbft.harness import free_ports
from tests.cluster.pbft.test_node import POLL_S, WAIT_S
from tests.waiting import eventually

N = 4
KEYS = [replica_keys(i) for i in range(N)]
PUBLIC = [k.public_key for k in KEYS]
CLIENT_KEYS = [client_keys(f"engine-{i}") for i in range(N)]
CLIENT_PUBLIC = [k.public_key for k in CLIENT_KEYS]


class RecordingFSM:
    """Records entries; the result of an entry is the number of entries so far."""

    def __init__(self, lie_from: int | None = None) -> None:
        self.entries: list[tuple[int, bytes]] = []
        self.lie_from = lie_from  # from this index on, results are wrong (a diverged replica)

    def apply(self, index: int, blob: bytes) -> bytes:
        self.entries.append((index, blob))
        if self.lie_from is not None and index >= self.lie_from:
            return b"wrong"
        return b"%d" % len(self.entries)

    def snapshot(self) -> bytes:
        return encode_record([[i, b] for i, b in self.entries])

    def restore(self, blob: bytes) -> None:
        self.entries = [(i, b) for i, b in decode_record(blob)]

    def reset(self) -> None:
        self.entries = []


class Cluster:
    def __init__(self, request_timeout_ms: int = 8000, fsms: list[RecordingFSM] | None = None) -> None:
        self.addresses = [f"127.0.0.1:{p}" for p in free_ports(N)]
        self.fsms = fsms or [RecordingFSM() for _ in range(N)]
        self.roles: list[list[str]] = [[] for _ in range(N)]
        self.engines = [
            PbftEngine(replica_id=i, addresses=self.addresses, keys=KEYS[i], public_keys=PUBLIC,
                       client_keys=CLIENT_KEYS[i], client_public_keys=CLIENT_PUBLIC, fsm=self.fsms[i],
                       request_timeout_ms=request_timeout_ms, retry_ms=300, queue_timeout_ms=request_timeout_ms,
                       checkpoint_interval=4, view_change_timeout_ms=400, status_interval_ms=50,
                       fetch_timeout_ms=100, send_queue_max=64)
            for i in range(N)
        ]
        for i, engine in enumerate(self.engines):
            engine.on_role_change(self.roles[i].append)

    async def submit(self, i: int, blob: bytes) -> str | None:
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.engines[i].submit(blob, future.set_result)
        return await future


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    for engine in c.engines:
        await engine.start()
    try:
        yield c
        assert [e.node.failure for e in c.engines] == [None] * N
    finally:
        for engine in c.engines:
            await engine.stop()


def test_app_numbers_requests_and_round_trips() -> None:
    fsm = RecordingFSM()
    app = FsmApp(fsm)
    r1 = app.execute(1, Request("c", 1, b"a", "sig"))
    r2 = app.execute(1, Request("c", 2, b"b", "sig"))  # same batch: next index
    assert (r1, r2) == (entry_reply(1, b"a", b"1"), entry_reply(2, b"b", b"2"))
    assert app.replies == {"c": (2, r2)}
    assert reply_index(r2) == 2 and reply_index(b"short") is None
    other = FsmApp(RecordingFSM())
    other.restore(app.snapshot())
    assert other.index == 2 and other.fsm.entries == fsm.entries  # type: ignore[attr-defined]
    assert other.restored_index == 2 and other.replies == {}
    assert other.execute(2, Request("c", 3, b"c", "sig")) == entry_reply(3, b"c", b"3")
    with pytest.raises(InvariantError):
        other.restore(b"garbage")


def test_replies_bind_index_operation_and_result() -> None:
    base = entry_reply(5, b"op", b"result")
    assert len({base, entry_reply(6, b"op", b"result"), entry_reply(5, b"op2", b"result"),
                entry_reply(5, b"op", b"other")}) == 4
    # the operation is hashed before the result is appended: no ambiguity at the seam
    assert entry_reply(5, b"ab", b"c") != entry_reply(5, b"a", b"bc")


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:7001") == ("127.0.0.1", 7001)
    for bad in ("127.0.0.1", ":1", "h:0", "h:x"):
        with pytest.raises(InvalidInput):
            parse_address(bad)


async def test_submits_through_any_engine_agree(cluster: Cluster) -> None:
    assert isinstance(cluster.engines[0], ConsensusEngine)
    blobs = [b"op-%d-%d" % (i, k) for k in range(3) for i in range(N)]
    results = await asyncio.gather(*(cluster.submit(int(b.split(b"-")[1]), b) for b in blobs))
    assert results == [None] * len(blobs)
    await eventually(lambda: all(len(f.entries) == len(blobs) for f in cluster.fsms),
                     "every replica to apply them", WAIT_S, interval_s=POLL_S)
    first = cluster.fsms[0].entries
    assert [i for i, _ in first] == list(range(1, len(blobs) + 1))
    assert sorted(b for _, b in first) == sorted(blobs)
    assert all(f.entries == first for f in cluster.fsms)
    assert all(e.status().commit_index == len(blobs) for e in cluster.engines)


async def test_status_has_one_leader_the_primary(cluster: Cluster) -> None:
    assert await cluster.submit(1, b"x") is None
    await eventually(lambda: all(e.status().healthy for e in cluster.engines),
                     "every engine healthy", WAIT_S, interval_s=POLL_S)
    statuses = [e.status() for e in cluster.engines]
    assert [s.role for s in statuses] == ["leader", "follower", "follower", "follower"]
    assert {s.leader for s in statuses} == {cluster.addresses[0]}
    assert {s.term for s in statuses} == {0}
    assert all(s.members == tuple(cluster.addresses) for s in statuses)
    assert cluster.roles[0] == ["leader"] and cluster.roles[1] == ["follower"]
    with pytest.raises(Unavailable):
        await cluster.engines[0].add_member("127.0.0.1:1")
    with pytest.raises(Unavailable):
        await cluster.engines[0].remove_member(cluster.addresses[3])


async def test_stopping_the_primary_elects_a_new_one(cluster: Cluster) -> None:
    assert await cluster.submit(2, b"before") is None
    await cluster.engines[0].stop()
    assert cluster.roles[0] == ["leader", "stopped"]
    assert cluster.engines[0].status().role == "stopped"
    results = await asyncio.gather(*(cluster.submit(i, b"after-%d" % i) for i in (1, 2, 3)))
    assert results == [None, None, None]
    await eventually(lambda: any(e.status().role == "leader" for e in cluster.engines[1:]),
                     "a new leader", WAIT_S, interval_s=POLL_S)
    statuses = [e.status() for e in cluster.engines[1:]]
    leaders = [s for s in statuses if s.role == "leader"]
    assert len(leaders) == 1 and leaders[0].term >= 1
    assert leaders[0].node == leaders[0].leader == cluster.addresses[leaders[0].term % N]
    assert "leader" in cluster.roles[leaders[0].term % N]
    assert await cluster.submit(3, b"more") is None
    await eventually(lambda: all(len(f.entries) == 5 for f in cluster.fsms[1:]),
                     "5 entries on the others", WAIT_S, interval_s=POLL_S)
    assert cluster.fsms[1].entries == cluster.fsms[2].entries == cluster.fsms[3].entries


async def test_submit_alone_is_unknown_and_stopped_is_definite() -> None:
    c = Cluster(request_timeout_ms=1500)
    engine = c.engines[1]
    await engine.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await c.submit(1, b"lonely") == Failure.UNKNOWN
        assert loop.time() - started < 3
        assert not engine.status().healthy
    finally:
        await engine.stop()
    assert await c.submit(1, b"late") == Failure.NO_LEADER
    assert Failure.NO_LEADER in Failure.DEFINITE


async def test_a_replica_whose_results_differ_never_confirms_them() -> None:
    """Engine 2's state machine returns wrong results from index 3 on: the
    f+1 correct replies disagree with it, so its own submissions end with
    UNKNOWN and it reports itself unhealthy; the others are not affected."""
    c = Cluster(fsms=[RecordingFSM(), RecordingFSM(), RecordingFSM(lie_from=3), RecordingFSM()])
    for engine in c.engines:
        await engine.start()
    try:
        assert await c.submit(2, b"one") is None  # index 1: still honest
        assert await c.submit(0, b"two") is None
        assert await c.submit(2, b"three") == Failure.UNKNOWN  # index 3: engine 2 lies
        assert await c.submit(1, b"four") is None  # the correct replicas go on
        status = c.engines[2].status()
        assert not status.healthy and status.problem is not None and "diverged" in status.problem
        assert c.engines[2].counters["result_mismatch"] == 1
        assert c.engines[2].event_counts()["engine_result_mismatch"] == 1
        assert [c.engines[i].divergence for i in (0, 1, 3)] == [None] * 3
    finally:
        for engine in c.engines:
            await engine.stop()


async def test_the_primary_knows_when_a_quorum_last_spoke(cluster: Cluster) -> None:
    """``KnowsQuorumContact``: the primary hears 2f peers' statuses within
    ``quorum_lease_s``; with two backups stopped it hears only one, and the
    age grows past the lease (the leases service then refuses heartbeats)."""
    from coordinator.ports import KnowsQuorumContact

    primary = cluster.engines[0]
    assert isinstance(primary, KnowsQuorumContact)
    assert primary.quorum_lease_s == 0.4
    assert await cluster.submit(1, b"x") is None
    await eventually(lambda: (primary.quorum_contact_age_s() or 1.0) < primary.quorum_lease_s,
                     "contact with a quorum", WAIT_S, interval_s=POLL_S)
    assert cluster.engines[1].quorum_contact_age_s() is None  # a backup
    await cluster.engines[2].stop()
    await cluster.engines[3].stop()
    await eventually(lambda: (primary.quorum_contact_age_s() or 0.0) > primary.quorum_lease_s,
                     "the quorum contact to age past the lease", WAIT_S, interval_s=POLL_S)


class FailingFSM(RecordingFSM):
    """Raises while applying ``fail_at`` (a handler bug), like ``Applier`` would."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def apply(self, index: int, blob: bytes) -> bytes:
        if index == self.fail_at:
            raise ZeroDivisionError("bug with a payload: " + blob.decode(errors="replace"))
        return super().apply(index, blob)


async def test_a_replica_whose_apply_raises_halts_and_leaves_the_protocol(caplog) -> None:
    """Engine 2's state machine raises at index 3 (issue 20, item 10): engine 2
    applies nothing after it, stops its node (a halted replica counts against
    f), reports why and refuses submissions; the other three go on."""
    import logging

    caplog.set_level(logging.CRITICAL)
    c = Cluster(fsms=[RecordingFSM(), RecordingFSM(), FailingFSM(fail_at=3), RecordingFSM()])
    for engine in c.engines:
        await engine.start()
    try:
        assert await c.submit(0, b"one") is None
        assert await c.submit(1, b"two") is None
        assert await c.submit(3, b"three") is None  # index 3: engine 2 raises, f+1 others agree
        await eventually(lambda: c.engines[2].status().role == "stopped" and not c.engines[2].node.running,
                         "engine 2 to stop", WAIT_S, interval_s=POLL_S)
        status = c.engines[2].status()
        assert not status.healthy and status.problem == "apply failed at index 3: ZeroDivisionError"
        assert c.engines[2].app.halted == status.problem
        assert [i for i, _ in c.fsms[2].entries] == [1, 2]  # nothing after the failed entry
        assert await c.submit(2, b"refused") == Failure.NO_LEADER
        await eventually(lambda: c.roles[2][-1:] == ["stopped"], "engine 2's listeners to hear it stopped",
                         WAIT_S, interval_s=POLL_S)  # listeners drop the leader's duties
        assert await c.submit(1, b"four") is None  # n = 4 tolerates the halted one
        await eventually(lambda: all(len(c.fsms[i].entries) == 4 for i in (0, 1, 3)),
                         "4 entries on the others", WAIT_S, interval_s=POLL_S)
        assert "bug with a payload" not in caplog.text
    finally:
        for engine in c.engines:
            await engine.stop()


def test_the_app_halts_on_a_restore_that_raises_and_answers_with_placeholders(caplog) -> None:
    import logging

    caplog.set_level(logging.CRITICAL)

    class BrokenRestore(RecordingFSM):
        def restore(self, blob: bytes) -> None:
            raise ValueError("bug")

    source = FsmApp(RecordingFSM())
    source.execute(1, Request("c", 1, b"a", "sig"))
    halts: list[str] = []
    app = FsmApp(BrokenRestore(), halts.append)
    app.restore(source.snapshot())
    assert app.halted == "restore failed at index 1: ValueError" and halts == [app.halted]
    assert app.execute(2, Request("c", 2, b"b", "sig")) == b""  # no result to vouch for
    assert app.fsm.entries == []  # type: ignore[attr-defined]
    assert app.snapshot() != source.snapshot() and decode_record(app.snapshot())[1] == "halted"
