"""Four ``PbftNode``s on loopback TCP in one process (cluster/pbft/node.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cluster.pbft.messages import Envelope, sign_request
from cluster.pbft.node import (
    FrameError,
    NodeError,
    NodeStopped,
    PbftNode,
    ReplyFrame,
    SubmitTimeout,
    decode_frame,
    encode_frame,
)
from cluster.pbft.replica import Replica
from cluster.pbft.sim import CounterApp, client_keys, replica_keys
from tests.cluster.pbft.harness import free_ports
from tests.waiting import eventually

WAIT_S = 8.0  # replicas on loopback agree within this, even on a loaded machine
POLL_S = 0.02
N = 4
CLIENTS = {f"c{i}": i for i in range(N)}  # client c<i> is hosted by node i
KEYS = [replica_keys(i) for i in range(N)]
PUBLIC = [k.public_key for k in KEYS]
CLIENT_KEYS = {name: client_keys(name) for name in CLIENTS}


class Cluster:
    def __init__(self) -> None:
        self.addresses = [("127.0.0.1", p) for p in free_ports(N)]
        self.apps: list[CounterApp] = [CounterApp() for _ in range(N)]
        self.nodes: list[PbftNode] = [self.make(i) for i in range(N)]

    def make(self, i: int) -> PbftNode:
        self.apps[i] = CounterApp()
        replica = Replica(i, N, KEYS[i], PUBLIC, app=self.apps[i],
                          client_keys={c: k.public_key for c, k in CLIENT_KEYS.items()},
                          checkpoint_interval=4, view_change_timeout_ms=400, status_interval_ms=50,
                          fetch_timeout_ms=100)
        hosted = {c: k for c, k in CLIENT_KEYS.items() if CLIENTS[c] == i}
        return PbftNode(replica, self.addresses, PUBLIC, client_keys=hosted, client_homes=CLIENTS,
                        request_timeout_ms=8000, retry_ms=300,
                        # Small queues: while a peer is down its backlog is cut to the newest frames,
                        # so a node restarted late cannot replay the whole history from it.
                        send_queue_max=32)

    def histories(self, ids: list[int]) -> list[list[tuple[str, int, bytes]]]:
        return [self.apps[i].ordered() for i in ids]


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    for node in c.nodes:
        await node.start()
    try:
        yield c
        assert [node.failure for node in c.nodes] == [None] * N
    finally:
        for node in c.nodes:
            await node.stop()


def test_frames_round_trip_and_refuse_garbage() -> None:
    env = Envelope(2, b"body", "sig")
    request = sign_request(CLIENT_KEYS["c0"], "c0", 7, b"add:1")
    for item in (env, ReplyFrame(env), request):
        frame = encode_frame(item)
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        assert decode_frame(frame[4:]) == item
    for garbage in (b"", b"\x00\x01", b"R\x93\x01\xa3env\x01", b"R\x92\x02\xa3env"):
        with pytest.raises(FrameError):
            decode_frame(garbage)


def test_only_loopback() -> None:
    replica = Replica(0, N, KEYS[0], PUBLIC, app=CounterApp(), client_keys={})
    with pytest.raises(NodeError):
        PbftNode(replica, [("10.0.0.1", 1)] * N, PUBLIC, client_keys={}, client_homes={})


async def test_submits_through_every_node_agree(cluster: Cluster) -> None:
    results = await asyncio.gather(*(cluster.nodes[i].submit(b"add:%d" % (i + 1), f"c{i}") for i in range(N)))
    more = await asyncio.gather(*(cluster.nodes[i].submit(b"add:10", f"c{i}") for i in range(N)))
    assert sorted(int(r) for r in results)[-1] <= 10 and max(int(r) for r in more) == 50
    await eventually(lambda: all(len(h) == 2 * N for h in cluster.histories(list(range(N)))),
                     "every replica to execute both rounds", WAIT_S, interval_s=POLL_S)
    first, *rest = cluster.histories(list(range(N)))
    assert all(h == first for h in rest)
    # every client saw the result the replicas computed for its request
    computed = {(c, t): r for _, c, t, _, r in cluster.apps[0].history}
    assert sorted(computed.values()) == sorted([*results, *more])


async def test_writes_complete_with_one_node_stopped(cluster: Cluster) -> None:
    await cluster.nodes[3].stop()
    for k in range(3):
        results = await asyncio.gather(*(cluster.nodes[i].submit(b"add:1", f"c{i}") for i in range(3)))
        assert sorted(int(r) for r in results) == [3 * k + 1, 3 * k + 2, 3 * k + 3]
    first, *rest = cluster.histories([0, 1, 2])
    assert all(h[: len(first)] == first[: len(h)] for h in rest)


async def test_writes_complete_with_the_primary_stopped(cluster: Cluster) -> None:
    await cluster.nodes[0].stop()
    results = await asyncio.gather(*(cluster.nodes[i].submit(b"add:1", f"c{i}") for i in (1, 2, 3)))
    assert sorted(int(r) for r in results) == [1, 2, 3]
    assert all(cluster.nodes[i].replica.view >= 1 for i in (1, 2, 3))


async def test_a_node_restarted_late_catches_up(cluster: Cluster) -> None:
    await cluster.nodes[3].stop()
    for _ in range(5):  # past a few checkpoints (K = 4): the restarted node needs a state transfer
        await asyncio.gather(*(cluster.nodes[i].submit(b"add:1", f"c{i}") for i in range(3)))
    cluster.nodes[3] = cluster.make(3)
    await cluster.nodes[3].start()
    assert await cluster.nodes[3].submit(b"add:100", "c3") == b"115"
    await eventually(lambda: cluster.apps[3].value == 115 == cluster.apps[0].value,
                     "replica 3 to catch up", WAIT_S, interval_s=POLL_S)
    assert cluster.nodes[3].counters["state_transferred"] >= 1
    assert cluster.nodes[0].counters["send_dropped"] > 0  # the oldest frames for node 3 went first
    assert cluster.apps[3].ordered() == cluster.apps[0].ordered()


@pytest.mark.parametrize("frame", [
    (64 << 20).to_bytes(4, "big") + b"x" * 16,  # oversized
    (5).to_bytes(4, "big") + b"hello",  # garbage
])
async def test_a_peer_sending_a_bad_frame_is_disconnected(cluster: Cluster, frame: bytes) -> None:
    target = cluster.nodes[1]
    before = target.counters["frame_oversized"] + target.counters["frame_malformed"]
    reader, writer = await asyncio.open_connection(*cluster.addresses[1])
    try:
        writer.write(frame)
        await writer.drain()
        async with asyncio.timeout(3):
            assert await reader.read() == b""  # the node closed the connection
    finally:
        writer.close()
    assert target.counters["frame_oversized"] + target.counters["frame_malformed"] == before + 1
    assert await cluster.nodes[2].submit(b"add:1", "c2") == b"1"  # nothing crashed


async def test_a_lone_node_bounds_its_queues_and_its_waits() -> None:
    """No peer is listening: the send queues fill and drop their oldest
    frames, reconnects back off, and a submit times out instead of hanging."""
    addresses = [("127.0.0.1", p) for p in free_ports(N)]
    replica = Replica(0, N, KEYS[0], PUBLIC, app=CounterApp(),
                      client_keys={c: k.public_key for c, k in CLIENT_KEYS.items()}, status_interval_ms=10)
    node = PbftNode(replica, addresses, PUBLIC, client_keys={"c0": CLIENT_KEYS["c0"]}, client_homes=CLIENTS,
                    send_queue_max=2, request_timeout_ms=300, retry_ms=100)
    await node.start()
    try:
        with pytest.raises(SubmitTimeout):
            await node.submit(b"add:1", "c0")
        await eventually(lambda: node.counters["send_dropped"] > 0, "a dropped send", 3, interval_s=POLL_S)
        assert node.counters["connect_failed"] > 0 and node.counters["connected"] == 0
        with pytest.raises(NodeError):
            await node.submit(b"add:1", "c1")  # hosted elsewhere
    finally:
        await node.stop()
    with pytest.raises(NodeStopped):
        await node.submit(b"add:1", "c0")
