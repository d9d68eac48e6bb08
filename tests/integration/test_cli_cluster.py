"""The ``coordinator`` command line against a real secure three-node cluster
(an admin token file, no anonymous access), each command a subprocess as a
user runs it: the endpoints and the token file come from COORD_ENDPOINTS and
COORD_TOKEN_FILE, as a shell that exported them gives them.

One cluster serves the whole module (each start costs seconds); each test
uses its own keys, locks, elections and topics.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.client import CoordinatorClient
from devcluster.cluster import LocalCluster, free_base_port

pytestmark = pytest.mark.cluster

CLI_TIMEOUT_S = 60.0  # one CLI run, far above what it needs: a hung run fails instead of hanging the suite


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    low = int(os.environ.get("COORD_BASE_PORT", "0"))
    base = free_base_port(low=low, high=low + 1000) if low else free_base_port()
    made = LocalCluster(tmp_path_factory.mktemp("cli") / "cluster", base_port=base, secure=True)
    made.start_all()
    try:
        made.wait_leader(30)
        yield made
    finally:
        made.stop_all()


@pytest.fixture(scope="module")
def env(cluster: LocalCluster) -> dict[str, str]:
    """The environment of every CLI run: no COORD_* of the caller's, the
    endpoints (all three) and the admin token file of this cluster."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COORD_")}
    return {**clean, "COORD_ENDPOINTS": ",".join(cluster.specs[n].http for n in cluster.members),
            "COORD_TOKEN_FILE": str(cluster.admin_token_file)}


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """A CLI run that holds something; its first table row read (it printed what it holds)."""
    return subprocess.Popen([sys.executable, "-m", "coordinator.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop(process: subprocess.Popen[str]) -> None:
    """Kill a holding run the test did not end (by its own PID)."""
    if process.poll() is None:
        process.kill()
        process.wait()


def held_row(process: subprocess.Popen[str]) -> list[str]:
    """The row under the header a holding command prints once it holds
    (readline returns '' if it exited instead)."""
    assert process.stdout is not None
    header = process.stdout.readline()
    row = process.stdout.readline()
    assert header and row, f"exited {process.wait(5)}: {process.stderr.read() if process.stderr else ''}"
    return row.split()


def ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, (run.returncode, run.stderr)
    return run.stdout


def test_members_and_status_with_the_admin_token_from_the_environment(cluster: LocalCluster,
                                                                      env: dict[str, str]) -> None:
    listed = json.loads(ok(cli(env, "members", "list", "-w", "json")))["members"]
    assert sorted(m["id"] for m in listed) == ["n1", "n2", "n3"]
    rows = ok(cli(env, "status")).splitlines()
    assert rows[0].split()[:4] == ["ID", "HTTP", "RAFT", "ROLE"] and len(rows) == 4
    assert sum(" leader " in row for row in rows) == 1

    # members add used to go without the token: a 401 on every secure cluster. Now the
    # token reaches the node, which judges the request itself: a 400 naming the field.
    refused = cli(env, "members", "add", "--id", "n9", "--raft", "not-an-address", "--http", "127.0.0.1:1")
    assert (refused.returncode, refused.stderr) == (2, "coordinator: raft: must be host:port\n")
    anonymous = cli({k: v for k, v in env.items() if k != "COORD_TOKEN_FILE"},
                    "members", "add", "--id", "n9", "--raft", "127.0.0.1:1", "--http", "127.0.0.1:2")
    assert anonymous.returncode == 2 and "needs credentials" in anonymous.stderr
    assert sorted(m["id"] for m in json.loads(ok(cli(env, "members", "list", "-w", "json")))["members"]) == \
        ["n1", "n2", "n3"]


def test_kv_put_get_list_del_and_watch(env: dict[str, str]) -> None:
    first = json.loads(ok(cli(env, "kv", "put", "cli/a", "hello", "-w", "json")))["revision"]
    ok(cli(env, "kv", "put", "cli/b", "-", "--json", stdin='{"n": [1, 2]}\n'))
    assert ok(cli(env, "kv", "get", "cli/a", "--value-only")) == "hello\n"
    assert json.loads(ok(cli(env, "kv", "get", "cli/b", "-w", "json")))["value"] == {"n": [1, 2]}
    assert [i["key"] for i in json.loads(ok(cli(env, "kv", "list", "cli/", "-w", "json")))["items"]] == \
        ["cli/a", "cli/b"]
    ok(cli(env, "kv", "del", "cli/a"))

    missing = cli(env, "kv", "get", "cli/a")
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", "coordinator: key 'cli/a' not found\n")
    assert cli(env, "kv", "del", "cli/a").returncode == 1

    # From the first put's revision, so the changes are there before the watch starts.
    watched = ok(cli(env, "kv", "watch", "cli/", "--from-revision", str(first), "--count", "3", "-w", "json"))
    changes = [json.loads(line) for line in watched.splitlines()]
    assert [(c["type"], c["key"]) for c in changes] == [("put", "cli/a"), ("put", "cli/b"), ("delete", "cli/a")]
    assert changes[0]["revision"] == first


# The command run under the lock: it asks the cluster itself who holds the lock, and
# exits 7 only when that is the CLI's holder with the fencing token it was handed.
CHECK_HELD = textwrap.dedent("""
    import json, os, sys, urllib.request
    token = open(os.environ["COORD_TOKEN_FILE"]).read().strip()
    endpoint = os.environ["COORD_ENDPOINTS"].split(",")[0]
    request = urllib.request.Request(f"http://{endpoint}/v1/locks/" + os.environ["COORD_LOCK_NAME"],
                                     headers={"Authorization": "Bearer " + token})
    lock = json.load(urllib.request.urlopen(request, timeout=10))
    held = lock["holder"] == "worker" and lock["fencing_token"] == int(os.environ["COORD_LOCK_TOKEN"])
    print("held" if held else f"not held: {lock}")
    sys.exit(7 if held else 5)
""")


def test_lock_runs_a_command_while_holding_and_passes_its_status_through(env: dict[str, str]) -> None:
    run = cli(env, "lock", "cli-lock", "--holder", "worker", "--ttl", "5", "--", sys.executable, "-c", CHECK_HELD)
    assert (run.returncode, run.stdout, run.stderr) == (7, "held\n", "")
    assert cli(env, "lock", "cli-lock", "--holder", "other", "--", "true").returncode == 0  # released at the end


def test_lock_without_a_command_holds_until_sigterm_and_releases(env: dict[str, str]) -> None:
    with start(env, "lock", "cli-held", "--holder", "a", "--ttl", "5") as holder:
        try:
            name, who, token = held_row(holder)
            assert (name, who) == ("cli-held", "a") and int(token) > 0
            taken = cli(env, "lock", "cli-held", "--holder", "b")
            assert (taken.returncode, taken.stderr) == (1, "coordinator: lock 'cli-held' is held by another holder\n")
            holder.send_signal(signal.SIGTERM)
            assert holder.wait(CLI_TIMEOUT_S) == 130
        finally:
            stop(holder)
    assert cli(env, "lock", "cli-held", "--holder", "b", "--", "true").returncode == 0


def test_elect_campaign_leader_and_resign(env: dict[str, str]) -> None:
    with start(env, "elect", "campaign", "cli-election", "c1", "--ttl", "3") as campaign:
        try:
            election, leader, token = held_row(campaign)
            assert (election, leader) == ("cli-election", "c1")
            shown = json.loads(ok(cli(env, "elect", "leader", "cli-election", "-w", "json")))
            assert (shown["leader"], shown["fencing_token"]) == ("c1", int(token))
            ok(cli(env, "elect", "resign", "cli-election", "c1"))
            # Its next refresh (a third of the TTL) finds the leadership gone: it says so and exits 1.
            assert campaign.wait(CLI_TIMEOUT_S) == 1
            assert campaign.stderr is not None and "leadership of 'cli-election' lost" in campaign.stderr.read()
        finally:
            stop(campaign)
    gone = cli(env, "elect", "leader", "cli-election")
    assert (gone.returncode, gone.stderr) == (1, "coordinator: election 'cli-election' has no leader\n")


def test_publish_and_subscribe_with_a_count(env: dict[str, str]) -> None:
    ok(cli(env, "publish", "cli.orders", "hello", "--type", "notification", "--header", "region=eu"))
    ok(cli(env, "publish", "cli.orders", '{"n": 2}', "--json"))
    lines = ok(cli(env, "subscribe", "cli.orders", "--start", "beginning", "--count", "2", "--max-wait-s", "30",
                   "-w", "json")).splitlines()
    messages = [json.loads(line)["message"] for line in lines]
    assert [m["payload"] for m in messages] == ["hello", {"n": 2}]
    assert (messages[0]["type"], messages[0]["headers"]) == ("notification", {"region": "eu"})

    late = cli(env, "subscribe", "cli.orders", "--count", "1", "--max-wait-s", "0.5")  # new messages only: none
    assert (late.returncode, late.stderr) == (1, "coordinator: 0 of 1 deliveries within 0.5 s\n")


def test_agents_and_sagas(cluster: LocalCluster, env: dict[str, str]) -> None:
    async def register() -> str:
        urls = [cluster.url(n) for n in cluster.members]
        async with CoordinatorClient(urls, token=cluster.admin_token) as admin:
            return (await admin.register("cli-worker", agent_id="cli-agent-1", ttl_s=60)).id

    agent_id = asyncio.run(register())
    listed = json.loads(ok(cli(env, "agents", "list", "--type", "cli-worker", "-w", "json")))["agents"]
    assert [a["id"] for a in listed] == [agent_id]
    assert ok(cli(env, "agents", "show", agent_id)).splitlines()[1].split()[:2] == [agent_id, "cli-worker"]
    assert cli(env, "agents", "show", "nobody").returncode == 1

    assert json.loads(ok(cli(env, "saga", "list", "-w", "json"))) == {"sagas": []}
    assert cli(env, "saga", "show", "no-such-saga").returncode == 1


def test_an_agent_identity_signs_instead_of_the_token(cluster: LocalCluster, env: dict[str, str],
                                                      tmp_path: Path) -> None:
    key_file = tmp_path / "stranger.key"
    ok(cli(env, "agent-key", "new", str(key_file)))
    as_agent = {**env, "COORD_AGENT_ID": "stranger", "COORD_AGENT_KEY_FILE": str(key_file)}
    both = cli(as_agent, "kv", "get", "cli/b")  # the token file is in the environment too: ambiguous
    assert both.returncode == 2 and "unset one or pass a flag" in both.stderr
    del as_agent["COORD_TOKEN_FILE"]
    # Signed by a key no agent registered: the node checks the signature and refuses it (not a 401 for no credential).
    unknown = cli(as_agent, "kv", "get", "cli/b")
    assert unknown.returncode == 2 and "coordinator: " in unknown.stderr and "needs credentials" not in unknown.stderr


def test_status_exits_1_naming_an_unreachable_member(cluster: LocalCluster, env: dict[str, str]) -> None:
    """Last in the module: it stops a member."""
    leader = cluster.wait_leader()
    down = next(n for n in cluster.members if n != leader)
    cluster.stop(down)
    run = cli(env, "status", "-w", "json")
    assert (run.returncode, run.stderr) == (1, f"coordinator: unreachable: {down}\n")
    roles = {m["id"]: m["role"] for m in json.loads(run.stdout)["members"]}
    assert roles[down] == "unreachable" and roles[leader] == "leader"
