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
import random
import secrets
import ssl as ssl_module
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, cast

import aiohttp
import yarl

from coordinator import crypto, datagram
from coordinator.crypto import AgentKeys, authorization_header
from coordinator.errors import (
    BadGateway,
    Compacted,
    Conflict,
    CoordinatorError,
    Forbidden,
    InvalidInput,
    NotFound,
    OutcomeUnknown,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from coordinator.tls import client_context

_ERRORS: dict[int, type[CoordinatorError]] = {401: Unauthenticated, 403: Forbidden, 404: NotFound, 409: Conflict,
                                              410: Compacted, 413: TooLarge, 502: BadGateway, 507: QuotaExceeded}


class ApiError(CoordinatorError):
    """An answer the client cannot map to a more specific error."""

    code = "api"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status=status)
        self.status = status


def _seg(value: str) -> str:
    """One path segment, percent-encoded ('/', '?', '#' and '%' included)."""
    return urllib.parse.quote(value, safe="")


def _base(endpoint: str, scheme: str = "http") -> str:
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.startswith(("http://", "https://")) else f"{scheme}://{endpoint}"


@dataclass(frozen=True, slots=True)
class Registration:
    """``heartbeat_key``: the lease's heartbeat datagram key (never printed),
    and ``heartbeat_udp`` where datagrams go, when the node takes them."""

    id: str
    lease_id: int
    ttl_s: float
    heartbeat_key: bytes | None = dataclass_field(default=None, repr=False)
    heartbeat_udp: tuple[str, ...] = ()

    @classmethod
    def of(cls, answer: dict[str, Any]) -> Registration:
        """From the answer to ``POST /v1/agents``."""
        grant = answer.get("heartbeat_udp")
        if not isinstance(grant, dict):
            return cls(answer["id"], answer["lease_id"], answer["ttl_s"])
        return cls(answer["id"], answer["lease_id"], answer["ttl_s"], bytes.fromhex(grant["key"]),
                   tuple(grant["addresses"]))


class _Datagrams(asyncio.DatagramProtocol):
    """One UDP socket of a client: sends heartbeat datagrams and hands each
    verified reply to the send waiting for it (by lease id and counter)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[tuple[int, int], tuple[bytes, asyncio.Future[int]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector transport of a datagram endpoint does not subclass DatagramTransport (3.11)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        request = datagram.peek_ack(data)
        wanted = self.waiting.get(request) if request is not None else None
        if wanted is None:
            return
        key, future = wanted
        ack = datagram.decode_ack(key, data)
        if ack is not None and not future.done():
            future.set_result(ack.status)

    async def exchange(self, key: bytes, beat: datagram.Beat, address: str, timeout_s: float) -> int | None:
        """Send one beat to ``address`` (host:port, an IP address); its
        verified reply's status, or None when none came within ``timeout_s``."""
        if self.transport is None:
            return None
        host, _, port = address.rpartition(":")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting[(beat.lease_id, beat.counter)] = (key, future)
        try:
            self.transport.sendto(datagram.encode_beat(key, beat), (host.strip("[]"), int(port)))
            async with asyncio.timeout(timeout_s):
                return await future
        except (TimeoutError, OSError, ValueError):
            return None
        finally:
            self.waiting.pop((beat.lease_id, beat.counter), None)


@dataclass(frozen=True, slots=True)
class InvokeAnswer:
    """An agent's answer to ``invoke``: its status, body and headers (read-only,
    names case-insensitive), and who answered."""

    status: int
    body: bytes
    headers: Mapping[str, str]
    agent: str
    attempts: int

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def _node_error(status: int, body: bytes) -> CoordinatorError:
    """The error a node answered with (not an agent's answer)."""
    try:
        error = json.loads(body).get("error", {})
    except (ValueError, AttributeError):
        error = {}
    message = error.get("message", f"HTTP {status}")
    if status == 400:
        return InvalidInput(message, field=error.get("field"))
    if status == 429:
        return RateLimited(message, retry_after_s=float(error.get("retry_after_s", 1.0)))
    if status == 503:
        return Unavailable(message, leader=error.get("leader"))
    if status == 504:
        return RequestTimeout(message)
    if status in _ERRORS:
        return _ERRORS[status](message)
    return ApiError(status, message)


MAX_INVOKE_TIMEOUT_S = 300.0  # the longest timeout a balancing policy may set
LIST_PAGE = 1000  # keys per page of list(): the most the API answers at once


@dataclass
class HeldLock:
    """A lock held by ``CoordinatorClient.lock``: its fencing ``token``, and
    ``lost``, set once the lease may have expired or another holder has it."""

    name: str
    holder: str
    token: int
    lost: asyncio.Event = dataclass_field(default_factory=asyncio.Event)


def backoff_s(attempt: int, retry_after_s: float | None = None) -> float:
    """How long to wait before attempt ``attempt + 1``. Full jitter over an
    exponential ceiling (50 ms doubling, at most 1 s), so clients that failed
    together do not come back together; a node's ``Retry-After`` (capped at
    1 s: the client moves to another node meanwhile) is waited at least, plus
    up to a fifth more."""
    if retry_after_s is not None and retry_after_s >= 0:
        return min(retry_after_s, 1.0) * random.uniform(1.0, 1.2)
    return random.uniform(0.0, min(0.05 * 2 ** min(attempt, 5), 1.0))


class RetriableOutcomeUnknown(OutcomeUnknown):
    """What the client raises for ``OutcomeUnknown``: ``request_id`` is the
    id the request carried (None for a read) and ``await retry()`` sends the
    same request again, with the same id, and returns the API's answer: the
    first outcome when the first attempt took effect, so it is never applied
    twice. Catch ``OutcomeUnknown``; this is one."""

    def __init__(self, message: str, retry: Callable[[], Awaitable[Any]], *, request_id: str | None) -> None:
        super().__init__(message, request_id=request_id)
        self.retry = retry


class CoordinatorClient:
    """``endpoints``: ``host:port`` or URLs. For an HTTPS cluster give ``https://``
    URLs or ``ca_file`` (the CA that signed the nodes' certificates; the system
    CAs otherwise) or ``ssl`` (your own ``SSLContext``); with either, bare
    ``host:port`` endpoints and the nodes' leader hints mean HTTPS."""

    def __init__(self, endpoints: list[str] | str, *, timeout_s: float = 10.0, request_timeout_s: float = 6.0,
                 ca_file: str | None = None, ssl: ssl_module.SSLContext | None = None,
                 token: str | None = None, agent_id: str | None = None, keys: AgentKeys | None = None,
                 heartbeat_over: str = "http", datagram_timeout_s: float = 0.3) -> None:
        """``token``: the admin credential. ``agent_id`` with ``keys``: sign every
        request as that agent (its registered Ed25519 key). Neither: anonymous.
        ``heartbeat_over``: "udp" makes ``agent``'s heartbeat loop send
        datagrams (``heartbeat_udp``), falling back to HTTP when no node acks
        one within ``datagram_timeout_s``; "http" (default) sends requests."""
        if heartbeat_over not in ("http", "udp"):
            raise InvalidInput("heartbeat_over: must be http or udp", field="heartbeat_over")
        self.heartbeat_over = heartbeat_over
        self.datagram_timeout_s = datagram_timeout_s
        self._datagrams: _Datagrams | None = None
        self._counter = 0  # the last datagram counter sent (milliseconds, rising)
        raw = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if (agent_id is None) != (keys is None):
            raise InvalidInput("keys: an agent signs with agent_id and keys together", field="keys")
        if token is not None and keys is not None:
            raise InvalidInput("token: give the admin token or an agent's keys, not both", field="token")
        self._token = token
        self.agent_id = agent_id
        self.keys = keys
        if ca_file is not None and ssl is not None:
            raise InvalidInput("ca_file: give ca_file or ssl, not both", field="ca_file")
        self._ssl = ssl if ssl is not None else client_context(ca_file) if ca_file is not None else None
        tls = self._ssl is not None or any(e.startswith("https://") for e in raw)
        self._scheme = "https" if tls else "http"
        self.endpoints = [_base(e, self._scheme) for e in raw]
        if not self.endpoints:
            raise InvalidInput("endpoints: give at least one", field="endpoints")
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self._given = len(self.endpoints)  # the endpoints given (leader hints may add more)
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._datagrams is not None and self._datagrams.transport is not None:
            self._datagrams.transport.close()
            self._datagrams = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.request_timeout_s),
                                                  connector=connector)
        return self._session

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def _prepare(self, method: str, path: str, params: dict[str, Any] | None, body: bytes,
                 headers: dict[str, str] | None = None) -> tuple[yarl.URL, dict[str, str]]:
        """The URL (sent exactly as signed) and the headers with the credential."""
        path_qs = path + ("?" + urllib.parse.urlencode({k: str(v) for k, v in params.items()}) if params else "")
        url = yarl.URL(self.endpoint + path_qs, encoded=True)
        out = dict(headers or {})
        if self._token is not None:
            out["Authorization"] = f"Bearer {self._token}"
        elif self.keys is not None and self.agent_id is not None:
            host = url.raw_authority
            out["Authorization"] = authorization_header(self.agent_id, self.keys.sign, method, host, path_qs, body,
                                                        int(time.time() * 1000), secrets.token_urlsafe(18))
        return url, out

    def _move(self, hint: str | None) -> None:
        if hint:
            hinted = _base(hint, self._scheme)
            if hinted not in self.endpoints:
                self.endpoints.append(hinted)
            self._current = self.endpoints.index(hinted)
        else:
            self._current = (self._current + 1) % len(self.endpoints)

    # -- transport -----------------------------------------------------------------

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                      params: dict[str, Any] | None = None, *, timeout_s: float | None = None,
                      attempt_timeout_s: float | None = None) -> Any:
        """One API call with retries across nodes until the deadline.

        Raises the mapped error for 4xx answers at once; ``Unavailable`` or
        ``OutcomeUnknown`` when the deadline passes without an answer.
        ``attempt_timeout_s`` bounds one attempt (long-polls need more than
        the default ``request_timeout_s``).
        """
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        per_attempt = {"timeout": aiohttp.ClientTimeout(total=attempt_timeout_s)} if attempt_timeout_s else {}
        last: CoordinatorError = Unavailable("no attempt made")
        attempt = 0
        while True:
            attempt += 1
            hint = None
            retry_after = backoff_s(attempt)
            try:
                data = json.dumps(body).encode() if body is not None else b""
                url, headers = self._prepare(method, path, params, data,
                                             {"Content-Type": "application/json"} if body is not None else None)
                async with self._http().request(method, url, data=data if body is not None else None,
                                                headers=headers, **per_attempt) as response:
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
                            retry_after = backoff_s(attempt, float(response.headers["Retry-After"]))
                    elif status == 504 and error.get("code") == "timeout":
                        raise RequestTimeout(message)
                    elif status == 504:
                        last = OutcomeUnknown(message)
                    elif status == 400:
                        raise InvalidInput(message, field=error.get("field"))
                    elif status == 429:
                        raise RateLimited(message, retry_after_s=float(error.get("retry_after_s", 1.0)))
                    elif status in _ERRORS:
                        raise _ERRORS[status](message, **{k: v for k, v in error.items()
                                                          if k not in ("code", "message")})
                    else:
                        raise ApiError(status, message)
            except aiohttp.ClientConnectorCertificateError as exc:  # the request never left
                last = Unavailable(f"{self.endpoint}: {exc.certificate_error} (pass ca_file= with the cluster's CA?)")
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last = OutcomeUnknown(f"{type(exc).__name__} talking to {self.endpoint}")
            # Move on after any failure, also the last one: the next call must not
            # go back to a node that just hung or refused.
            self._move(hint)
            if time.monotonic() + retry_after > deadline:
                if isinstance(last, OutcomeUnknown):
                    raise self._unknown(last, method, path, body, params, timeout_s, attempt_timeout_s)
                raise last
            await asyncio.sleep(retry_after)

    def _unknown(self, error: OutcomeUnknown, method: str, path: str, body: dict[str, Any] | None,
                 params: dict[str, Any] | None, timeout_s: float | None,
                 attempt_timeout_s: float | None) -> OutcomeUnknown:
        """The error with what a safe retry needs: the request id the request
        carried (None for a request without one, a read) and ``retry()``,
        which sends the same request again with the same id and returns the
        API's answer (the first outcome, if the first attempt took effect)."""
        request_id = body.get("request_id") if isinstance(body, dict) else None

        async def retry() -> Any:
            return await self.request(method, path, body, params, timeout_s=timeout_s,
                                      attempt_timeout_s=attempt_timeout_s)

        return RetriableOutcomeUnknown(error.message, retry, request_id=request_id)

    @staticmethod
    def _request_id() -> str:
        return secrets.token_hex(12)

    # -- cluster -------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/status")

    async def members(self) -> list[dict[str, Any]]:
        """The members (``id``, ``raft``, ``http``) as the answering node knows them."""
        return (await self.request("GET", "/v1/members"))["members"]

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

    async def list(self, prefix: str = "", *, limit: int | None = None,
                   consistency: str = "linearizable") -> list[dict[str, Any]]:
        """Every key under ``prefix`` in key order, page by page (1000 a page),
        or the first ``limit``. Each page is its own read: a key written
        between pages shows only if it sorts after the pages already read."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"prefix": prefix, "consistency": consistency}
        while limit is None or len(out) < limit:
            params["limit"] = LIST_PAGE if limit is None else min(LIST_PAGE, limit - len(out))
            page = await self.request("GET", "/v1/kv", params=params)
            out.extend(page["items"])
            if not page.get("more") or not page["items"]:
                break
            params["start_after"] = page["items"][-1]["key"]
        return out

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
        return Registration.of(await self.request("POST", "/v1/agents", body))

    async def join(self, agent_type: str, *, metadata: dict[str, Any] | None = None, ttl_s: float = 10.0,
                   endpoint: str | None = None, weight: int | None = None) -> Registration:
        """Register this client's own agent (``agent_id`` and ``keys``) with
        its public key, the request signed by that key; solves the cluster's
        join proof of work first when the admin asks for one."""
        if self.keys is None or self.agent_id is None:
            raise InvalidInput("keys: joining needs the client's agent_id and keys", field="keys")
        body: dict[str, Any] = {"id": self.agent_id, "type": agent_type, "ttl_s": ttl_s, "metadata": metadata or {},
                                "public_key": self.keys.public_key, "request_id": self._request_id()}
        if endpoint:
            body["endpoint"] = endpoint
        if weight is not None:
            body["weight"] = weight
        puzzle = await self.request("GET", "/v1/join/challenge")
        if puzzle["difficulty"]:
            nonce = await asyncio.to_thread(crypto.solve_pow, puzzle["challenge"], self.agent_id,
                                            self.keys.public_key, puzzle["difficulty"])
            body["proof"] = {"challenge": puzzle["challenge"], "nonce": nonce}
        return Registration.of(await self.request("POST", "/v1/agents", body))

    async def heartbeat(self, agent_id: str, *, health: str | None = None) -> dict[str, Any]:
        """Renew ``agent_id``'s lease. Any node answers a heartbeat from memory
        (the nodes gossip what they heard), so each agent starts at the
        endpoint its id hashes to among those given, which spreads agents over
        the cluster instead of putting every heartbeat through one node; a 503
        or a failed connection moves on (to the leader when the node names
        it), as every request does."""
        if self._given > 1:
            self._current = zlib.crc32(agent_id.encode("utf-8", "surrogatepass")) % self._given
        body = {"health": health} if health else {}
        return await self.request("POST", f"/v1/agents/{_seg(agent_id)}/heartbeat", body)

    async def heartbeat_udp(self, registration: Registration, *, health: str | None = None) -> str:
        """Renew the lease with one datagram (``coordinator.datagram``) to
        the nodes the registration named, starting at the one the agent's id
        hashes to, each waited for ``datagram_timeout_s``, a new counter per
        send; when none acks, or the registration has no datagram key, an
        HTTP ``heartbeat``. Returns "udp" or "http" (how it was renewed);
        raises ``NotFound`` when a node says the lease is not the agent's
        current one (register again), as HTTP does for an unknown agent."""
        addresses = registration.heartbeat_udp
        if registration.heartbeat_key is not None and addresses:
            if self._datagrams is None:
                _, self._datagrams = await asyncio.get_running_loop().create_datagram_endpoint(
                    _Datagrams, local_addr=("0.0.0.0", 0))
            start = zlib.crc32(registration.id.encode("utf-8", "surrogatepass")) % len(addresses)
            for k in range(len(addresses)):
                self._counter = max(self._counter + 1, time.time_ns() // 1_000_000)
                beat = datagram.Beat(registration.lease_id, self._counter, health)
                status = await self._datagrams.exchange(registration.heartbeat_key, beat,
                                                        addresses[(start + k) % len(addresses)],
                                                        self.datagram_timeout_s)
                if status == datagram.OK:
                    return "udp"
                if status == datagram.UNKNOWN_LEASE:
                    raise NotFound(f"lease {registration.lease_id} of {registration.id!r} is not current")
        await self.heartbeat(registration.id, health=health)
        return "http"

    async def deregister(self, agent_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.request("DELETE", f"/v1/agents/{_seg(agent_id)}", {"request_id": self._request_id()})

    async def agents(self, agent_type: str | None = None) -> list[dict[str, Any]]:
        params = {"type": agent_type} if agent_type else None
        return (await self.request("GET", "/v1/agents", params=params))["agents"]

    async def describe_agent(self, agent_id: str, *, consistency: str = "linearizable") -> dict[str, Any] | None:
        """One registered agent as ``agents`` lists it; None when not registered."""
        try:
            return await self.request("GET", f"/v1/agents/{_seg(agent_id)}", params={"consistency": consistency})
        except NotFound:
            return None

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
                if self.heartbeat_over == "udp":
                    await self.heartbeat_udp(registration)
                else:
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

    @contextlib.asynccontextmanager
    async def lock(self, name: str, holder: str | None = None, *, ttl_s: float = 15.0,
                   wait_s: float = 0.0, poll_s: float = 0.2) -> AsyncIterator[HeldLock]:
        """Hold lock ``name`` while inside: ``async with client.lock("jobs/a", "w1") as held``.

        Waits up to ``wait_s`` for another holder to let go (``Conflict`` when
        it did not), then renews the lease every third of ``ttl_s`` (the holder
        acquiring again) and releases it on the way out. ``holder`` defaults to
        the agent this client signs as. If the lease could not be renewed for
        ``ttl_s`` or someone else holds the lock, ``held.lost`` is set: pass
        ``held.token`` as the fence of your writes so that a lost lock cannot
        corrupt anything, and check ``held.lost`` between steps."""
        holder = holder if holder is not None else self.agent_id
        if not holder:
            raise InvalidInput("holder: name the holder (or sign as an agent)", field="holder")
        deadline = time.monotonic() + wait_s
        while (token := await self.acquire(name, holder, ttl_s=ttl_s)) is None:
            if time.monotonic() + poll_s > deadline:
                raise Conflict(f"lock {name!r} is held by another holder (waited {wait_s:g} s)")
            await asyncio.sleep(random.uniform(poll_s / 2, poll_s))
        held = HeldLock(name, holder, token)
        keeper = asyncio.create_task(self._keep_lock(held, ttl_s))
        try:
            yield held
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if not held.lost.is_set():
                with contextlib.suppress(CoordinatorError):
                    await self.release(name, holder)

    async def _keep_lock(self, held: HeldLock, ttl_s: float) -> None:
        renewed = time.monotonic()
        while not held.lost.is_set():
            await asyncio.sleep(ttl_s / 3)
            try:
                token = await self.acquire(held.name, held.holder, ttl_s=ttl_s)
            except (Unavailable, OutcomeUnknown):
                if time.monotonic() - renewed >= ttl_s:
                    held.lost.set()  # not renewed for a whole TTL: it may have expired
                continue
            if token != held.token:
                held.lost.set()  # expired and taken (None), or expired and taken again by us (a new token)
            renewed = time.monotonic()

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

    # -- bus ---------------------------------------------------------------------------------------

    async def publish(self, topic: str, message: dict[str, Any] | None = None, *,
                      messages: list[dict[str, Any]] | None = None,
                      seal_to: list[str] | None = None) -> dict[str, Any]:
        """Publish one message (answer: its id, offset, routed) or a batch in one
        log entry (``messages=``; answer: ``{"topic", "messages": [...]}``).
        Retries reuse one request id, so a retried publish is stored once.
        ``seal_to``: encrypt each payload for these agents and sign it as this
        client's agent (see ``seal``); the cluster cannot read it."""
        if (message is None) == (messages is None):
            raise InvalidInput("give message or messages", field="message")
        if seal_to is not None:
            # The source names the sealing agent: ``open`` refuses an envelope whose
            # message says it came from someone else (the node's default names the caller).
            if message is not None:
                message = {"source": self.agent_id, **message,
                           "payload": await self.seal(message.get("payload"), seal_to)}
            else:
                messages = [{"source": self.agent_id, **m, "payload": await self.seal(m.get("payload"), seal_to)}
                            for m in messages or []]
        body: dict[str, Any] = dict(message) if message is not None else {"messages": messages}
        body["request_id"] = self._request_id()
        return await self.request("POST", f"/v1/topics/{_seg(topic)}/messages", body)

    async def seal(self, payload: Any, recipients: list[str]) -> dict[str, Any]:
        """``payload`` encrypted for ``recipients`` (their public keys come from
        the registry) and signed by this client's agent."""
        if self.keys is None or self.agent_id is None:
            raise InvalidInput("keys: sealing needs the client's agent_id and keys", field="keys")
        keys = {}
        for recipient in recipients:
            agent = await self.request("GET", f"/v1/agents/{_seg(recipient)}")
            if not agent.get("public_key"):
                raise InvalidInput(f"seal_to: agent {recipient!r} registered no public key", field="seal_to")
            keys[recipient] = agent["public_key"]
        return crypto.seal(payload, sender_id=self.agent_id, sender=self.keys, recipients=keys)

    async def open(self, message: dict[str, Any]) -> Any:
        """A delivered message's payload, opened if it is sealed: the sender's
        signature is checked with the key the registry holds for it, and the
        message must come from that sender. ``SealError`` when it was tampered
        with, signed by someone else, or not sealed for this agent."""
        payload = message.get("payload")
        if not crypto.is_sealed(payload):
            return payload
        if self.keys is None or self.agent_id is None:
            raise crypto.SealError("not a recipient: this client has no agent keys")
        sender = payload.get("sender")
        if not isinstance(sender, str):
            raise crypto.SealError("malformed sender", "sender")
        if message.get("source") not in (None, sender):
            raise crypto.SealError(f"tampered: sealed by {sender!r} but sent by {message.get('source')!r}", "sender")
        try:
            agent = await self.request("GET", f"/v1/agents/{_seg(sender)}")
        except NotFound:
            raise crypto.SealError(f"bad signature by {sender!r}: the sender is not registered", "sender") from None
        return crypto.open_sealed(payload, recipient_id=self.agent_id, recipient=self.keys,
                                  sender_public_key=agent.get("public_key") or "")

    def publisher(self, topic: str, *, max_batch: int = 100, linger_s: float = 0.002) -> Publisher:
        """Client-side batching: ``await pub.publish(msg)`` returns when the
        batch holding ``msg`` committed; see ``Publisher``."""
        return Publisher(self, topic, max_batch=max_batch, linger_s=linger_s)

    async def subscribe(self, topic: str, *, group: str | None = None, filter: str | None = None,
                        guarantee: str = "at-least-once", ack_timeout_s: float | None = None,
                        max_attempts: int | None = None, start: str | None = None, start_offset: int | None = None,
                        start_time_ms: int | None = None, agent: str | None = None, key: str | None = None) -> str:
        """A subscription id. ``group`` joins (or creates) a consumer group.
        ``key`` (``payload.NAME`` or ``headers.NAME``): messages of one key go
        to one member, in publish order, one in flight at a time."""
        body: dict[str, Any] = {"topic": topic, "guarantee": guarantee, "request_id": self._request_id()}
        optional = {"group": group, "filter": filter, "ack_timeout_s": ack_timeout_s, "max_attempts": max_attempts,
                    "start": start, "start_offset": start_offset, "start_time_ms": start_time_ms, "agent": agent,
                    "key": key}
        body.update({k: v for k, v in optional.items() if v is not None})
        return (await self.request("POST", "/v1/subscriptions", body))["id"]

    async def unsubscribe(self, subscription: str) -> bool:
        try:
            await self.request("DELETE", f"/v1/subscriptions/{_seg(subscription)}",
                               {"request_id": self._request_id()})
        except NotFound:
            return False
        return True

    async def subscription(self, subscription: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/subscriptions/{_seg(subscription)}")

    @staticmethod
    def _consumer(subscription: str | None, agent: str | None) -> str:
        if (subscription is None) == (agent is None):
            raise InvalidInput("give a subscription or an agent (its inbox)", field="subscription")
        return f"/v1/subscriptions/{_seg(subscription)}" if subscription else f"/v1/agents/{_seg(agent or '')}"

    async def fetch(self, subscription: str | None = None, *, agent: str | None = None, max: int = 10,
                    wait_s: float = 0.0) -> list[dict[str, Any]]:
        """Deliveries (``delivery_id``, ``attempt``, ``message``...), waiting up
        to ``wait_s`` for the first. Ack what you processed; the rest comes
        back after the ack timeout."""
        path = self._consumer(subscription, agent) + "/messages"
        answer = await self.request("GET", path, params={"max": max, "wait_s": wait_s},
                                    timeout_s=self.timeout_s + wait_s,
                                    attempt_timeout_s=wait_s + self.request_timeout_s)
        return answer["messages"]

    async def ack(self, subscription: str | None, delivery_ids: list[str], *,
                  agent: str | None = None) -> dict[str, Any]:
        path = self._consumer(subscription, agent) + "/ack"
        return await self.request("POST", path, {"delivery_ids": delivery_ids, "request_id": self._request_id()})

    async def nack(self, subscription: str | None, delivery_ids: list[str], *, agent: str | None = None,
                   delay_s: float | None = None, dead_letter: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"delivery_ids": delivery_ids, "dead_letter": dead_letter,
                                "request_id": self._request_id()}
        if delay_s is not None:
            body["delay_s"] = delay_s
        return await self.request("POST", self._consumer(subscription, agent) + "/nack", body)

    async def dead_letters(self, subscription: str | None, *, agent: str | None = None,
                           limit: int = 100) -> list[dict[str, Any]]:
        path = self._consumer(subscription, agent) + "/dlq"
        return (await self.request("GET", path, params={"limit": limit}))["dead_letters"]

    async def redrive(self, subscription: str | None, delivery_ids: list[str] | None = None, *,
                      agent: str | None = None) -> list[str]:
        """Dead letters back to the queue (the chosen ones, or all); their delivery ids."""
        return (await self._dlq(subscription, agent, "redrive", delivery_ids))["redriven"]

    async def purge(self, subscription: str | None, delivery_ids: list[str] | None = None, *,
                    agent: str | None = None) -> int:
        return (await self._dlq(subscription, agent, "purge", delivery_ids))["purged"]

    async def _dlq(self, subscription: str | None, agent: str | None, action: str,
                   delivery_ids: list[str] | None) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": self._request_id()}
        if delivery_ids is not None:
            body["delivery_ids"] = delivery_ids
        return await self.request("POST", self._consumer(subscription, agent) + f"/dlq/{action}", body)

    async def configure_topic(self, topic: str, *, max_messages: int | None = None,
                              max_age_s: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"request_id": self._request_id()}
        if max_messages is not None:
            body["max_messages"] = max_messages
        if max_age_s is not None:
            body["max_age_s"] = max_age_s
        return await self.request("PUT", f"/v1/topics/{_seg(topic)}", body)

    async def topic_messages(self, topic: str, *, from_offset: int = 1, limit: int = 100) -> list[dict[str, Any]]:
        """Retained messages of ``topic`` from an offset (no subscription needed)."""
        answer = await self.request("GET", f"/v1/topics/{_seg(topic)}/messages",
                                    params={"from_offset": from_offset, "limit": limit})
        return answer["messages"]

    async def call(self, topic: str, payload: Any, *, timeout_s: float = 30.0,
                   headers: dict[str, str] | None = None, message_id: str | None = None) -> dict[str, Any]:
        """Request/reply: the response message. ``RequestTimeout`` when no one
        answers within ``timeout_s``; ``Unavailable`` when no one subscribes."""
        body: dict[str, Any] = {"type": "request", "payload": payload, "timeout_s": timeout_s,
                                "id": message_id or f"req-{self._request_id()}"}
        if headers:
            body["headers"] = headers
        answer = await self.request("POST", f"/v1/topics/{_seg(topic)}/request", body,
                                    timeout_s=timeout_s + self.timeout_s, attempt_timeout_s=timeout_s + 5)
        return answer["response"]

    async def reply(self, request_message: dict[str, Any], payload: Any, *,
                    headers: dict[str, str] | None = None) -> dict[str, Any]:
        """Answer a request message received from ``fetch``."""
        message: dict[str, Any] = {"type": "response", "correlationId": request_message["id"], "payload": payload}
        if headers:
            message["headers"] = headers
        return await self.publish(request_message["replyTo"], message)

    async def stream(self, subscription: str | None = None, *, agent: str | None = None, max: int = 100,
                     auto_ack: bool = False) -> AsyncIterator[dict[str, Any]]:
        """Deliveries as Server-Sent Events; reconnects to any node. Without
        ``auto_ack``, ack what you processed (what you do not comes back)."""
        path = self._consumer(subscription, agent) + "/stream"
        params = {"max": str(max), "auto_ack": "true" if auto_ack else "false"}
        async for delivery in self._sse(path, params):
            yield delivery

    async def consume(self, subscription: str | None, handler: Any, *, agent: str | None = None, max: int = 100,
                      wait_s: float = 5.0, stop: asyncio.Event | None = None, remember: int = 100_000) -> None:
        """Fetch, call ``await handler(delivery)`` for each, ack in batches,
        until ``stop`` is set. A handler that raises gets its delivery nacked.

        Deliveries whose handler already succeeded are remembered (the last
        ``remember`` delivery ids), so a redelivery after a lost ack is acked
        again without calling the handler twice: with exactly-once messages
        this is the consumer's half of exactly-once processing (within one
        process; across restarts, keep the ids with your side effects).
        """
        done: dict[str, None] = {}
        while stop is None or not stop.is_set():
            try:
                deliveries = await self.fetch(subscription, agent=agent, max=max, wait_s=wait_s)
            except (Unavailable, OutcomeUnknown):
                continue
            acks, nacks = [], []
            for delivery in deliveries:
                delivery_id = delivery["delivery_id"]
                if delivery_id not in done:
                    try:
                        await handler(delivery)
                    except Exception:
                        nacks.append(delivery_id)
                        continue
                    done[delivery_id] = None
                    while len(done) > remember:
                        done.pop(next(iter(done)))
                if delivery["guarantee"] != "at-most-once":
                    acks.append(delivery_id)
            with contextlib.suppress(Unavailable, OutcomeUnknown):
                if acks:
                    await self.ack(subscription, acks, agent=agent)
                if nacks:
                    await self.nack(subscription, [n for n in nacks if not n.startswith("v.")], agent=agent)

    # -- load-balanced invocation ---------------------------------------------------------------

    async def invoke(self, agent_type: str, payload: Any = None, *, data: bytes | None = None,
                     content_type: str | None = None, key: str | None = None, timeout_s: float | None = None,
                     idempotency_key: str | None = None, idempotent: bool = False, caller: str | None = None,
                     request_id: str | None = None) -> InvokeAnswer:
        """Call one agent of ``agent_type`` through the cluster: ``payload`` as
        JSON (or raw ``data``). Returns the agent's answer whatever its status;
        raises the node's own refusals: ``InvalidInput``, ``RateLimited``,
        ``Unavailable`` (no agent, every circuit open), ``BadGateway``,
        ``RequestTimeout``. Goes to another node only when one could not be
        reached (the request never left). ``key`` feeds consistent hashing;
        ``idempotent``/``idempotency_key`` allow the node to retry elsewhere."""
        if data is None:
            data = json.dumps(payload).encode()
            content_type = content_type or "application/json"
        headers = {"X-Request-Id": request_id or self._request_id()}
        for name, value in (("Content-Type", content_type), ("X-Coord-Key", key), ("Idempotency-Key", idempotency_key),
                            ("X-Coord-Caller", caller)):
            if value is not None:
                headers[name] = value
        if timeout_s is not None:
            headers["X-Coord-Timeout"] = str(timeout_s)
        if idempotent:
            headers["X-Coord-Idempotent"] = "1"
        limit = aiohttp.ClientTimeout(total=(timeout_s or MAX_INVOKE_TIMEOUT_S) + 5.0)  # the node's own limit first
        last: CoordinatorError = Unavailable("no node reachable")
        for _ in range(len(self.endpoints)):
            url, signed = self._prepare("POST", f"/v1/services/{_seg(agent_type)}/invoke", None, data, headers)
            try:
                async with self._http().post(url, data=data, headers=signed, timeout=limit) as response:
                    body = await response.read()
                    if "X-Coord-Agent" in response.headers:
                        # The parsed headers as they are: a plain dict would make
                        # names case-sensitive, and aiohttp spells some its own way
                        # ("X-Request-ID").
                        return InvokeAnswer(response.status, body, response.headers,
                                            response.headers["X-Coord-Agent"],
                                            int(response.headers.get("X-Coord-Attempts", "1")))
                    raise _node_error(response.status, body)
            except aiohttp.ClientConnectorError:
                last = Unavailable(f"node {self.endpoint} is unreachable")
                self._move(None)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise OutcomeUnknown(f"{type(exc).__name__} invoking {agent_type!r} through {self.endpoint}") from None
        raise last

    # -- sagas ---------------------------------------------------------------------------------------

    async def start_saga(self, steps: list[dict[str, Any]], *, saga_id: str | None = None, name: str | None = None,
                         input: Any = None, compensation_retry: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start a saga (``steps`` as in ``POST /v1/sagas``); ``{"id", "state"}``.
        Retried across nodes under one request id, so it starts once."""
        body: dict[str, Any] = {"steps": steps, "request_id": self._request_id()}
        for field, value in (("id", saga_id), ("name", name), ("input", input),
                             ("compensation_retry", compensation_retry)):
            if value is not None:
                body[field] = value
        return await self.request("POST", "/v1/sagas", body)

    async def saga(self, saga_id: str, *, consistency: str = "linearizable") -> dict[str, Any] | None:
        """The saga with its steps and committed history; None when unknown."""
        try:
            return await self.request("GET", f"/v1/sagas/{_seg(saga_id)}", params={"consistency": consistency})
        except NotFound:
            return None

    async def sagas(self, state: str | None = None, *, limit: int = 1000) -> list[dict[str, Any]]:
        """Sagas (without their history) in creation order, optionally in one
        state; an agent sees those it may start (``saga`` on the name)."""
        out: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": min(limit, 1000)}
        if state is not None:
            params["state"] = state
        while len(out) < limit:
            page = await self.request("GET", "/v1/sagas", params=params)
            out.extend(page["sagas"])
            if page["next"] is None:
                break
            params["after"] = page["next"]
        return out[:limit]

    async def cancel_saga(self, saga_id: str, reason: str | None = None) -> dict[str, Any]:
        """Stop a running saga and compensate what it did; 409 (Conflict) when it already ended."""
        body: dict[str, Any] = {"request_id": self._request_id()}
        if reason is not None:
            body["reason"] = reason
        return await self.request("POST", f"/v1/sagas/{_seg(saga_id)}/cancel", body)

    async def wait_saga(self, saga_id: str, *, timeout_s: float = 60.0, poll_s: float = 0.1) -> dict[str, Any]:
        """The saga once it is completed, compensated or failed-stuck;
        ``RequestTimeout`` if it is still going after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            saga = await self.saga(saga_id)
            if saga is None:
                raise NotFound(f"saga {saga_id!r} does not exist")
            if saga["state"] in ("completed", "compensated", "failed-stuck"):
                return saga
            if time.monotonic() + poll_s > deadline:
                raise RequestTimeout(f"saga {saga_id!r} is still {saga['state']} after {timeout_s:g} s")
            await asyncio.sleep(poll_s)

    # -- event store and projections ------------------------------------------------------------

    async def append(self, stream: str, events: list[dict[str, Any]], *,
                     expected_version: int | str = "any") -> dict[str, Any]:
        """Append ``events`` ({"type", "data", "metadata"?, "id"?}) to ``stream``
        atomically. ``expected_version``: a version, -1 or "no_stream", "exists"
        or "any". Raises ``Conflict`` when the stream is elsewhere. Retried
        safely: the request id makes a retry answer the first outcome."""
        body = {"events": events, "expected_version": expected_version, "request_id": self._request_id()}
        return await self.request("POST", f"/v1/streams/{_seg(stream)}", body)

    async def read_stream(self, stream: str, *, from_version: int = 0, limit: int = 1000,
                          backward: bool = False, consistency: str = "linearizable") -> dict[str, Any] | None:
        """One page of the stream (with its snapshot, if any), or None when it does not exist."""
        params = {"from_version": from_version, "limit": limit, "consistency": consistency,
                  "direction": "backward" if backward else "forward"}
        if backward and from_version == 0:
            del params["from_version"]  # from the last version down
        try:
            return await self.request("GET", f"/v1/streams/{_seg(stream)}", params=params)
        except NotFound:
            return None

    async def snapshot_stream(self, stream: str, version: int, state: Any, *, truncate: bool = False) -> dict[str, Any]:
        body = {"version": version, "state": state, "truncate": truncate, "request_id": self._request_id()}
        return await self.request("PUT", f"/v1/streams/{_seg(stream)}/snapshot", body)

    async def delete_stream(self, stream: str, *, expected_version: int | str = "any") -> dict[str, Any]:
        body = {"expected_version": expected_version, "request_id": self._request_id()}
        return await self.request("DELETE", f"/v1/streams/{_seg(stream)}", body)

    async def category_events(self, category: str, *, from_position: int = 1,
                              limit: int = 1000) -> dict[str, Any]:
        return await self.request("GET", f"/v1/categories/{_seg(category)}/events",
                                  params={"from_position": from_position, "limit": limit})

    async def watch_category(self, category: str, *,
                             from_position: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every event appended to the category's streams from ``from_position``
        on (default: from now); reconnects to any node and resumes after the
        last position seen. Raises ``Compacted`` when events it would have
        seen were truncated below a snapshot."""
        async for event in self._sse(f"/v1/categories/{_seg(category)}/watch", {}, "from_position", from_position):
            yield event

    async def put_projection(self, name: str, definition: dict[str, Any]) -> dict[str, Any]:
        body = {**definition, "request_id": self._request_id()}
        return await self.request("PUT", f"/v1/projections/{_seg(name)}", body)

    async def projection(self, name: str, *, consistency: str = "linearizable") -> dict[str, Any] | None:
        try:
            return await self.request("GET", f"/v1/projections/{_seg(name)}", params={"consistency": consistency})
        except NotFound:
            return None

    async def rebuild_projection(self, name: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/projections/{_seg(name)}/rebuild",
                                  {"request_id": self._request_id()})

    async def delete_projection(self, name: str) -> dict[str, Any]:
        return await self.request("DELETE", f"/v1/projections/{_seg(name)}", {"request_id": self._request_id()})

    async def put_processor(self, name: str, definition: dict[str, Any]) -> dict[str, Any]:
        """Define (or redefine, starting empty) a stream processor: a window or a pattern."""
        return await self.request("PUT", f"/v1/processors/{_seg(name)}",
                                  {**definition, "request_id": self._request_id()})

    async def processor(self, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", f"/v1/processors/{_seg(name)}")
        except NotFound:
            return None

    async def delete_processor(self, name: str) -> dict[str, Any]:
        return await self.request("DELETE", f"/v1/processors/{_seg(name)}", {"request_id": self._request_id()})

    # -- events and watches ----------------------------------------------------------------------

    async def events(self, from_seq: int = 1, *, limit: int = 1000) -> list[dict[str, Any]]:
        """Cluster events from ``from_seq``; an agent does not see ``saga.*`` and
        ``lock.*`` events of sagas and locks it has no permission on."""
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

    async def _sse(self, path: str, params: dict[str, str], cursor_name: str | None = None,
                   cursor: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """A Server-Sent Events stream that reconnects to any node (resuming
        after the last ``id:`` when ``cursor_name`` is given). 404 is
        ``NotFound``, 410 and a compaction event ``Compacted``."""
        last_id: int | None = None if cursor is None else cursor - 1
        failures = 0
        while True:
            query = dict(params)
            if cursor_name is not None and last_id is not None:
                query[cursor_name] = str(last_id + 1)
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
                url, headers = self._prepare("GET", path, query, b"")
                async with self._http().get(url, headers=headers, timeout=timeout) as response:
                    if response.status in (404, 410):
                        message = (await response.json()).get("error", {}).get("message", "")
                        raise (NotFound if response.status == 404 else Compacted)(message)
                    if response.status != 200:
                        raise Unavailable(f"{path} answered {response.status}")
                    failures = 0
                    async for event_type, event_id, data in _sse_events(response):
                        if event_type == "error" and data.get("code") == "compacted":
                            raise Compacted(data.get("message", "compacted"))
                        if event_type == "error":
                            raise ApiError(500, data.get("message", "stream error"))
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


class Publisher:
    """Client-side batching for one topic: messages published within
    ``linger_s`` of each other (up to ``max_batch``) travel as one request
    and one log entry. ``publish`` returns the message's own answer (id,
    offset) once its batch committed, or raises the batch's error.

    Use from one event loop; ``async with client.publisher(topic) as pub``.
    """

    def __init__(self, client: CoordinatorClient, topic: str, *, max_batch: int = 100,
                 linger_s: float = 0.002) -> None:
        if not 1 <= max_batch <= 1000:
            raise InvalidInput("max_batch: must be between 1 and 1000", field="max_batch")
        self.client = client
        self.topic = topic
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.batches = 0
        self._pending: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.flush()

    async def publish(self, message: dict[str, Any]) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((message, future))
        if len(self._pending) >= self.max_batch:
            self._send()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._send)
        return await future

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
        task = asyncio.get_running_loop().create_task(self._deliver(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        if self._pending:
            self._send()

    async def _deliver(self, batch: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]) -> None:
        try:
            answer = await self.client.publish(self.topic, messages=[m for m, _ in batch])
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else Unavailable("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        for (_, future), result in zip(batch, answer["messages"], strict=True):
            if not future.done():
                future.set_result(result)

    async def flush(self) -> None:
        """Send what waits and return when every batch sent so far is answered."""
        self._send()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
