"""Gossip between nodes (``coordinator.services.gossip``) at the HTTP edge, and
what the leader makes of heard heartbeats: leases renewed from the merged
table, suspicion and recovery committed only on change. One node over the
simulated engine, time on a ManualClock."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import ClientSession, web

from coordinator.clock import ManualClock
from coordinator.services import gossip
from coordinator.services.gossip import REFUSED, Gossip, Peer, _PeerState, encode, sign
from coordinator.services.liveness import HeardTable
from tests.coordinator.api.conftest import NODE_ID, Harness
from tests.waiting import eventually

KEY = b"k" * 32


def message(h: Harness, entries: list[list[Any]], *, seq: int, to: str = NODE_ID, sender: str = "n2",
            ts_ms: int | None = None) -> bytes:
    return encode(sender, to, seq, h.clock.now_ms() if ts_ms is None else ts_ms, entries)


async def post(h: Harness, body: bytes, signature: str | None = None, key: bytes = KEY) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json",
               gossip.SIG_HEADER: sign(key, body) if signature is None else signature}
    return await h.call("POST", gossip.PATH, raw=body, headers=headers)


@pytest.fixture
async def g(h: Harness) -> Harness:
    h.node.gossip.key = KEY  # as main.py derives it from the cluster secret
    return h


async def test_a_signed_message_is_merged_and_moves_the_lease(g: Harness) -> None:
    agent = await g.register(ttl_s=10)
    g.clock.advance(8)
    assert g.node.leases.remaining_s("agent", agent["id"]) == pytest.approx(2)
    before = g.fingerprint()
    status, answer = await post(g, message(g, [[agent["id"], agent["lease_id"], 500], ["nobody", 1, 0]], seq=1))
    assert (status, answer) == (200, {"leader": True, "counters": True})
    assert g.node.leases.remaining_s("agent", agent["id"]) == pytest.approx(9.5)  # heard 0.5 s ago
    assert "nobody" not in g.node.heard.entries  # not registered here: not merged
    assert g.fingerprint() == before  # a heartbeat is not a log entry


async def test_anything_but_a_fresh_signed_message_for_this_node_is_refused_alike(g: Harness) -> None:
    agent = await g.register(ttl_s=10)
    entries = [[agent["id"], agent["lease_id"], 0]]
    ok_body = message(g, entries, seq=10)
    assert (await post(g, ok_body))[0] == 200
    refusals = [
        await post(g, message(g, entries, seq=11), signature=""),  # unsigned
        await post(g, message(g, entries, seq=12), key=b"x" * 32),  # another cluster's key
        await post(g, ok_body),  # replayed
        await post(g, message(g, entries, seq=9)),  # an older sequence number
        await post(g, message(g, entries, seq=13, to="n3")),  # for another node
        await post(g, message(g, entries, seq=14, ts_ms=g.clock.now_ms() - 31_000)),  # too old
    ]
    for status, body in refusals:
        assert status == 401 and body["error"]["message"] == REFUSED  # one answer: a stranger learns nothing
    assert g.node.gossip.refused == len(refusals)
    assert (await post(g, message(g, entries, seq=15)))[0] == 200


async def test_a_secret_being_changed_is_accepted_but_never_sent(g: Harness) -> None:
    """While the cluster changes its secret (accept_secret_file), gossip signed
    with the accepted secret's key is taken; another key still is not."""
    agent = await g.register(ttl_s=10)
    entries = [[agent["id"], agent["lease_id"], 0]]
    old = b"o" * 32
    assert (await post(g, message(g, entries, seq=1), key=old))[0] == 401
    g.node.gossip.accepted_keys = (old,)
    assert (await post(g, message(g, entries, seq=2), key=old))[0] == 200
    assert (await post(g, message(g, entries, seq=3), key=b"x" * 32))[0] == 401
    assert g.node.gossip.key == KEY  # what it signs with


async def test_a_node_without_the_cluster_secret_refuses_every_message(h: Harness) -> None:
    assert not h.node.gossip.enabled
    status, body = await post(h, message(h, [], seq=1))
    assert status == 401 and body["error"]["message"] == REFUSED


async def test_bodies_are_bounded_and_a_bad_shape_names_the_field(g: Harness) -> None:
    big = b"{" + b" " * gossip.BODY_MAX_BYTES + b"}"
    status, body = await post(g, big)
    assert status == 413
    status, body = await post(g, message(g, [["a", 1]], seq=1))
    assert status == 400 and body["error"]["field"] == "entries"
    status, body = await post(g, message(g, [["a", -1, 0]], seq=2))
    assert status == 400 and body["error"]["field"] == "entries"
    status, body = await post(g, message(g, [["a", 1, 0]] * (gossip.ENTRIES_MAX + 1), seq=3))
    assert status in (400, 413)


async def test_a_silent_agent_is_suspected_once_recovers_when_heard_and_expires_at_its_ttl(g: Harness) -> None:
    agent = await g.register(ttl_s=30)
    agent_id, lease_id = agent["id"], agent["lease_id"]
    table, leases = g.node.heard, g.node.leases
    for _ in range(10):  # a heartbeat a second, answered by this node
        g.clock.advance(1.0)
        table.heard_here(agent_id, lease_id, g.clock.monotonic())
    last = g.clock.monotonic()
    moment = table.entries[agent_id].detector.suspect_at(table.settings) + leases.suspect_grace_s
    assert moment - last == pytest.approx(table.settings.bound_intervals() + leases.suspect_grace_s, rel=1e-3)
    g.clock.advance(moment - last - 0.05)
    leases.tick()
    assert g.applier.machine.registry.agents[agent_id].liveness == "alive"
    g.clock.advance(0.1)
    leases.tick()
    await eventually(lambda: g.applier.machine.registry.agents[agent_id].liveness == "suspect", "the suspicion")
    leases.tick()
    await eventually(lambda: not leases._judging, "no verdict in flight")
    assert leases.suspected == 1
    _, listed = await g.call("GET", f"/v1/agents/{agent_id}", expect=200)
    assert listed["liveness"] == "suspect"
    g.clock.advance(1.0)
    table.heard_here(agent_id, lease_id, g.clock.monotonic())  # back
    await eventually(lambda: g.applier.machine.registry.agents[agent_id].liveness == "alive", "the recovery")
    types = [e["type"] for e in await g.events("agent.suspected,agent.recovered")]
    assert types == ["agent.suspected", "agent.recovered"]
    await g.advance_and_tick(29.0)
    assert agent_id in g.applier.machine.registry.agents
    await g.advance_and_tick(1.5)  # 30 s after the last heartbeat heard
    await eventually(lambda: agent_id not in g.applier.machine.registry.agents, "the expiry")
    assert agent_id not in table.entries  # forgotten with the agent


async def test_a_follower_renews_from_memory_only_with_fresh_word_from_the_leader_and_a_live_lease(g: Harness
                                                                                                 ) -> None:
    """``_may_answer`` (asked on a follower; the harness's one node stands in)."""
    node, clock = g.node, g.clock
    agent_id = (await g.register(ttl_s=10))["id"]
    agent = g.applier.machine.registry.agents[agent_id]
    leader = Peer("n9", "127.0.0.1:1", "127.0.0.1:2")
    node.gossip._round_peers = [leader]
    node.gossip._peers[leader.id] = state = _PeerState(contact_s=clock.monotonic(), leader_ok=True)
    assert node._may_answer(agent, leader.raft)  # the lease counts from its registration
    assert not node._may_answer(agent, "127.0.0.1:3")  # another leader: no word from it
    state.leader_ok = False
    assert not node._may_answer(agent, leader.raft)  # its answer said: not an active leader with a quorum
    state.leader_ok = True
    clock.advance(0.6)
    assert node._may_answer(agent, leader.raft)  # older than the quorum lease, within the window (2.3 s of 10 s)
    clock.advance(1.8)
    assert not node._may_answer(agent, leader.raft)  # 2.4 s without word from the leader: past the window
    state.contact_s = clock.monotonic()
    clock.advance(5.2)
    state.contact_s = clock.monotonic()
    assert not node._may_answer(agent, leader.raft)  # 7.6 s of the 10 s TTL gone: the leader answers
    node.heard.heard_here(agent_id, agent.lease_id, clock.monotonic())
    assert node._may_answer(agent, leader.raft)


async def test_an_entry_carries_the_datagram_counter_and_the_sender_its_udp_address(g: Harness) -> None:
    agent = await g.register(ttl_s=10)
    body = encode("n2", NODE_ID, 1, g.clock.now_ms(), [[agent["id"], agent["lease_id"], 0, 1234]],
                  udp="127.0.0.1:7002")
    assert (await post(g, body))[0] == 200
    assert g.node.heard.entries[agent["id"]].counter == 1234
    assert not g.node.heard.counter_fresh(agent["id"], agent["lease_id"], 1234)  # a replay here too
    assert g.node.heard.counter_fresh(agent["id"], agent["lease_id"], 1235)
    assert g.node.gossip.peer_udp == {"n2": "127.0.0.1:7002"}
    bad = encode("n2", NODE_ID, 2, g.clock.now_ms(), [[agent["id"], agent["lease_id"], 0, -1]])
    assert (await post(g, bad))[0] == 400
    # what a sender puts in: the counter only when one was seen
    g.node.heard.heard_here(agent["id"], agent["lease_id"], g.clock.monotonic(), 2000)
    state = _PeerState(pending={agent["id"]: g.node.heard.entries[agent["id"]]})
    entries, _ = g.node.gossip._batch(state, g.clock.monotonic())
    assert entries == [[agent["id"], agent["lease_id"], 0, 2000]]


async def test_a_peer_of_the_version_before_counters_gets_entries_without_them(aiohttp_server: Any) -> None:
    """In a rolling upgrade, a node from before UDP heartbeats answers 400 to
    an entry of four elements: the sender sends that peer three-element
    entries from then on (the batch is not lost), and counters again once an
    answer says the peer takes them."""
    takes_counters = False
    bodies: list[list[list[Any]]] = []

    async def old_or_new(request: web.Request) -> web.Response:
        entries = (await request.json())["entries"]
        bodies.append(entries)
        if not takes_counters and any(len(e) != 3 for e in entries):
            return web.json_response({"error": {"field": "entries"}}, status=400)
        return web.json_response({"leader": True, **({"counters": True} if takes_counters else {})})

    app = web.Application()
    app.router.add_post(gossip.PATH, old_or_new)
    server = await aiohttp_server(app)
    clock, table = ManualClock(), HeardTable()
    async with ClientSession() as session:
        peer = Peer("n2", "127.0.0.1:1", f"127.0.0.1:{server.port}")
        sender = Gossip("n1", table, clock, b"k" * 32, peers=lambda: [peer], leader_raft=lambda: peer.raft,
                        leader_ok=lambda: False, known=lambda _: True, session=lambda: session, quorum_lease_s=0.5)
        state = _PeerState()

        async def send(agent_id: str, counter: int) -> None:
            table.heard_here(agent_id, 7, clock.monotonic(), counter)
            state.pending.update(table.take_dirty())
            await sender._send(peer, state)

        await send("a1", 100)
        assert bodies[-1] == [["a1", 7, 0, 100]] and state.plain and state.pending  # refused, kept
        await sender._send(peer, state)
        assert bodies[-1] == [["a1", 7, 0]] and not state.pending and state.contact_s is not None
        takes_counters = True  # the peer was upgraded
        await send("a2", 200)
        assert bodies[-1] == [["a2", 7, 0]] and not state.plain  # its answer said so
        await send("a3", 300)
        assert bodies[-1] == [["a3", 7, 0, 300]]
