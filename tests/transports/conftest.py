"""Every transport plugin behind one fixture, so one contract suite runs
against all of them (hashicorp's transport_test.go). Broker plugins talk to
the real servers on 127.0.0.1 that scripts/brokers-up.sh guarantees; each
test gets its own namespace, and what it created is removed afterwards."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import entry_points
from typing import Any

import pytest

from coordinator.ports import BusTransport

# Where this machine's broker of each plugin answers (scripts/brokers-up.sh).
URLS = {
    "memory": "memory://",
    "redis": "redis://127.0.0.1:6379/0",
    "nats": "nats://127.0.0.1:4222",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "kafka": "kafka://127.0.0.1:9092",
}
# A port nothing listens on, for "the broker is down"; with a password that must never be shown.
SECRET = "s3cret-pw"
DEAD_URLS = {
    "redis": f"redis://:{SECRET}@127.0.0.1:1/0",
    "nats": f"nats://user:{SECRET}@127.0.0.1:1",
    "rabbitmq": f"amqp://guest:{SECRET}@127.0.0.1:1/",
    "kafka": f"kafka://user:{SECRET}@127.0.0.1:1",
}
# Every plugin registered under the coordinator.transports entry points (setup.cfg):
# name -> ("module:Class", URL). A new plugin joins the suite by registering; without
# a URL above it fails test_every_plugin_says_where_its_broker_is.
PLUGINS = {ep.name: (ep.value, URLS.get(ep.name, "")) for ep in entry_points(group="coordinator.transports")}

TransportFactory = Callable[..., Awaitable[BusTransport]]


def transport_class(name: str) -> Any:
    (found,) = entry_points(group="coordinator.transports", name=name)
    return found.load()


@pytest.fixture(params=sorted(PLUGINS), ids=str)
def plugin(request: pytest.FixtureRequest) -> str:
    if request.param != "memory":
        request.applymarker(pytest.mark.integration)
    return request.param


@pytest.fixture
async def make_transport(plugin: str) -> AsyncIterator[TransportFactory]:
    """``await make_transport(ack_timeout_s=30.0, url=None)``: a started
    transport in a fresh namespace; closed (and its topics unbound) at the end."""
    made: list[tuple[BusTransport, list[str]]] = []
    namespace = f"coordtest{secrets.token_hex(4)}"

    async def make(*, ack_timeout_s: float = 30.0, url: str | None = None, start: bool = True) -> BusTransport:
        transport = transport_class(plugin)(url or PLUGINS[plugin][1], namespace=namespace, timeout_s=3.0,
                                            ack_timeout_s=ack_timeout_s)
        bound: list[str] = []
        made.append((transport, bound))
        original_bind = transport.bind

        async def bind(topic: str) -> None:
            await original_bind(topic)
            bound.append(topic)

        transport.bind = bind  # type: ignore[method-assign]
        if start:
            await transport.start()
        return transport

    yield make
    for transport, bound in made:
        for topic in bound:
            try:
                await transport.unbind(topic)
            except Exception:  # the test may have broken the connection on purpose
                pass
        await transport.close()
