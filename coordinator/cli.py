"""The ``coordinator`` command: ``serve``, ``status``, ``members add|remove``,
``agent-key new|show``."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import sys
from typing import Any

from coordinator import config as config_module
from coordinator import logs
from coordinator.client import CoordinatorClient
from coordinator.crypto import AgentKeys
from coordinator.errors import CoordinatorError

DISTRIBUTION = "agentcoord"
# What ``serve`` imports beyond the client (the extra "server").
SERVER_MODULES = frozenset({"pysyncobj", "cryptography", "msgpack", "sortedcontainers", "prometheus_client"})


def version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator", description="Raft-replicated coordination service")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one node")
    serve.add_argument("--config", help="TOML file with the settings below (flags win)")
    serve.add_argument("--node-id", dest="node_id")
    serve.add_argument("--http", help="this node's HTTP address host:port, as peers and clients reach it "
                                      "(listened on, unless --http-bind)")
    serve.add_argument("--raft", help="this node's Raft address host:port, its identity in the cluster "
                                      "(listened on, unless --raft-bind)")
    serve.add_argument("--http-bind", dest="http_bind", metavar="HOST:PORT",
                       help="listen for HTTP here instead, e.g. 0.0.0.0:7001 (--http stays what others are told)")
    serve.add_argument("--raft-bind", dest="raft_bind", metavar="HOST:PORT",
                       help="listen for Raft here instead, e.g. 0.0.0.0:7101 (engine raft)")
    serve.add_argument("--data-dir", dest="data_dir")
    serve.add_argument("--peer", dest="peers", action="append",
                       help="another member: ID=RAFT_HOST:PORT,HTTP_HOST:PORT (repeat)")
    serve.add_argument("--secret-file", dest="secret_file",
                       help="file holding the cluster secret (else COORD_CLUSTER_SECRET)")
    serve.add_argument("--engine", help="consensus engine: raft (default) or pbft (3f+1 nodes, "
                                        "needs --pbft-key-file and --pbft-keyring)")
    serve.add_argument("--pbft-key-file", dest="pbft_key_file", metavar="PATH",
                       help="engine pbft: this node's Ed25519 key file (mode 600)")
    serve.add_argument("--pbft-keyring", dest="pbft_keyring", metavar="PATH",
                       help='engine pbft: JSON file {"NODE_ID": "PUBLIC_KEY", ...} with every member\'s public key')
    serve.add_argument("--unsafe-pbft-fault", dest="unsafe_pbft_fault", metavar="KIND",
                       choices=config_module.PBFT_FAULTS,
                       help="UNSAFE, for chaos demonstrations only: this PBFT node turns Byzantine "
                            f"({', '.join(config_module.PBFT_FAULTS)})")
    serve.add_argument("--durability", choices=config_module.DURABILITY,
                       help="fsync (default) or none (benchmarks only: loses data on power loss)")
    serve.add_argument("--compaction-entries", dest="compaction_entries", type=int,
                       help="snapshot and compact the log beyond this many entries (default 20000)")
    serve.add_argument("--compaction-bytes", dest="compaction_bytes", type=int,
                       help="or once the journal holds this many bytes (default 67108864)")
    serve.add_argument("--transport", dest="transports", action="append", metavar="NAME=URL",
                       help="a broker transport, e.g. redis=redis://127.0.0.1:6379/0 (repeatable)")
    serve.add_argument("--transport-namespace", dest="transport_namespace",
                       help="prefix of every broker resource (the same on every node; default coord)")
    serve.add_argument("--log-level", dest="log_level")
    serve.add_argument("--log-format", dest="log_format", choices=("text", "json"),
                       help="text (default) or json: one object per line, for log collectors")
    serve.add_argument("--access-log", dest="access_log", action="store_true", default=None,
                       help="log every HTTP request (method, path without query, status, ms, principal)")
    serve.add_argument("--unsafe-stale-reads", dest="unsafe_stale_reads", action="store_true", default=None,
                       help="UNSAFE, for chaos demonstrations: serve default reads from local state "
                            "without a barrier (stale, not linearizable)")
    serve.add_argument("--unsafe-test-clock-control", dest="unsafe_test_clock_control", action="store_true",
                       default=None,
                       help="UNSAFE, for chaos tests only: shift this node's wall clock by the milliseconds "
                            "written in <data-dir>/unsafe-clock-offset-ms (the clock-skew nemesis)")
    serve.add_argument("--unsafe-test-power-loss", dest="unsafe_test_power_loss", action="store_true",
                       default=None,
                       help="UNSAFE, for chaos tests only: record after every fsync what of this node's files a "
                            "power cut would leave, in <data-dir>/unsafe-power-loss/ (the lost-fsync nemesis)")
    serve.add_argument("--allow-anonymous", dest="allow_anonymous", action="store_true", default=None,
                       help="let requests without credentials do anything (development only; default: "
                            "every request needs the admin token or an agent's signature)")
    serve.add_argument("--chaos-dir", dest="chaos_dir", metavar="PATH",
                       help="chaos runs (python -m chaos.run --out) the dashboard shows (default <data-dir>/chaos)")
    serve.add_argument("--connections-max", dest="connections_max", type=int,
                       help="open HTTP connections this node accepts (default 8192, kept under the "
                            "descriptor limit); more get a 503 and are closed")
    serve.add_argument("--long-requests-per-principal", dest="long_requests_per_principal", type=int,
                       help="SSE streams and long polls one caller may hold on this node (default 64; then 429)")
    serve.add_argument("--long-requests-max", dest="long_requests_max", type=int,
                       help="SSE streams and long polls this node holds in all (default 1024; then 503)")
    serve.add_argument("--admin-token-file", dest="admin_token_file", metavar="PATH",
                       help="file holding the admin credential (or COORD_ADMIN_TOKEN)")
    serve.add_argument("--metrics-token-file", dest="metrics_token_file", metavar="PATH",
                       help="file holding a token that may read /metrics and nothing else (or COORD_METRICS_TOKEN); "
                            "on a secure node /metrics needs it or the admin token")
    serve.add_argument("--http-name", dest="http_names", action="append", metavar="HOST[:PORT]",
                       help="another name clients reach this node's HTTP by (repeat); agents' signatures must "
                            "name one of this node's names as Host")
    serve.add_argument("--tls-cert", dest="tls_cert", metavar="PATH",
                       help="serve HTTPS with this certificate (PEM; needs --tls-key)")
    serve.add_argument("--tls-key", dest="tls_key", metavar="PATH", help="the private key of --tls-cert (PEM)")
    serve.add_argument("--tls-ca", dest="tls_ca", metavar="PATH",
                       help="CA certificate (PEM) the other nodes' certificates chain to, for forwarding to "
                            "the leader over HTTPS (default: the system CAs)")

    status = sub.add_parser("status", help="role, term and commit index of every member")
    status.add_argument("--endpoint", required=True, help="HTTP address of any member")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--tls-ca", dest="tls_ca", metavar="PATH", help="CA certificate of an HTTPS cluster")

    members = sub.add_parser("members", help="change the membership")
    members.add_argument("--tls-ca", dest="tls_ca", metavar="PATH", help="CA certificate of an HTTPS cluster")
    members_sub = members.add_subparsers(dest="action", required=True)
    add = members_sub.add_parser("add", help="add a voting member (start it first with --peer of all members)")
    add.add_argument("--endpoint", required=True)
    add.add_argument("--id", required=True)
    add.add_argument("--raft", required=True)
    add.add_argument("--http", required=True)
    remove = members_sub.add_parser("remove", help="remove a member")
    remove.add_argument("--endpoint", required=True)
    remove.add_argument("--id", required=True)

    keys = sub.add_parser("agent-key", help="an agent's Ed25519 key file (for the Python client and the dashboard)")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    new = keys_sub.add_parser("new", help="write a new key file (mode 600) and print its public key")
    new.add_argument("path")
    new.add_argument("--force", action="store_true", help="replace a file that is there")
    show = keys_sub.add_parser("show", help="print the public key of a key file")
    show.add_argument("path")
    from coordinator import cli_snapshot  # backups: snapshot save|status|restore
    cli_snapshot.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "status":
            return asyncio.run(_status(args))
        if args.command == "agent-key":
            return _agent_key(args)
        if args.command == "snapshot":
            from coordinator import cli_snapshot
            return cli_snapshot.run(args)
        return asyncio.run(_members(args))
    except CoordinatorError as exc:
        print(f"coordinator: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"coordinator: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# The serve flags that are settings of the node (NodeConfig fields, or the files they are read from).
SERVE_SETTINGS = ("node_id", "http", "raft", "http_bind", "raft_bind", "data_dir", "engine", "durability",
                  "log_level", "log_format", "access_log", "secret_file", "compaction_entries", "compaction_bytes",
                  "unsafe_stale_reads",
                  "transport_namespace", "unsafe_test_clock_control", "unsafe_test_power_loss", "tls_cert",
                  "tls_key", "tls_ca", "allow_anonymous", "admin_token_file", "pbft_key_file", "pbft_keyring",
                  "unsafe_pbft_fault", "chaos_dir", "connections_max", "long_requests_per_principal",
                  "long_requests_max", "metrics_token_file")


def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {name: getattr(args, name) for name in SERVE_SETTINGS}
    if args.http_names:
        overrides["http_names"] = args.http_names
    if args.peers:
        overrides["peers"] = args.peers
    if args.transports:
        overrides["transports"] = args.transports
    cfg = config_module.load(args.config, overrides)
    logs.configure(cfg.log_level, cfg.log_format)
    try:
        from coordinator.main import serve  # the composition root, only when serving
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        print(f"coordinator: serving needs the server extra ({exc.name} is missing): "
              f"pip install '{DISTRIBUTION}[server]'", file=sys.stderr)
        return 2

    asyncio.run(serve(cfg))
    return 0


async def _status(args: argparse.Namespace) -> int:
    async with CoordinatorClient(args.endpoint, timeout_s=3, ca_file=args.tls_ca) as client:
        first = await client.status()
        rows = []
        for member in first["members"]:
            row: dict[str, Any] = {"id": member["id"], "http": member["http"], "raft": member["raft"]}
            try:
                if not member["http"]:
                    raise CoordinatorError("unknown HTTP address")
                scheme = client.endpoint.partition("://")[0]  # members serve what this one serves
                async with CoordinatorClient(f"{scheme}://{member['http']}", timeout_s=2, ca_file=args.tls_ca) as one:
                    st = await one.status()
                row.update(role=st["role"], term=st["term"], commit_index=st["commit_index"],
                           applied_index=st["applied_index"], healthy=st["healthy"])
            except CoordinatorError as exc:
                row.update(role="unreachable", error=exc.message)
            rows.append(row)
    if args.json:
        print(json.dumps({"leader": first["leader"], "members": rows}, indent=2))
        return 0
    columns = ("id", "http", "raft", "role", "term", "commit_index", "applied_index", "healthy")
    table = [columns] + [tuple(str(r.get(c, "-")) for c in columns) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0 if all(r["role"] != "unreachable" for r in rows) else 1


def _agent_key(args: argparse.Namespace) -> int:
    """``new``: a fresh identity written to ``path`` (not over a file there
    unless ``--force``); ``show``: the key file's public key. Prints
    ``{"public_key"}``, what the agent registers; never the private part."""
    if args.action == "new":
        if os.path.lexists(args.path) and not args.force:
            print(f"coordinator: {args.path} exists (--force replaces it)", file=sys.stderr)
            return 2
        keys = AgentKeys.generate()
        keys.save(args.path)
    else:
        keys = AgentKeys.load(args.path)
    print(json.dumps({"public_key": keys.public_key}))
    return 0


async def _members(args: argparse.Namespace) -> int:
    async with CoordinatorClient(args.endpoint, ca_file=args.tls_ca) as client:
        if args.action == "add":
            result = await client.add_member(args.id, args.raft, args.http)
        else:
            result = await client.remove_member(args.id)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
