"""NodeConfig (coordinator/config.py): the TLS settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import config
from coordinator.errors import InvalidInput

SECRET = "s" * 32


def _load(tmp_path: Path, **overrides: object) -> config.NodeConfig:
    base = {"node_id": "n1", "http": "127.0.0.1:7001", "raft": "127.0.0.1:7101", "data_dir": str(tmp_path / "n1"),
            "secret": SECRET}
    return config.load(None, {**base, **overrides})


@pytest.fixture
def pem(tmp_path: Path) -> tuple[str, str, str]:
    paths = []
    for name in ("node.pem", "node.key", "ca.pem"):
        (tmp_path / name).write_text("-----BEGIN PLACEHOLDER-----\n")
        paths.append(str(tmp_path / name))
    return paths[0], paths[1], paths[2]


def test_tls_is_off_by_default(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == ("", "", "")


def test_cert_key_and_ca_are_read_from_flags_and_toml(tmp_path: Path, pem: tuple[str, str, str]) -> None:
    cert, key, ca = pem
    cfg = _load(tmp_path, tls_cert=cert, tls_key=key, tls_ca=ca)
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (cert, key, ca)
    toml = tmp_path / "n1.toml"
    toml.write_text(f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    cfg = config.load(str(toml), {"node_id": "n1", "http": "127.0.0.1:7001", "raft": "127.0.0.1:7101",
                                  "data_dir": str(tmp_path / "n1"), "secret": SECRET})
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (cert, key, "")


def test_a_cert_without_a_key_is_refused(tmp_path: Path, pem: tuple[str, str, str]) -> None:
    cert, key, ca = pem
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, tls_cert=cert)
    assert refused.value.field == "tls_key"
    assert "tls_cert and tls_key go together" in refused.value.message
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, tls_key=key)
    assert refused.value.field == "tls_cert"
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, tls_ca=ca)
    assert refused.value.field == "tls_ca"


def test_a_missing_file_is_refused_with_its_path(tmp_path: Path, pem: tuple[str, str, str]) -> None:
    cert, key, _ = pem
    missing = str(tmp_path / "nowhere.key")
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, tls_cert=cert, tls_key=missing)
    assert refused.value.field == "tls_key"
    assert refused.value.message == f"tls_key: cannot read {missing} (No such file or directory)"
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, tls_cert=cert, tls_key=key, tls_ca=str(tmp_path))
    assert refused.value.field == "tls_ca" and "Is a directory" in refused.value.message
