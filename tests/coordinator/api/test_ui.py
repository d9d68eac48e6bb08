"""The dashboard's files and the cluster view it reads."""

from __future__ import annotations

import json

from coordinator.api.app import make_app
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


PNG_1X1 = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def make_run(directory, name: str, verdict: dict, plot: bool = True) -> None:
    run = directory / name
    run.mkdir(parents=True)
    (run / "verdict.json").write_text(json.dumps(verdict))
    (run / "report.txt").write_text(f"report of {name}\n")
    if plot:
        (run / "latency.png").write_bytes(PNG_1X1)


async def test_chaos_runs(h: Harness, aiohttp_client, tmp_path) -> None:
    make_run(tmp_path, "20261127-101010", {"register": {"valid": True}, "locks": {"valid": True}})
    make_run(tmp_path, "20261127-111111", {"bus": {"valid": False}}, plot=False)
    (tmp_path / "notarun").mkdir()
    (tmp_path / "20261127-121212").mkdir()  # no verdict yet: a run still going
    http = await aiohttp_client(make_app(h.node, AuthSettings(allow_anonymous=True), chaos_dir=tmp_path))
    async with http.get("/v1/chaos/runs") as response:
        page = await response.json()
    assert [(r["run"], r["valid"], r["has_plot"]) for r in page["runs"]] == [
        ("20261127-111111", False, False), ("20261127-101010", True, True)]
    assert page["runs"][1]["checks"] == {"register": True, "locks": True}
    async with http.get("/v1/chaos/runs/20261127-101010") as response:
        assert (await response.json())["report"] == "report of 20261127-101010\n"
    async with http.get("/v1/chaos/runs/20261127-101010/latency.png") as response:
        assert response.content_type == "image/png" and await response.read() == PNG_1X1
    for path in ("/v1/chaos/runs/20261127-111111/latency.png", "/v1/chaos/runs/notarun",
                 "/v1/chaos/runs/..%2F..%2Fetc", "/v1/chaos/runs/20261127-121212"):
        async with http.get(path) as response:
            assert response.status == 404, path


async def test_no_chaos_directory(h: Harness) -> None:
    _, page = await h.call("GET", "/v1/chaos/runs", expect=200)
    assert page == {"directory": None, "runs": []}
