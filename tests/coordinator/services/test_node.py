"""CoordinatorNode: the facade's own logic (TTL parsing, heartbeat forwarding,
membership, status)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from coordinator.api.app import make_app
from coordinator.api.auth import AuthSettings
from coordinator.clock import ManualClock, SeededRng
from coordinator.commands.cluster import MemberRegister, MemberRemove
from coordinator.config import PeerConfig
from coordinator.errors import InvalidInput, NotFound, OutcomeUnknown, Unavailable
from coordinator.ports import EngineStatus
from coordinator.services.applier import Applier
from coordinator.services.node import CoordinatorNode, Identity, leader_url, ttl_ms_from
from tests.coordinator.services.conftest import Sim
from tests.fakes import SimEngine


@pytest.mark.parametrize(("body", "expected"), [({}, 7000), ({"ttl_s": 1}, 1000), ({"ttl_s": 86_400}, 86_400_000),
                                                ({"ttl_s": 2.5}, 2500)])
def test_ttl_ms_from_accepts(body: dict[str, Any], expected: int) -> None:
    assert ttl_ms_from(body, "ttl_s", 7.0) == expected


@pytest.mark.parametrize("value", [0, 0.999, -1, 86_400.01, True, "5", None, [5], 1.7e308, 1e308,
                                   float("inf"), float("-inf"), float("nan"), 10**400])
def test_ttl_ms_from_refuses(value: Any) -> None:
    with pytest.raises(InvalidInput) as refused:
        ttl_ms_from({"ttl": value}, "ttl", 7.0)
    assert refused.value.field == "ttl"


class FollowerEngine(SimEngine):
    """A follower that knows who leads (SimEngine's followers never do)."""

    def __init__(self, fsm: Applier, address: str, leader: str) -> None:
        super().__init__(fsm, address)
        self.leader = leader

    async def start(self) -> None:
        self.role = "follower"

    def status(self) -> EngineStatus:
        st = super().status()
        return EngineStatus(node=st.node, role="follower", leader=self.leader, term=st.term,
                            commit_index=st.commit_index, applied_index=st.applied_index, members=st.members,
                            healthy=True)


async def test_follower_forwards_heartbeats_to_the_leader(sim: Sim, aiohttp_client: Any) -> None:
    leader_http = await aiohttp_client(make_app(sim.node, AuthSettings(allow_anonymous=True)))
    await sim.node.proposer.propose("agent.register", {"id": "w1", "type": "t", "ttl_ms": 2000})
    leader_address = f"{leader_http.host}:{leader_http.port}"

    applier = Applier()
    engine = FollowerEngine(applier, "127.0.0.1:17102", leader=sim.engine.address)
    follower = CoordinatorNode(Identity("n2", engine.address, "127.0.0.1:17002",
                                        peers=(PeerConfig("n1", sim.engine.address, leader_address),)),
                               engine, applier, ManualClock(), SeededRng(2), check_endpoints=False)
    await follower.start()
    try:
        sim.clock.advance(1.5)
        answer = await follower.heartbeat("w1", None, headers_forwarded=False)
        assert answer["id"] == "w1" and answer["ttl_s"] == 2.0
        assert sim.node.leases.remaining_s("agent", "w1") == 2.0  # renewed on the leader
        with pytest.raises(NotFound):
            await follower.heartbeat("ghost", None, headers_forwarded=False)
        with pytest.raises(Unavailable):  # a forwarded heartbeat is never forwarded again
            await follower.heartbeat("w1", None, headers_forwarded=True)
        # The leader cannot serve heartbeats (lost leadership): the follower answers 503.
        sim.engine.step_down()
        with pytest.raises(Unavailable) as unavailable:
            await follower.heartbeat("w1", None, headers_forwarded=False)
        assert unavailable.value.leader == leader_address
    finally:
        await follower.stop()


async def test_add_and_remove_members(sim: Sim) -> None:
    member = await sim.node.add_member(MemberRegister("n2", "127.0.0.1:17102", "127.0.0.1:17002"))
    assert member == {"id": "n2", "raft": "127.0.0.1:17102", "http": "127.0.0.1:17002"}
    assert "127.0.0.1:17102" in sim.engine.members
    status = sim.node.status()
    assert {m["id"] for m in status["members"]} == {"n1", "n2"}
    assert sim.node.http_of("127.0.0.1:17102") == "127.0.0.1:17002"

    with pytest.raises(InvalidInput):
        await sim.node.remove_member(MemberRemove("n1"))  # the leader cannot remove itself
    with pytest.raises(NotFound):
        await sim.node.remove_member(MemberRemove("n9"))
    await sim.node.remove_member(MemberRemove("n2"))
    assert "127.0.0.1:17102" not in sim.engine.members
    assert "n2" not in sim.applier.machine.members.members

    sim.engine.step_down()
    with pytest.raises(Unavailable):
        await sim.node.add_member(MemberRegister("n3", "127.0.0.1:17103", "127.0.0.1:17003"))


async def test_status_names_the_leader_by_http_address(sim: Sim) -> None:
    status = sim.node.status()
    assert status["leader"] == "127.0.0.1:17001" and status["leader_id"] == "n1"
    assert status["commit_index"] == len(sim.engine.log)
    assert sim.node.readiness() == (True, "ready")
    sim.engine.step_down()
    assert sim.node.status()["leader"] is None
    assert sim.node.readiness()[0] is False


async def _silent_leader() -> tuple[asyncio.Server, str, asyncio.Event]:
    """A 'leader' that accepts a request, reads it and never answers."""
    received = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received.set()
        await reader.read()  # until the follower gives up and closes
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    return server, f"{host}:{port}", received


async def _follower_of(leader_http: str) -> CoordinatorNode:
    applier = Applier()
    engine = FollowerEngine(applier, "127.0.0.1:17102", leader="127.0.0.1:17101")
    follower = CoordinatorNode(Identity("n2", engine.address, "127.0.0.1:17002",
                                        peers=(PeerConfig("n1", "127.0.0.1:17101", leader_http),)),
                               engine, applier, ManualClock(), SeededRng(2))
    await follower.start()
    return follower


async def test_a_forward_sent_but_unanswered_is_outcome_unknown() -> None:
    """The leader got the request and may have applied it: 504, not 503."""
    server, address, received = await _silent_leader()
    follower = await _follower_of(address)
    try:
        with pytest.raises(OutcomeUnknown):
            await follower.forward("POST", "/v1/topics/t/messages", b'{"payload": 1}', 0.5)
        assert received.is_set()
    finally:
        await follower.stop()
        server.close()
        await server.wait_closed()


async def test_a_forward_that_cannot_connect_is_certainly_not_applied() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()  # nothing listens there now
    follower = await _follower_of(address)
    try:
        with pytest.raises(Unavailable) as unavailable:
            await follower.forward("POST", "/v1/topics/t/messages", b'{"payload": 1}', 0.5)
        assert unavailable.value.retry_after_s is not None
    finally:
        await follower.stop()


@pytest.mark.parametrize("path_qs", ["/v1/agents/%7E/messages", "/v1/agents/%3A/messages?max=1",
                                     "/v1/agents/%2e%2e/messages", "/v1/kv/a%2Fb", "/v1/agents/%40x/messages"])
def test_a_forwarded_request_keeps_its_path_exactly(path_qs: str) -> None:
    """Normalized, the leader would serve another path than the caller's and
    refuse the forwarded principal, whose HMAC covers the path as received."""
    assert leader_url("http", "127.0.0.1:7001", path_qs).raw_path_qs == path_qs
