"""A secure three-node cluster (``LocalCluster(secure=True)``: an admin token,
no anonymous access), end to end:

- the admin makes roles and grants; alice and bob join themselves (signed
  by the key they register) through different followers;
- what a follower forwards to the leader over HTTP (heartbeats, fetches)
  carries the principal with an HMAC of the cluster secret; a request that
  forges the principal header without it is refused;
- alice publishes a payload sealed to bob through a follower; bob fetches it
  through another node and opens it; neither the stored message nor any file
  of any node holds the plaintext; a tampered copy does not open;
- mallory, joined holding only ``serve`` on its type, may not publish to the topic;
- a signed write captured on its way to one node and replayed to another is
  refused (its signed Host names the first node), and replayed to the same
  node after that node restarted (its nonces forgotten) it applies nothing:
  it is answered with the first result.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from coordinator.api.auth import FORWARD_SIG_HEADER, PRINCIPAL_HEADER
from coordinator.client import CoordinatorClient
from coordinator.crypto import AgentKeys, SealError, authorization_header, is_sealed
from coordinator.errors import Forbidden, Unauthenticated
from coordinator.services.node import FORWARD_HEADER
from devcluster.cluster import LocalCluster
from tests.waiting import CLUSTER_POLL_S, eventually

pytestmark = pytest.mark.cluster

TOPIC = "chat.alice-bob"
CHAT = [{"action": "send", "pattern": "chat.>"}, {"action": "subscribe", "pattern": "chat.>"},
        {"action": "receive", "pattern": "chat.>"}]


def _files_holding(directory: Path, needle: bytes) -> list[Path]:
    """Every file under ``directory`` whose bytes contain ``needle``."""
    return [path for path in sorted(directory.rglob("*")) if path.is_file() and needle in path.read_bytes()]


async def _caught_up(cluster: LocalCluster, index: int) -> None:
    """Every node applied ``index`` (so its log and state hold what came before)."""
    for node_id in cluster.members:
        await asyncio.to_thread(cluster.wait_caught_up, node_id, index, 30)


def _tampered(envelope: dict[str, Any]) -> dict[str, Any]:
    """The envelope with one byte of its ciphertext flipped (still canonical base64)."""
    raw = bytearray(base64.b64decode(envelope["ciphertext"]))
    raw[-1] ^= 0x01
    return {**envelope, "ciphertext": base64.b64encode(bytes(raw)).decode()}


async def _raw(method: str, url: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
            session.request(method, url, data=body or None, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def test_sealed_messages_between_self_joined_agents_in_a_secure_cluster(make_cluster) -> None:
    cluster = make_cluster(secure=True)
    leader = cluster.wait_leader()
    follower_a, follower_b = [n for n in cluster.members if n != leader]
    urls = [cluster.url(n) for n in cluster.members]
    marker = f"plaintext-marker-{secrets.token_hex(8)}"
    control = f"control-marker-{secrets.token_hex(8)}"  # published unsealed: the grep must find it

    async with CoordinatorClient(urls, token=cluster.admin_token) as admin, \
            CoordinatorClient(cluster.url(follower_a), agent_id="alice", keys=AgentKeys.generate()) as alice, \
            CoordinatorClient(cluster.url(follower_b), agent_id="bob", keys=AgentKeys.generate()) as bob, \
            CoordinatorClient(cluster.url(leader), agent_id="mallory", keys=AgentKeys.generate()) as mallory:
        # Nothing without credentials, not even reading.
        async with CoordinatorClient(urls, timeout_s=2) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.agents()

        # The admin's roles and grants (before the agents join: grants are kept by id).
        # Registering as a type needs serve on it: without, mallory cannot join.
        await admin.request("PUT", "/v1/roles/chat", {"permissions": CHAT})
        await admin.request("PUT", "/v1/roles/chatter", {"permissions": [{"action": "serve", "pattern": "chatter"}]})
        with pytest.raises(Forbidden) as no_serve:
            await mallory.join("chatter", ttl_s=60)
        assert (no_serve.value.permission, no_serve.value.resource) == ("serve", "chatter")
        for agent_id in ("alice", "bob"):
            await admin.request("PUT", f"/v1/agents/{agent_id}/roles", {"roles": ["chat", "chatter"]})
        await admin.request("PUT", "/v1/agents/mallory/roles", {"roles": ["chatter"]})

        # Each agent joins itself through its own node, signing with the key it registers.
        await alice.join("chatter", ttl_s=60)
        await bob.join("chatter", ttl_s=60)
        await mallory.join("chatter", ttl_s=60)
        registered = {a["id"]: a["public_key"] for a in await admin.agents()}
        assert registered == {"alice": alice.keys.public_key, "bob": bob.keys.public_key,
                              "mallory": mallory.keys.public_key}

        # A heartbeat to a follower is forwarded to the leader (which keeps the
        # leases) with alice's principal and the cluster's HMAC; the follower
        # would answer 503 if the leader had refused the forward.
        assert (await alice.heartbeat("alice"))["id"] == "alice"
        assert alice.endpoints == [cluster.url(follower_a)]
        with pytest.raises(Forbidden) as not_self:
            await alice.heartbeat("bob")
        assert (not_self.value.permission, not_self.value.resource) == ("self", "bob")

        # Forging the forwarded principal without the HMAC gets nowhere, on any node.
        path = "/v1/agents/bob/heartbeat"
        for node_id in (leader, follower_a):
            for headers in ({PRINCIPAL_HEADER: "agent:bob", FORWARD_HEADER: "1"},
                            {PRINCIPAL_HEADER: "admin", FORWARD_HEADER: "1", FORWARD_SIG_HEADER: "0" * 64}):
                status, body = await _raw("POST", cluster.url(node_id) + path, headers, b"{}")
                assert status == 401, body
                assert "forwarded principal" in body["error"]["message"]
            status, body = await _raw("GET", cluster.url(node_id) + f"/v1/topics/{TOPIC}/messages",
                                      {PRINCIPAL_HEADER: "admin"})
            assert status == 401, body

        # bob subscribes through his follower; alice publishes sealed to bob through hers.
        sub = await bob.subscribe(TOPIC, start="beginning")
        await alice.publish(TOPIC, {"id": "m1", "payload": {"text": marker}}, seal_to=["bob"])
        await alice.publish(TOPIC, {"id": "m2", "payload": {"text": control}})

        # bob fetches through his follower (forwarded to the leader, which serves fetches).
        deliveries = await eventually(lambda: bob.fetch(sub, max=10, wait_s=2), "bob's deliveries", 30,
                                      interval_s=CLUSTER_POLL_S)
        assert bob.endpoints == [cluster.url(follower_b)]
        by_id = {d["message"]["id"]: d for d in deliveries}
        assert set(by_id) == {"m1", "m2"}
        sealed = by_id["m1"]["message"]
        assert is_sealed(sealed["payload"]) and list(sealed["payload"]["keys"]) == ["bob"]
        assert await bob.open(sealed) == {"text": marker}
        assert await bob.open(by_id["m2"]["message"]) == {"text": control}
        await bob.ack(sub, [d["delivery_id"] for d in deliveries])

        # alice sealed it for bob only: she cannot open her own message, and mallory
        # (not a recipient, not allowed to read the topic either) cannot.
        with pytest.raises(SealError, match="not a recipient"):
            await alice.open(sealed)
        with pytest.raises(SealError, match="not a recipient"):
            await mallory.open(sealed)

        # What the cluster stores is the envelope: no plaintext, in the API or on disk.
        stored = await admin.topic_messages(TOPIC)
        assert [m["message"]["id"] for m in stored] == ["m1", "m2"]
        assert stored[0]["message"]["payload"] == sealed["payload"]
        assert marker not in repr(stored[0])
        applied = max(cluster.status(n)["applied_index"] for n in cluster.members)
        await _caught_up(cluster, applied)
        assert await asyncio.to_thread(_files_holding, cluster.dir, control.encode()), \
            "the unsealed control message is on disk nowhere: the grep proves nothing"
        assert await asyncio.to_thread(_files_holding, cluster.dir, marker.encode()) == []

        # A tampered copy, re-published by alice herself, does not open for bob.
        await alice.publish(TOPIC, {"id": "m3", "source": "alice", "payload": _tampered(sealed["payload"])})
        tampered = await eventually(lambda: bob.fetch(sub, max=10, wait_s=2), "the tampered copy", 30,
                                    interval_s=CLUSTER_POLL_S)
        assert [d["message"]["id"] for d in tampered] == ["m3"]
        with pytest.raises(SealError, match="bad signature by 'alice'"):
            await bob.open(tampered[0]["message"])
        # nor does an envelope that someone else claims to have sent
        with pytest.raises(SealError, match="tampered"):
            await bob.open({**sealed, "source": "mallory"})

        # mallory holds no role but serve: publishing to the topic is refused, and nothing is stored.
        with pytest.raises(Forbidden) as refused:
            await mallory.publish(TOPIC, {"id": "m4", "payload": {"text": "spam"}})
        assert (refused.value.permission, refused.value.resource) == ("send", TOPIC)
        with pytest.raises(Forbidden):
            await mallory.subscribe(TOPIC)
        with pytest.raises(Forbidden):
            await mallory.fetch(sub)
        assert [m["message"]["id"] for m in await admin.topic_messages(TOPIC)] == ["m1", "m2", "m3"]


async def _signed(method: str, url: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
    """Send exactly these headers (Host included) and body: a captured request, replayed."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), skip_auto_headers=()) as session, \
            session.request(method, url, data=body, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def test_a_signed_write_replayed_to_another_node_or_after_a_restart_applies_once(make_cluster) -> None:
    cluster = make_cluster(secure=True)
    leader = cluster.wait_leader()
    first, other = [n for n in cluster.members if n != leader]
    keys = AgentKeys.generate()
    async with CoordinatorClient([cluster.url(n) for n in cluster.members], token=cluster.admin_token) as admin, \
            CoordinatorClient(cluster.url(first), agent_id="rita", keys=keys) as rita:
        await admin.request("PUT", "/v1/roles/replay", {"permissions": [
            {"action": "kv", "pattern": "replay/*"}, {"action": "serve", "pattern": "worker"}]})
        await admin.request("PUT", "/v1/agents/rita/roles", {"roles": ["replay"]})
        await rita.join("worker", ttl_s=120)

        # One signed write to `first`, as captured on the wire: no request_id of its own.
        host = cluster.specs[first].http
        path, body = "/v1/kv/replay/counter", b'{"value": 1}'
        captured = {"Host": host, "Content-Type": "application/json",
                    "Authorization": authorization_header("rita", keys.sign, "PUT", host, path, body,
                                                          int(time.time() * 1000), secrets.token_urlsafe(18))}
        status, answer = await _signed("PUT", cluster.url(first) + path, captured, body)
        assert status == 200, answer
        revision = answer["revision"]

        # Replayed to another node (its Host kept, as signed): refused, nothing written.
        status, answer = await _signed("PUT", cluster.url(other) + path, captured, body)
        assert status == 401 and "Host is not a name of this node" in answer["error"]["message"], answer
        # Replayed to the same node: its nonce was seen.
        status, answer = await _signed("PUT", cluster.url(first) + path, captured, body)
        assert status == 401 and "nonce" in answer["error"]["message"], answer

        # `first` restarts and forgets its nonces; within the clock window the replay
        # passes the signature check but is the same write: the first answer, nothing applied.
        committed = max(cluster.status(n)["commit_index"] for n in cluster.members)
        cluster.stop(first)
        cluster.start(first)
        await _caught_up(cluster, committed)  # it knows rita's key again (else the replay is a 401 for that)
        status, answer = await eventually(
            lambda: _retry_unavailable(_signed("PUT", cluster.url(first) + path, captured, body)),
            "the replay to be answered", 30, interval_s=CLUSTER_POLL_S)
        assert status == 200 and answer == {"revision": revision}, answer
        stored = await admin.get("replay/counter")
        assert stored is not None and stored["revision"] == revision and stored["version"] == 1, stored


async def _retry_unavailable(attempt: Any) -> tuple[int, Any] | None:
    """The answer, or None (try again) while the restarted node cannot serve yet."""
    try:
        status, answer = await attempt
    except (aiohttp.ClientError, TimeoutError):
        return None
    return None if status == 503 else (status, answer)
