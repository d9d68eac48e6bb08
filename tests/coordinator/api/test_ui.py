"""The dashboard's files and the cluster view it reads."""

from __future__ import annotations

from coordinator.api.auth import AuthSettings
from tests.coordinator.api.conftest import Harness, HarnessFactory


async def test_static_files_only_from_the_list(h: Harness) -> None:
    async with h.http.get("/ui") as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert "<title>coordinator</title>" in await response.text()
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        async with h.http.get(f"/ui/{name}") as response:
            assert response.status == 200 and response.content_type == kind
    for name in ("secret.txt", "..%2Fui.py", "%2e%2e", "index.html%00.js"):
        status, error = await h.call("GET", f"/ui/{name}")
        assert status == 404 and error["error"]["code"] == "not_found", name


async def test_the_cluster_view(h: Harness) -> None:
    _, view = await h.call("GET", "/v1/cluster", expect=200)
    assert view["node"] == "n1" and view["leader_id"] == "n1"
    [member] = view["members"]
    assert member["role"] == "leader" and member["reachable"] and member["self"] and member["apply_lag"] == 0


async def test_with_auth_on_the_page_is_public_and_its_data_is_not(make_harness: HarnessFactory) -> None:
    h = await make_harness(auth=AuthSettings(admin_token="a" * 40))
    async with h.http.get("/ui") as response:
        assert response.status == 200
    status, _ = await h.call("GET", "/v1/cluster")
    assert status == 401
    await h.call("GET", "/v1/cluster", headers={"Authorization": "Bearer " + "a" * 40}, expect=200)


async def test_newest_sagas_first(h: Harness) -> None:
    ids = []
    for name in ("first", "second"):
        _, saga = await h.call("POST", "/v1/sagas", {"name": name, "steps": [
            {"id": "s", "action": {"kind": "agent", "agent_type": "nobody"}}]}, expect=201)
        ids.append(saga["id"])
    _, page = await h.call("GET", "/v1/sagas?order=newest&limit=1", expect=200)
    assert [s["id"] for s in page["sagas"]] == [ids[1]] and page["next"] is None
    for query, field in (("order=sideways", "order"), ("order=newest&state=running", "order")):
        status, error = await h.call("GET", f"/v1/sagas?{query}")
        assert status == 400 and error["error"]["field"] == field
