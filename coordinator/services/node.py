"""One node's services behind one facade: what the HTTP layer and the
composition root talk to. Handlers call one method here and render the
result; they read state through the ``StateView`` that ``view()`` returns
(``coordinator.services.view``).

Loop thread only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl

from coordinator import datagram
from coordinator.commands.agents import AgentHealth, AgentRegister
from coordinator.commands.base import MAX_TTL_MS, MIN_TTL_MS, DomainCommand
from coordinator.commands.cluster import MemberRegister, MemberRemove
from coordinator.config import PeerConfig
from coordinator.errors import InvalidInput, NotFound, OutcomeUnknown, ReplicaHalted, Unavailable
from coordinator.ports import BusTransport, Clock, ConfirmsReads, ConsensusEngine, KnowsQuorumContact, Rng
from coordinator.services.agent_http import EndpointGuard
from coordinator.services.applier import Applier
from coordinator.services.backup import SnapshotTaker
from coordinator.services.balancer.health import HealthChecker
from coordinator.services.balancer.service import Balancer
from coordinator.services.bus import BusService
from coordinator.services.digests import DigestWatch
from coordinator.services.duties import LeaderDuties
from coordinator.services.gossip import Gossip, Peer
from coordinator.services.leases import LeaseKeeper, NotLeader
from coordinator.services.liveness import HeardTable
from coordinator.services.proposals import Proposer, cluster_request, raise_for
from coordinator.services.reads import Reads
from coordinator.services.sagas import SagaOrchestrator
from coordinator.services.transports import TransportDriver
from coordinator.services.udp import HeartbeatDatagrams
from coordinator.services.view import StateView
from coordinator.types import RequestKey

log = logging.getLogger(__name__)

FORWARD_HEADER = "X-Coord-Forwarded"
Signer = Callable[[str, str, str, bytes], dict[str, str]]  # (method, host, path with query, body) -> headers


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: str
    raft: str
    http: str
    peers: tuple[PeerConfig, ...] = ()


def ttl_ms_from(body: dict[str, Any], field: str, default_s: float) -> int:
    value = body.get(field, default_s)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{field}: must be a number of seconds", field=field)
    try:
        ttl_ms = int(value * 1000)
    except (OverflowError, ValueError):  # inf or nan: seconds too large to count in milliseconds
        ttl_ms = -1
    if not MIN_TTL_MS <= ttl_ms <= MAX_TTL_MS:
        raise InvalidInput(f"{field}: must be between {MIN_TTL_MS / 1000} and {MAX_TTL_MS / 1000} seconds",
                           field=field)
    return ttl_ms


class CoordinatorNode:
    def __init__(self, identity: Identity, engine: ConsensusEngine, applier: Applier, clock: Clock, rng: Rng, *,
                 proposal_timeout_s: float = 5.0, inflight_max: int = 1024, command_max_bytes: int = 1 << 20,
                 forward_timeout_s: float = 3.0, unsafe_stale_reads: bool = False,
                 transports: dict[str, BusTransport] | None = None, transport_factory: Any = None,
                 peer_ssl: ssl.SSLContext | None = None, check_endpoints: bool = True,
                 digest_check_s: float = 5.0, gossip_key: bytes | None = None, gossip_interval_s: float = 0.1,
                 gossip_accepted_keys: tuple[bytes, ...] = (),
                 unsafe_test_gossip_loss: float = 0.0, heartbeat_key: bytes | None = None,
                 heartbeat_accepted_keys: tuple[bytes, ...] = (), heartbeat_udp_bind: str = "",
                 heartbeat_udp_rate_max: int = 30_000) -> None:
        """``peer_ssl``: set when the nodes serve HTTPS; forwarding to the leader
        then uses ``https://`` and verifies the leader's certificate with it.
        ``check_endpoints``: call agents only where the admin's endpoint
        allow-list lets this node (``coordinator.commands.endpoints``); off for a
        node with ``--allow-anonymous``. ``digest_check_s``: how often this
        node compares its state digest with the other members' (0: never).
        ``gossip_key``: the key derived from the cluster secret for gossip
        between nodes (``services.gossip``); None: every heartbeat a follower
        takes is forwarded to the leader. ``unsafe_test_gossip_loss``: tests
        only, the share of gossip messages this node drops.
        ``heartbeat_key``: the key derived from the cluster secret for
        heartbeat datagrams (``heartbeat_accepted_keys``: of the secrets also
        accepted); with ``heartbeat_udp_bind`` (host:port) and gossip on,
        this node takes heartbeats over UDP too (``services.udp``), at most
        ``heartbeat_udp_rate_max`` datagrams a second."""
        self.identity = identity
        self.engine = engine
        self.applier = applier
        self._view = StateView(applier)
        self.clock = clock
        self.rng = rng
        self.proposer = Proposer(engine, applier, clock, rng, inflight_max=inflight_max,
                                 timeout_s=proposal_timeout_s, command_max_bytes=command_max_bytes,
                                 leader_hint=self.leader_http)
        self.reads = Reads(self.proposer, applier, engine if isinstance(engine, ConfirmsReads) else None)
        quorum = engine if isinstance(engine, KnowsQuorumContact) else None
        self.heard = HeardTable()
        self.leases = LeaseKeeper(applier, self.proposer, self.reads, clock, quorum=quorum, table=self.heard,
                                  suspect_grace_s=3 * gossip_interval_s + 0.1)
        self.heard.on_heard = self.leases.heard
        self.gossip = Gossip(identity.node_id, self.heard, clock, gossip_key if gossip_interval_s > 0 else None,
                             peers=self._gossip_peers, leader_raft=lambda: engine.status().leader,
                             leader_ok=self._leads_leases, known=lambda a: a in applier.machine.registry.agents,
                             session=lambda: self._session,
                             quorum_lease_s=quorum.quorum_lease_s if quorum is not None else 1.0,
                             interval_s=gossip_interval_s or 0.2, scheme="https" if peer_ssl is not None else "http",
                             loss=unsafe_test_gossip_loss, accepted_keys=gossip_accepted_keys)
        self.udp: HeartbeatDatagrams | None = None
        self.udp_bind = heartbeat_udp_bind
        if heartbeat_key is not None and heartbeat_udp_bind and self.gossip.enabled:
            self.udp = HeartbeatDatagrams(heartbeat_key, clock, self.heard,
                                          agent_by_lease=lambda lease: applier.machine.registry.by_lease(lease),
                                          renew=self._renew_datagram, report_health=self._report_health,
                                          accepted_keys=heartbeat_accepted_keys, rate_max=heartbeat_udp_rate_max)
        self.heartbeats_answered = 0  # heartbeat requests this node answered itself
        self.heartbeats_forwarded = 0  # and those it forwarded to the leader
        applier.on_apply(self._follow_registry)
        self.duties = LeaderDuties(applier, self.proposer, self.reads, engine, clock, node_id=identity.node_id,
                                   member_id=lambda raft: self._peer_id(raft))
        self.bus = BusService(applier, self.proposer, self.duties, clock, rng, node_id=identity.node_id)
        self.transports = TransportDriver(applier, self.proposer, dict(transports or {}), clock,
                                          lambda: self.duties.active, factory=transport_factory)
        self.bus.transports = self.transports.transports
        self.endpoint_guard = EndpointGuard((lambda: applier.machine.access.endpoint_allow) if check_endpoints
                                            else None)
        self.balancer = Balancer(applier, random.Random(int(rng.token_hex(8), 16)), monotonic=clock.monotonic,
                                 guard=self.endpoint_guard)
        self.health = HealthChecker(applier, self.proposer, lambda: self.duties.active, monotonic=clock.monotonic,
                                    guard=self.endpoint_guard)
        self.sagas = SagaOrchestrator(applier, self.proposer, self.bus, self.balancer, clock, self.duties,
                                      node_id=identity.node_id, guard=self.endpoint_guard)
        self.forward_timeout_s = forward_timeout_s
        self.peer_ssl = peer_ssl
        self.digests = DigestWatch(applier, lambda: self.ask_members("/v1/status", {}), identity.raft,
                                   interval_s=digest_check_s)
        self.snapshots = SnapshotTaker(applier, engine, identity.node_id, self.read_barrier, clock.now_ms)
        # Serve default reads from local state without a barrier. Wrong on purpose:
        # it exists so the chaos checker can show it catches stale reads.
        self.unsafe_stale_reads = unsafe_stale_reads
        if unsafe_stale_reads:
            log.warning("UNSAFE: default reads are served from local state without a barrier; "
                        "they can be stale and are not linearizable")
        self.leader_changes = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        engine.on_role_change(self._on_role)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        if self.udp is not None:  # first: a port taken stops the node before anything else started
            host, _, port = self.udp_bind.rpartition(":")
            try:
                await self.udp.start(host.strip("[]"), int(port))
            except OSError as exc:
                raise InvalidInput(f"heartbeat_udp_port: cannot listen on UDP {self.udp_bind} ({exc.strerror}); "
                                   "give another port, or 0 to take no heartbeat datagrams",
                                   field="heartbeat_udp_port") from None
            advertised = f"{self.identity.http.rpartition(':')[0]}:{self.udp.address.rpartition(':')[2]}" \
                if self.udp.address else None
            self.udp.address = self.gossip.udp = advertised
        connector = aiohttp.TCPConnector(ssl=self.peer_ssl) if self.peer_ssl is not None else None
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.forward_timeout_s),
                                              connector=connector)
        await self.engine.start()
        self._tasks.append(asyncio.create_task(self.leases.run(), name="leases"))
        self._tasks.append(asyncio.create_task(self.gossip.run(), name="gossip"))
        self._tasks.append(asyncio.create_task(self.duties.run(), name="leader-duties"))
        await self.transports.start()
        self._tasks.append(asyncio.create_task(self.transports.run(), name="transports"))
        self._tasks.append(asyncio.create_task(self.bus.run_checkpoints(), name="direct-checkpoints"))
        self._tasks.append(asyncio.create_task(self.sagas.run(), name="sagas"))
        self._tasks.append(asyncio.create_task(self.health.run(), name="health-checks"))
        self._tasks.append(asyncio.create_task(self.balancer.run(), name="balancer"))
        self._tasks.append(asyncio.create_task(self._register_self(), name="register-self"))
        if self.digests.interval_s > 0:
            self._tasks.append(asyncio.create_task(self.digests.run(), name="digest-check"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.udp is not None:
            self.udp.close()
        await self.leases.stop()
        await self.sagas.stop()
        await self.health.stop()
        await self.balancer.close()
        await self.duties.stop()
        await self.bus.stop()
        await self.transports.stop()
        await self.engine.stop()
        if self._session is not None:
            await self._session.close()

    def _on_role(self, role: str) -> None:
        self.leader_changes += 1
        self.leases.on_role(role)
        self.duties.on_role(role)

    def _gossip_peers(self) -> list[Peer]:
        peers = []
        for raft in self.engine.status().members:
            member = self.member_of(raft)
            if raft != self.identity.raft and member is not None and member.http:
                peers.append(Peer(member.id, member.raft, member.http))
        return peers

    def _leads_leases(self) -> bool:
        """An active leader with quorum contact (what gossip senders learn)."""
        if not self.leases.active or self.engine.status().role != "leader":
            return False
        quorum = self.leases.quorum
        if quorum is None:
            return True
        age_s = quorum.quorum_contact_age_s()
        return age_s is not None and age_s <= quorum.quorum_lease_s

    def _follow_registry(self, command: Any, result: Any) -> None:
        """Keep the heard table with the registry: a new lease counts from its
        registration, a terminated agent is forgotten."""
        for event in result.events:
            if event.type == "agent.terminated":
                self.heard.forget(event.data["agentId"])
            elif event.type in ("agent.spawned", "agent.updated") and command.op == AgentRegister.op:
                self.heard.lease_started(event.data["agentId"], event.data["lease_id"], self.clock.monotonic())

    async def _register_self(self) -> None:
        """Make sure the member table maps this node's Raft address to its HTTP
        address (followers use it to find the leader's HTTP endpoint)."""
        me = self.identity
        delay = 0.2
        while True:
            member = self.applier.machine.members.members.get(me.node_id)
            if member is not None and member.raft == me.raft and member.http == me.http:
                return
            register = MemberRegister(me.node_id, me.raft, me.http)
            try:
                await self.proposer.propose(register.op, register.to_args(),
                                            cluster_request(register.op, me.node_id, me.raft, me.http))
            except Exception as exc:  # no leader yet, a timeout: try again
                log.debug("registering this member failed: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- cluster -----------------------------------------------------------------------

    def member_of(self, raft: str | None) -> PeerConfig | None:
        """Who has Raft address ``raft``: the member table, else our own
        configuration (before the table knows everybody)."""
        if raft is None:
            return None
        member = self.applier.machine.members.by_raft(raft)
        if member is not None:
            return PeerConfig(member.id, member.raft, member.http)
        me = self.identity
        if raft == me.raft:
            return PeerConfig(me.node_id, me.raft, me.http)
        return next((p for p in me.peers if p.raft == raft), None)

    def http_of(self, raft: str | None) -> str | None:
        member = self.member_of(raft)
        return member.http if member else None

    def leader_http(self) -> str | None:
        return self.http_of(self.engine.status().leader)

    def status(self) -> dict[str, Any]:
        """This node's view (``GET /v1/status``). ``healthy`` is false and
        ``problem`` says why when the engine reports a problem or the replica
        halted ("apply failed at index N: KeyError"); ``digest`` is the state
        digest at ``index`` (hex ``value``), the ``points`` it can be
        compared at, and the last comparison with the other members."""
        st = self.engine.status()
        machine = self.applier.machine
        failure = self.applier.failure
        digest = self.applier.digest
        members = []
        for raft in st.members:
            members.append({
                "id": self._peer_id(raft),
                "raft": raft,
                "http": self.http_of(raft),
                "leader": raft == st.leader,
                "connected": raft == st.node or raft in st.connected,
            })
        return {
            "node": self.identity.node_id,
            "role": st.role,
            "leader": self.http_of(st.leader),
            "leader_id": self._peer_id(st.leader) if st.leader else None,
            "term": st.term,
            "commit_index": st.commit_index,
            "applied_index": machine.applied_index,
            "apply_lag": max(0, st.commit_index - machine.applied_index),
            "healthy": st.healthy and failure is None,
            "problem": failure.problem if failure is not None else st.problem,
            "apply_failure": ({"kind": failure.kind, "index": failure.index, "error": failure.error}
                              if failure is not None else None),
            "digest": {"index": digest.index, "value": digest.value.hex(), "points": digest.points(),
                       "check": self.digests.status()},
            "leases_active": self.leases.active,
            "liveness": {"heartbeats_answered": self.heartbeats_answered,
                         "heartbeats_forwarded": self.heartbeats_forwarded, "heard_local": self.heard.heard_local,
                         "heard_gossip": self.heard.heard_gossip, "table": len(self.heard.entries),
                         "suspected": self.leases.suspected, "recovered": self.leases.recovered,
                         "expired_agents": self.leases.expired_agents, "gossip": self.gossip.status(),
                         "udp": self.udp.status() if self.udp is not None else None},
            "bus": self.bus.status(),
            "sagas": self.sagas.status(),
            "balancer": {**self.balancer.status(), "health_checks": self.health.checks,
                         "health_changes": self.health.changes},
            "transports": {name: {"configured": True, "error": self.transports.errors.get(name)}
                           for name in self.transports.transports},
            "unsafe_stale_reads": self.unsafe_stale_reads,
            "members": members,
            "http": self.identity.http,
            "raft": self.identity.raft,
        }

    def _peer_id(self, raft: str | None) -> str | None:
        member = self.member_of(raft)
        return member.id if member else None

    def readiness(self) -> tuple[bool, str]:
        if self.applier.failure is not None:
            return False, self.applier.failure.problem
        st = self.engine.status()
        if not st.healthy:
            return False, st.problem or "engine unhealthy"
        if st.leader is None:
            return False, "no leader known"
        lag = st.commit_index - self.applier.applied_index
        if lag > 1000:
            return False, f"applying: {lag} entries behind the commit index"
        return True, "ready"

    async def add_member(self, register: MemberRegister) -> dict[str, Any]:
        """Add ``register.raft`` to the engine's configuration (leader only),
        then commit the member's addresses."""
        self._require_leader()
        if register.raft not in self.engine.status().members:
            await self.engine.add_member(register.raft)
        return await self.write_command(register)

    async def remove_member(self, remove: MemberRemove) -> dict[str, Any]:
        """Take ``remove.id`` out of the engine's configuration (leader only),
        then out of the member table. The voter is found by the table's Raft
        address, or, when that is not a voter, by the id this node knows the
        voters by: a member that died before it registered, or registered
        other addresses (a cluster restored from a backup on new ones), is
        still removed."""
        self._require_leader()
        member = self.applier.machine.members.members.get(remove.id)
        voters = self.engine.status().members
        rafts = {member.raft} & set(voters) if member is not None else set()
        if not rafts:
            rafts = {raft for raft in voters if self._peer_id(raft) == remove.id}
        if member is None and not rafts:
            raise NotFound(f"member {remove.id!r} is not known")
        if self.identity.raft in rafts or (member is not None and member.raft == self.identity.raft):
            raise InvalidInput("id: the leader cannot remove itself; ask another member", field="id")
        for raft in sorted(rafts):
            await self.engine.remove_member(raft)
        if member is None:  # never registered: only a voter to drop
            return {"id": remove.id, "raft": min(rafts), "http": self.http_of(min(rafts))}
        return await self.write_command(remove)

    def _require_leader(self) -> None:
        st = self.engine.status()
        if st.role != "leader":
            raise Unavailable("membership changes go to the leader", retry_after_s=0.5, leader=self.http_of(st.leader))

    # -- generic -----------------------------------------------------------------------------

    async def write_command(self, command: DomainCommand, request: RequestKey | None = None) -> Any:
        """Propose a parsed command (``command.op`` with ``command.to_args()``)
        and return its value; a refusal raises its ``CoordinatorError``
        (``services.proposals.raise_for``)."""
        return raise_for(await self.proposer.propose(command.op, command.to_args(), request))

    async def view(self, consistency: str) -> StateView:
        """The local replica to read, after ``read_barrier(consistency)``: a
        linearizable view reflects every write acknowledged before this call.
        Raises like ``read_barrier``."""
        await self.read_barrier(consistency)
        return self._view

    @property
    def local_view(self) -> StateView:
        """The local replica as it is, without a barrier and whether or not it
        halted: for deciding who a caller is and what it may see, and for
        metrics, which must not wait on the log. Not for answering reads."""
        return self._view

    async def read_barrier(self, consistency: str) -> None:
        """Before a read of local state. ``ReplicaHalted`` (503) for any read
        once this replica halted: even a stale read would show a state that
        may be half-applied."""
        if consistency not in ("linearizable", "stale"):
            raise InvalidInput("consistency: must be linearizable or stale", field="consistency")
        if self.applier.failure is not None:
            raise ReplicaHalted(f"this node stopped applying the log ({self.applier.failure.problem}); "
                                "use another node", retry_after_s=5.0)
        if consistency == "linearizable" and not self.unsafe_stale_reads:
            await self.reads.linearizable()

    # -- agents --------------------------------------------------------------------------------

    async def heartbeat(self, agent_id: str, health: str | None, headers_forwarded: bool,
                        sign: Signer | None = None) -> dict[str, Any]:
        """Renew an agent's lease. The leader answers from memory; with gossip
        on, so does a follower that knows the agent, while the leader answered
        its gossip within the quorum lease and the lease was heard of well
        within its TTL (``_may_answer``): the heartbeat reaches the leader
        with its next gossip round. Otherwise (no gossip, an agent or a lease
        this replica does not know yet, a lease that may have run out, no
        recent word from the leader) a follower forwards the heartbeat to the
        leader, and answers 503 with the leader's address when that fails."""
        st = self.engine.status()
        agent = self.applier.machine.registry.agents.get(agent_id)
        if st.role != "leader" and headers_forwarded:
            raise Unavailable("forwarded heartbeat reached a follower", retry_after_s=0.3,
                              leader=self.http_of(st.leader))
        answer = self.renew_here(agent_id, agent, st.role == "leader", st.leader)
        if answer is None:
            # No gossip, an agent this replica does not know yet, or no fresh word from
            # the leader: the leader answers itself (503 with its address when it cannot).
            self.heartbeats_forwarded += 1
            answer = await self._forward_heartbeat(agent_id, st.leader, sign)
        if health is not None and health != answer.get("health"):
            await self._report_health(agent_id, health)
            answer["health"] = health
        return answer

    def renew_here(self, agent_id: str, agent: Any, leading: bool, leader: str | None,
                   counter: int = 0) -> dict[str, Any] | None:
        """A heartbeat answered from this node's memory, over HTTP or UDP
        (``counter``: a datagram's). The leader renews the lease (raises
        ``Unavailable`` while it takes over or lacks quorum contact,
        ``NotFound`` for an unknown agent); a follower records it when it may
        vouch for the lease (``_may_answer``). None when this node may not
        answer: the leader must."""
        if leading:
            try:
                answer = self.leases.heartbeat(agent_id)
            except NotLeader:
                raise Unavailable("the new leader is taking over the leases", retry_after_s=0.2) from None
            self.heartbeats_answered += 1
            if agent is not None:
                self.heard.heard_here(agent_id, agent.lease_id, self.clock.monotonic(), counter)
            return answer
        if self.gossip.enabled and agent is not None and self._may_answer(agent, leader):
            self.heard.heard_here(agent_id, agent.lease_id, self.clock.monotonic(), counter)
            self.heartbeats_answered += 1
            return {"id": agent_id, "lease_id": agent.lease_id, "ttl_s": agent.ttl_ms / 1000,
                    "health": agent.health}
        return None

    def _may_answer(self, agent: Any, leader: str | None) -> bool:
        """Whether this follower may renew ``agent``'s lease from memory: the
        lease was heard of (anywhere, by this node's merged table) at least
        ``margin`` before its TTL ran out, and the leader answered this
        node's gossip within ``margin - 2 gossip intervals`` (the vouching
        window). What the leader has heard lags this node's table by at most
        that window plus a gossip round, so the leader still holds the lease
        when this node says "renewed": an expiry this replica has not applied
        yet, or a lease nobody heard of since its registration, goes to the
        leader, which answers (404 for an expired agent).

        The window scales with the TTL (7.3 s of a 30 s TTL, never under the
        quorum lease) rather than being the quorum lease alone: a leader
        busy with registrations answers gossip late, and at 0.5 s every
        follower stopped vouching and sent every heartbeat to that leader.
        A follower cut off from the leader vouches for at most the window;
        its agents then move to another node with most of their TTL left,
        if they heartbeat at most every TTL / 2."""
        heard = self.heard.entries.get(agent.id)
        if heard is None or heard.lease_id != agent.lease_id:
            return False
        ttl_s = agent.ttl_ms / 1000
        interval_s = self.gossip.interval_s
        margin_s = max(1.0, ttl_s / 4, self.gossip.quorum_lease_s + 2 * interval_s)
        return (self.clock.monotonic() - heard.at_s < ttl_s - margin_s
                and self.gossip.leader_contact_fresh(leader, within_s=margin_s - 2 * interval_s))

    def _renew_datagram(self, agent: Any, counter: int) -> int:
        """A heartbeat datagram of ``agent``'s current lease: what
        ``renew_here`` says, as a ``datagram`` status."""
        st = self.engine.status()
        try:
            answer = self.renew_here(agent.id, agent, st.role == "leader", st.leader, counter)
        except NotFound:
            return datagram.UNKNOWN_LEASE
        except Unavailable:
            return datagram.NOT_READY
        return datagram.NOT_READY if answer is None else datagram.OK

    async def _report_health(self, agent_id: str, health: str) -> None:
        await self.write_command(AgentHealth(agent_id, health, "reported by the agent"))

    def heartbeat_grant(self, lease_id: int) -> dict[str, Any] | None:
        """For the answer to whoever registered ``lease_id`` only: its
        heartbeat datagram key (hex) and where to send datagrams (this node
        first, then the peers that told it by gossip); None when this node
        takes no datagrams."""
        if self.udp is None or self.udp.address is None:
            return None
        peers = [self.gossip.peer_udp[p.id] for p in self._gossip_peers() if p.id in self.gossip.peer_udp]
        return {"key": self.udp.lease_key(lease_id).hex(), "addresses": [self.udp.address, *peers]}

    async def _forward_heartbeat(self, agent_id: str, leader_raft: str | None, sign: Signer | None
                                 ) -> dict[str, Any]:
        leader = self.http_of(leader_raft)
        status, raw, _ = await self.forward("POST", f"/v1/agents/{urllib.parse.quote(agent_id, safe='')}/heartbeat",
                                            b"{}", self.forward_timeout_s, sign)
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        if status == 404:
            raise NotFound(body.get("error", {}).get("message", f"agent {agent_id!r} is not registered"))
        if status != 200:
            raise Unavailable(f"leader answered {status}", retry_after_s=0.5, leader=leader)
        return body

    async def cluster_view(self, timeout_s: float = 1.0) -> dict[str, Any]:
        """Every member's own status, asked over HTTP at once (``/v1/status`` is
        public), this node's answered locally; an unreachable member is listed
        with ``reachable: false``. For the dashboard and operators."""
        own = self.status()
        answers = await self.ask_members("/v1/status", own, timeout_s=timeout_s)
        rows = []
        for member, status, error in answers:
            row = {"id": member["id"], "raft": member["raft"], "http": member["http"]}
            if status is None:
                rows.append({**row, "reachable": False, "error": error})
            else:
                rows.append({**row, **_view_of(status), "reachable": True,
                             **({"self": True} if member["raft"] == self.identity.raft else {})})
        leaders = {r["id"] for r in rows if r.get("role") == "leader"}
        return {"node": self.identity.node_id, "leader_id": own["leader_id"], "term": own["term"],
                "members": sorted(rows, key=lambda r: r["id"] or r["raft"]), "leaders_seen": sorted(leaders)}

    async def ask_members(self, path_qs: str, own: dict[str, Any], *, sign: Signer | None = None,
                          timeout_s: float = 1.0) -> list[tuple[dict[str, Any], dict[str, Any] | None, str | None]]:
        """GET ``path_qs`` from every member at once, each within ``timeout_s``:
        (member, its JSON answer or None, why not). This node's answer is
        ``own``, without a request. ``sign`` gives the headers that carry
        the caller's identity to each member, which answers as it would the
        caller. A member that cannot be reached, or answers other than 200,
        is reported, never raised."""
        members = self.status()["members"]

        async def ask(member: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, str | None]:
            if member["raft"] == self.identity.raft:
                return member, own, None
            if not member["http"] or self._session is None:
                return member, None, "unknown HTTP address"
            scheme = "https" if self.peer_ssl is not None else "http"
            headers = sign("GET", member["http"], path_qs, b"") if sign is not None else {}
            try:
                async with self._session.get(f"{scheme}://{member['http']}{path_qs}", headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                    if response.status != 200:
                        return member, None, f"answered {response.status}"
                    return member, await response.json(), None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                return member, None, type(exc).__name__

        return list(await asyncio.gather(*(ask(m) for m in members)))

    async def forward(self, method: str, path_qs: str, body: bytes | None, timeout_s: float,
                      sign: Signer | None = None, *, to: str | None = None) -> tuple[int, bytes, dict[str, str]]:
        """Send one HTTP request to the leader (or to the member whose HTTP
        address is ``to``), marked as forwarded (it never forwards it again).
        ``sign`` gives the headers that carry the
        caller's identity for exactly this method, leader (its Host), path and body.
        Returns status, body and the headers worth passing on. ``Unavailable``
        (certainly not applied) when no leader is known or the connection to it
        could not be made; ``OutcomeUnknown`` when the request may have reached
        the leader but no answer came back (a timeout or a dropped connection
        after connecting): the leader may have applied it, so only a retry with
        the same ``request_id`` is safe."""
        if to is not None:
            leader = to
            if self._session is None:
                raise Unavailable("this node is stopping", retry_after_s=0.5)
        else:
            st = self.engine.status()
            leader = self.http_of(st.leader)
            if leader is None or self._session is None or st.leader == st.node:
                raise Unavailable("no leader known", retry_after_s=0.5)
        where = "the leader" if to is None else f"member {to}"
        headers = {FORWARD_HEADER: "1", "Content-Type": "application/json"}
        if sign is not None:
            headers.update(sign(method, leader, path_qs, body or b""))
        try:
            scheme = "https" if self.peer_ssl is not None else "http"
            # The connect phase ends well before the total: a timeout there means nothing was sent.
            timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s / 2, 2.0))
            async with self._session.request(method, leader_url(scheme, leader, path_qs), data=body,
                                             headers=headers, timeout=timeout) as response:
                raw = await response.read()
                passed = {k: v for k, v in response.headers.items() if k in ("Retry-After", "Content-Type")}
                return response.status, raw, passed
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # Nothing was sent: the connection itself failed.
            raise Unavailable(f"forwarding to {where} failed: {type(exc).__name__}", retry_after_s=0.5,
                              **({"leader": leader} if to is None else {})) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OutcomeUnknown(f"forwarded to {where}, no answer: {type(exc).__name__}") from None

    def ranked_members(self, key: str) -> list[tuple[str, str | None, bool, bool]]:
        """Every member as (id, HTTP address, connected, this node), in the order of
        rendezvous hashing of ``key`` (the highest sha256 of ``key`` and the
        member's id first): every node ranks them alike, and losing one
        member moves only the keys it ranked first. ``connected``: this node
        is itself or has a Raft connection to it (its view)."""
        st = self.engine.status()
        rows = []
        for raft in st.members:
            ident = self._peer_id(raft) or raft
            score = hashlib.sha256(f"{key}\0{ident}".encode()).digest()
            me = raft == st.node
            rows.append((score, ident, self.http_of(raft), me or raft in st.connected, me))
        rows.sort(reverse=True)
        return [(ident, http, connected, me) for _, ident, http, connected, me in rows]


def leader_url(scheme: str, leader: str, path_qs: str) -> yarl.URL:
    """The leader's URL for a forwarded request: ``path_qs`` exactly as this
    node received it. Parsed as usual, it would be normalized (``%7E`` to
    ``~``, ``%3A`` to ``:``, ``/a/%2e%2e/b`` to ``/b``): the leader would
    serve another path than the caller's, and the forwarded principal's HMAC,
    made over the path as received, would not match (found by
    tests/integration/test_openapi_fuzz.py)."""
    return yarl.URL(f"{scheme}://{leader}{path_qs}", encoded=True)

def _view_of(status: dict[str, Any]) -> dict[str, Any]:
    view = {key: status.get(key) for key in ("role", "term", "commit_index", "applied_index", "apply_lag", "healthy",
                                             "problem", "leader_id")}
    digest = status.get("digest")
    if isinstance(digest, dict):
        view["digest"] = {"index": digest.get("index"), "value": digest.get("value")}
    return view
