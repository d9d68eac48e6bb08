"""The join proof of work: the admin sets a difficulty; a join without a
solved challenge, with a forged or expired challenge, or with a wrong nonce
is a 403 that registers nothing; the client solves it by itself."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import pytest

from coordinator import crypto
from coordinator.api.auth import CHALLENGE_TTL_S, AuthSettings
from coordinator.client import CoordinatorClient
from coordinator.crypto import AgentKeys
from coordinator.errors import Forbidden, InvalidInput
from tests.coordinator.api.conftest import Harness, HarnessFactory

TOKEN = "admin-" + "t" * 26
SECRET = "c" * 32
CHALLENGE_KEY = crypto.derived_key(SECRET, crypto.KEY_JOIN_CHALLENGE)  # what the cluster MACs challenges with
DIFFICULTY = 8


@pytest.fixture
async def secure(make_harness: HarnessFactory) -> Harness:
    h = await make_harness(auth=AuthSettings(admin_token=TOKEN, cluster_secret=SECRET))
    admin = {"Authorization": f"Bearer {TOKEN}"}
    await h.call("PUT", "/v1/security", {"pow_difficulty": DIFFICULTY}, headers=admin, expect=200)
    # the agents that join here may register as workers
    await h.call("PUT", "/v1/roles/worker", {"permissions": [{"action": "serve", "pattern": "worker"}]},
                 headers=admin, expect=200)
    for agent_id in ("a1", "a2", "free"):
        await h.call("PUT", f"/v1/agents/{agent_id}/roles", {"roles": ["worker"]}, headers=admin, expect=200)
    return h


def _client(h: Harness, **kwargs: Any) -> CoordinatorClient:
    return CoordinatorClient([str(h.http.make_url(""))], timeout_s=3, **kwargs)


async def test_the_client_solves_the_puzzle_and_joins(secure: Harness) -> None:
    keys = AgentKeys.generate()
    async with _client(secure, agent_id="a1", keys=keys) as agent:
        registration = await agent.join("worker")
        assert registration.id == "a1"
    assert secure.applier.machine.registry.agents["a1"].public_key == keys.public_key


async def _refused(h: Harness, proof: Any, keys: AgentKeys, agent_id: str = "a2") -> None:
    before = h.fingerprint()
    async with _client(h, agent_id=agent_id, keys=keys) as agent:
        body = {"id": agent_id, "type": "worker", "public_key": keys.public_key}
        if proof is not None:
            body["proof"] = proof
        with pytest.raises(Forbidden, match="proof of work") as refused:
            await agent.request("POST", "/v1/agents", body)
    assert refused.value.details["permission"] == "proof_of_work"
    assert h.fingerprint() == before
    assert agent_id not in h.applier.machine.registry.agents


async def test_a_join_without_a_good_proof_is_a_403_that_changes_nothing(secure: Harness) -> None:
    keys = AgentKeys.generate()
    _, puzzle = await secure.call("GET", "/v1/join/challenge", expect=200)
    assert puzzle["difficulty"] == DIFFICULTY and puzzle["expires_in_s"] == CHALLENGE_TTL_S
    challenge = puzzle["challenge"]
    await _refused(secure, None, keys)  # no proof
    await _refused(secure, {"challenge": challenge}, keys)  # no nonce
    forged = challenge[:-1] + ("0" if challenge[-1] != "0" else "1")
    good = crypto.solve_pow(forged, "a2", keys.public_key, DIFFICULTY)
    await _refused(secure, {"challenge": forged, "nonce": good}, keys)  # not this cluster's challenge
    wrong = next(format(i, "x") for i in range(1 << 20)
                 if crypto.leading_zero_bits(crypto.pow_digest(challenge, "a2", keys.public_key,
                                                               format(i, "x"))) < DIFFICULTY)
    await _refused(secure, {"challenge": challenge, "nonce": wrong}, keys)  # does not solve it
    other = crypto.solve_pow(challenge, "someone-else", keys.public_key, DIFFICULTY)
    if crypto.leading_zero_bits(crypto.pow_digest(challenge, "a2", keys.public_key, other)) < DIFFICULTY:
        await _refused(secure, {"challenge": challenge, "nonce": other}, keys)  # solved for another id
    # expired: a challenge this cluster could have issued (signed with its secret) a while ago
    head = f"{int((time.time() - 1) * 1000)}.00112233aabbccdd"
    stale = f"{head}.{hmac.new(CHALLENGE_KEY, head.encode(), hashlib.sha256).hexdigest()[:32]}"
    solved = crypto.solve_pow(stale, "a2", keys.public_key, DIFFICULTY)
    await _refused(secure, {"challenge": stale, "nonce": solved}, keys)


async def test_a_challenge_keyed_with_the_raw_cluster_secret_is_not_the_clusters(secure: Harness) -> None:
    """Challenges are MACed with a key derived from the cluster secret (HKDF),
    never with the secret itself: one made with the raw secret is refused."""
    keys = AgentKeys.generate()
    head = f"{int((time.time() + 60) * 1000)}.00112233aabbccdd"
    raw_keyed = f"{head}.{hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).hexdigest()[:32]}"
    solved = crypto.solve_pow(raw_keyed, "a2", keys.public_key, DIFFICULTY)
    await _refused(secure, {"challenge": raw_keyed, "nonce": solved}, keys)
    derived = f"{head}.{hmac.new(CHALLENGE_KEY, head.encode(), hashlib.sha256).hexdigest()[:32]}"
    solved = crypto.solve_pow(derived, "a2", keys.public_key, DIFFICULTY)
    async with _client(secure, agent_id="a2", keys=keys) as agent:
        await agent.request("POST", "/v1/agents", {"id": "a2", "type": "worker", "public_key": keys.public_key,
                                                   "proof": {"challenge": derived, "nonce": solved}})


async def test_the_admin_joins_agents_without_a_proof_and_sets_the_difficulty(secure: Harness) -> None:
    async with _client(secure, token=TOKEN) as admin:
        await admin.register("worker", agent_id="by-admin")
        with pytest.raises(InvalidInput, match="pow_difficulty"):
            await admin.request("PUT", "/v1/security", {"pow_difficulty": 33})
        assert (await admin.request("PUT", "/v1/security", {"pow_difficulty": 0})) == {"pow_difficulty": 0,
                                                                                      "endpoint_allow": []}
    keys = AgentKeys.generate()
    async with _client(secure, agent_id="free", keys=keys) as agent:
        await agent.request("POST", "/v1/agents", {"id": "free", "type": "worker", "public_key": keys.public_key})


def test_solving_takes_about_two_to_the_difficulty_tries() -> None:
    nonce = crypto.solve_pow("c", "a", "k", 12)
    assert crypto.leading_zero_bits(crypto.pow_digest("c", "a", "k", nonce)) >= 12
    assert crypto.leading_zero_bits(b"\x00\x00\x80" + b"\x00" * 29) == 16
