"""cluster/pbft/wiring.py: a NodeConfig to PbftEngine arguments, and the dev keys
(also as LocalCluster makes and passes them; no node is started here)."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from cluster.pbft.engine import PbftEngine
from cluster.pbft.wiring import engine_kwargs, main, write_dev_keys
from coordinator import config
from coordinator.crypto import AgentKeys
from coordinator.errors import InvalidInput
from devcluster.cluster import LocalCluster

SECRET = "Zq3v-8kLm_W2xRt9bNc4YhPe7uJd0sAf"  # passes config.weak_secret
IDS = ["n1", "n2", "n3", "n4"]


def _address(node_id: str, kind: str) -> str:
    return f"127.0.0.1:{(7100 if kind == 'raft' else 7000) + int(node_id[1:])}"


def _config(keys: Path, node_id: str, ids: list[str], **overrides: Any) -> config.NodeConfig:
    """``node_id``'s config in a cluster of ``ids`` whose dev keys are in ``keys``."""
    peers = [f"{p}={_address(p, 'raft')},{_address(p, 'http')}" for p in ids if p != node_id]
    values: dict[str, Any] = {
        "node_id": node_id, "http": _address(node_id, "http"), "raft": _address(node_id, "raft"),
        "data_dir": str(keys / node_id), "secret": SECRET, "allow_anonymous": True, "engine": "pbft",
        "pbft_key_file": str(keys / f"{node_id}.key"), "pbft_keyring": str(keys / "keyring.json"), "peers": peers}
    return config.load(None, {**values, **overrides})


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    write_dev_keys(tmp_path / "pbft", IDS)
    return tmp_path / "pbft"


def _keyring(keys: Path) -> dict[str, str]:
    document = json.loads((keys / "keyring.json").read_text())
    assert isinstance(document, dict)
    return document


def _refused(keys: Path, node_id: str = "n1", ids: list[str] | None = None, **overrides: Any) -> InvalidInput:
    cfg = _config(keys, node_id, ids or IDS, **overrides)
    with pytest.raises(InvalidInput) as refused:
        engine_kwargs(cfg)
    return refused.value


def _assert_no_key_material(message: str, keys: Path) -> None:
    for public_key in _keyring(keys).values():
        assert public_key not in message
    for key_file in keys.glob("*.key"):
        assert json.loads(key_file.read_text())["seed"] not in message


# -- engine_kwargs --------------------------------------------------------------------------------------


def test_replicas_are_the_members_ordered_by_node_id_the_same_on_every_node(tmp_path: Path) -> None:
    ids = ["n3", "n10", "n1", "n2"]  # any --peer order; string order of ids decides: n1 n10 n2 n3
    write_dev_keys(tmp_path, ids)
    ring = _keyring(tmp_path)
    ordered = ["n1", "n10", "n2", "n3"]
    seen = []
    for node_id in ids:
        kwargs = engine_kwargs(_config(tmp_path, node_id, ids))
        assert kwargs["addresses"] == [_address(n, "raft") for n in ordered]
        assert kwargs["public_keys"] == [ring[n] for n in ordered]
        assert kwargs["replica_id"] == ordered.index(node_id)
        assert kwargs["keys"].public_key == ring[node_id] == kwargs["public_keys"][kwargs["replica_id"]]
        # one key signs as replica and as the engine's client (domain-separated in messages.py)
        assert kwargs["client_keys"] is kwargs["keys"]
        assert kwargs["client_public_keys"] == kwargs["public_keys"]
        seen.append(kwargs["replica_id"])
    assert sorted(seen) == [0, 1, 2, 3]


def test_timings_and_the_fault_come_from_the_config(keys: Path) -> None:
    kwargs = engine_kwargs(_config(keys, "n2", IDS))
    assert (kwargs["request_timeout_ms"], kwargs["view_change_timeout_ms"], kwargs["fault"]) == (5000, 1000, None)
    kwargs = engine_kwargs(_config(keys, "n2", IDS, proposal_timeout_s=2.5, election_timeout_max_s=1.5,
                                   unsafe_pbft_fault="equivocate"))
    assert (kwargs["request_timeout_ms"], kwargs["view_change_timeout_ms"], kwargs["fault"]) == (2500, 1500,
                                                                                                "equivocate")


def test_the_arguments_are_those_of_pbft_engine(keys: Path) -> None:
    # Raises TypeError if wiring passes an argument the engine does not take (or misses one it needs).
    inspect.signature(PbftEngine).bind(fsm=object(), **engine_kwargs(_config(keys, "n1", IDS)))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 8])
def test_pbft_needs_3f_plus_1_nodes(tmp_path: Path, n: int) -> None:
    ids = [f"n{i}" for i in range(1, n + 1)]
    write_dev_keys(tmp_path, ids)
    refused = _refused(tmp_path, ids=ids)
    assert refused.field == "peers"
    assert "PBFT needs 3f+1 nodes" in refused.message and f"this cluster has {n}" in refused.message


def test_seven_nodes_tolerate_two_faults(tmp_path: Path) -> None:
    ids = [f"n{i}" for i in range(1, 8)]
    write_dev_keys(tmp_path, ids)
    kwargs = engine_kwargs(_config(tmp_path, "n7", ids))
    assert len(kwargs["addresses"]) == 7 and kwargs["replica_id"] == 6


def test_a_peer_reached_through_the_chaos_proxy_is_refused(keys: Path) -> None:
    peers = [f"n2={_address('n2', 'raft')}@127.0.0.1:7051,{_address('n2', 'http')}"]
    peers += [f"{p}={_address(p, 'raft')},{_address(p, 'http')}" for p in ("n3", "n4")]
    refused = _refused(keys, peers=peers)
    assert refused.field == "peers" and "chaos proxy" in refused.message


@pytest.mark.parametrize(("document", "reason"), [
    ("not json", "not JSON"),
    ('["a list"]', "must be a JSON object"),
    ("drop:n3", "no key for member n3"),
    ("add:n9", "'n9' is not a member"),
    ("set:n2:7", "the key of n2 is not a base64 Ed25519 public key"),
    ("set:n2:not base64!", "the key of n2 is not a base64"),
    ("set:n2:" + "QUFB" * 4, "the key of n2 is not a base64"),  # 12 bytes, not 32
    ("strip:n2", "the key of n2 is not a base64"),  # padding removed: not canonical
    ("copy:n3:n4", "n3 and n4 have the same key"),
])
def test_a_bad_keyring_is_refused_without_showing_keys(keys: Path, document: str, reason: str) -> None:
    ring: Any = _keyring(keys)
    verb, _, rest = document.partition(":")
    if verb == "drop":
        del ring[rest]
    elif verb == "add":
        ring[rest] = ring["n1"][::-1]
    elif verb == "set":
        node_id, _, value = rest.partition(":")
        ring[node_id] = int(value) if value.isdigit() else value
    elif verb == "strip":
        ring[rest] = ring[rest].rstrip("=")
    elif verb == "copy":
        source, _, target = rest.partition(":")
        ring[target] = ring[source]
    else:
        ring = None
    original = _keyring(keys)
    path = keys / "bad-keyring.json"
    path.write_text(document if ring is None else json.dumps(ring))
    refused = _refused(keys, pbft_keyring=str(path))
    assert refused.field == "pbft_keyring"
    assert refused.message.startswith(f"pbft_keyring: {path}: ")
    assert reason in refused.message
    for key in original.values():
        assert key not in refused.message


def test_the_keyring_must_list_this_nodes_own_key(keys: Path, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.key"
    AgentKeys.generate().save(stranger)
    refused = _refused(keys, pbft_key_file=str(stranger))
    assert refused.field == "pbft_keyring"
    assert refused.message == ("pbft_keyring: the key listed for n1 (this node) is not the public key of "
                               "pbft_key_file")
    _assert_no_key_material(refused.message, keys)
    assert AgentKeys.load(stranger).public_key not in refused.message


def test_an_unreadable_or_loose_key_file_is_refused(keys: Path) -> None:
    key_file = keys / "n1.key"
    key_file.chmod(0o644)
    refused = _refused(keys)
    assert refused.field == "pbft_key_file"
    assert "accessible by group or others" in refused.message and "chmod 600" in refused.message
    _assert_no_key_material(refused.message, keys)
    key_file.chmod(0o600)
    key_file.write_text('{"version": 1, "type": "ed25519-seed", "seed": "c2VjcmV0"}')
    refused = _refused(keys)
    assert refused.field == "pbft_key_file" and "not an agent key file" in refused.message
    assert "c2VjcmV0" not in refused.message
    key_file.unlink()
    with pytest.raises(InvalidInput) as missing:  # config checks readability first
        _config(keys, "n1", IDS)
    assert missing.value.field == "pbft_key_file"


# -- dev keys -------------------------------------------------------------------------------------------


def test_dev_keys_are_private_and_listed_in_the_keyring(tmp_path: Path) -> None:
    directory = tmp_path / "pbft"
    write_dev_keys(directory, IDS)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for node_id in IDS:
        assert stat.S_IMODE((directory / f"{node_id}.key").stat().st_mode) == 0o600
    assert _keyring(directory) == {n: AgentKeys.load(directory / f"{n}.key").public_key for n in IDS}
    assert len(set(_keyring(directory).values())) == 4
    assert sorted(p.name for p in directory.iterdir()) == sorted([f"{n}.key" for n in IDS] + ["keyring.json"])


def test_dev_keys_are_kept_and_the_keyring_follows_the_ids(tmp_path: Path) -> None:
    write_dev_keys(tmp_path, IDS)
    before = _keyring(tmp_path)
    (tmp_path / "n2.key").unlink()
    write_dev_keys(tmp_path, ["n1", "n2", "n3"])
    after = _keyring(tmp_path)
    assert set(after) == {"n1", "n2", "n3"}  # exactly the ids asked for
    assert after["n1"] == before["n1"] and after["n3"] == before["n3"]
    assert after["n2"] != before["n2"]  # only the missing key is made anew
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("bad", ["", "../n1", "a/b", ".hidden"])
def test_dev_keys_refuse_ids_that_are_not_file_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not a plain file name"):
        write_dev_keys(tmp_path, ["n1", bad])
    assert not list(tmp_path.iterdir())


def test_the_dev_keys_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dev-keys", str(tmp_path / "k"), "n1", "n2"]) == 0
    assert set(_keyring(tmp_path / "k")) == {"n1", "n2"}
    assert main(["dev-keys", str(tmp_path / "k")]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["dev-keys", str(tmp_path / "k"), "../x"]) == 2


# -- LocalCluster with engine pbft (devcluster/cluster.py; no process is started) ----------------


def test_the_dev_cluster_makes_keys_that_every_node_accepts(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "c", base_port=7000, nodes=4, engine="pbft", pbft_fault={"n3": "forge"})
    cluster.ensure_pbft_keys()  # runs python -m cluster.pbft.wiring dev-keys
    assert set(_keyring(cluster.pbft_dir)) == set(IDS)
    for node_id in IDS:
        assert stat.S_IMODE((cluster.pbft_dir / f"{node_id}.key").stat().st_mode) == 0o600
    made = os.stat(cluster.pbft_keyring).st_mtime_ns
    cluster.ensure_pbft_keys()  # everything there: nothing is rewritten
    assert os.stat(cluster.pbft_keyring).st_mtime_ns == made
    replica_ids = set()
    for node_id in IDS:
        command = cluster.command(node_id)
        flags = dict(itertools.pairwise(command))
        assert flags["--engine"] == "pbft"
        assert flags["--pbft-key-file"] == str(cluster.pbft_dir / f"{node_id}.key")
        assert flags["--pbft-keyring"] == str(cluster.pbft_keyring)
        assert flags.get("--unsafe-pbft-fault") == ("forge" if node_id == "n3" else None)
        peers = [arg.removeprefix("--peer=") for arg in command if arg.startswith("--peer=")]
        cfg = config.load(None, {"node_id": node_id, "http": flags["--http"], "raft": flags["--raft"],
                                 "data_dir": flags["--data-dir"], "secret": SECRET, "allow_anonymous": True,
                                 "engine": "pbft", "pbft_key_file": flags["--pbft-key-file"],
                                 "pbft_keyring": flags["--pbft-keyring"],
                                 "unsafe_pbft_fault": flags.get("--unsafe-pbft-fault"), "peers": peers})
        replica_ids.add(engine_kwargs(cfg)["replica_id"])
    assert replica_ids == {0, 1, 2, 3}


def test_the_dev_cluster_refuses_what_pbft_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="proxied cluster with engine pbft is not supported"):
        LocalCluster(tmp_path, base_port=7000, nodes=4, engine="pbft", proxied=True)
    with pytest.raises(ValueError, match="pbft_fault needs engine pbft"):
        LocalCluster(tmp_path, base_port=7000, nodes=3, pbft_fault={"n1": "silent"})
    with pytest.raises(ValueError, match="unknown node"):
        LocalCluster(tmp_path, base_port=7000, nodes=4, engine="pbft", pbft_fault={"n5": "silent"})
    raft = LocalCluster(tmp_path, base_port=7000, nodes=3)
    assert not any(arg.startswith("--pbft") for arg in raft.command("n1"))


def test_the_core_spells_out_the_fault_kinds_of_cluster_pbft() -> None:
    faults = pytest.importorskip("cluster.pbft.faults")
    assert set(config.PBFT_FAULTS) == set(faults.FAULT_KINDS)
