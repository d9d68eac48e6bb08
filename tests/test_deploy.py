"""What deploy/ ships (issue 24), checked as far as this machine can
without a container daemon: the example settings load, systemd accepts the
unit, the Dockerfile builds from every package the distribution has and
runs as a user, and the wheel it would install carries what it must."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from coordinator import config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SECRET = "Zq3v-8kLm_W2xRt9bNc4YhPe7uJd0sAf"


def _packages() -> list[str]:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    return [p.strip() for p in setup["options.packages.find"]["include"].split() if "." not in p.strip()]


def test_the_example_settings_load(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "token").write_text("t" * 32)
    for path in tmp_path.iterdir():
        path.chmod(0o600)
    cfg = config.load(str(DEPLOY / "node.toml.example"),
                      {"secret_file": str(tmp_path / "secret"), "admin_token_file": str(tmp_path / "token")})
    assert (cfg.http, cfg.http_bind, cfg.raft_bind) == ("10.0.0.11:7001", "0.0.0.0:7001", "0.0.0.0:7101")
    assert [p.id for p in cfg.peers] == ["n2", "n3"] and cfg.log_format == "json"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    unit = (DEPLOY / "agentcoord.service").read_text()
    assert "ExecStart=/opt/agentcoord/bin/coordinator serve --config /etc/agentcoord/node.toml" in unit
    copy = tmp_path / "agentcoord.service"  # the binary is not installed here: verify checks it exists
    copy.write_text(unit.replace("/opt/agentcoord/bin/coordinator", "/bin/true"))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "User=agentcoord" in unit and "NoNewPrivileges=yes" in unit and "ProtectSystem=strict" in unit


def test_the_dockerfile_copies_every_package_and_runs_as_a_user() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    instructions = [line.split()[0] for line in lines if line.split()[0].isupper()]
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms and all(":" in image and not image.endswith(":latest") for image in froms)
    copied = {line.split()[1] for line in lines if line.startswith("COPY ") and "--from" not in line}
    assert set(_packages()) <= copied, set(_packages()) - copied
    assert instructions.index("USER") < instructions.index("ENTRYPOINT")
    user = next(line.split()[1] for line in lines if line.startswith("USER "))
    assert user not in ("root", "0")
    assert not any(line.startswith(("ENV ", "ARG ")) and ("SECRET" in line or "TOKEN" in line) for line in lines)
    assert any("/healthz" in line for line in lines if line.startswith(("HEALTHCHECK", "CMD")))


def test_the_wheel_carries_every_package_its_licence_and_type_marker(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("agentcoord-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for package in _packages():
        assert f"{package}/__init__.py" in names
    assert "coordinator/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert any(n.startswith("coordinator/api/ui/") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    requires = [line for line in text.splitlines() if line.startswith("Requires-Dist:")]
    assert not any("pysyncobj" in r and "extra ==" not in r for r in requires)
