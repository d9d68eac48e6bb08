"""The fault proxy on real loopback sockets: pass, drop, one-way drop,
delay, throttle, reset, and its control API."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp.test_utils import TestClient, TestServer

from chaos.proxy import Faults, Proxy, control_app, faults_from
from devcluster.cluster import free_base_port


class Echo:
    """A target server that echoes every byte back."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self, port: int) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", port)
        self.port = port

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def rig():
    base = free_base_port()
    echo = Echo()
    await echo.start(base + 1)
    proxy = Proxy([("a-b", base + 2, base + 1)], seed=7)
    await proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", base + 2)
    yield proxy, reader, writer
    writer.close()
    await proxy.stop()
    await echo.stop()


async def _roundtrip(reader, writer, payload: bytes, timeout_s: float = 2.0) -> bytes:
    writer.write(payload)
    await writer.drain()
    out = b""
    async with asyncio.timeout(timeout_s):
        while len(out) < len(payload):
            out += await reader.read(65536)
    return out


async def test_passes_bytes_both_ways(rig) -> None:
    proxy, reader, writer = rig
    assert await _roundtrip(reader, writer, b"hello") == b"hello"
    link = proxy.links["a-b"]
    assert link.bytes_a_to_b == 5 and link.bytes_b_to_a == 5 and link.connections == 1


@pytest.mark.parametrize("faults", [Faults(drop_a_to_b=True, drop_b_to_a=True), Faults(drop_a_to_b=True),
                                    Faults(drop_b_to_a=True)], ids=["both", "a-to-b", "b-to-a"])
async def test_drop_blackholes_and_heal_resets_the_broken_stream(rig, faults) -> None:
    proxy, reader, writer = rig
    proxy.set("a-b", faults)
    with pytest.raises(TimeoutError):
        await _roundtrip(reader, writer, b"lost", timeout_s=0.3)
    assert proxy.links["a-b"].dropped_bytes >= 4
    proxy.heal()  # the stream has a hole: it is aborted, a new connection works
    async with asyncio.timeout(2):
        try:
            assert await reader.read(100) == b""
        except ConnectionResetError:
            pass
    port = proxy.links["a-b"].listen_port
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
    assert await _roundtrip(reader2, writer2, b"again") == b"again"
    writer2.close()


async def test_delay_holds_bytes_back_in_order(rig) -> None:
    proxy, reader, writer = rig
    proxy.set("a-b", Faults(delay_ms=150, jitter_ms=20))
    started = time.monotonic()
    payload = b"".join(bytes([i]) * 10 for i in range(50))
    assert await _roundtrip(reader, writer, payload) == payload
    assert time.monotonic() - started >= 0.25  # two delayed hops, at least 130 ms each


async def test_throttle_limits_the_rate(rig) -> None:
    proxy, reader, writer = rig
    proxy.set("a-b", Faults(rate_bps=20_000))
    started = time.monotonic()
    await _roundtrip(reader, writer, b"x" * 10_000, timeout_s=5)
    assert time.monotonic() - started >= 0.4  # 10 kB at 20 kB/s, twice


async def test_reset_aborts_open_connections(rig) -> None:
    proxy, reader, writer = rig
    assert await _roundtrip(reader, writer, b"up") == b"up"
    assert proxy.reset("a-b") == 1
    async with asyncio.timeout(2):
        with pytest.raises(ConnectionError):
            while True:
                if not await reader.read(100):
                    raise ConnectionResetError("closed")


async def test_control_api(rig) -> None:
    proxy, _, _ = rig
    async with TestClient(TestServer(control_app(proxy))) as client:
        response = await client.post("/links/a-b", json={"drop": True, "delay_ms": 5})
        assert response.status == 200
        assert (await response.json())["describe"] == "drop, delay 5±0 ms"
        assert proxy.links["a-b"].faults.drop_a_to_b
        assert (await client.post("/links/a-b", json={"delay_ms": -1})).status == 400
        assert (await client.post("/links/a-b", json={"explode": True})).status == 400
        assert (await client.post("/links/nope", json={})).status == 404
        assert (await client.post("/heal")).status == 200
        assert proxy.links["a-b"].faults == Faults()
        status = await (await client.get("/links")).json()
        assert status["a-b"]["describe"] == "pass"


def test_faults_from_validates() -> None:
    assert faults_from({"drop": True}) == Faults(drop_a_to_b=True, drop_b_to_a=True)
    with pytest.raises(ValueError):
        faults_from({"drop_a_to_b": "yes"})
