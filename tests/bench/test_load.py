"""bench/load.py: the generator's HTTP/1.1 client, its response parser fed
the bytes etcd's gateway really sends, and whole runs against real aiohttp
servers on 127.0.0.1 (ephemeral ports): Content-Length and chunked bodies,
errors, Connection: close, a stalled server, a refused connection."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import load
from bench.load import VALUE, BadResponse, Requests, ResponseParser, Target, run_load

# Captured from etcd 3.4.23's v3 gateway: a put, and the error it answers chunked, with a trailer.
ETCD_PUT_OK = (b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Headers: accept, content-type, authorization\r\n"
               b"Access-Control-Allow-Methods: POST, GET, OPTIONS, PUT, DELETE\r\nAccess-Control-Allow-Origin: *\r\n"
               b"Content-Type: application/json\r\nGrpc-Metadata-Content-Type: application/grpc\r\n"
               b"Date: Mon, 07 Dec 2026 18:22:54 GMT\r\nContent-Length: 112\r\n\r\n"
               b'{"header":{"cluster_id":"1168133145129506930","member_id":"8098938858742182543","revision":"2",'
               b'"raft_term":"2"}}')
ETCD_ERROR_CHUNKED = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                      b"Trailer: Grpc-Trailer-Content-Type\r\nDate: Mon, 07 Dec 2026 18:22:56 GMT\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n60\r\n"
                      b'{"error":"etcdserver: key is not provided","message":"etcdserver: key is not provided",'
                      b'"code":3}\r\n0\r\nGrpc-Trailer-Content-Type: application/grpc\r\n\r\n')
CHUNKED_NO_TRAILER = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\n")


def _feed_split(parser: ResponseParser, response: bytes, at: int) -> list[bool]:
    return [parser.feed(response[:at]), parser.feed(response[at:])]


@pytest.mark.parametrize(("response", "status"), [(ETCD_PUT_OK, 200), (ETCD_ERROR_CHUNKED, 400),
                                                  (CHUNKED_NO_TRAILER, 200)])
def test_a_response_is_read_whole_split_anywhere_and_byte_by_byte(response: bytes, status: int) -> None:
    parser = ResponseParser()
    assert parser.feed(response) and parser.status == status and parser.keep_alive
    for at in range(len(response)):  # the same parser, response after response
        assert _feed_split(parser, response, at) == [False, True], at
        assert parser.status == status
    assert [parser.feed(response[i:i + 1]) for i in range(len(response))] == [False] * (len(response) - 1) + [True]


def test_keep_alive_follows_the_version_and_connection_header() -> None:
    cases = {b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n": True,
             b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}": False,
             b"HTTP/1.1 503 Service Unavailable\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n": False,
             b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n": False,
             b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n": True,
             b"HTTP/1.1 204 No Content\r\n\r\n": True}
    for response, keep_alive in cases.items():
        parser = ResponseParser()
        assert parser.feed(response) and parser.keep_alive is keep_alive, response


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}",  # framed by close: not read
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/2 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nno colon\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1",  # bytes nobody asked for
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (load.BODY_MAX_BYTES + 1),
    b"HTTP/1.1 200 OK\r\nX: " + b"x" * load.HEAD_MAX_BYTES,
])
def test_what_it_does_not_read_is_a_bad_response(response: bytes) -> None:
    with pytest.raises(BadResponse):
        ResponseParser().feed(response)


def test_requests_are_the_bytes_of_the_same_calls_as_before() -> None:
    target = Target.parse("http://127.0.0.1:2379")
    put = Requests("etcd").write(target, 3, 205)
    head, body = put.split(b"\r\n\r\n")
    assert head == (b"POST /v3/kv/put HTTP/1.1\r\nHost: 127.0.0.1:2379\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d" % len(body))
    assert json.loads(body) == {"key": base64.b64encode(b"bench/3/5").decode(), "value": base64.b64encode(
        VALUE.encode()).decode()}
    assert Requests("etcd").read(target).startswith(b"POST /v3/kv/range HTTP/1.1\r\n")
    assert Requests("coord").write(target, 3, 205).startswith(b"PUT /v1/kv/bench/3/5 HTTP/1.1\r\n")
    assert Requests("coord").read(target) == b"GET /v1/kv/bench/0/0 HTTP/1.1\r\nHost: 127.0.0.1:2379\r\n\r\n"
    assert Target.parse("http://127.0.0.1:80/api/").prefix == "/api"
    with pytest.raises(ValueError):
        Target.parse("https://127.0.0.1")


# -- whole runs against real servers ----------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Seen:
    """What a test server saw: requests by (method, path) and the client ports."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.bodies: list[Any] = []
        self.ports: Counter[int] = Counter()

    async def record(self, request: web.Request) -> None:
        self.requests[(request.method, request.path)] += 1
        self.ports[request.transport.get_extra_info("peername")[1]] += 1  # type: ignore[union-attr]
        if request.can_read_body:
            self.bodies.append(await request.json())


async def _server(handler: Handler) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server


async def _run(servers: list[TestServer], system: str = "coord", clients: int = 3, seconds: float = 0.3,
               kind: str = "write", first_client: int = 0) -> dict[str, Any]:
    urls = [f"http://127.0.0.1:{s.port}" for s in servers]
    result = await asyncio.wait_for(run_load(system, urls, clients, seconds, kind, first_client), seconds + 10)
    assert set(result) == {"ops", "errors", "latencies_us", "elapsed_s", "cpu_s"}
    assert len(result["latencies_us"]) == result["ops"] and seconds - 0.05 < result["elapsed_s"] < seconds + 2
    return result


async def test_content_length_answers_over_one_kept_alive_connection_per_client() -> None:
    seen = Seen()

    async def put(request: web.Request) -> web.Response:
        await seen.record(request)
        return web.json_response({"revision": 1})

    server = await _server(put)
    try:
        result = await _run([server], clients=3, first_client=10)
    finally:
        await server.close()
    assert result["errors"] == {} and result["ops"] == sum(seen.requests.values()) > 30
    assert {m for m, _ in seen.requests} == {"PUT"}
    assert {p.rsplit("/", 2)[1] for _, p in seen.requests} == {"10", "11", "12"}
    assert all(body == {"value": VALUE} for body in seen.bodies)
    assert len(seen.ports) == 3  # keep-alive: each client reused its one connection


async def test_chunked_answers_and_clients_round_robin_over_the_urls() -> None:
    seen = [Seen(), Seen()]

    def make(s: Seen) -> Handler:
        async def answer(request: web.Request) -> web.StreamResponse:
            await s.record(request)
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b'{"header":')
            await response.write(b'{"revision":"2"}}')
            await response.write_eof()
            return response
        return answer

    servers = [await _server(make(s)) for s in seen]
    try:
        result = await _run(servers, system="etcd", clients=4, kind="read")
    finally:
        for server in servers:
            await server.close()
    assert result["errors"] == {} and result["ops"] == sum(sum(s.requests.values()) for s in seen) > 30
    for s in seen:
        assert set(s.requests) == {("POST", "/v3/kv/range")} and len(s.ports) == 2  # clients 0, 2 and 1, 3
        assert all(body == {"key": base64.b64encode(b"bench/0/0").decode()} for body in s.bodies)


async def test_a_non_200_status_is_counted_and_the_connection_kept() -> None:
    seen = Seen()

    async def unavailable(request: web.Request) -> web.Response:
        await seen.record(request)
        return web.json_response({"error": "no leader"}, status=503)

    server = await _server(unavailable)
    try:
        result = await _run([server], clients=2)
    finally:
        await server.close()
    assert result["ops"] == 0 and result["errors"] == {"503": sum(seen.requests.values())}
    assert result["errors"]["503"] > 10 and len(seen.ports) == 2


async def test_connection_close_makes_the_client_reconnect() -> None:
    seen = Seen()

    async def once(request: web.Request) -> web.Response:
        await seen.record(request)
        response = web.json_response({"revision": 1})
        response.force_close()  # answers with Connection: close, then closes
        return response

    server = await _server(once)
    try:
        result = await _run([server], clients=2, seconds=0.3)
    finally:
        await server.close()
    served = sum(seen.requests.values())
    assert result["errors"] == {} and result["ops"] == served > 10
    assert len(seen.ports) == served  # a new connection for every request


async def test_a_stalled_server_costs_each_request_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load, "REQUEST_TIMEOUT_S", 0.2)
    release = asyncio.Event()
    seen = Seen()

    async def stall(request: web.Request) -> web.Response:
        await seen.record(request)
        await asyncio.wait_for(release.wait(), 5)
        return web.json_response({})

    server = await _server(stall)
    try:
        result = await _run([server], clients=2, seconds=0.5)
    finally:
        release.set()
        await server.close()
    # each client: requests at 0, 0.2, 0.4 s (2 on a starved loop), each timing out; the last ends the run at ~0.6 s
    timeouts = seen.requests.total()
    assert result["ops"] == 0 and result["errors"] == {"TimeoutError": timeouts} and 4 <= timeouts <= 6
    assert result["elapsed_s"] < 1.2 and len(seen.ports) == timeouts  # a timed-out connection is not reused


async def test_a_refused_connection_and_a_half_answer_are_counted_by_type() -> None:
    def answer(response: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(response)
                await writer.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            writer.close()
        return handle

    half_then_close = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
    no_framing = answer(b"HTTP/1.1 200 OK\r\n\r\n{}")

    half = await asyncio.start_server(half_then_close, "127.0.0.1", 0)
    unframed = await asyncio.start_server(no_framing, "127.0.0.1", 0)
    closed = await asyncio.start_server(no_framing, "127.0.0.1", 0)
    closed_port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    try:
        results = [await run_load("coord", [f"http://127.0.0.1:{port}"], 1, 0.1, "read")
                   for port in (half.sockets[0].getsockname()[1], unframed.sockets[0].getsockname()[1], closed_port)]
    finally:
        for server in (half, unframed):
            server.close()
            await server.wait_closed()
    assert [r["ops"] for r in results] == [0, 0, 0]
    assert [set(r["errors"]) for r in results] == [{"ServerDisconnected"}, {"BadResponse"},
                                                   {"ConnectionRefusedError"}]
    assert all(r["errors"] for r in results)


async def test_the_command_line_prints_one_json_line_of_the_same_shape() -> None:
    async def put(request: web.Request) -> web.Response:
        return web.json_response({"revision": 1})

    server = await _server(put)
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.load", "--system", "coord", "--urls", f"http://127.0.0.1:{server.port}",
            "--clients", "2", "--seconds", "0.3", "--kind", "write", stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(child.communicate(), 30)
    finally:
        await server.close()
    assert child.returncode == 0
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert list(result) == ["ops", "errors", "latencies_us", "elapsed_s", "cpu_s"]
    assert result["ops"] > 0 and result["errors"] == {} and result["cpu_s"] > 0
