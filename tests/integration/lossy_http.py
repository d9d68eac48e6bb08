"""A lossy HTTP forwarder: a packet-loss proxy for requests. It listens on a
port of its own and passes each request to one target node, except a seeded
share of them, which it drops without forwarding (the connection is closed:
the caller sees no answer, as it would after a lost packet)."""

from __future__ import annotations

import random

import aiohttp
from aiohttp import web


class LossyForwarder:
    def __init__(self, target: str, loss: float, seed: int) -> None:
        """``target``: ``host:port`` of the node; ``loss``: the share dropped."""
        self.target = target
        self.loss = loss
        self.rng = random.Random(seed)
        self.forwarded = 0
        self.dropped = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    async def start(self, port: int) -> str:
        """Listen on loopback ``port``; returns ``host:port``."""
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = port
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.rng.random() < self.loss:
            self.dropped += 1
            if request.transport is not None:
                request.transport.close()
            raise web.HTTPServiceUnavailable()  # never reaches the caller: the connection is gone
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        async with self._session.request(request.method, f"http://{self.target}{request.path_qs}", data=body,
                                         headers=headers) as response:
            payload = await response.read()
            self.forwarded += 1
            return web.Response(status=response.status, body=payload,
                                content_type=response.content_type)
