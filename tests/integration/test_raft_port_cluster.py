"""Strangers on the Raft port of a real cluster: whatever they send or however
many connections they open, the node cuts them off and the cluster keeps its
leader, its term and its writes.

Before the port was bounded, pysyncobj buffered a stranger's declared 2 GiB
frame (with quadratic copying, on the tick thread: the leader stalled and the
followers elected another) and kept every silent connection open for ever.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import time

import pytest

from cluster.raft_pysyncobj import UNAUTHENTICATED_MAX
from coordinator.client import CoordinatorClient

pytestmark = pytest.mark.cluster

STREAM_BYTES = 32 << 20  # what a stranger tries to push in one frame


def _address(cluster, node_id: str) -> tuple[str, int]:
    host, _, port = cluster.specs[node_id].raft.rpartition(":")
    return host, int(port)


def _closed_by_peer(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the other end closes ``sock`` within ``timeout_s`` (EOF or reset)."""
    sock.settimeout(timeout_s)
    try:
        while True:  # the node sends nothing to a stranger: the first read is EOF, a reset or the timeout
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _huge_declared_frame(address: tuple[str, int]) -> tuple[bool, int]:
    """Declare a 2 GiB frame and stream garbage into it: (closed by the node, bytes it took)."""
    with socket.create_connection(address, timeout=5) as sock:
        sent = 0
        try:
            sock.sendall(struct.pack("i", 2**31 - 1))
            chunk = os.urandom(64 << 10)
            while sent < STREAM_BYTES:
                sent += sock.send(chunk)
        except (ConnectionResetError, BrokenPipeError):
            return True, sent
        except TimeoutError:  # the node neither reads nor closes
            return False, sent
        return _closed_by_peer(sock, 5), sent


def _garbage_frame(address: tuple[str, int], length: int) -> bool:
    """A complete frame of garbage of ``length`` bytes: closed by the node?"""
    with socket.create_connection(address, timeout=5) as sock:
        try:
            sock.sendall(struct.pack("i", length) + os.urandom(length))
        except (ConnectionResetError, BrokenPipeError):
            return True
        return _closed_by_peer(sock, 5)


def _many_silent_connections(address: tuple[str, int], count: int, timeout_s: float) -> list[float]:
    """Open ``count`` connections that send nothing; the seconds after which
    the node closed each (``inf``: still open at the deadline)."""
    socks = [socket.create_connection(address, timeout=5) for _ in range(count)]
    opened = time.monotonic()
    closed_after = {s.fileno(): float("inf") for s in socks}
    try:
        open_socks = list(socks)
        deadline = opened + timeout_s
        while open_socks and time.monotonic() < deadline:
            readable, _, _ = select.select(open_socks, [], [], max(0.0, deadline - time.monotonic()))
            for sock in readable:
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed_after[sock.fileno()] = time.monotonic() - opened
                    open_socks.remove(sock)
    finally:
        result = [closed_after[s.fileno()] for s in socks]
        for sock in socks:
            sock.close()
    return result


def _listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at ``port`` (Linux /proc/net/tcp)."""
    found = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_the_raft_port_listens_on_the_configured_address_only(make_cluster) -> None:
    """pysyncobj binds every interface; a node configured on 127.0.0.1 must not
    be reachable from the network."""
    cluster = make_cluster()
    for node_id in cluster.members:
        host, port = _address(cluster, node_id)
        assert _listening_addresses(port) == {host}


async def test_strangers_on_the_raft_port_are_cut_off_and_the_leader_stays(make_cluster) -> None:
    cluster = make_cluster()
    leader = cluster.wait_leader()
    term = cluster.status(leader)["term"]
    target = _address(cluster, leader)
    stop = asyncio.Event()
    written: list[int] = []

    async def keep_writing() -> None:
        async with CoordinatorClient([cluster.url(n) for n in cluster.members]) as client:
            i = 0
            while not stop.is_set() and i < 100_000:
                await client.put(f"port/{i % 50}", i)  # raises if a write fails
                written.append(i)
                i += 1

    writer = asyncio.create_task(keep_writing())
    try:
        closed, took = await asyncio.to_thread(_huge_declared_frame, target)
        assert closed, f"the node kept a stranger's 2 GiB frame open after taking {took} bytes of it"
        assert took < STREAM_BYTES

        assert await asyncio.to_thread(_garbage_frame, target, 1000), "a frame that does not decrypt was kept"
        assert await asyncio.to_thread(_garbage_frame, target, 1 << 20), "a 1 MiB first frame was buffered"

        strangers = 4 * UNAUTHENTICATED_MAX
        closed_after = await asyncio.to_thread(_many_silent_connections, target, strangers, 15.0)
        assert all(t < float("inf") for t in closed_after), f"stranger connections left open: {closed_after}"
        at_once = sum(1 for t in closed_after if t < 1.5)  # the handshake deadline is 3 s
        assert at_once >= strangers - UNAUTHENTICATED_MAX, f"only {at_once} closed at once: {closed_after}"
    finally:
        stop.set()
        await writer  # re-raises a failed write
    assert len(written) > 10, "writes did not keep going while strangers were at the port"

    statuses = {n: cluster.status(n) for n in cluster.members}
    assert {n: (s["leader_id"], s["term"]) for n, s in statuses.items()} == \
        {n: (leader, term) for n in cluster.members}, "the strangers churned an election"
    async with CoordinatorClient(cluster.url(leader)) as client:
        assert (await client.get(f"port/{written[-1] % 50}"))["value"] == written[-1]
    assert "raft port: closed" in cluster.log_tail(leader, 400)
