"""Topics bound to real brokers on a real three-node cluster: the leader
drives the broker from committed entries, a leader SIGKILL mid-stream loses
nothing (and duplicates nothing where the broker dedupes), and a broker
stopped by its PID holds a bounded backlog that drains when it is back.

The outage test starts its own broker process on a free port (the machine's
shared brokers stay up for everything else) and restarts it with the same
command line, the way the machine starts its own."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.client import CoordinatorClient
from coordinator.errors import Unavailable
from tests.transports.conftest import PLUGINS, transport_class
from tests.waiting import CLUSTER_POLL_S, eventually, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.integration]


def _cluster(make_cluster: Any, plugin: str, url: str, namespace: str) -> Any:
    return make_cluster(extra_args=("--transport", f"{plugin}={url}", "--transport-namespace", namespace))


async def _drain_broker(plugin: str, url: str, namespace: str, topic: str, want: int) -> list[Any]:
    """Every message the broker holds for ``topic``, through a fresh group."""
    transport = transport_class(plugin)(url, namespace=namespace, timeout_s=5.0, ack_timeout_s=30.0)
    await transport.start()
    try:
        await transport.subscribe(topic, "verify")
        got: list[Any] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            batch = await transport.fetch(topic, "verify", "v", 500, 0.5)
            if batch:
                await transport.ack(topic, "verify", [d.delivery_id for d in batch])
            got.extend(batch)
            if len({d.key for d in got}) >= want and not batch:
                break
        await transport.unbind(topic)
        return got
    finally:
        await transport.close()


async def _backlog(client: CoordinatorClient, topic: str) -> int | None:
    listing = await client.request("GET", "/v1/bindings")
    rows = [b for b in listing["bindings"] if b["topic"] == topic]
    return rows[0]["backlog"] if rows else None


@pytest.mark.parametrize("plugin", ["redis", "nats", "rabbitmq", "kafka"])
async def test_a_leader_kill_mid_stream_loses_nothing_at_the_broker(make_cluster: Any, plugin: str) -> None:
    url = PLUGINS[plugin][1]
    namespace = f"coordit{secrets.token_hex(3)}"
    cluster = _cluster(make_cluster, plugin, url, namespace)
    leader = cluster.wait_leader()
    followers = [n for n in cluster.members if n != leader]
    topic = "orders.eu"
    acknowledged: dict[str, int] = {}
    async with CoordinatorClient([cluster.url(n) for n in followers], timeout_s=20) as client:
        await client.request("PUT", f"/v1/topics/{topic}/binding", {"transport": plugin})

        async def publish(first: int, last: int) -> None:
            for start in range(first, last + 1, 20):
                batch = [{"id": f"m{i}", "payload": {"i": i}, "deliveryOptions": {"guarantee": "exactly-once"}}
                         for i in range(start, min(start + 20, last + 1))]
                answer = await client.publish(topic, messages=batch)
                for message in answer["messages"]:
                    acknowledged[message["id"]] = message["offset"]

        await publish(1, 100)
        cluster.kill(leader)
        await publish(101, 200)  # through the survivors while they elect
        new_leader = await asyncio.to_thread(cluster.wait_leader, 30, followers)
        async with CoordinatorClient(cluster.url(new_leader), timeout_s=20) as direct:
            await eventually(lambda: _zero(direct, topic), "the binding's backlog to drain", 30,
                             interval_s=CLUSTER_POLL_S)
            listing = await direct.request("GET", "/v1/bindings")
            assert listing["transports"][plugin]["ok"] is True
    assert len(acknowledged) == 200
    got = await _drain_broker(plugin, url, namespace, topic, len(set(acknowledged.values())))
    keys = [d.key for d in got]
    offsets = set(acknowledged.values())
    assert {f"{topic}:{o}" for o in offsets} <= set(keys)  # nothing acknowledged is missing at the broker
    assert {d.message["id"] for d in got} >= set(acknowledged)
    if transport_class(plugin).guarantee == "exactly-once":
        assert len(keys) == len(set(keys))  # the broker recognised what the new leader re-sent


async def _zero(client: CoordinatorClient, topic: str) -> bool:
    try:
        return await _backlog(client, topic) == 0
    except Unavailable:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Broker:
    """A private broker on a free port, in its own process group, so the test
    can SIGKILL it by its process (group) id and start it again with the very
    same command line and environment, keeping its data directory."""

    def __init__(self, plugin: str, data: Path) -> None:
        self.port = _free_port()
        self.plugin = plugin
        self.command, self.env = _broker_command(plugin, self.port, data)
        self.url = {"redis": f"redis://127.0.0.1:{self.port}/0",
                    "nats": f"nats://127.0.0.1:{self.port}",
                    "rabbitmq": f"amqp://guest:guest@127.0.0.1:{self.port}/"}[plugin]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _port_open(self.port), f"the broker to open port {self.port}", 60,
                   interval_s=CLUSTER_POLL_S)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)  # the broker's group: its pid is the group id
        except ProcessLookupError:
            return
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def _broker_command(plugin: str, port: int, data: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if plugin == "redis":
        return [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port", str(port),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(data)], env
    if plugin == "nats":
        nats = shutil.which("nats-server") or "/usr/sbin/nats-server"
        return [nats, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data)], env
    # RabbitMQ as Debian installs it, but as a second node: its own name, ports,
    # database, logs and config, so the machine's broker on 5672 is untouched.
    (data / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{port}\n")
    (data / "enabled_plugins").write_text("[].\n")
    env.update(HOME=str(data), RABBITMQ_NODENAME=f"coordtest{port}@localhost",
               RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(port),
               RABBITMQ_DIST_PORT=str(_free_port()), RABBITMQ_MNESIA_BASE=str(data / "mnesia"),
               RABBITMQ_LOG_BASE=str(data / "log"), RABBITMQ_CONFIG_FILE=str(data / "rabbitmq.conf"),
               RABBITMQ_ENABLED_PLUGINS_FILE=str(data / "enabled_plugins"))
    return ["/usr/lib/rabbitmq/bin/rabbitmq-server"], env


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("plugin", ["redis", "nats", "rabbitmq"])
async def test_a_stopped_broker_holds_a_bounded_backlog_that_drains_when_it_returns(
        make_cluster: Any, plugin: str, tmp_path: Path) -> None:
    if plugin == "rabbitmq" and not Path("/usr/lib/rabbitmq/bin/rabbitmq-server").exists():
        pytest.skip("a private RabbitMQ node needs Debian's rabbitmq-server (scripts/brokers-up.sh installs it)")
    data = tmp_path / "broker"
    data.mkdir()
    broker = _Broker(plugin, data)
    await asyncio.to_thread(broker.start)
    try:
        url = broker.url
        namespace = f"coordit{secrets.token_hex(3)}"
        cluster = _cluster(make_cluster, plugin, url, namespace)
        leader = cluster.wait_leader()
        topic = "jobs"
        async with CoordinatorClient(cluster.url(leader), timeout_s=20) as client:
            await client.request("PUT", f"/v1/topics/{topic}/binding", {"transport": plugin, "backlog_max": 30})
            await client.publish(topic, messages=[{"payload": i} for i in range(10)])
            await eventually(lambda: _zero(client, topic), "the first messages to reach the broker", 30,
                             interval_s=CLUSTER_POLL_S)

            # Stopped by its PID. RabbitMQ gets SIGTERM: a 3.10 node SIGKILLed within
            # about three seconds of a stream's declaration comes back with that stream
            # "down or inaccessible" for good (measured; docs/transports.md).
            await asyncio.to_thread(broker.kill, signal.SIGTERM if plugin == "rabbitmq" else signal.SIGKILL)
            await client.publish(topic, messages=[{"payload": i} for i in range(10, 40)])
            async with CoordinatorClient(cluster.url(leader), timeout_s=1) as impatient:
                with pytest.raises(Unavailable, match="wait for"):
                    await impatient.publish(topic, {"payload": "over"})

            async def red() -> bool:
                listing = await client.request("GET", "/v1/bindings")
                return listing["transports"][plugin]["ok"] is False and await _backlog(client, topic) == 30

            await eventually(red, "health red and the backlog held", 20, interval_s=CLUSTER_POLL_S)
            await asyncio.to_thread(broker.start)  # the same way as the first time
            await eventually(lambda: _zero(client, topic), "the backlog to drain", 60, interval_s=CLUSTER_POLL_S)
        got = await _drain_broker(plugin, url, namespace, topic, 40)
        assert sorted({d.offset for d in got}) == list(range(1, 41))
    finally:
        await asyncio.to_thread(broker.kill, signal.SIGTERM)


@pytest.mark.parametrize("plugin", ["redis", "nats", "rabbitmq", "kafka"])
async def test_a_bound_topic_is_consumed_through_the_cluster_across_a_leader_kill(make_cluster: Any,
                                                                                 plugin: str) -> None:
    """Subscribe, fetch and ack through followers (served by the leader from
    the broker); after the leader dies, the rest arrives through the new one
    and nothing acked is handed out again (the acked keys are committed)."""
    url = PLUGINS[plugin][1]
    namespace = f"coordit{secrets.token_hex(3)}"
    cluster = _cluster(make_cluster, plugin, url, namespace)
    leader = cluster.wait_leader()
    followers = [n for n in cluster.members if n != leader]
    topic = "tasks"
    async with CoordinatorClient([cluster.url(n) for n in followers], timeout_s=20) as client:
        await client.request("PUT", f"/v1/topics/{topic}/binding", {"transport": plugin})
        sub = await client.subscribe(topic, group="workers")
        await client.publish(topic, messages=[{"id": f"t{i}", "payload": i} for i in range(40)])
        acked: list[int] = []
        while len(acked) < 20:
            got = await client.fetch(sub, max=20 - len(acked), wait_s=2)
            await client.ack(sub, [d["delivery_id"] for d in got])
            acked.extend(d["message"]["payload"] for d in got)
        cluster.kill(leader)
        await asyncio.to_thread(cluster.wait_leader, 30, followers)
        rest: list[int] = []

        async def the_rest_came() -> bool:
            try:
                got = await client.fetch(sub, max=20, wait_s=1)
                if got:
                    await client.ack(sub, [d["delivery_id"] for d in got])
            except Unavailable:
                return False
            rest.extend(d["message"]["payload"] for d in got)
            return len(set(rest)) >= 20

        await eventually(the_rest_came, lambda: f"the other 20 messages after the failover, got {sorted(rest)}", 40,
                         interval_s=0)
        assert sorted(set(acked) | set(rest)) == list(range(40))  # nothing lost
        assert not set(acked) & set(rest)  # nothing acked came back
        assert len(acked) == len(set(acked))
    cleaner = transport_class(plugin)(url, namespace=namespace, timeout_s=5.0)
    await cleaner.start()
    try:
        await cleaner.unbind(topic)
    finally:
        await cleaner.close()
