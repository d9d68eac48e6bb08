"""A three-node cluster serving HTTPS with certificates from the dev cluster's
local CA: the client with the CA works (also through followers, whose
forwarding to the leader is itself HTTPS), plain HTTP and an untrusting
client are refused."""

from __future__ import annotations

import asyncio
import ipaddress
import stat
import subprocess
from contextlib import aclosing

import aiohttp
import pytest
from cryptography import x509

from coordinator.client import CoordinatorClient
from coordinator.errors import Unavailable
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster


async def test_tls_cluster_serves_the_client_with_the_ca_and_refuses_others(make_cluster) -> None:
    cluster = make_cluster(tls=True)
    leader = cluster.wait_leader()
    followers = [n for n in cluster.members if n != leader]
    assert all(cluster.url(n).startswith("https://") for n in cluster.members)
    ca = str(cluster.ca_file)

    # Writes through every node (a follower hands KV writes to the leader over
    # Raft) and linearizable reads through every node.
    for i, node_id in enumerate(cluster.members):
        async with CoordinatorClient(cluster.url(node_id), ca_file=ca) as client:
            assert await client.put(f"tls/{node_id}", i) >= 1
    for node_id in cluster.members:
        async with CoordinatorClient(cluster.url(node_id), ca_file=ca) as client:
            assert [item["value"] for item in await client.list("tls/")] == [0, 1, 2]
            assert (await client.get("tls/n1"))["value"] == 0

    # What a follower forwards to the leader over HTTP(S): heartbeats, bus
    # fetches and acks. Had the forward failed, the follower would answer 503
    # with the leader hint and the client would have moved to the leader.
    follower_url = cluster.url(followers[0])
    async with CoordinatorClient(follower_url, ca_file=ca) as client:
        registration = await client.register("worker", ttl_s=10)
        assert (await client.heartbeat(registration.id))["id"] == registration.id
        sub = await client.subscribe("tls-topic")
        await client.publish("tls-topic", {"id": "m1", "payload": {"n": 1}})
        deliveries = await client.fetch(sub, max=10, wait_s=5)
        assert [d["message"]["id"] for d in deliveries] == ["m1"]
        assert (await client.ack(sub, [d["delivery_id"] for d in deliveries]))["unknown"] == []
        assert client.endpoints == [follower_url]
        # Gossip between the nodes runs over HTTPS too: the follower hears from the leader.
        await eventually(lambda: _leader_contact(client), "the follower's gossip to reach the leader", 10,
                         interval_s=CLUSTER_POLL_S)
        async with asyncio.timeout(10), aclosing(client.watch("tls/", from_revision=1)) as watch:  # SSE over TLS
            first = await anext(watch)
        assert first["key"] == "tls/n1"

    # Bare host:port endpoints plus the CA mean HTTPS; so do leader hints.
    async with CoordinatorClient([cluster.specs[n].http for n in followers], ca_file=ca) as client:
        assert client.endpoint.startswith("https://")
        assert (await client.get("tls/n2"))["value"] == 1

    # Plain HTTP to a TLS port: the handshake fails, no answer.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://{cluster.specs[leader].http}/v1/status") as response:
                await response.read()

    # A client without the CA does not trust the nodes' certificates.
    async with CoordinatorClient(cluster.url(leader), timeout_s=0.5) as untrusting:
        with pytest.raises(Unavailable) as refused:
            await untrusting.put("tls/never", 1)
    assert "certificate verify failed" in refused.value.message.lower()
    async with CoordinatorClient(cluster.url(leader), ca_file=ca) as client:
        assert await client.get("tls/never") is None


def test_dev_ca_issues_node_certificates_for_loopback(make_cluster) -> None:
    cluster = make_cluster(nodes=1, start=False, tls=True)
    cluster.ensure_certs("n1")
    tls_dir = cluster.ca_file.parent
    for key in ("ca.key", "n1.key"):
        assert stat.S_IMODE((tls_dir / key).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(cluster.ca_file.read_bytes())
    node = x509.load_pem_x509_certificate((tls_dir / "n1.pem").read_bytes())
    node.verify_directly_issued_by(ca)
    san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "--tls-cert" in cluster.command("n1") and "--tls-ca" in cluster.command("n1")

    cluster.ensure_certs("n1")  # kept
    assert x509.load_pem_x509_certificate((tls_dir / "n1.pem").read_bytes()) == node


def test_a_node_with_an_unreadable_certificate_exits_with_a_clear_error(make_cluster) -> None:
    cluster = make_cluster(nodes=1, start=False, tls=True)
    cluster.ensure_secret()
    cluster.ensure_certs("n1")
    (cluster.ca_file.parent / "n1.pem").write_text("not a certificate\n")
    done = subprocess.run(cluster.command("n1"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "tls_cert: cannot load" in done.stderr


async def _leader_contact(client: CoordinatorClient) -> bool:
    status = await client.request("GET", "/v1/status")
    return status["liveness"]["gossip"]["leader_contact_fresh"] is True
