"""NodeConfig (coordinator/config.py): the TLS, authentication and PBFT settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import config
from coordinator.errors import InvalidInput

SECRET = "Zq3v-8kLm_W2xRt9bNc4YhPe7uJd0sAf"  # passes config.weak_secret
TOKEN = "t" * 32


def _load(tmp_path: Path, **overrides: object) -> config.NodeConfig:
    base = {"node_id": "n1", "http": "127.0.0.1:7001", "raft": "127.0.0.1:7101", "data_dir": str(tmp_path / "n1"),
            "secret": SECRET, "admin_token": TOKEN}
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
                                  "data_dir": str(tmp_path / "n1"), "secret": SECRET, "allow_anonymous": True})
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


# -- authentication settings -----------------------------------------------------------------


def test_a_node_needs_an_admin_token_unless_anonymous_access_is_allowed(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COORD_ADMIN_TOKEN", raising=False)
    with pytest.raises(InvalidInput, match="admin_token: required unless allow_anonymous"):
        _load(tmp_path, admin_token=None)
    cfg = _load(tmp_path, admin_token=None, allow_anonymous=True)
    assert cfg.allow_anonymous is True and cfg.admin_token == ""
    with pytest.raises(InvalidInput, match="at least 16"):
        _load(tmp_path, admin_token="short")


def test_the_admin_token_comes_from_a_file_or_the_environment_and_is_never_shown(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("f" * 40 + "\n")
    cfg = _load(tmp_path, admin_token=None, admin_token_file=str(token_file))
    assert cfg.admin_token == "f" * 40
    assert "f" * 40 not in repr(cfg)
    monkeypatch.setenv("COORD_ADMIN_TOKEN", "e" * 40)
    assert _load(tmp_path, admin_token=None).admin_token == "e" * 40
    with pytest.raises(InvalidInput, match="admin_token_file: cannot read it"):
        _load(tmp_path, admin_token=None, admin_token_file=str(tmp_path / "missing"))


# weak cluster secrets: each is refused with the reason (and never the secret itself)
WEAK_SECRETS = [
    ("short-secret", "fewer than 16 characters"),
    ("s" * 32, "fewer than 8 distinct characters"),
    ("abcdefghabcdefghabcdefgh", "repeats a shorter string"),
    ("abcdefghijklmnopqrstuvwxyz", "straight run"),
    ("0123456789abcdef0123", "straight run"),
    ("zyxwvutsrqponmlkjihg", "straight run"),
    ("Password123456789!", "common word ('password')"),
    ("--Changeme--2024--!!", "common word ('changeme')"),
    ("coordinatorcoordinator1", "common word ('coordinator')"),
    ("abababababababababababababxyzQ7-", "under 64 bits"),
    ("aaaaaaaaaaaaaaaaaaaaaaaaaaaa-x7Kq2Wb", "one repeated"),
]


@pytest.mark.parametrize(("secret", "why"), WEAK_SECRETS, ids=[w for _, w in WEAK_SECRETS])
def test_an_obviously_weak_cluster_secret_is_refused_saying_why(tmp_path: Path, secret: str, why: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, secret=secret)
    assert refused.value.field == "secret"
    assert why in refused.value.message and "too weak" in refused.value.message
    assert secret not in refused.value.message


def test_generated_secrets_pass_the_strength_check(tmp_path: Path) -> None:
    """What the scripts and LocalCluster write (``secrets.token_urlsafe(32)``), and hex."""
    import secrets
    for _ in range(500):
        assert config.weak_secret(secrets.token_urlsafe(32)) is None
        assert config.weak_secret(secrets.token_hex(16)) is None
    assert _load(tmp_path, secret=secrets.token_urlsafe(32)).secret


def test_the_metrics_token_and_http_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _load(tmp_path).metrics_token == ""
    token_file = tmp_path / "metrics.token"
    token_file.write_text("m" * 40 + "\n")
    cfg = _load(tmp_path, metrics_token_file=str(token_file), http_names=["coord-1.example.com:7001"])
    assert cfg.metrics_token == "m" * 40 and "m" * 40 not in repr(cfg)
    assert cfg.http_names == ("coord-1.example.com:7001",)
    monkeypatch.setenv("COORD_METRICS_TOKEN", "n" * 40)
    assert _load(tmp_path).metrics_token == "n" * 40
    with pytest.raises(InvalidInput, match="metrics_token: must have at least 16"):
        _load(tmp_path, metrics_token="short")
    with pytest.raises(InvalidInput, match="metrics_token: must differ from admin_token"):
        _load(tmp_path, metrics_token=TOKEN)
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, http_names=["ok:1", "http://x/"])
    assert refused.value.field == "http_names[1]"


# -- PBFT settings -----------------------------------------------------------------------------


@pytest.fixture
def pbft_files(tmp_path: Path) -> tuple[str, str]:
    """Placeholders: config only checks that they are readable (cluster.pbft.wiring reads them)."""
    (tmp_path / "n1.key").write_text("{}\n")
    (tmp_path / "keyring.json").write_text("{}\n")
    return str(tmp_path / "n1.key"), str(tmp_path / "keyring.json")


def test_pbft_settings_are_off_by_default_and_unused_by_raft(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    assert (cfg.pbft_key_file, cfg.pbft_keyring, cfg.unsafe_pbft_fault) == ("", "", "")
    # raft does not look at them (nor need them)
    assert _load(tmp_path, pbft_key_file=str(tmp_path / "nowhere")).engine == "raft"


def test_pbft_needs_its_key_file_and_keyring(tmp_path: Path, pbft_files: tuple[str, str]) -> None:
    key_file, keyring = pbft_files
    cfg = _load(tmp_path, engine="pbft", pbft_key_file=key_file, pbft_keyring=keyring)
    assert (cfg.engine, cfg.pbft_key_file, cfg.pbft_keyring) == ("pbft", key_file, keyring)
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, engine="pbft", pbft_keyring=keyring)
    assert refused.value.field == "pbft_key_file"
    assert refused.value.message == "pbft_key_file: is required with engine pbft"
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, engine="pbft", pbft_key_file=key_file)
    assert refused.value.field == "pbft_keyring"


def test_unreadable_pbft_files_are_refused_with_their_path(tmp_path: Path, pbft_files: tuple[str, str]) -> None:
    key_file, keyring = pbft_files
    missing = str(tmp_path / "nowhere.json")
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, engine="pbft", pbft_key_file=key_file, pbft_keyring=missing)
    assert refused.value.field == "pbft_keyring"
    assert refused.value.message == f"pbft_keyring: cannot read {missing} (No such file or directory)"
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, engine="pbft", pbft_key_file=str(tmp_path), pbft_keyring=keyring)
    assert refused.value.field == "pbft_key_file" and "Is a directory" in refused.value.message


def test_pbft_settings_are_read_from_toml(tmp_path: Path, pbft_files: tuple[str, str]) -> None:
    key_file, keyring = pbft_files
    toml = tmp_path / "n1.toml"
    toml.write_text(f'engine = "pbft"\npbft_key_file = "{key_file}"\npbft_keyring = "{keyring}"\n'
                    'unsafe_pbft_fault = "forge"\n')
    cfg = config.load(str(toml), {"node_id": "n1", "http": "127.0.0.1:7001", "raft": "127.0.0.1:7101",
                                  "data_dir": str(tmp_path / "n1"), "secret": SECRET, "allow_anonymous": True})
    assert (cfg.pbft_key_file, cfg.pbft_keyring, cfg.unsafe_pbft_fault) == (key_file, keyring, "forge")
    toml.write_text(f'engine = "pbft"\npbft_key_file = 3\npbft_keyring = "{keyring}"\n')
    with pytest.raises(InvalidInput) as refused:
        config.load(str(toml), {"node_id": "n1", "http": "127.0.0.1:7001", "raft": "127.0.0.1:7101",
                                "data_dir": str(tmp_path / "n1"), "secret": SECRET, "allow_anonymous": True})
    assert refused.value.field == "pbft_key_file" and "must be a file path" in refused.value.message


@pytest.mark.parametrize("kind", ["silent", "equivocate", "forge"])
def test_a_pbft_node_may_be_told_to_misbehave(tmp_path: Path, pbft_files: tuple[str, str], kind: str) -> None:
    key_file, keyring = pbft_files
    cfg = _load(tmp_path, engine="pbft", pbft_key_file=key_file, pbft_keyring=keyring, unsafe_pbft_fault=kind)
    assert cfg.unsafe_pbft_fault == kind
    assert kind in config.PBFT_FAULTS


def test_an_unknown_pbft_fault_is_refused(tmp_path: Path, pbft_files: tuple[str, str]) -> None:
    key_file, keyring = pbft_files
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, engine="pbft", pbft_key_file=key_file, pbft_keyring=keyring, unsafe_pbft_fault="crash")
    assert refused.value.field == "unsafe_pbft_fault"
    assert refused.value.message == "unsafe_pbft_fault: must be one of silent, equivocate, forge"


def test_a_pbft_fault_needs_engine_pbft(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, unsafe_pbft_fault="silent")
    assert refused.value.field == "unsafe_pbft_fault"
    assert refused.value.message == "unsafe_pbft_fault: needs engine pbft"



def test_the_digest_check_period(tmp_path: Path) -> None:
    assert _load(tmp_path).digest_check_s == 5.0
    assert _load(tmp_path, digest_check_s=0).digest_check_s == 0  # off
    for bad in (0.01, -1, 7200):
        with pytest.raises(InvalidInput) as refused:
            _load(tmp_path, digest_check_s=bad)
        assert refused.value.field == "digest_check_s"


def test_the_unsafe_apply_failpoint_is_read_from_the_environment_only_when_set(monkeypatch) -> None:
    from coordinator.main import FAIL_APPLY_AT_ENV, unsafe_fail_apply_at

    monkeypatch.delenv(FAIL_APPLY_AT_ENV, raising=False)
    assert unsafe_fail_apply_at() is None
    monkeypatch.setenv(FAIL_APPLY_AT_ENV, "42")
    assert unsafe_fail_apply_at() == 42
    for bad in ("0", "x", "-3"):
        monkeypatch.setenv(FAIL_APPLY_AT_ENV, bad)
        with pytest.raises(InvalidInput):
            unsafe_fail_apply_at()


def test_compaction_bytes_defaults_and_bounds(tmp_path: Path) -> None:
    assert _load(tmp_path).compaction_bytes == 64 << 20
    assert _load(tmp_path, compaction_bytes=1 << 20).compaction_bytes == 1 << 20
    for bad in (100, 1 << 41):
        with pytest.raises(InvalidInput) as refused:
            _load(tmp_path, compaction_bytes=bad)
        assert refused.value.field == "compaction_bytes"


@pytest.mark.parametrize("name", ["http", "raft"])
@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_an_address_others_cannot_reach_is_refused_naming_the_bind_setting(tmp_path: Path, name: str,
                                                                          host: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, **{name: f"{host}:7001"})
    assert refused.value.field == name and f"{name}_bind" in refused.value.message


def test_bind_addresses_are_checked_and_default_to_the_advertised_ones(tmp_path: Path) -> None:
    cfg = _load(tmp_path)
    assert cfg.http_bind == "" and cfg.raft_bind == ""
    cfg = _load(tmp_path, http_bind="0.0.0.0:7001", raft_bind="0.0.0.0:7101")
    assert (cfg.http_bind, cfg.raft_bind) == ("0.0.0.0:7001", "0.0.0.0:7101")
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, http_bind="nowhere")
    assert refused.value.field == "http_bind"


def test_log_format_is_text_or_json(tmp_path: Path) -> None:
    assert _load(tmp_path).log_format == "text"
    assert _load(tmp_path, log_format="json", access_log=True).access_log is True
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, log_format="xml")
    assert refused.value.field == "log_format"


def test_a_secret_file_flag_wins_over_the_settings_files(tmp_path: Path) -> None:
    for name, text in (("file-secret", SECRET), ("flag-secret", SECRET[::-1])):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)
    toml = tmp_path / "node.toml"
    toml.write_text(f'node_id = "n1"\nhttp = "127.0.0.1:7001"\nraft = "127.0.0.1:7101"\n'
                    f'data_dir = "{tmp_path / "n1"}"\nsecret_file = "{tmp_path / "file-secret"}"\n'
                    f'admin_token = "{TOKEN}"\n')
    assert config.load(str(toml), {}).secret == SECRET
    assert config.load(str(toml), {"secret_file": str(tmp_path / "flag-secret")}).secret == SECRET[::-1]


def test_an_accepted_secret_is_read_from_its_file_checked_and_never_shown(tmp_path: Path) -> None:
    """``accept_secret_file``: a second cluster secret the node accepts while the
    secret changes (docs/operations.md); as strong as the secret, never in repr."""
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "accepted").write_text(SECRET[::-1] + "\n")
    toml = tmp_path / "node.toml"
    toml.write_text(f'node_id = "n1"\nhttp = "127.0.0.1:7001"\nraft = "127.0.0.1:7101"\nallow_anonymous = true\n'
                    f'data_dir = "{tmp_path / "n1"}"\naccept_secret_file = "{tmp_path / "accepted"}"\n')
    loaded = config.load(str(toml), {"secret_file": str(tmp_path / "secret")})
    assert loaded.secret == SECRET and loaded.accepted_secrets == (SECRET[::-1],)
    assert SECRET[::-1] not in repr(loaded)
    (tmp_path / "accepted").write_text(SECRET + "\n")  # the same secret: nothing more to accept
    assert config.load(str(toml), {"secret_file": str(tmp_path / "secret")}).accepted_secrets == ()
    (tmp_path / "accepted").write_text("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n")
    with pytest.raises(InvalidInput, match="accept_secret_file: the secret in it is too weak") as refused:
        config.load(str(toml), {"secret_file": str(tmp_path / "secret")})
    assert refused.value.field == "accept_secret_file"
    (tmp_path / "accepted").unlink()
    with pytest.raises(InvalidInput, match="accept_secret_file: cannot read it"):
        config.load(str(toml), {"secret_file": str(tmp_path / "secret")})


def test_heartbeat_datagrams_listen_on_the_http_port_number_unless_told_otherwise(tmp_path: Path) -> None:
    assert _load(tmp_path).heartbeat_udp_bind == "127.0.0.1:7001"
    assert _load(tmp_path, http_bind="0.0.0.0:7001").heartbeat_udp_bind == "0.0.0.0:7001"
    assert _load(tmp_path, heartbeat_udp_port=7201).heartbeat_udp_bind == "127.0.0.1:7201"
    assert _load(tmp_path, heartbeat_udp_port=0).heartbeat_udp_bind == ""  # off
    assert _load(tmp_path, gossip_interval_s=0).heartbeat_udp_bind == ""  # followers could not answer
    for bad in (-1, 65536, True, "7001"):
        with pytest.raises(InvalidInput) as refused:
            _load(tmp_path, heartbeat_udp_port=bad)
        assert refused.value.field == "heartbeat_udp_port"
    with pytest.raises(InvalidInput) as refused:
        _load(tmp_path, heartbeat_udp_rate_max=10)
    assert refused.value.field == "heartbeat_udp_rate_max"
