"""Key/value over HTTP: the DESIGN contract, listing, CAS, idempotency and fencing."""

from __future__ import annotations

import pytest

from tests.coordinator.api.conftest import Harness


async def test_put_then_get_returns_value_and_revision(h: Harness) -> None:
    status, put = await h.call("PUT", "/v1/kv/color", {"value": {"hue": "red", "n": [1, 2.5, None, True]}})
    assert status == 200
    assert set(put) == {"revision"}
    got = await h.get("color")
    assert got is not None
    assert got["key"] == "color"
    assert got["value"] == {"hue": "red", "n": [1, 2.5, None, True]}
    assert got["revision"] == put["revision"]
    assert got["create_revision"] == put["revision"]
    assert got["version"] == 1


async def test_overwrite_moves_revision_and_version(h: Harness) -> None:
    first = await h.put("k", 1)
    second = await h.put("k", 2)
    assert second == first + 1
    got = await h.get("k")
    assert got == {"key": "k", "value": 2, "revision": second, "create_revision": first, "version": 2}


async def test_get_missing_key_is_404_json(h: Harness) -> None:
    status, body = await h.call("GET", "/v1/kv/nothing-here")
    assert status == 404
    assert body["error"]["code"] == "not_found"
    assert "nothing-here" in body["error"]["message"]


async def test_null_is_a_value_not_an_absence(h: Harness) -> None:
    await h.put("nullish", None)
    got = await h.get("nullish")
    assert got is not None and got["value"] is None


async def test_keys_with_slashes(h: Harness) -> None:
    revision = await h.put("a/b/c", "deep")
    await h.put("a/b", "shallow")
    assert (await h.get("a/b/c"))["value"] == "deep"
    assert (await h.get("a/b"))["value"] == "shallow"
    assert (await h.get("a/b/c"))["revision"] == revision
    # A key may even end in "/cas": only POST .../cas is the CAS route.
    await h.put("x/cas", "not a cas")
    assert (await h.get("x/cas"))["value"] == "not a cas"
    await h.call("DELETE", "/v1/kv/a/b/c", expect=200)
    assert await h.get("a/b/c") is None
    assert (await h.get("a/b"))["value"] == "shallow"


async def test_cas_on_value(h: Harness) -> None:
    await h.put("cfg", {"v": 1})
    status, body = await h.call("POST", "/v1/kv/cfg/cas", {"expected": {"v": 1}, "value": {"v": 2}})
    assert status == 200
    revision = body["revision"]
    assert (await h.get("cfg"))["value"] == {"v": 2}

    before = h.fingerprint()[2]
    status, body = await h.call("POST", "/v1/kv/cfg/cas", {"expected": {"v": 1}, "value": {"v": 3}})
    assert status == 409
    assert body["error"]["code"] == "conflict"
    got = await h.get("cfg")
    assert got["value"] == {"v": 2} and got["revision"] == revision
    assert h.fingerprint()[2] == before


async def test_cas_tells_true_from_one(h: Harness) -> None:
    await h.put("flag", True)
    status, _ = await h.call("POST", "/v1/kv/flag/cas", {"expected": 1, "value": False})
    assert status == 409
    assert (await h.get("flag"))["value"] is True


async def test_cas_expected_null_creates_a_missing_key_only(h: Harness) -> None:
    status, _ = await h.call("POST", "/v1/kv/fresh/cas", {"expected": None, "value": "first"})
    assert status == 200
    status, _ = await h.call("POST", "/v1/kv/fresh/cas", {"expected": None, "value": "second"})
    assert status == 409
    assert (await h.get("fresh"))["value"] == "first"


async def test_cas_on_revision(h: Harness) -> None:
    # expected_revision 0 means "absent".
    status, body = await h.call("POST", "/v1/kv/r/cas", {"expected_revision": 0, "value": "a"})
    assert status == 200
    revision = body["revision"]
    status, _ = await h.call("POST", "/v1/kv/r/cas", {"expected_revision": 0, "value": "b"})
    assert status == 409
    status, _ = await h.call("POST", "/v1/kv/r/cas", {"expected_revision": revision + 100, "value": "b"})
    assert status == 409
    status, body = await h.call("POST", "/v1/kv/r/cas", {"expected_revision": revision, "value": "c"})
    assert status == 200
    assert (await h.get("r"))["value"] == "c"


async def test_delete(h: Harness) -> None:
    await h.put("gone", 1)
    status, body = await h.call("DELETE", "/v1/kv/gone")
    assert status == 200
    assert "revision" in body
    assert await h.get("gone") is None
    status, body = await h.call("DELETE", "/v1/kv/gone")
    assert status == 404
    assert body["error"]["code"] == "not_found"


async def test_list_with_prefix_and_pagination(h: Harness) -> None:
    for name in ["app/a", "app/b", "app/c", "app/d", "app/e", "apple", "other/x"]:
        await h.put(name, name.upper())
    _, page = await h.call("GET", "/v1/kv?prefix=app/&limit=2", expect=200)
    assert [i["key"] for i in page["items"]] == ["app/a", "app/b"]
    assert page["more"] is True
    assert page["items"][0]["value"] == "APP/A"
    keys = [i["key"] for i in page["items"]]
    while page["more"]:
        _, page = await h.call("GET", f"/v1/kv?prefix=app/&limit=2&start_after={keys[-1]}", expect=200)
        keys += [i["key"] for i in page["items"]]
    assert keys == ["app/a", "app/b", "app/c", "app/d", "app/e"]
    assert page["revision"] == h.applier.machine.kv.revision

    _, everything = await h.call("GET", "/v1/kv", expect=200)
    assert [i["key"] for i in everything["items"]] == ["app/a", "app/b", "app/c", "app/d", "app/e", "apple",
                                                       "other/x"]
    assert everything["more"] is False
    _, none = await h.call("GET", "/v1/kv?prefix=zzz", expect=200)
    assert none["items"] == [] and none["more"] is False


async def test_stale_read_serves_local_state_without_a_barrier(h: Harness) -> None:
    await h.put("s", "v")
    barriers = h.node.reads.barriers
    _, got = await h.call("GET", "/v1/kv/s?consistency=stale", expect=200)
    assert got["value"] == "v"
    _, listed = await h.call("GET", "/v1/kv?consistency=stale", expect=200)
    assert [i["key"] for i in listed["items"]] == ["s"]
    assert h.node.reads.barriers == barriers
    await h.call("GET", "/v1/kv/s", expect=200)
    assert h.node.reads.barriers == barriers + 1


@pytest.mark.parametrize("how", ["body", "header"])
async def test_request_id_dedupes_a_retried_write(h: Harness, how: str) -> None:
    def send(value: object) -> dict:
        if how == "body":
            return {"body": {"value": value, "request_id": "req-1"}}
        return {"body": {"value": value}, "headers": {"Idempotency-Key": "req-1"}}

    _, first = await h.call("PUT", "/v1/kv/once", **send("first"), expect=200)
    _, again = await h.call("PUT", "/v1/kv/once", **send("first"), expect=200)
    assert again["revision"] == first["revision"]
    got = await h.get("once")
    assert got["version"] == 1
    assert h.applier.machine.kv.revision == first["revision"]
    # The same id with a different body is not a retry: refused, naming the field, and nothing changes.
    _, third = await h.call("PUT", "/v1/kv/once", **send("changed"), expect=409)
    assert third["error"]["message"].startswith("request_id:")
    assert (await h.get("once"))["value"] == "first"
    assert h.applier.machine.kv.revision == first["revision"]


async def test_request_id_reused_for_a_delete_deletes_nothing_and_says_so(h: Harness) -> None:
    await h.call("PUT", "/v1/kv/keep", {"value": 1, "request_id": "r-7"}, expect=200)
    status, body = await h.call("DELETE", "/v1/kv/keep", {"request_id": "r-7"})
    assert status == 409
    assert body["error"]["code"] == "conflict" and "request_id" in body["error"]["message"]
    assert (await h.get("keep"))["value"] == 1
    # The genuine retry of the put is still answered with its first result.
    _, again = await h.call("PUT", "/v1/kv/keep", {"value": 1, "request_id": "r-7"}, expect=200)
    assert again["revision"] == h.applier.machine.kv.revision


async def test_request_id_dedupes_a_cas_conflict_too(h: Harness) -> None:
    await h.put("c", 1)
    body = {"expected": 0, "value": 2, "request_id": "cas-1"}
    status, _ = await h.call("POST", "/v1/kv/c/cas", body)
    assert status == 409
    await h.put("c", 0)
    # The retry answers the logged outcome (a conflict), it does not re-run the CAS.
    status, _ = await h.call("POST", "/v1/kv/c/cas", body)
    assert status == 409
    assert (await h.get("c"))["value"] == 0


async def test_fenced_write_with_the_current_token(h: Harness) -> None:
    _, lock = await h.call("POST", "/v1/locks/db", {"holder": "w1", "ttl_s": 30}, expect=200)
    fence = {"lock": "db", "token": lock["fencing_token"]}
    await h.put("guarded", "by w1", fence=fence)
    assert (await h.get("guarded"))["value"] == "by w1"
    status, _ = await h.call("POST", "/v1/kv/guarded/cas", {"expected": "by w1", "value": "cas", "fence": fence})
    assert status == 200
    status, _ = await h.call("DELETE", "/v1/kv/guarded", {"fence": fence})
    assert status == 200


async def test_fenced_write_after_release_is_refused(h: Harness) -> None:
    _, lock = await h.call("POST", "/v1/locks/db", {"holder": "w1", "ttl_s": 30}, expect=200)
    fence = {"lock": "db", "token": lock["fencing_token"]}
    await h.put("guarded", "original", fence=fence)
    await h.call("DELETE", "/v1/locks/db", {"holder": "w1"}, expect=200)

    revision = h.applier.machine.kv.revision
    status, body = await h.call("PUT", "/v1/kv/guarded", {"value": "late write", "fence": fence})
    assert status == 409
    assert body["error"]["code"] == "conflict"
    status, _ = await h.call("DELETE", "/v1/kv/guarded", {"fence": fence})
    assert status == 409
    got = await h.get("guarded")
    assert got["value"] == "original"
    assert h.applier.machine.kv.revision == revision


async def test_fenced_write_with_an_old_token_is_refused(h: Harness) -> None:
    _, old = await h.call("POST", "/v1/locks/db", {"holder": "w1", "ttl_s": 30}, expect=200)
    await h.call("DELETE", "/v1/locks/db", {"holder": "w1"}, expect=200)
    _, new = await h.call("POST", "/v1/locks/db", {"holder": "w2", "ttl_s": 30}, expect=200)
    assert new["fencing_token"] > old["fencing_token"]
    await h.put("guarded", "by w2", fence={"lock": "db", "token": new["fencing_token"]})

    status, _ = await h.call("PUT", "/v1/kv/guarded", {"value": "zombie w1",
                                                      "fence": {"lock": "db", "token": old["fencing_token"]}})
    assert status == 409
    status, _ = await h.call("POST", "/v1/kv/guarded/cas", {
        "expected": "by w2", "value": "zombie w1", "fence": {"lock": "db", "token": old["fencing_token"]}})
    assert status == 409
    assert (await h.get("guarded"))["value"] == "by w2"


async def test_write_sees_its_own_effect_immediately(h: Harness) -> None:
    for i in range(5):
        await h.put("counter", i)
        assert (await h.get("counter"))["value"] == i


# The 400s the kv commands' parse gives, as the routes answered them before (coordinator.commands.kv).
BAD_KV_REQUESTS = [
    ("PUT", "/v1/kv/k", {}, "value: is required"),
    ("PUT", "/v1/kv/k", {"value": 1, "fence": "db"}, "fence: must be an object"),
    ("PUT", "/v1/kv/k", {"value": 1, "fence": {"lock": "db", "token": 1, "x": 0}}, "fence.x: unknown field"),
    ("PUT", "/v1/kv/k", {"value": 1, "fence": {"token": 1}}, "fence.lock: must be a string"),
    ("DELETE", "/v1/kv/k", {"fence": {"lock": "db", "token": -1}},
     "fence.token: must be between 0 and 9223372036854775807"),
    ("POST", "/v1/kv/k/cas", {"value": 1}, "expected: give exactly one of expected and expected_revision"),
    ("POST", "/v1/kv/k/cas", {"value": 1, "expected": 1, "expected_revision": None},
     "expected_revision: must be an integer"),
    ("POST", "/v1/kv/k/cas", {"value": 1, "expected_revision": -1},
     "expected_revision: must be between 0 and 9223372036854775807"),
    ("PUT", "/v1/kv/" + "k" * 1025, {"value": 1}, "key: must have 1 to 1024 characters"),
    ("PUT", "/v1/kv/a%7Fb", {"value": 1}, "key: must not contain control characters"),
]


@pytest.mark.parametrize(("method", "path", "body", "message"), BAD_KV_REQUESTS,
                         ids=[f"{m} {p[:20]} {msg}" for m, p, _, msg in BAD_KV_REQUESTS])
async def test_bad_kv_writes_name_the_field(h: Harness, method: str, path: str, body: dict, message: str) -> None:
    status, answer = await h.call(method, path, body)
    assert status == 400
    assert answer["error"]["message"] == message
    assert answer["error"]["field"] == message.partition(":")[0]
