"""Locks with fencing tokens and leader elections over HTTP."""

from __future__ import annotations

import pytest

from tests.coordinator.api.conftest import Harness
from tests.waiting import eventually


async def test_acquire_answers_a_fencing_token(h: Harness) -> None:
    status, body = await h.call("POST", "/v1/locks/db", {"holder": "w1", "ttl_s": 10})
    assert status == 200
    assert isinstance(body["fencing_token"], int) and body["fencing_token"] > 0
    _, lock = await h.call("GET", "/v1/locks/db", expect=200)
    assert lock["holder"] == "w1"
    assert lock["fencing_token"] == body["fencing_token"]
    assert lock["ttl_s"] == 10
    assert lock["lease_remaining_s"] == 10


async def test_other_holder_gets_409_and_changes_nothing(h: Harness) -> None:
    _, first = await h.call("POST", "/v1/locks/db", {"holder": "w1", "ttl_s": 10}, expect=200)
    status, body = await h.call("POST", "/v1/locks/db", {"holder": "w2", "ttl_s": 10})
    assert status == 409
    assert body["error"]["code"] == "conflict"
    _, lock = await h.call("GET", "/v1/locks/db", expect=200)
    assert lock["holder"] == "w1" and lock["fencing_token"] == first["fencing_token"]


async def test_same_holder_refresh_keeps_the_token_and_renews_the_lease(h: Harness) -> None:
    _, first = await h.call("POST", "/v1/locks/db", {"holder": "w1", "ttl_s": 2}, expect=200)
    await h.advance_and_tick(1.5)
    _, again = await h.call("POST", "/v1/locks/db", {"holder": "w1", "ttl_s": 2}, expect=200)
    assert again["fencing_token"] == first["fencing_token"]
    assert again.get("refreshed") is True
    await h.advance_and_tick(1.5)  # 3 s after the grant, 1.5 s after the refresh
    _, lock = await h.call("GET", "/v1/locks/db", expect=200)
    assert lock["fencing_token"] == first["fencing_token"]
    assert len(await h.events("lock.acquired")) == 1


async def test_release_by_holder_then_next_grant_has_larger_token(h: Harness) -> None:
    _, first = await h.call("POST", "/v1/locks/db", {"holder": "w1"}, expect=200)
    status, body = await h.call("DELETE", "/v1/locks/db", {"holder": "w1"})
    assert status == 200 and body == {"released": True}
    status, _ = await h.call("GET", "/v1/locks/db")
    assert status == 404
    _, second = await h.call("POST", "/v1/locks/db", {"holder": "w2"}, expect=200)
    assert second["fencing_token"] > first["fencing_token"]


async def test_release_by_non_holder_is_409_and_the_lock_stays(h: Harness) -> None:
    _, first = await h.call("POST", "/v1/locks/db", {"holder": "w1"}, expect=200)
    status, body = await h.call("DELETE", "/v1/locks/db", {"holder": "w2"})
    assert status == 409
    assert body["error"]["code"] == "conflict"
    _, lock = await h.call("GET", "/v1/locks/db", expect=200)
    assert lock["holder"] == "w1" and lock["fencing_token"] == first["fencing_token"]


async def test_release_of_a_free_lock_is_404(h: Harness) -> None:
    status, body = await h.call("DELETE", "/v1/locks/free", {"holder": "w1"})
    assert status == 404
    assert body["error"]["code"] == "not_found"


async def test_lock_ttl_expiry_releases_it(h: Harness) -> None:
    _, first = await h.call("POST", "/v1/locks/db", {"holder": "w1", "ttl_s": 2}, expect=200)
    await h.advance_and_tick(1.9)
    await h.call("GET", "/v1/locks/db", expect=200)
    await h.advance_and_tick(0.2)
    await eventually(lambda: "db" not in h.applier.machine.locks.locks, "the lock to expire")
    status, _ = await h.call("GET", "/v1/locks/db")
    assert status == 404
    released = await h.events("lock.released")
    assert len(released) == 1
    assert released[0]["data"] == {"name": "db", "holder": "w1", "fencing_token": first["fencing_token"],
                                   "reason": "expired"}
    assert h.node.leases.expired_locks == 1

    _, second = await h.call("POST", "/v1/locks/db", {"holder": "w2", "ttl_s": 2}, expect=200)
    assert second["fencing_token"] > first["fencing_token"]
    # The stale holder's release is refused now.
    status, _ = await h.call("DELETE", "/v1/locks/db", {"holder": "w1"})
    assert status == 409


async def test_lock_names_may_contain_slashes(h: Harness) -> None:
    _, body = await h.call("POST", "/v1/locks/jobs/nightly", {"holder": "w1"}, expect=200)
    _, lock = await h.call("GET", "/v1/locks/jobs/nightly", expect=200)
    assert lock["name"] == "jobs/nightly" and lock["fencing_token"] == body["fencing_token"]
    status, _ = await h.call("GET", "/v1/locks/jobs")
    assert status == 404
    await h.call("DELETE", "/v1/locks/jobs/nightly", {"holder": "w1"}, expect=200)


async def test_lock_acquire_is_idempotent_by_request_id(h: Harness) -> None:
    _, first = await h.call("POST", "/v1/locks/db", {"holder": "w1", "request_id": "grab-1"}, expect=200)
    await h.call("DELETE", "/v1/locks/db", {"holder": "w1"}, expect=200)
    # A late retry of the first acquire must not grant the lock again.
    _, again = await h.call("POST", "/v1/locks/db", {"holder": "w1", "request_id": "grab-1"}, expect=200)
    assert again == first
    status, _ = await h.call("GET", "/v1/locks/db")
    assert status == 404


async def test_election_campaign_leader_resign(h: Harness) -> None:
    status, won = await h.call("POST", "/v1/elections/scheduler/campaign", {"candidate": "a", "ttl_s": 10})
    assert status == 200
    assert won["elected"] is True and won["leader"] == "a"
    token = won["fencing_token"]

    status, body = await h.call("POST", "/v1/elections/scheduler/campaign", {"candidate": "b", "ttl_s": 10})
    assert status == 409 and body["error"]["code"] == "conflict"

    _, leader = await h.call("GET", "/v1/elections/scheduler", expect=200)
    assert leader["leader"] == "a" and leader["fencing_token"] == token
    assert leader["since_ms"] == h.clock.now_ms()

    status, _ = await h.call("POST", "/v1/elections/scheduler/resign", {"candidate": "b"})
    assert status == 409
    status, _ = await h.call("POST", "/v1/elections/scheduler/resign", {"candidate": "a"})
    assert status == 200
    status, body = await h.call("GET", "/v1/elections/scheduler")
    assert status == 404 and body["error"]["code"] == "not_found"

    _, next_term = await h.call("POST", "/v1/elections/scheduler/campaign", {"candidate": "b"}, expect=200)
    assert next_term["leader"] == "b" and next_term["fencing_token"] > token


async def test_election_leader_that_stops_renewing_is_replaced(h: Harness) -> None:
    _, won = await h.call("POST", "/v1/elections/e/campaign", {"candidate": "a", "ttl_s": 2}, expect=200)
    await h.advance_and_tick(1.5)
    await h.call("POST", "/v1/elections/e/campaign", {"candidate": "a", "ttl_s": 2}, expect=200)  # renew
    await h.advance_and_tick(1.5)
    _, leader = await h.call("GET", "/v1/elections/e", expect=200)
    assert leader["leader"] == "a"
    await h.advance_and_tick(1)
    await eventually(lambda: "election/e" not in h.applier.machine.locks.locks, "the leadership to lapse")
    _, next_term = await h.call("POST", "/v1/elections/e/campaign", {"candidate": "b"}, expect=200)
    assert next_term["fencing_token"] > won["fencing_token"]


async def test_elections_do_not_collide_with_same_named_locks(h: Harness) -> None:
    await h.call("POST", "/v1/locks/scheduler", {"holder": "x"}, expect=200)
    _, won = await h.call("POST", "/v1/elections/scheduler/campaign", {"candidate": "a"}, expect=200)
    assert won["leader"] == "a"


@pytest.mark.parametrize("method", ["POST", "DELETE", "GET"])
async def test_the_election_namespace_is_not_reachable_through_locks(h: Harness, method: str) -> None:
    await h.call("POST", "/v1/elections/leader/campaign", {"candidate": "a", "ttl_s": 5}, expect=200)
    before = h.fingerprint()
    body = {"holder": "intruder", "ttl_s": 5} if method != "GET" else None
    status, answer = await h.call(method, "/v1/locks/election/leader", body)
    assert status == 400 and answer["error"]["field"] == "name"
    assert h.fingerprint() == before
    _, leader = await h.call("GET", "/v1/elections/leader", expect=200)
    assert leader["leader"] == "a"


# The 400s the lock commands' parse gives, as the routes answered them before
# (coordinator.commands.locks): an election names its holder "candidate".
BAD_LOCK_REQUESTS = [
    ("POST", "/v1/locks/db", {"holder": "", "ttl_s": 10}, "holder: must have 1 to 256 characters"),
    ("POST", "/v1/locks/db", {"ttl_s": 10}, "holder: must be a string"),
    ("DELETE", "/v1/locks/db", {"holder": "a\x01"}, "holder: must not contain control characters"),
    ("POST", "/v1/locks/db", {"holder": "w1", "ttl_s": 0.5}, "ttl_s: must be between 1.0 and 86400.0 seconds"),
    ("POST", "/v1/elections/e/campaign", {"candidate": ""}, "candidate: must have 1 to 256 characters"),
    ("POST", "/v1/elections/e/campaign", {"candidate": 7}, "candidate: must be a string"),
    ("POST", "/v1/elections/e/resign", {}, "candidate: must be a string"),
    # two bad fields: the holder is answered first, as always
    ("POST", "/v1/locks/db", {"holder": "", "ttl_s": 0.1}, "holder: must have 1 to 256 characters"),
    ("POST", "/v1/elections/e/campaign", {"candidate": "", "ttl_s": 0.1}, "candidate: must have 1 to 256 characters"),
]


@pytest.mark.parametrize(("method", "path", "body", "message"), BAD_LOCK_REQUESTS,
                         ids=[f"{m} {p} {msg}" for m, p, _, msg in BAD_LOCK_REQUESTS])
async def test_bad_lock_requests_name_the_field_sent(h: Harness, method: str, path: str, body: dict,
                                                     message: str) -> None:
    status, answer = await h.call(method, path, body)
    assert status == 400
    assert answer["error"]["message"] == message
    assert answer["error"]["field"] == message.partition(":")[0]
