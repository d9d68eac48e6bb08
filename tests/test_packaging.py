"""The distribution (issue 24): a client-only install needs neither the
Raft engine nor any broker client; a node tells what is missing; the
package ships its licence and type marker.

The client-only run is a fresh interpreter whose import system refuses the
server's and the brokers' modules, as an install without the extras would."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from coordinator.errors import InvalidInput
from coordinator.main import transport_factory

ROOT = Path(__file__).resolve().parent.parent
SERVER = ("pysyncobj", "cryptography", "msgpack", "sortedcontainers", "prometheus_client")
BROKERS = ("redis", "nats", "aio_pika", "aiokafka")

BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))
    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Refuse())
    sys.argv = sys.argv[2:]
""")


def _run_without(blocked: tuple[str, ...], code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COORD_CLUSTER_SECRET": "packaging-test-" + "s" * 32}
    return subprocess.run([sys.executable, "-c", BLOCK + code, ",".join(blocked), "x", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False, env=env)


def _setup() -> configparser.ConfigParser:
    parsed = configparser.ConfigParser()
    parsed.read(ROOT / "setup.cfg")
    return parsed


def _names(requirements: str) -> set[str]:
    lines = [line.strip() for line in requirements.splitlines()]
    return {line.split(">")[0].split("=")[0].split("<")[0].strip() for line in lines
            if line and not line.startswith("#")}


def test_the_client_and_the_cli_import_without_the_server_or_any_broker() -> None:
    code = textwrap.dedent("""
        import sys
        import coordinator.client, coordinator.cli
        from coordinator.client import CoordinatorClient
        assert CoordinatorClient
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("client ok")
    """)
    out = _run_without(SERVER + BROKERS, code)
    assert out.returncode == 0, out.stderr
    assert "client ok" in out.stdout


def test_serve_without_the_server_extra_names_the_extra(tmp_path: Path) -> None:
    code = "from coordinator.cli import main; raise SystemExit(main(sys.argv[1:]))"
    out = _run_without(SERVER, code, "serve", "--node-id", "n1", "--http", "127.0.0.1:1", "--raft",
                       "127.0.0.1:2", "--data-dir", str(tmp_path), "--allow-anonymous")
    assert out.returncode == 2, out.stderr
    assert "pip install 'agentcoord[server]'" in out.stderr
    assert "Traceback" not in out.stderr


def test_version_is_the_distributions() -> None:
    out = _run_without(SERVER + BROKERS, "from coordinator.cli import main; raise SystemExit(main(sys.argv[1:]))",
                       "--version")
    assert out.returncode == 0
    assert out.stdout.startswith("coordinator ") and "unknown" not in out.stdout


def test_a_transport_whose_client_is_missing_is_a_config_error_naming_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "aiokafka", None)  # import aiokafka raises ImportError
    monkeypatch.delitem(sys.modules, "transports.kafka", raising=False)
    make = transport_factory(SimpleNamespace(transport_namespace="coord"))
    with pytest.raises(InvalidInput) as refused:
        make("kafka", "kafka://127.0.0.1:9092")
    assert refused.value.field == "transports.kafka"
    assert "agentcoord[kafka]" in refused.value.message


def test_the_distribution_has_its_own_name_and_keeps_servers_and_brokers_in_extras() -> None:
    setup = _setup()
    assert setup["metadata"]["name"] == "agentcoord"
    base = _names(setup["options"]["install_requires"])
    assert base == {"aiohttp", "pynacl"}
    extras = setup["options.extras_require"]
    assert {"pysyncobj", "cryptography", "msgpack", "sortedcontainers", "prometheus-client"} <= _names(extras["server"])
    for extra, client in (("redis", "redis"), ("nats", "nats-py"), ("rabbitmq", "aio-pika"), ("kafka", "aiokafka")):
        assert _names(extras[extra]) == {client}
        assert client in _names(extras["brokers"])


def test_the_licence_and_the_type_marker_ship() -> None:
    setup = _setup()
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert setup["metadata"]["license_files"].strip() == "LICENSE"
    assert (ROOT / "coordinator" / "py.typed").is_file()
    assert "py.typed" in setup["options.package_data"]["coordinator"]
