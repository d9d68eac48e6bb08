"""Node configuration: a TOML file and/or flags, validated before anything starts.

The cluster secret is read from ``secret_file`` or ``COORD_CLUSTER_SECRET``;
it is never printed (``repr`` hides it) and never leaves the node but as
pysyncobj's key on the Raft port.
"""

from __future__ import annotations

import itertools
import math
import os
import tomllib
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any

from coordinator.errors import InvalidInput
from coordinator.logs import LOG_FORMATS

DURABILITY = ("fsync", "none")
# The Byzantine behaviours a PBFT node can be told to show (chaos demonstrations
# only). The names are cluster.pbft's; spelled out here because the core never
# imports cluster.
PBFT_FAULTS = ("silent", "equivocate", "forge")


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """Another member. ``raft`` is its Raft address (its identity); ``dial``,
    when set, is where this node connects to reach it (a chaos proxy)."""

    id: str
    raft: str
    http: str
    dial: str | None = None


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    # The addresses the other nodes and the clients are told (member table,
    # leader hints, Raft identity): never a wildcard. The node listens on
    # them unless http_bind / raft_bind say where (e.g. 0.0.0.0:7001).
    http: str
    raft: str
    data_dir: str
    peers: tuple[PeerConfig, ...] = ()
    http_bind: str = ""
    raft_bind: str = ""
    secret: str = field(default="", repr=False)
    # Other cluster secrets this node also accepts (never sends): for changing the
    # secret one node at a time (docs/operations.md). Read from accept_secret_file.
    accepted_secrets: tuple[str, ...] = field(default=(), repr=False)
    engine: str = "raft"
    durability: str = "fsync"
    proposal_timeout_s: float = 5.0
    inflight_max: int = 1024
    election_timeout_min_s: float = 0.5
    election_timeout_max_s: float = 1.0
    heartbeat_s: float = 0.1
    leader_fallback_s: float = 2.0
    compaction_entries: int = 20_000
    compaction_bytes: int = 64 << 20  # or once the journal holds this many bytes
    stall_timeout_s: float = 5.0
    # how often each node compares its state digest with the other members' (0: never)
    digest_check_s: float = 5.0
    # how often each node sends the others the heartbeats it answered (0: no
    # gossip, followers forward every heartbeat to the leader); needs the secret
    gossip_interval_s: float = 0.1
    # UDP port for heartbeat datagrams (coordinator.datagram), on the host this
    # node's HTTP listens on: None (default) is the HTTP port's number, 0 is off.
    # Only with a cluster secret and gossip on (the per-lease keys derive from the
    # secret; followers answer datagrams from their gossiped table).
    heartbeat_udp_port: int | None = None
    heartbeat_udp_rate_max: int = 30_000  # datagrams a second this node looks at, at most
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object per line (coordinator.logs)
    access_log: bool = False  # one line per HTTP request (coordinator.api.accesslog)
    unsafe_stale_reads: bool = False  # chaos demonstrations only: reads skip the barrier
    # chaos tests only: the wall clock (stamped into commands) is shifted by the offset
    # in <data_dir>/unsafe-clock-offset-ms, which the clock-skew nemesis writes
    unsafe_test_clock_control: bool = False
    # chaos tests only: the engine records, under <data_dir>/unsafe-power-loss/, what
    # of its files a power cut would leave (the lost-fsync nemesis rolls them back)
    unsafe_test_power_loss: bool = False
    # broker transports: plugin name -> URL (may hold credentials: never printed)
    transports: dict[str, str] = field(default_factory=dict, repr=False)
    transport_namespace: str = "coord"  # prefix of every broker resource; the same on every node
    # HTTPS: this node's certificate and key (both or neither), and the CA its
    # peers' certificates chain to (for forwarding to the leader; else the system CAs)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    # Authentication: requests need the admin token or an agent's signature,
    # unless anonymous access is allowed explicitly (a development mode).
    allow_anonymous: bool = False
    admin_token: str = field(default="", repr=False)  # read from admin_token_file or COORD_ADMIN_TOKEN
    # may read /metrics and nothing else (a Prometheus scraper's bearer token);
    # read from metrics_token_file or COORD_METRICS_TOKEN
    metrics_token: str = field(default="", repr=False)
    # other host[:port] names clients reach this node's HTTP by (DNS names, a
    # load balancer): agents' signatures name the Host, and only this node's
    # own names are accepted (``http`` itself always is)
    http_names: tuple[str, ...] = ()
    # engine "pbft": this node's Ed25519 key file (coordinator.crypto.AgentKeys) and
    # a JSON file {"<node id>": "<public key>", ...} of every member's key
    pbft_key_file: str = ""
    pbft_keyring: str = ""
    # where the dashboard looks for chaos runs (``python -m chaos.run --out``); default <data_dir>/chaos
    chaos_dir: str = ""
    unsafe_pbft_fault: str = ""  # chaos demonstrations only: this PBFT node misbehaves (PBFT_FAULTS)
    # What callers may hold open on this node (coordinator.api.limits): sockets, and SSE
    # streams plus long polls per principal and in total.
    connections_max: int = 8192
    long_requests_per_principal: int = 64
    long_requests_max: int = 1024

    def validate(self) -> NodeConfig:
        for name in ("node_id", "http", "raft", "data_dir"):
            if not getattr(self, name):
                raise InvalidInput(f"{name}: is required", field=name)
        for name in ("http", "raft"):
            _check_address(getattr(self, name), name)
            address = getattr(self, name)
            if _host(address) in WILDCARD_HOSTS:
                raise InvalidInput(f"{name}: {address!r} is where to listen, not an address others can reach: "
                                   f"give this node's reachable address as {name} and listen with {name}_bind "
                                   f"(--{name}-bind {address})", field=name)
        for name in ("http_bind", "raft_bind"):
            if getattr(self, name):
                _check_address(getattr(self, name), name)
        if self.raft_bind and self.engine != "raft":
            raise InvalidInput(f"raft_bind: the {self.engine} engine listens on its raft address only",
                               field="raft_bind")
        ids = {self.node_id}
        addresses = {self.raft, self.http}
        for peer in self.peers:
            _check_address(peer.raft, f"peer {peer.id} raft")
            _check_address(peer.http, f"peer {peer.id} http")
            if peer.dial is not None:
                _check_address(peer.dial, f"peer {peer.id} dial")
            if peer.id in ids or peer.raft in addresses or peer.http in addresses:
                raise InvalidInput(f"peers: {peer.id} repeats an id or address", field="peers")
            ids.add(peer.id)
            addresses |= {peer.raft, peer.http}
        if self.log_format not in LOG_FORMATS:
            raise InvalidInput(f"log_format: must be {' or '.join(LOG_FORMATS)}", field="log_format")
        weak = weak_secret(self.secret)
        if weak:
            raise InvalidInput(f"secret: the cluster secret is too weak: {weak} (secret_file or "
                               "COORD_CLUSTER_SECRET; make one with: python -c 'import secrets; "
                               "print(secrets.token_urlsafe(32))')", field="secret")
        for accepted in self.accepted_secrets:
            if weak_secret(accepted):
                raise InvalidInput(f"accept_secret_file: the secret in it is too weak: {weak_secret(accepted)}",
                                   field="accept_secret_file")
        for name in ("admin_token", "metrics_token"):
            if getattr(self, name) and len(getattr(self, name)) < 16:
                raise InvalidInput(f"{name}: must have at least 16 characters", field=name)
        if self.metrics_token and self.metrics_token == self.admin_token:
            raise InvalidInput("metrics_token: must differ from admin_token", field="metrics_token")
        for i, name in enumerate(self.http_names):
            if not isinstance(name, str) or not name or len(name) > 256 or any(c in name for c in " /\\@\t\r\n"):
                raise InvalidInput(f"http_names[{i}]: must be a host or host:port", field=f"http_names[{i}]")
        if not self.allow_anonymous and not self.admin_token:
            raise InvalidInput("admin_token: required unless allow_anonymous is set (admin_token_file or "
                               "COORD_ADMIN_TOKEN); without it nobody could manage roles", field="admin_token")
        if self.durability not in DURABILITY:
            raise InvalidInput("durability: must be fsync or none", field="durability")
        if not 0.05 <= self.heartbeat_s < self.election_timeout_min_s / 3:
            raise InvalidInput("heartbeat_s: must be at least 0.05 and under a third of the election timeout",
                               field="heartbeat_s")
        if not self.election_timeout_min_s < self.election_timeout_max_s <= 30:
            raise InvalidInput("election_timeout_max_s: must exceed election_timeout_min_s",
                               field="election_timeout_max_s")
        if not self.heartbeat_s < self.leader_fallback_s <= 60:
            raise InvalidInput("leader_fallback_s: must be between heartbeat_s and 60", field="leader_fallback_s")
        if not 0.1 <= self.proposal_timeout_s <= 120:
            raise InvalidInput("proposal_timeout_s: must be between 0.1 and 120", field="proposal_timeout_s")
        if self.gossip_interval_s != 0 and not 0.05 <= self.gossip_interval_s <= 5:
            raise InvalidInput("gossip_interval_s: must be 0 (off) or between 0.05 and 5", field="gossip_interval_s")
        if self.heartbeat_udp_port is not None and (isinstance(self.heartbeat_udp_port, bool) or not isinstance(
                self.heartbeat_udp_port, int) or not 0 <= self.heartbeat_udp_port < 65536):
            raise InvalidInput("heartbeat_udp_port: must be a port (0: off)", field="heartbeat_udp_port")
        if not 100 <= self.heartbeat_udp_rate_max <= 1_000_000:
            raise InvalidInput("heartbeat_udp_rate_max: must be between 100 and 1000000",
                               field="heartbeat_udp_rate_max")
        if self.digest_check_s != 0 and not 0.1 <= self.digest_check_s <= 3600:
            raise InvalidInput("digest_check_s: must be 0 (off) or between 0.1 and 3600", field="digest_check_s")
        if not 2 <= self.compaction_entries <= 10_000_000:
            raise InvalidInput("compaction_entries: must be between 2 and 10000000", field="compaction_entries")
        if not 1 << 16 <= self.compaction_bytes <= 1 << 40:
            raise InvalidInput("compaction_bytes: must be between 65536 and 1099511627776", field="compaction_bytes")
        for name, url in self.transports.items():
            if not isinstance(url, str) or "://" not in url:
                raise InvalidInput(f"transports.{name}: must be a URL such as redis://127.0.0.1:6379/0",
                                   field=f"transports.{name}")
        if not self.transport_namespace.replace("-", "").replace("_", "").isalnum():
            raise InvalidInput("transport_namespace: letters, digits, - and _ only", field="transport_namespace")
        if not 1 <= self.inflight_max <= 100_000:
            raise InvalidInput("inflight_max: must be between 1 and 100000", field="inflight_max")
        if not 16 <= self.connections_max <= 1_000_000:
            raise InvalidInput("connections_max: must be between 16 and 1000000", field="connections_max")
        if not 1 <= self.long_requests_per_principal <= self.long_requests_max <= 100_000:
            raise InvalidInput("long_requests_per_principal: must be between 1 and long_requests_max "
                               "(at most 100000)", field="long_requests_per_principal")
        self._validate_tls()
        self._validate_pbft()
        return self

    @property
    def heartbeat_udp_bind(self) -> str:
        """host:port where this node takes heartbeat datagrams: the HTTP
        listener's host (``http_bind``'s, else ``http``'s) and
        ``heartbeat_udp_port`` (default the HTTP port's number); "" when off
        (port 0, no cluster secret, or no gossip)."""
        if self.heartbeat_udp_port == 0 or not self.secret or self.gossip_interval_s == 0:
            return ""
        host, _, port = (self.http_bind or self.http).rpartition(":")
        return f"{host}:{self.heartbeat_udp_port if self.heartbeat_udp_port is not None else port}"

    def _validate_tls(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "tls_key" if self.tls_cert else "tls_cert"
            raise InvalidInput(f"{missing}: tls_cert and tls_key go together (give both or neither)", field=missing)
        if self.tls_ca and not self.tls_cert:
            # Peers are reached over HTTPS only when this node serves HTTPS itself.
            raise InvalidInput("tls_ca: needs tls_cert and tls_key", field="tls_ca")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            if path:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as exc:
                    raise InvalidInput(f"{name}: cannot read {path} ({exc.strerror})", field=name) from None

    def _validate_pbft(self) -> None:
        # Only that the files are readable: their content is the engine's to check
        # (cluster.pbft.wiring), and the core does not import cluster.
        fault = self.unsafe_pbft_fault
        if fault and fault not in PBFT_FAULTS:
            raise InvalidInput(f"unsafe_pbft_fault: must be one of {', '.join(PBFT_FAULTS)}",
                               field="unsafe_pbft_fault")
        if self.engine != "pbft":
            if fault:
                raise InvalidInput("unsafe_pbft_fault: needs engine pbft", field="unsafe_pbft_fault")
            return
        for name in ("pbft_key_file", "pbft_keyring"):
            path = getattr(self, name)
            if not isinstance(path, str):
                raise InvalidInput(f"{name}: must be a file path", field=name)
            if not path:
                raise InvalidInput(f"{name}: is required with engine pbft", field=name)
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise InvalidInput(f"{name}: cannot read {path} ({exc.strerror})", field=name) from None


SECRET_LENGTH_MIN = 16
SECRET_DISTINCT_MIN = 8
SECRET_ENTROPY_BITS_MIN = 64
STRAIGHT_RUN_SHARE = 0.75  # of neighbour steps that are the same one
# Words a person picks for a secret; one of them alone (or with digits and
# punctuation around it, or repeated) is refused.
COMMON_SECRETS = ("password", "passw0rd", "secret", "changeme", "letmein", "qwerty", "admin", "default",
                  "cluster", "coordinator", "welcome", "trustno1", "iloveyou", "dragon", "master", "test",
                  "example", "abc", "123456789", "0123456789")


def weak_secret(secret: str) -> str | None:
    """Why ``secret`` is obviously weak, or None. Obviously weak means any of:
    fewer than 16 characters; fewer than 8 distinct characters; one shorter
    string repeated (``abcdabcd…``); a straight run (three quarters of the
    neighbours one same step apart, ``abcdefgh…``, ``0123…9abcdef``); under 64 bits by the character
    frequency estimate (length times the Shannon entropy of its characters); or
    a common word (``COMMON_SECRETS``) once or repeated, with only digits,
    punctuation and case around it. ``secrets.token_urlsafe(32)`` (what
    the scripts write) passes all of these with a wide margin."""
    n = len(secret)
    if n < SECRET_LENGTH_MIN:
        return f"it has fewer than {SECRET_LENGTH_MIN} characters"
    if len(set(secret)) < SECRET_DISTINCT_MIN:
        return f"it has fewer than {SECRET_DISTINCT_MIN} distinct characters"
    for period in range(1, n // 2 + 1):
        if n % period == 0 and secret[:period] * (n // period) == secret:
            return "it repeats a shorter string"
    steps = Counter(ord(b) - ord(a) for a, b in itertools.pairwise(secret))
    if steps.most_common(1)[0][1] >= STRAIGHT_RUN_SHARE * (n - 1):
        return "it is (mostly) a straight run of characters (abcd…, or one repeated)"
    counts = Counter(secret)
    bits = -sum(c * math.log2(c / n) for c in counts.values())
    if bits < SECRET_ENTROPY_BITS_MIN:
        return f"it carries under {SECRET_ENTROPY_BITS_MIN} bits by its character frequencies"
    letters = "".join(c for c in secret.lower() if c.isalnum())
    core = letters.strip("0123456789")
    for word in COMMON_SECRETS:
        if letters == word or (core and core == word * (len(core) // len(word))):
            return f"it is a common word ({word!r}) with digits or punctuation around it"
    return None


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", "*"})


def _host(address: str) -> str:
    return address.rpartition(":")[0]


def _check_address(value: str, name: str) -> None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(f"{name}: must be host:port, got {value!r}", field=name)


def parse_peer(text: str) -> PeerConfig:
    """``ID=RAFT_HOST:PORT,HTTP_HOST:PORT``, or ``ID=RAFT@DIAL,HTTP`` to reach
    the peer's Raft port through another address (a proxy)."""
    node_id, sep, rest = text.partition("=")
    raft, comma, http = rest.partition(",")
    raft, at, dial = raft.partition("@")
    if not sep or not comma or not node_id or (at and not dial):
        raise InvalidInput(f"peer: expected ID=RAFT_ADDR[@DIAL_ADDR],HTTP_ADDR, got {text!r}", field="peer")
    return PeerConfig(node_id.strip(), raft.strip(), http.strip(), dial.strip() or None)


def parse_transport(text: str) -> tuple[str, str]:
    """``NAME=URL`` (the error never repeats the URL: it may hold a password)."""
    name, sep, url = text.partition("=")
    if not sep or not name.strip() or not url.strip():
        raise InvalidInput("transport: expected NAME=URL", field="transport")
    return name.strip(), url.strip()


def _read_secret_file(path: str, field: str) -> str:
    """The stripped text of a secret's file; the error names the setting, never the content."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        raise InvalidInput(f"{field}: cannot read it ({exc.strerror})", field=field) from None


def load(path: str | None, overrides: dict[str, Any]) -> NodeConfig:
    """Read ``path`` (TOML) if given, apply non-None ``overrides``, find the secret, validate."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"config: cannot read {path}: {exc}", field="config") from None
    # Both popped: a flag wins over the file's setting, which must not stay behind as an unknown one.
    secret_file = overrides.pop("secret_file", None) or values.pop("secret_file", None)
    values.pop("secret_file", None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    transports = values.pop("transports", {})
    if isinstance(transports, (list, tuple)):  # --transport NAME=URL flags
        transports = dict(parse_transport(t) for t in transports)
    values["transports"] = dict(transports)
    peers = values.pop("peers", ())
    values["peers"] = tuple(p if isinstance(p, PeerConfig) else
                            parse_peer(p) if isinstance(p, str) else PeerConfig(**p) for p in peers)
    accept_secret_file = overrides.pop("accept_secret_file", None) or values.pop("accept_secret_file", None)
    values.pop("accept_secret_file", None)
    known = ({f.name for f in fields(NodeConfig)} | {"admin_token_file", "metrics_token_file"}) - {"accepted_secrets"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown setting", field=unknown[0])
    secret = values.get("secret") or os.environ.get("COORD_CLUSTER_SECRET", "")
    if secret_file:
        secret = _read_secret_file(secret_file, "secret_file")
    values["secret"] = secret
    accepted = _read_secret_file(accept_secret_file, "accept_secret_file") if accept_secret_file else ""
    values["accepted_secrets"] = (accepted,) if accepted and accepted != secret else ()
    admin_token_file = values.pop("admin_token_file", None)
    token = values.get("admin_token") or os.environ.get("COORD_ADMIN_TOKEN", "")
    if admin_token_file:
        token = _read_secret_file(admin_token_file, "admin_token_file")
    values["admin_token"] = token
    metrics_token_file = values.pop("metrics_token_file", None)
    metrics_token = values.get("metrics_token") or os.environ.get("COORD_METRICS_TOKEN", "")
    if metrics_token_file:
        metrics_token = _read_secret_file(metrics_token_file, "metrics_token_file")
    values["metrics_token"] = metrics_token
    names = values.get("http_names", ())
    values["http_names"] = tuple(names) if isinstance(names, (list, tuple)) else names
    for name in ("node_id", "http", "raft", "data_dir"):
        values.setdefault(name, "")
    return replace(NodeConfig(**values)).validate()
