"""The Python client for agents: kv, agents with a heartbeat loop, locks,
elections and watches, over the HTTP API.

It follows the cluster: a 503 with a leader hint or a refused connection
moves it to another node, and it retries until its deadline. Every write
carries a ``request_id``, so retrying a write whose outcome was unknown
(a 504, a dropped connection) cannot apply it twice.

Use from one event loop; ``async with CoordinatorClient([...]) as c: ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from coordinator.errors import (
    Compacted,
    Conflict,
    CoordinatorError,
    InvalidInput,
    NotFound,
    OutcomeUnknown,
    TooLarge,
    Unavailable,
)

_ERRORS: dict[int, type[CoordinatorError]] = {404: NotFound, 409: Conflict, 410: Compacted, 413: TooLarge}


class ApiError(CoordinatorError):
    """An answer the client cannot map to a more specific error."""

    code = "api"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status=status)
        self.status = status


def _seg(value: str) -> str:
    """One path segment, percent-encoded ('/', '?', '#' and '%' included)."""
    return urllib.parse.quote(value, safe="")


def _base(endpoint: str) -> str:
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.startswith(("http://", "https://")) else f"http://{endpoint}"


@dataclass(frozen=True, slots=True)
class Registration:
    id: str
    lease_id: int
    ttl_s: float


class CoordinatorClient:
    def __init__(self, endpoints: list[str] | str, *, timeout_s: float = 10.0, request_timeout_s: float = 6.0) -> None:
        self.endpoints = [_base(e) for e in ([endpoints] if isinstance(endpoints, str) else endpoints)]
        if not self.endpoints:
            raise InvalidInput("endpoints: give at least one", field="endpoints")
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.request_timeout_s))
        return self._session

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def _move(self, hint: str | None) -> None:
        if hint:
            hinted = _base(hint)
            if hinted not in self.endpoints:
                self.endpoints.append(hinted)
            self._current = self.endpoints.index(hinted)
        else:
            self._current = (self._current + 1) % len(self.endpoints)

    # -- transport -----------------------------------------------------------------

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                      params: dict[str, Any] | None = None, *, timeout_s: float | None = None) -> Any:
        """One API call with retries across nodes until the deadline.

        Raises the mapped error for 4xx answers at once; ``Unavailable`` or
        ``OutcomeUnknown`` when the deadline passes without an answer.
        """
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        last: CoordinatorError = Unavailable("no attempt made")
        attempt = 0
        while True:
            attempt += 1
            hint = None
            retry_after = min(0.05 * 2 ** min(attempt, 5), 1.0)
            try:
                async with self._http().request(method, self.endpoint + path, json=body, params=params) as response:
                    text = await response.text()
                    status = response.status
                    data = json.loads(text) if text else None
                    if status < 400:
                        return data
                    error = (data or {}).get("error", {}) if isinstance(data, dict) else {}
                    message = error.get("message", f"HTTP {status}")
                    if status == 503:
                        hint = error.get("leader")
                        last = Unavailable(message, leader=hint)
                        with contextlib.suppress(ValueError):
                            retry_after = min(float(response.headers.get("Retry-After", retry_after)), 1.0)
                    elif status == 504:
                        last = OutcomeUnknown(message)
                    elif status == 400:
                        raise InvalidInput(message, field=error.get("field"))
                    elif status in _ERRORS:
                        raise _ERRORS[status](message, **{k: v for k, v in error.items()
                                                          if k not in ("code", "message")})
                    else:
                        raise ApiError(status, message)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last = OutcomeUnknown(f"{type(exc).__name__} talking to {self.endpoint}")
            if time.monotonic() + retry_after > deadline:
                raise last
            self._move(hint)
            await asyncio.sleep(retry_after)

    @staticmethod
    def _request_id() -> str:
        return secrets.token_hex(12)

    # -- cluster -------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/status")

    async def add_member(self, node_id: str, raft: str, http: str) -> dict[str, Any]:
        return await self.request("POST", "/v1/members", {"id": node_id, "raft": raft, "http": http})

    async def remove_member(self, node_id: str) -> dict[str, Any]:
        return await self.request("DELETE", f"/v1/members/{_seg(node_id)}")

    # -- key/value -------------------------------------------------------------------------

    async def get(self, key: str, *, consistency: str = "linearizable") -> dict[str, Any] | None:
        try:
            return await self.request("GET", f"/v1/kv/{_seg(key)}", params={"consistency": consistency})
        except NotFound:
            return None

    async def put(self, key: str, value: Any, *, fence: dict[str, Any] | None = None) -> int:
        body: dict[str, Any] = {"value": value, "request_id": self._request_id()}
        if fence:
            body["fence"] = fence
        return (await self.request("PUT", f"/v1/kv/{_seg(key)}", body))["revision"]

    async def cas(self, key: str, expected: Any, value: Any) -> int | None:
        """The new revision, or None when the current value was not ``expected``."""
        try:
            answer = await self.request("POST", f"/v1/kv/{_seg(key)}/cas",
                                        {"expected": expected, "value": value, "request_id": self._request_id()})
        except Conflict:
            return None
        return answer["revision"]

    async def delete(self, key: str) -> bool:
        try:
            await self.request("DELETE", f"/v1/kv/{_seg(key)}", {"request_id": self._request_id()})
        except NotFound:
            return False
        return True

    async def list(self, prefix: str = "", *, limit: int = 1000) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/kv", params={"prefix": prefix, "limit": limit}))["items"]

    # -- agents ------------------------------------------------------------------------------

    async def register(self, agent_type: str, *, agent_id: str | None = None, metadata: dict[str, Any] | None = None,
                       ttl_s: float = 10.0, endpoint: str | None = None, weight: int | None = None) -> Registration:
        body: dict[str, Any] = {"type": agent_type, "ttl_s": ttl_s, "metadata": metadata or {},
                                "request_id": self._request_id()}
        if agent_id:
            body["id"] = agent_id
        if endpoint:
            body["endpoint"] = endpoint
        if weight is not None:
            body["weight"] = weight
        answer = await self.request("POST", "/v1/agents", body)
        return Registration(answer["id"], answer["lease_id"], answer["ttl_s"])

    async def heartbeat(self, agent_id: str, *, health: str | None = None) -> dict[str, Any]:
        body = {"health": health} if health else {}
        return await self.request("POST", f"/v1/agents/{_seg(agent_id)}/heartbeat", body)

    async def deregister(self, agent_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.request("DELETE", f"/v1/agents/{_seg(agent_id)}", {"request_id": self._request_id()})

    async def agents(self, agent_type: str | None = None) -> list[dict[str, Any]]:
        params = {"type": agent_type} if agent_type else None
        return (await self.request("GET", "/v1/agents", params=params))["agents"]

    @contextlib.asynccontextmanager
    async def agent(self, agent_type: str, **kwargs: Any) -> AsyncIterator[Registration]:
        """Join, heartbeat every third of the TTL while inside, leave on exit."""
        registration = await self.register(agent_type, **kwargs)
        task = asyncio.create_task(self._heartbeat_loop(registration))
        try:
            yield registration
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self.deregister(registration.id)

    async def _heartbeat_loop(self, registration: Registration) -> None:
        while True:
            await asyncio.sleep(registration.ttl_s / 3)
            with contextlib.suppress(Unavailable, OutcomeUnknown):
                await self.heartbeat(registration.id)

    # -- locks and elections -------------------------------------------------------------------

    async def acquire(self, name: str, holder: str, *, ttl_s: float = 15.0) -> int | None:
        """The fencing token, or None when another holder has the lock."""
        try:
            answer = await self.request("POST", f"/v1/locks/{_seg(name)}",
                                        {"holder": holder, "ttl_s": ttl_s, "request_id": self._request_id()})
        except Conflict:
            return None
        return answer["fencing_token"]

    async def release(self, name: str, holder: str) -> bool:
        try:
            await self.request("DELETE", f"/v1/locks/{_seg(name)}",
                               {"holder": holder, "request_id": self._request_id()})
        except (NotFound, Conflict):
            return False
        return True

    async def campaign(self, election: str, candidate: str, *, ttl_s: float = 15.0) -> int | None:
        try:
            answer = await self.request("POST", f"/v1/elections/{_seg(election)}/campaign",
                                        {"candidate": candidate, "ttl_s": ttl_s, "request_id": self._request_id()})
        except Conflict:
            return None
        return answer["fencing_token"]

    async def leader(self, election: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", f"/v1/elections/{_seg(election)}")
        except NotFound:
            return None

    async def resign(self, election: str, candidate: str) -> bool:
        try:
            await self.request("POST", f"/v1/elections/{_seg(election)}/resign",
                               {"candidate": candidate, "request_id": self._request_id()})
        except (NotFound, Conflict):
            return False
        return True

    # -- events and watches ----------------------------------------------------------------------

    async def events(self, from_seq: int = 1, *, limit: int = 1000) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/events", params={"from_seq": from_seq, "limit": limit}))["events"]

    async def watch(self, prefix: str = "", *, from_revision: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Changes under ``prefix``; reconnects to any node and resumes after
        the last revision seen. Raises ``Compacted`` when history is gone."""
        params = {"prefix": prefix}
        async for event in self._sse("/v1/watch", params, "from_revision", from_revision):
            yield event

    async def watch_events(self, *, from_seq: int | None = None,
                           types: tuple[str, ...] = ()) -> AsyncIterator[dict[str, Any]]:
        params = {"types": ",".join(types)} if types else {}
        async for event in self._sse("/v1/watch/events", params, "from_seq", from_seq):
            yield event

    async def _sse(self, path: str, params: dict[str, str], cursor_name: str,
                   cursor: int | None) -> AsyncIterator[dict[str, Any]]:
        last_id: int | None = None if cursor is None else cursor - 1
        failures = 0
        while True:
            query = dict(params)
            if last_id is not None:
                query[cursor_name] = str(last_id + 1)
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
                async with self._http().get(self.endpoint + path, params=query, timeout=timeout) as response:
                    if response.status == 410:
                        raise Compacted((await response.json()).get("error", {}).get("message", "compacted"))
                    if response.status != 200:
                        raise Unavailable(f"watch answered {response.status}")
                    failures = 0
                    async for event_type, event_id, data in _sse_events(response):
                        if event_type == "error":
                            raise Compacted(data.get("message", "compacted"))
                        if event_id is not None:
                            last_id = event_id
                        yield data
            except (aiohttp.ClientError, TimeoutError, Unavailable):
                failures += 1
                if failures > 20:
                    raise
                self._move(None)
                await asyncio.sleep(min(0.1 * failures, 1.0))


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, int | None, dict[str, Any]]]:
    event_type, event_id, data_lines = "message", None, []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data_lines:
                yield event_type, event_id, json.loads("\n".join(data_lines))
            event_type, event_id, data_lines = "message", None, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event_type = value
            elif name == "id":
                event_id = int(value) if value.isdigit() else None
            elif name == "data":
                data_lines.append(value)
