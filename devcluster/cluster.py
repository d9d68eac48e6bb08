"""Run a cluster of local node processes on 127.0.0.1: for cluster-up.sh,
the tests and chaos runs. Standard library only (``cryptography`` too with
``tls=True``); talks to nodes over HTTP, or HTTPS with ``tls=True``.

Layout under ``directory``: ``secret`` (generated once, mode 600), ``<id>/``
data directories, ``<id>.log`` and ``<id>.pid``; with ``tls=True`` also
``tls/``: a local CA (``ca.pem``, ``ca.key``) and ``<id>.pem``/``<id>.key``
per node for 127.0.0.1 and localhost (keys mode 600); with ``engine="pbft"``
also ``pbft/``: ``<id>.key`` per node (mode 600) and ``keyring.json``, made
by ``python -m cluster.pbft.wiring dev-keys`` (the core may not import
``cluster``, not even lazily: import-linter sees every import statement).
Ports: HTTP ``base+i``,
Raft ``base+100+i`` for node ``n<i>``. A process is signalled only by the PID
recorded when it was started, after checking it still runs that node.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: str
    http: str
    raft: str

    def peer_arg(self, dial: str | None = None) -> str:
        raft = f"{self.raft}@{dial}" if dial else self.raft
        return f"{self.id}={raft},{self.http}"


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """The one TCP connection between two nodes, through a proxy port.
    ``dialer`` opens it (pysyncobj: the node whose address sorts higher)."""

    name: str
    dialer: str
    target: str
    listen_port: int
    target_port: int


def free_base_port(nodes: int = 5, low: int = 20_000, high: int = 45_000) -> int:
    """A base port whose HTTP (base+1..; TCP and UDP, where the nodes take
    heartbeat datagrams), proxy (base+50..60) and Raft (base+101..) ports on
    127.0.0.1 are all free right now. Kept below the
    kernel's ephemeral range, where outgoing connections could take them
    between this check and the node's bind."""
    high = min(high, _ephemeral_low() - 200)
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(low, high, 200)
        ports = [base + i for i in range(1, nodes + 1)] + [base + 100 + i for i in range(1, nodes + 1)]
        ports += [base + 40] + [base + 50 + i for i in range(11)]
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            for port in ports[:nodes]:  # each node's heartbeat datagrams: UDP on its HTTP port's number
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range on 127.0.0.1")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def recorded_pid(pid_file: Path, *markers: str) -> int | None:
    """The PID in ``pid_file`` if that process still runs and its command line
    holds every marker (a recycled PID belongs to someone else)."""
    try:
        pid = int(pid_file.read_text().strip())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if all(marker.encode() in args for marker in markers) else None


def fetch_json(url: str, timeout: float = 1.0, context: ssl.SSLContext | None = None) -> Any:
    """GET ``url`` as JSON; None when unreachable or not JSON (any status).
    ``context`` verifies an https:// node (else the system CAs)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


class LocalCluster:
    def __init__(self, directory: str | Path, *, base_port: int = 7000, nodes: int = 3, engine: str = "raft",
                 durability: str = "fsync", python: str | None = None, env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = (), proxied: bool = False, tls: bool = False,
                 secure: bool = False, pbft_fault: dict[str, str] | None = None) -> None:
        """``pbft_fault`` maps node ids to a Byzantine behaviour
        (``--unsafe-pbft-fault``) for chaos demonstrations; ``engine="pbft"`` only.
        Raises ``ValueError`` for a combination that cannot run."""
        if engine == "pbft" and proxied:
            raise ValueError("a proxied cluster with engine pbft is not supported: PBFT links cannot go "
                             "through the chaos proxy yet")
        if pbft_fault and engine != "pbft":
            raise ValueError("pbft_fault needs engine pbft")
        self.dir = Path(directory)
        self.tls = tls
        self.secure = secure  # auth required (an admin token file); else anonymous access is allowed
        self._ssl: ssl.SSLContext | None = None
        self.base_port = base_port
        self.engine = engine
        self.durability = durability
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.extra_args = tuple(extra_args)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self.specs: dict[str, NodeSpec] = {}
        for i in range(1, nodes + 1):
            self.add_spec(i)
        self.pbft_fault = dict(pbft_fault or {})
        unknown = sorted(set(self.pbft_fault) - set(self.specs))
        if unknown:
            raise ValueError(f"pbft_fault names unknown node(s) {unknown}")
        self.members = list(self.specs)  # the ids the cluster was bootstrapped or joined with
        self.links: dict[str, LinkSpec] = self._plan_links() if proxied else {}

    def _plan_links(self) -> dict[str, LinkSpec]:
        """A proxy port per pair of nodes, dialed by the node pysyncobj makes dial.

        pysyncobj connects from the node whose address string sorts higher
        to the other; the dialer reaches its peer through the proxy, which
        works only if the dialer's own address still sorts above the proxy's."""
        links: dict[str, LinkSpec] = {}
        ids = sorted(self.specs, key=lambda n: self.specs[n].raft, reverse=True)
        port = self.base_port + 50
        for i, dialer in enumerate(ids):
            for target in ids[i + 1:]:
                listen = f"127.0.0.1:{port}"
                if not self.specs[dialer].raft > listen:
                    raise ValueError(f"proxy address {listen} must sort below {self.specs[dialer].raft}; "
                                     "choose another base port")
                name = f"{dialer}-{target}"
                links[name] = LinkSpec(name, dialer, target, port, int(self.specs[target].raft.rpartition(":")[2]))
                port += 1
        return links

    def link_between(self, a: str, b: str) -> LinkSpec | None:
        return self.links.get(f"{a}-{b}") or self.links.get(f"{b}-{a}")
    def add_spec(self, i: int) -> NodeSpec:
        spec = NodeSpec(f"n{i}", f"127.0.0.1:{self.base_port + i}", f"127.0.0.1:{self.base_port + 100 + i}")
        self.specs[spec.id] = spec
        return spec

    # -- processes -------------------------------------------------------------------

    @property
    def secret_file(self) -> Path:
        return self.dir / "secret"

    @property
    def admin_token_file(self) -> Path:
        return self.dir / "admin.token"

    @property
    def admin_token(self) -> str | None:
        """The admin credential of a secure cluster (made at its first start)."""
        if not self.secure:
            return None
        self.ensure_secret()
        return self.admin_token_file.read_text().strip()

    def ensure_secret(self) -> None:
        """The cluster secret, and for a secure cluster the admin token: made once, mode 600."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path, wanted in ((self.secret_file, True), (self.admin_token_file, self.secure)):
            if wanted and not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32) + "\n")

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The local CA's certificate (``tls=True``): what clients verify the nodes with."""
        return self.tls_dir / "ca.pem"

    def ensure_certs(self, node_id: str) -> None:
        """Create the local CA once, and ``node_id``'s certificate and key if missing.
        A new CA reissues every node's certificate (the old ones chain to nothing)."""
        if not (self.ca_file.exists() and (self.tls_dir / "ca.key").exists()):
            write_dev_ca(self.tls_dir)
        if not ((self.tls_dir / f"{node_id}.pem").exists() and (self.tls_dir / f"{node_id}.key").exists()):
            write_dev_node_cert(self.tls_dir, node_id)

    @property
    def pbft_dir(self) -> Path:
        return self.dir / "pbft"

    @property
    def pbft_keyring(self) -> Path:
        return self.pbft_dir / "keyring.json"

    def ensure_pbft_keys(self) -> None:
        """Every member's PBFT key (made once, mode 600) and a keyring listing
        exactly the members: ``python -m cluster.pbft.wiring dev-keys``, run
        only when a key is missing or the keyring lists other ids."""
        ids = list(self.members)
        try:
            listed = json.loads(self.pbft_keyring.read_text())
        except (OSError, ValueError):
            listed = None
        if (isinstance(listed, dict) and set(listed) == set(ids)
                and all((self.pbft_dir / f"{n}.key").exists() for n in ids)):
            return
        done = subprocess.run([self.python, "-m", "cluster.pbft.wiring", "dev-keys", str(self.pbft_dir), *ids],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, **self.env})
        if done.returncode != 0:
            raise RuntimeError(f"making the PBFT dev keys failed: {done.stderr.strip() or done.returncode}")

    def command(self, node_id: str, peers: list[str] | None = None) -> list[str]:
        spec = self.specs[node_id]
        peer_ids = peers if peers is not None else [m for m in self.members if m != node_id]
        tls = ["--tls-cert", str(self.tls_dir / f"{node_id}.pem"), "--tls-key", str(self.tls_dir / f"{node_id}.key"),
               "--tls-ca", str(self.ca_file)] if self.tls else []
        auth = ["--admin-token-file", str(self.admin_token_file)] if self.secure else ["--allow-anonymous"]
        pbft: list[str] = []
        if self.engine == "pbft":
            pbft = ["--pbft-key-file", str(self.pbft_dir / f"{node_id}.key"), "--pbft-keyring", str(self.pbft_keyring)]
            if node_id in self.pbft_fault:
                pbft += ["--unsafe-pbft-fault", self.pbft_fault[node_id]]
        return [self.python, "-m", "coordinator.cli", "serve", "--node-id", spec.id, "--http", spec.http,
                "--raft", spec.raft, "--data-dir", str(self.dir / spec.id), "--secret-file", str(self.secret_file),
                "--engine", self.engine, "--durability", self.durability, *tls, *auth, *pbft,
                *[f"--peer={self.specs[p].peer_arg(self._dial(node_id, p))}" for p in peer_ids], *self.extra_args]

    def _dial(self, node_id: str, peer: str) -> str | None:
        link = self.links.get(f"{node_id}-{peer}")
        return f"127.0.0.1:{link.listen_port}" if link else None

    def start(self, node_id: str, *, peers: list[str] | None = None, env: dict[str, str] | None = None) -> int:
        """Start ``node_id`` unless it runs already; returns its PID."""
        running = self.pid(node_id)
        if running is not None:
            return running
        self.ensure_secret()
        if self.tls:
            self.ensure_certs(node_id)
        if self.engine == "pbft":
            self.ensure_pbft_keys()
        child_env = {k: v for k, v in os.environ.items() if k != "COORD_CLUSTER_SECRET"}
        child_env.update(self.env)
        child_env.update(env or {})
        with open(self.dir / f"{node_id}.log", "ab") as log:
            proc = subprocess.Popen(self.command(node_id, peers), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=child_env)
        (self.dir / f"{node_id}.pid").write_text(f"{proc.pid}\n")
        self._children[node_id] = proc
        return proc.pid

    def start_all(self) -> None:
        for node_id in self.members:
            self.start(node_id)

    def pid(self, node_id: str) -> int | None:
        """The recorded PID of ``node_id`` if that process still runs this node."""
        child = self._children.get(node_id)
        if child is not None:  # our own child: its exit status is the truth
            return child.pid if child.poll() is None else None
        return recorded_pid(self.dir / f"{node_id}.pid", "serve", node_id, str(self.dir / node_id))

    def signal(self, node_id: str, sig: int) -> bool:
        pid = self.pid(node_id)
        if pid is None:
            return False
        os.kill(pid, sig)
        return True

    def kill(self, node_id: str) -> None:
        """SIGKILL: the node gets no chance to flush anything."""
        if self.signal(node_id, signal.SIGKILL):
            self._wait_gone(node_id, 10)

    def stop(self, node_id: str, timeout_s: float = 10) -> None:
        if self.signal(node_id, signal.SIGTERM) and not self._wait_gone(node_id, timeout_s):
            self.signal(node_id, signal.SIGKILL)
            self._wait_gone(node_id, 5)
        (self.dir / f"{node_id}.pid").unlink(missing_ok=True)

    def stop_all(self) -> list[str]:
        stopped = [n for n in self.specs if self.pid(n) is not None]
        for node_id in stopped:
            self.signal(node_id, signal.SIGTERM)
        for node_id in stopped:
            self.stop(node_id)
        return stopped

    def _wait_gone(self, node_id: str, timeout_s: float) -> bool:
        child = self._children.get(node_id)
        if child is not None:
            try:
                child.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pid(node_id) is None:
                return True
            time.sleep(0.02)
        return False

    # -- observation -------------------------------------------------------------------

    def url(self, node_id: str) -> str:
        return f"{'https' if self.tls else 'http'}://{self.specs[node_id].http}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context trusting the local CA (``tls=True``), else None."""
        if self.tls and self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        return self._ssl

    def status(self, node_id: str, timeout: float = 1.0) -> dict[str, Any] | None:
        context = self.ssl_context() if self.tls and self.ca_file.exists() else None
        status = fetch_json(self.url(node_id) + "/v1/status", timeout, context)
        return status if isinstance(status, dict) and "role" in status else None

    def wait_leader(self, timeout_s: float = 30.0, among: list[str] | None = None) -> str:
        """The id of the leader that every running node in ``among`` agrees on,
        itself one of ``among``."""
        among = among or [n for n in self.members if self.pid(n) is not None]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            statuses = [self.status(n) for n in among]
            leaders = {s["leader_id"] for s in statuses if s}
            if all(statuses) and len(leaders) == 1 and leaders <= set(among):
                leader = leaders.pop()
                leader_status = self.status(leader) if leader in self.specs else None
                if leader_status and leader_status["role"] == "leader":
                    return leader
            exited = [n for n in among if self.pid(n) is None]
            if exited:
                raise RuntimeError(f"node(s) {exited} exited; see {self.dir}/<node>.log")
            time.sleep(0.05)
        raise TimeoutError(f"no agreed leader among {among} within {timeout_s}s")

    def wait_caught_up(self, node_id: str, index: int, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status(node_id)
            if status and status["applied_index"] >= index and status["healthy"]:
                return status
            time.sleep(0.05)
        raise TimeoutError(f"{node_id} did not apply index {index} within {timeout_s}s")

    def log_tail(self, node_id: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / f"{node_id}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- a local CA for tls=True ---------------------------------------------------------------

CA_VALID_DAYS = 3650
NODE_CERT_VALID_DAYS = 825


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` with mode 600 from the start, atomically (a crash leaves the old file or none)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_dev_ca(directory: Path) -> None:
    """A fresh self-signed CA in ``directory`` (``ca.pem``, ``ca.key``); removes
    node certificates signed by an earlier one. For a dev cluster only: the
    key sits unencrypted next to the data."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for old in directory.glob("*.pem"):
        old.unlink()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coordinator local dev CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_private(directory / "ca.key", key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_dev_node_cert(directory: Path, node_id: str) -> None:
    """``<node_id>.pem`` and ``<node_id>.key`` in ``directory``, signed by its CA,
    for 127.0.0.1 and localhost (server and client use)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'}: expected the EC key write_dev_ca makes")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=NODE_CERT_VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_private(directory / f"{node_id}.key", key.private_bytes(serialization.Encoding.PEM,
                                                                   serialization.PrivateFormat.PKCS8,
                                                                   serialization.NoEncryption()))
    (directory / f"{node_id}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
