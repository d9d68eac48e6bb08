"""Real node processes on loopback for cluster tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from chaos.proxy import Faults, Proxy
from devcluster.cluster import LocalCluster, free_base_port


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def make_cluster(tmp_path, request) -> Iterator:
    """``make_cluster(nodes=3, env=None, start=True, tls=False, secure=False, engine="raft")``: a LocalCluster in
    tmp_path, stopped (by PID) at the end; its logs are printed when the test failed. ``secure``:
    nodes require credentials (``cluster.admin_token``), no anonymous access."""
    made: list[LocalCluster] = []

    def make(nodes: int = 3, env: dict[str, str] | None = None, start: bool = True,
             extra_args: tuple[str, ...] = (), proxied: bool = False, tls: bool = False,
             secure: bool = False, engine: str = "raft",
             pbft_fault: dict[str, str] | None = None) -> LocalCluster:
        cluster = LocalCluster(tmp_path / f"cluster{len(made)}", base_port=free_base_port(), nodes=nodes, env=env,
                               extra_args=extra_args, proxied=proxied, tls=tls, secure=secure, engine=engine,
                               pbft_fault=pbft_fault)
        made.append(cluster)
        if start:
            cluster.start_all()
            cluster.wait_leader(30)
        return cluster

    yield make
    report = getattr(request.node, "rep_call", None)
    for cluster in made:
        cluster.stop_all()
        if report is not None and report.failed:
            for node_id in cluster.specs:
                print(f"--- {node_id} log ---\n{cluster.log_tail(node_id, 60)}")


@asynccontextmanager
async def proxied_cluster(make_cluster: Callable[..., LocalCluster]) -> AsyncIterator[tuple[LocalCluster, Proxy]]:
    """A cluster whose Raft links run through a fault proxy, started; at the
    end its nodes are stopped (by PID) and the proxy closed."""
    cluster = make_cluster(proxied=True, start=False)
    proxy = Proxy([(link.name, link.listen_port, link.target_port) for link in cluster.links.values()])
    await proxy.start()
    try:
        cluster.start_all()
        yield cluster, proxy
    finally:
        await asyncio.to_thread(cluster.stop_all)
        await proxy.stop()


def isolate(cluster: LocalCluster, proxy: Proxy, node_id: str) -> None:
    """Drop everything on every Raft link to and from ``node_id``."""
    for link in cluster.links.values():
        if node_id in (link.dialer, link.target):
            proxy.set(link.name, Faults(drop_a_to_b=True, drop_b_to_a=True))
