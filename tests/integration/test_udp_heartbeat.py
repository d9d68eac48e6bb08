"""Heartbeats over UDP on a real three-node cluster (issue 23, part 3):
the registration answer's key works on every node; agents kept alive by
datagrams to followers only, past two TTLs; an agent gone silent is
suspected, then expired at its TTL, while its last datagram is replayed to
every node with bad, truncated, wrong-version and oversize ones, none of
which gets a reply; and the key never shows in an agent's record, a node's
status or a node's log."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import pytest

from coordinator import datagram
from coordinator.client import CoordinatorClient, Registration
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster

INTERVAL_S = 0.5
TTL_S = 4.0
SLACK_S = 1.5
NO_REPLY_S = 0.3  # a reply on loopback takes well under a millisecond


async def get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
        assert response.status == 200, await response.text()
        return await response.json()


class Sender:
    """One UDP socket (non-blocking, on the loop's thread) for raw datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    async def exchange(self, data: bytes, address: str, wait_s: float = NO_REPLY_S) -> bytes | None:
        """Send ``data``; the reply, or None when none came within ``wait_s``."""
        loop = asyncio.get_running_loop()
        while True:  # what is left of earlier exchanges
            try:
                self.sock.recv(2048)
            except BlockingIOError:
                break
        host, _, port = address.rpartition(":")
        self.sock.sendto(data, (host, int(port)))
        try:
            async with asyncio.timeout(wait_s):
                return await loop.sock_recv(self.sock, 2048)
        except TimeoutError:
            return None


def beat(reg: Registration, counter: int) -> bytes:
    assert reg.heartbeat_key is not None
    return datagram.encode_beat(reg.heartbeat_key, datagram.Beat(reg.lease_id, counter))


def status_of(reg: Registration, reply: bytes | None) -> int | None:
    assert reg.heartbeat_key is not None
    ack = datagram.decode_ack(reg.heartbeat_key, reply) if reply is not None else None
    return ack.status if ack is not None else None


async def test_udp_heartbeats_keep_agents_alive_and_strangers_get_nothing(make_cluster) -> None:
    cluster = make_cluster()
    leader = await asyncio.to_thread(cluster.wait_leader, 30)
    followers = [n for n in cluster.members if n != leader]
    urls = {n: cluster.url(n) for n in cluster.members}
    sender = Sender()
    try:
        await _run(cluster, leader, followers, urls, sender)
    finally:
        sender.close()


async def _run(cluster: Any, leader: str, followers: list[str], urls: dict[str, str], sender: Sender) -> None:
    async with aiohttp.ClientSession() as session, \
            CoordinatorClient([urls[f] for f in followers], heartbeat_over="udp") as client:
        async def udp_everywhere() -> bool:
            for url in urls.values():
                gossip = (await get(session, f"{url}/v1/status"))["liveness"]["gossip"]
                if len(gossip["peers"]) < 2 or not all(p["udp"] for p in gossip["peers"].values()):
                    return False
            return True
        await eventually(udp_everywhere, "every node knows every peer's UDP address", 10,
                         interval_s=CLUSTER_POLL_S)
        regs = [await client.register("worker", agent_id=f"u{i}", ttl_s=TTL_S) for i in range(2)]
        keys = [r.heartbeat_key.hex() for r in regs if r.heartbeat_key is not None]
        assert len(keys) == 2 and len(set(keys)) == 2
        addresses = {urls[n].removeprefix("http://") for n in cluster.members}
        assert set(regs[0].heartbeat_udp) == addresses, regs[0]  # UDP on the HTTP ports' numbers
        u0, u1 = regs
        follower_udp = [urls[f].removeprefix("http://") for f in followers]
        client_regs = [Registration(u0.id, u0.lease_id, u0.ttl_s, u0.heartbeat_key, tuple(follower_udp))]

        # the key works on every node (a follower may first need word from the leader)
        counter = time.time_ns() // 1_000_000
        for address in sorted(addresses):
            async def acked(address: str = address) -> bool:
                nonlocal counter
                counter += 1
                return status_of(u1, await sender.exchange(beat(u1, counter), address)) == datagram.OK
            await eventually(acked, f"an OK from {address}", 5, interval_s=0.1)

        # both heartbeat over UDP to the followers only, for two TTLs
        last_u1: dict[str, Any] = {}
        stop = asyncio.Event()

        async def beat_u0() -> None:
            for _ in range(1000):
                if stop.is_set():
                    return
                assert await client.heartbeat_udp(client_regs[0]) == "udp"
                await asyncio.sleep(INTERVAL_S)

        async def beat_u1() -> None:
            nonlocal counter
            for k in range(1000):
                if stop.is_set():
                    return
                counter += 1
                data = beat(u1, counter)
                if status_of(u1, await sender.exchange(data, follower_udp[k % 2], 1.0)) == datagram.OK:
                    last_u1.update(at=time.monotonic(), data=data)
                await asyncio.sleep(INTERVAL_S)

        task0, task1 = asyncio.create_task(beat_u0()), asyncio.create_task(beat_u1())
        leader_before = (await get(session, f"{urls[leader]}/v1/status"))["liveness"]
        await asyncio.sleep(2 * TTL_S)
        listed = await get(session, f"{urls[leader]}/v1/agents")
        assert sorted(a["id"] for a in listed["agents"]) == ["u0", "u1"]
        assert {a["liveness"] for a in listed["agents"]} == {"alive"}
        leader_after = (await get(session, f"{urls[leader]}/v1/status"))["liveness"]
        assert leader_after["udp"]["ok"] == leader_before["udp"]["ok"]  # the leader got no datagram
        assert leader_after["heartbeats_answered"] == leader_before["heartbeats_answered"]  # nor a request
        assert sum([(await get(session, f"{urls[f]}/v1/status"))["liveness"]["udp"]["ok"]
                    for f in followers]) > 4 * TTL_S / INTERVAL_S

        # u1 goes silent; its last datagram is replayed to every node, and junk sent, with no reply
        task1.cancel()
        await asyncio.gather(task1, return_exceptions=True)
        silent_since = last_u1["at"]
        replay = last_u1["data"]
        bad_mac = replay[:-1] + bytes([replay[-1] ^ 1])
        wrong_version = bytes([2]) + replay[1:]
        junk = [replay, bad_mac, replay[:20], wrong_version, replay + bytes(100), bytes(200)]
        before = {n: (await get(session, f"{urls[n]}/v1/status"))["liveness"]["udp"] for n in cluster.members}

        async def gone() -> float | None:
            for address in sorted(addresses):
                for data in junk:
                    reply = await sender.exchange(data, address, 0.05)
                    # once expired, the replayed datagram of the lease is told so (it carries a valid MAC)
                    assert reply is None or (data == replay and status_of(u1, reply) == datagram.UNKNOWN_LEASE), \
                        (address, data[:2])
            listed = await get(session, f"{urls[leader]}/v1/agents?consistency=stale")
            return None if "u1" in {a["id"] for a in listed["agents"]} else time.monotonic()
        expired_at = await eventually(gone, "u1 expired", TTL_S + SLACK_S + 5, interval_s=0)
        assert TTL_S - 0.3 < expired_at - silent_since <= TTL_S + SLACK_S + 1.0, expired_at - silent_since
        after = {n: (await get(session, f"{urls[n]}/v1/status"))["liveness"]["udp"] for n in cluster.members}
        for n in cluster.members:
            assert after[n]["replayed"] > before[n]["replayed"], (n, after[n])
            assert after[n]["refused"] >= before[n]["refused"] + 5, (n, after[n])
        kinds = [e["type"] for e in (await get(session, f"{urls[leader]}/v1/events?types=agent.suspected,"
                                                       "agent.terminated&consistency=stale"))["events"]
                 if e["data"]["agentId"] == "u1"]
        assert kinds == ["agent.suspected", "agent.terminated"], kinds

        # a fresh datagram of the expired lease is told so; u0 is still alive
        counter += 1
        assert status_of(u1, await sender.exchange(beat(u1, counter), follower_udp[0], 1.0)) \
            == datagram.UNKNOWN_LEASE
        stop.set()
        await asyncio.gather(task0)
        listed = await get(session, f"{urls[leader]}/v1/agents")
        assert [a["id"] for a in listed["agents"]] == ["u0"]

        # the key is nowhere but in the registration answer
        for n in cluster.members:
            shown = [await get(session, f"{urls[n]}/v1/agents/u0"), await get(session, f"{urls[n]}/v1/agents"),
                     await get(session, f"{urls[n]}/v1/status")]
            text = repr(shown)
            log = (cluster.dir / f"{n}.log").read_text(errors="replace")
            assert "heartbeat datagrams on UDP" in log
            for key in keys:
                assert key not in text and key not in log, n
