"""The composition root: configuration in, a running node out.

The only module that resolves plugins (``coordinator.engines`` entry points),
so the core never imports ``cluster`` or ``transports``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from aiohttp import web

from coordinator import crypto
from coordinator.api.accesslog import AccessLogger
from coordinator.api.app import make_app
from coordinator.api.auth import AuthSettings
from coordinator.api.limits import BoundedRunner, OpenLimits
from coordinator.clock import (
    CLOCK_OFFSET_FILE,
    OffsetClock,
    SteadyClock,
    SystemClock,
    SystemRng,
    parse_clock_offset,
)
from coordinator.config import NodeConfig
from coordinator.errors import InvalidInput
from coordinator.logs import ACCESS_LOGGER
from coordinator.services.applier import Applier
from coordinator.services.node import CoordinatorNode, Identity
from coordinator.tls import client_context, server_context

log = logging.getLogger("coordinator")

DEV_MODE_WARNING = (
    "anonymous access is allowed (--allow-anonymous, development only): requests without credentials may do "
    "anything, as may every signed agent (no roles are checked); any agent may register as any type with "
    "any endpoint, loopback and private addresses included, and the leader will call it; /metrics is public. "
    "Signatures that are sent are still checked.")


def load_engine_class(name: str) -> Any:
    found = [ep for ep in entry_points(group="coordinator.engines") if ep.name == name]
    if not found:
        known = sorted(ep.name for ep in entry_points(group="coordinator.engines"))
        raise InvalidInput(f"engine: unknown engine {name!r} (installed: {', '.join(known) or 'none'})",
                           field="engine")
    return found[0].load()


def transport_factory(config: NodeConfig) -> Any:
    """``make(name, url)``: a broker transport from the ``coordinator.transports`` entry points."""
    plugins = {ep.name: ep for ep in entry_points(group="coordinator.transports")}

    def make(name: str, url: str) -> Any:
        if name not in plugins:
            raise InvalidInput(f"transports.{name}: unknown transport (installed: {', '.join(sorted(plugins))})",
                               field=f"transports.{name}")
        try:
            plugin = plugins[name].load()
        except ImportError as exc:  # the broker's client library is an extra of its own
            raise InvalidInput(f"transports.{name}: its client library is not installed ({exc.name}); "
                               f"install the extra: pip install 'agentcoord[{name}]'",
                               field=f"transports.{name}") from None
        return plugin(url, namespace=config.transport_namespace)

    return make


def load_transports(config: NodeConfig) -> dict[str, Any]:
    """The broker transports this node's configuration names."""
    make = transport_factory(config)
    return {name: make(name, url) for name, url in config.transports.items()}


FAIL_APPLY_AT_ENV = "COORD_UNSAFE_TEST_FAIL_APPLY_AT"


def unsafe_fail_apply_at() -> int | None:
    """``COORD_UNSAFE_TEST_FAIL_APPLY_AT=<index>``: UNSAFE, tests only. This
    node's replica raises while applying the first entry at or past that
    index, as a handler bug would, and halts (``services.applier``)."""
    value = os.environ.get(FAIL_APPLY_AT_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidInput(f"{FAIL_APPLY_AT_ENV}: must be a log index (a positive integer)", field=FAIL_APPLY_AT_ENV)
    log.warning("UNSAFE test failpoint: this node's replica fails applying the first entry at or past index %s "
                "(%s)", value, FAIL_APPLY_AT_ENV)
    return int(value)


def _listening(advertised: str, bind: str) -> str:
    return f"{bind} (advertised as {advertised})" if bind else advertised


GOSSIP_LOSS_ENV = "COORD_UNSAFE_TEST_GOSSIP_LOSS"


def unsafe_test_gossip_loss() -> float:
    """Tests only: the share (0 to 0.5) of its gossip messages this node drops
    (``COORD_UNSAFE_TEST_GOSSIP_LOSS``), a packet-loss proxy for the
    no-flapping test. Off when unset; the API cannot set it."""
    value = os.environ.get(GOSSIP_LOSS_ENV, "").strip()
    if not value:
        return 0.0
    try:
        loss = float(value)
    except ValueError:
        loss = -1.0
    if not 0.0 <= loss <= 0.5:
        raise InvalidInput(f"{GOSSIP_LOSS_ENV}: must be a share between 0 and 0.5", field=GOSSIP_LOSS_ENV)
    log.warning("UNSAFE test knob: this node drops %.0f %% of its gossip messages (%s)", loss * 100,
                GOSSIP_LOSS_ENV)
    return loss


def make_node(config: NodeConfig, peer_ssl: ssl.SSLContext | None = None) -> CoordinatorNode:
    applier = Applier(fail_apply_at=unsafe_fail_apply_at())
    engine = load_engine_class(config.engine).from_config(config, applier)
    identity = Identity(config.node_id, config.raft, config.http, config.peers)
    # Proposals are stamped and timers fired by a clock that does not take a
    # step of the system's wall clock at once (coordinator.clock.SteadyClock).
    clock = SteadyClock(OffsetClock() if config.unsafe_test_clock_control else SystemClock())
    return CoordinatorNode(identity, engine, applier, clock, SystemRng(),
                           proposal_timeout_s=config.proposal_timeout_s, inflight_max=config.inflight_max,
                           unsafe_stale_reads=config.unsafe_stale_reads, transports=load_transports(config),
                           transport_factory=transport_factory(config), peer_ssl=peer_ssl,
                           check_endpoints=not config.allow_anonymous, digest_check_s=config.digest_check_s,
                           gossip_key=crypto.derived_key(config.secret, crypto.KEY_GOSSIP) if config.secret else None,
                           gossip_interval_s=config.gossip_interval_s,
                           gossip_accepted_keys=tuple(crypto.derived_key(s, crypto.KEY_GOSSIP)
                                                      for s in config.accepted_secrets),
                           unsafe_test_gossip_loss=unsafe_test_gossip_loss(),
                           heartbeat_key=crypto.derived_key(config.secret, crypto.KEY_HEARTBEAT)
                           if config.secret else None,
                           heartbeat_accepted_keys=tuple(crypto.derived_key(s, crypto.KEY_HEARTBEAT)
                                                         for s in config.accepted_secrets),
                           heartbeat_udp_bind=config.heartbeat_udp_bind,
                           heartbeat_udp_rate_max=config.heartbeat_udp_rate_max)


async def follow_clock_offset(clock: OffsetClock, path: str, every_s: float = 0.05) -> None:
    """Set ``clock.offset_ms`` from the control file ``path`` every ``every_s``
    (``--unsafe-test-clock-control``; the clock-skew nemesis writes it). A
    missing file means 0; a bad one is logged and leaves the offset alone."""
    complained = False
    while True:
        try:
            text = await asyncio.to_thread(_read_small, path)
            offset_ms = parse_clock_offset(text)
        except ValueError as exc:
            if not complained:
                log.warning("clock control: %s ignored (%s)", path, exc)
            complained = True
        else:
            complained = False
            if offset_ms != clock.offset_ms:
                log.warning("UNSAFE clock control: wall clock offset %+d ms", offset_ms)
                clock.offset_ms = offset_ms
        await asyncio.sleep(every_s)


def _read_small(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(64)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise ValueError(exc.strerror) from None


async def serve(config: NodeConfig) -> None:
    """Run one node until SIGTERM or SIGINT."""
    # Every file the node writes (journal, snapshots, PBFT state, files
    # pysyncobj creates itself) holds the cluster's data: owner only.
    os.umask(0o077)
    # The engine's tick thread and the event loop hand every command to each
    # other; with CPython's default 5 ms GIL switch interval a busy loop can
    # hold a waiting tick thread back for that long. 1 ms keeps handoffs short.
    sys.setswitchinterval(0.001)
    # Loaded before anything starts, so a bad certificate stops the node at once.
    server_ssl = server_context(config.tls_cert, config.tls_key) if config.tls_cert else None
    peer_ssl = client_context(config.tls_ca or None) if config.tls_cert else None
    if config.unsafe_test_power_loss:  # the engine records; said here too, before anything is written
        log.warning("UNSAFE: --unsafe-test-power-loss: this node records what a power cut would leave of its "
                    "files in %s (chaos tests only; it costs a copy of every synced byte)",
                    os.path.join(config.data_dir, "unsafe-power-loss"))
    node = make_node(config, peer_ssl)
    clock_control = None
    wall = getattr(node.clock, "inner", node.clock)
    if isinstance(wall, OffsetClock):
        log.warning("UNSAFE: this node's wall clock follows %s (chaos tests only)", CLOCK_OFFSET_FILE)
        clock_control = asyncio.create_task(follow_clock_offset(wall, os.path.join(config.data_dir,
                                                                                    CLOCK_OFFSET_FILE)))
    await node.start()
    app = make_app(node, AuthSettings(allow_anonymous=config.allow_anonymous, admin_token=config.admin_token or None,
                                      cluster_secret=config.secret, accepted_secrets=config.accepted_secrets,
                                      metrics_token=config.metrics_token or None,
                                      hosts=config.http_names),
                   chaos_dir=Path(config.chaos_dir or os.path.join(config.data_dir, "chaos")),
                   limits=OpenLimits(long_requests_per_principal=config.long_requests_per_principal,
                                     long_requests_max=config.long_requests_max))
    if config.allow_anonymous:
        log.warning(DEV_MODE_WARNING)
    # handler_cancellation: a long-poll or stream whose client went away must stop
    # taking messages for it. shutdown_timeout: in-flight requests get a second.
    # Header limits are explicit (bodies are capped by make_app at 1 MiB): a request
    # line or header over 8 KiB, or more than 64 headers, is refused before any handler.
    access = {"access_log": logging.getLogger(ACCESS_LOGGER), "access_log_class": AccessLogger} \
        if config.access_log else {"access_log": None}
    runner = BoundedRunner(app, connections_max=config.connections_max, **access, handle_signals=False,
                           handler_cancellation=True, shutdown_timeout=1.0, max_line_size=8190, max_field_size=8190,
                           max_headers=64)
    await runner.setup()
    host, _, port = (config.http_bind or config.http).rpartition(":")
    site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True, ssl_context=server_ssl)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await site.start()
        log.info("node %s serving %s on %s, Raft on %s (engine %s, durability %s)", config.node_id,
                 "HTTPS" if server_ssl else "HTTP", _listening(config.http, config.http_bind),
                 _listening(config.raft, config.raft_bind), config.engine, config.durability)
        if node.udp is not None:
            log.info("node %s takes heartbeat datagrams on UDP %s", config.node_id, node.udp.address)
        await stop.wait()
        log.info("node %s stopping", config.node_id)
    finally:
        node.bus.close()  # long-polls and streams answer now instead of holding the shutdown
        await runner.cleanup()
        await node.stop()
        if clock_control is not None:
            clock_control.cancel()
