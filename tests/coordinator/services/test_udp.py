"""The UDP heartbeat listener's decisions (``coordinator.services.udp``),
without a socket: datagrams handed to ``datagram_received``, replies caught
by a fake transport, time on a ManualClock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from coordinator import datagram
from coordinator.clock import ManualClock
from coordinator.datagram import Beat
from coordinator.services.liveness import HeardTable
from coordinator.services.udp import HEALTH_INFLIGHT_MAX, HeartbeatDatagrams

K_HB = b"h" * 32
K_OLD = b"o" * 32
PEER = ("127.0.0.1", 40000)


@dataclass
class Agent:
    id: str
    lease_id: int
    health: str = "unknown"


class Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass


class Fixture:
    def __init__(self, rate_max: int = 1000) -> None:
        self.clock = ManualClock()
        self.table = HeardTable()
        self.agents = {7: Agent("a", 7)}
        self.status = datagram.OK
        self.renewed: list[tuple[str, int]] = []
        self.health: list[tuple[str, str]] = []
        self.hold_health = asyncio.Event()
        self.udp = HeartbeatDatagrams(K_HB, self.clock, self.table, agent_by_lease=self.agents.get,
                                      renew=self._renew, report_health=self._health, accepted_keys=(K_OLD,),
                                      rate_max=rate_max)
        self.transport = Transport()
        self.udp.attach(self.transport)

    def _renew(self, agent: Agent, counter: int) -> int:
        if self.status == datagram.OK:
            self.table.heard_here(agent.id, agent.lease_id, self.clock.monotonic(), counter)
        self.renewed.append((agent.id, counter))
        return self.status

    async def _health(self, agent_id: str, health: str) -> None:
        self.health.append((agent_id, health))
        await self.hold_health.wait()

    def send(self, data: bytes) -> datagram.Ack | None:
        """Hand ``data`` over; the reply (verified with lease 7's key), or None when there was none."""
        before = len(self.transport.sent)
        self.udp.datagram_received(data, PEER)
        if len(self.transport.sent) == before:
            return None
        reply, addr = self.transport.sent[-1]
        assert addr == PEER and len(reply) <= len(data)
        lease = int.from_bytes(reply[2:10], "big")
        ack = datagram.decode_ack(datagram.lease_key(K_HB, lease), reply)
        assert ack is not None
        return ack


def beat(lease_id: int, counter: int, health: str | None = None, key: bytes = K_HB) -> bytes:
    return datagram.encode_beat(datagram.lease_key(key, lease_id), Beat(lease_id, counter, health))


def test_a_good_beat_is_renewed_and_acked_and_its_replay_gets_nothing() -> None:
    f = Fixture()
    assert f.send(beat(7, 100)) == datagram.Ack(7, 100, datagram.OK)
    assert f.renewed == [("a", 100)]
    assert f.table.entries["a"].counter == 100
    assert f.send(beat(7, 100)) is None  # replayed
    assert f.send(beat(7, 99)) is None  # older
    assert f.renewed == [("a", 100)]
    assert f.send(beat(7, 101)) == datagram.Ack(7, 101, datagram.OK)
    assert f.udp.counts["replayed"] == 2 and f.udp.counts["ok"] == 2


def test_junk_gets_no_reply_and_renews_nothing() -> None:
    f = Fixture()
    good = beat(7, 5)
    junk = [good[:-1] + bytes([good[-1] ^ 0x80]), good[:20], bytes([3]) + good[1:], good + bytes(90), b"",
            beat(7, 6, key=b"x" * 32)]
    assert [f.send(d) for d in junk] == [None] * len(junk)
    assert f.renewed == [] and f.udp.counts["refused"] == len(junk)


def test_the_accepted_secret_key_is_taken_and_the_reply_uses_the_current_key() -> None:
    f = Fixture()
    assert f.send(beat(7, 5, key=K_OLD)) == datagram.Ack(7, 5, datagram.OK)


def test_a_lease_nobody_holds_is_told_so_and_a_node_that_cannot_vouch_says_not_ready() -> None:
    f = Fixture()
    assert f.send(beat(8, 5)) == datagram.Ack(8, 5, datagram.UNKNOWN_LEASE)
    f.table.lease_started("a", 7, 0.0)
    f.status = datagram.NOT_READY
    assert f.send(beat(7, 5)) == datagram.Ack(7, 5, datagram.NOT_READY)
    assert f.send(beat(7, 5)) is None  # its counter is spent all the same
    f.status = datagram.OK
    assert f.send(beat(7, 6)) == datagram.Ack(7, 6, datagram.OK)


def test_the_rate_bound_drops_past_a_seconds_worth() -> None:
    f = Fixture(rate_max=100)
    replies = [f.send(beat(7, c)) for c in range(1, 151)]
    assert sum(r is not None for r in replies) == 100
    assert f.udp.counts["rate_dropped"] == 50
    f.clock.advance(0.5)
    replies = [f.send(beat(7, c)) for c in range(151, 231)]
    assert sum(r is not None for r in replies) == 50


async def test_a_new_health_is_proposed_in_the_background_once_at_a_time() -> None:
    f = Fixture()
    assert f.send(beat(7, 1, "healthy")) == datagram.Ack(7, 1, datagram.OK)  # acked without waiting
    assert f.send(beat(7, 2, "healthy")) is not None
    assert f.send(beat(7, 3, "unknown")) is not None  # the recorded health: nothing to propose
    await asyncio.sleep(0)
    assert f.health == [("a", "healthy")]  # one in flight for the agent
    for i in range(HEALTH_INFLIGHT_MAX + 5):
        f.agents[100 + i] = Agent(f"b{i}", 100 + i)
        f.send(beat(100 + i, 1, "healthy"))
    await asyncio.sleep(0)
    assert len(f.health) == HEALTH_INFLIGHT_MAX
    f.hold_health.set()
    await asyncio.sleep(0.01)
    assert f.udp._health == {}


@pytest.mark.parametrize("counter", [0, 5])
def test_gossiped_counters_refuse_a_replay_seen_elsewhere(counter: int) -> None:
    f = Fixture()
    f.table.lease_started("a", 7, 0.0)
    f.table.merge("a", 7, 0.0, 1.0, counter)
    assert (f.send(beat(7, 5)) is None) == (counter == 5)
