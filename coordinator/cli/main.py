"""The ``coordinator`` command: the parser, ``main`` (one exit code per
outcome, see ``exits``), ``serve`` and ``agent-key``; the client commands
live in ``commands`` and ``holding``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import sys
from typing import Any

import aiohttp

from coordinator import config as config_module
from coordinator import logs
from coordinator.cli import exits
from coordinator.cli import snapshot as cli_snapshot
from coordinator.cli.commands import COMMANDS, prepare
from coordinator.cli.holding import hold
from coordinator.cli.settings import global_options, resolve
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
    common = global_options()
    parser = argparse.ArgumentParser(prog="coordinator", description="Raft-replicated coordination service",
                                     epilog=exits.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False, parents=[common])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run one node", allow_abbrev=False)
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
    serve.add_argument("--accept-secret-file", dest="accept_secret_file", metavar="PATH",
                       help="file holding a second secret this node accepts but never sends, while the cluster "
                            "changes its secret one node at a time (docs/operations.md)")
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
    serve.add_argument("--heartbeat-udp-port", dest="heartbeat_udp_port", type=int, metavar="PORT",
                       help="UDP port for agents' heartbeat datagrams, on the host HTTP listens on (default: the "
                            "HTTP port's number; 0: off; needs the cluster secret)")
    serve.add_argument("--tls-cert", dest="tls_cert", metavar="PATH",
                       help="serve HTTPS with this certificate (PEM; needs --tls-key)")
    serve.add_argument("--tls-key", dest="tls_key", metavar="PATH", help="the private key of --tls-cert (PEM)")
    serve.add_argument("--tls-ca", dest="tls_ca", metavar="PATH",
                       help="CA certificate (PEM) the other nodes' certificates chain to, for forwarding to "
                            "the leader over HTTPS (default: the system CAs)")

    _client_commands(sub, common)

    keys = sub.add_parser("agent-key", help="an agent's Ed25519 key file (for the Python client and the dashboard)",
                          allow_abbrev=False)
    keys_sub = keys.add_subparsers(dest="action", required=True)
    new = keys_sub.add_parser("new", help="write a new key file (mode 600) and print its public key",
                              allow_abbrev=False)
    new.add_argument("path")
    new.add_argument("--force", action="store_true", help="replace a file that is there")
    show = keys_sub.add_parser("show", help="print the public key of a key file", allow_abbrev=False)
    show.add_argument("path")
    cli_snapshot.add_parsers(sub)  # backups: snapshot save|status|restore
    return parser


def _positive(text: str) -> int:
    """An argparse type: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _client_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Every command that talks to a running cluster; each takes ``common``."""

    def command(parent: Any, name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help_text, description=help_text, parents=[common],
                                 allow_abbrev=False, epilog=exits.EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def deprecated_endpoint(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--endpoint", default=argparse.SUPPRESS, metavar="HOST:PORT",
                            help="deprecated: --endpoints")

    status = command(sub, "status", "role, term and commit index of every member (exit 1: one is unreachable)")
    deprecated_endpoint(status)
    status.add_argument("--json", action="store_true", help="deprecated: -w json")

    members = command(sub, "members", "list or change the membership (changes need the admin token)")
    deprecated_endpoint(members)
    members_sub = members.add_subparsers(dest="action", required=True)
    command(members_sub, "list", "the members as the answering node knows them")
    add = command(members_sub, "add", "add a voting member (start it first with --peer of all members)")
    deprecated_endpoint(add)
    add.add_argument("--id", required=True)
    add.add_argument("--raft", required=True, metavar="HOST:PORT")
    add.add_argument("--http", required=True, metavar="HOST:PORT")
    remove = command(members_sub, "remove", "remove a member")
    deprecated_endpoint(remove)
    remove.add_argument("--id", required=True)

    kv = command(sub, "kv", "the key/value store")
    kv_sub = kv.add_subparsers(dest="action", required=True)
    get = command(kv_sub, "get", "one key (exit 1: not found)")
    get.add_argument("key")
    get.add_argument("--consistency", choices=("linearizable", "stale"), default="linearizable",
                     help="stale: the answering node's own state, without a read barrier")
    get.add_argument("--value-only", action="store_true",
                     help="print only the value (a string as it is, anything else as JSON)")
    put = command(kv_sub, "put", "write a key")
    put.add_argument("key")
    put.add_argument("value", help="the value as a string ('-': standard input, at most 1 MiB)")
    put.add_argument("--json", action="store_true", help="parse the value as JSON")
    delete = command(kv_sub, "del", "delete a key (exit 1: not found)")
    delete.add_argument("key")
    listing = command(kv_sub, "list", "keys under a prefix, in order")
    listing.add_argument("prefix", nargs="?", default="")
    listing.add_argument("--limit", type=_positive, help="at most this many (default: every key, page by page)")
    watch = command(kv_sub, "watch", "print one line per change under a prefix until --count or Ctrl-C")
    watch.add_argument("prefix", nargs="?", default="")
    watch.add_argument("--from-revision", type=int, metavar="REV", help="start at this revision (default: now)")
    watch.add_argument("--count", type=_positive, metavar="N", help="stop after N changes")

    lock = command(sub, "lock", "hold a lock: run COMMAND while holding it and exit with its status, or print the "
                                "fencing token and hold until Ctrl-C (exit 1: held by another)",
                   usage="coordinator lock [options] NAME [-- COMMAND [ARG ...]]")
    lock.add_argument("name")
    lock.add_argument("--holder", help="who holds it (default: --agent-id)")
    lock.add_argument("--ttl", type=float, default=15.0, metavar="SECONDS",
                      help="lease; refreshed every third of it while held (default 15)")
    lock.add_argument("--wait-s", type=float, default=0.0, metavar="SECONDS",
                      help="keep trying this long while another holds it (default 0)")

    elect = command(sub, "elect", "leader elections")
    elect_sub = elect.add_subparsers(dest="action", required=True)
    campaign = command(elect_sub, "campaign", "become the leader and stay until Ctrl-C (exit 1: another leads)")
    campaign.add_argument("election")
    campaign.add_argument("candidate", nargs="?", help="who campaigns (default: --agent-id)")
    campaign.add_argument("--ttl", type=float, default=15.0, metavar="SECONDS",
                          help="lease; refreshed every third of it while leading (default 15)")
    campaign.add_argument("--wait-s", type=float, default=0.0, metavar="SECONDS",
                          help="keep trying this long while another leads (default 0)")
    leader = command(elect_sub, "leader", "the current leader (exit 1: none)")
    leader.add_argument("election")
    resign = command(elect_sub, "resign", "give up leadership (exit 1: the candidate does not lead)")
    resign.add_argument("election")
    resign.add_argument("candidate")

    publish = command(sub, "publish", "publish one message")
    publish.add_argument("topic")
    publish.add_argument("payload", help="the payload as a string ('-': standard input, at most 1 MiB)")
    publish.add_argument("--json", action="store_true", help="parse the payload as JSON")
    publish.add_argument("--type", help="the message type (default event)")
    publish.add_argument("--header", action="append", metavar="NAME=VALUE", help="a header (repeat)")

    subscribe = command(sub, "subscribe", "print each delivery and ack it, until --count, --max-wait-s or Ctrl-C")
    subscribe.add_argument("topic", help="a topic or a pattern (orders.*, orders.>)")
    subscribe.add_argument("--group", help="join this consumer group (competing consumers)")
    subscribe.add_argument("--filter", help="only messages matching this filter expression")
    subscribe.add_argument("--start", choices=("new", "beginning"),
                           help="new messages only (the default) or from the topic's retained beginning")
    subscribe.add_argument("--count", type=_positive, metavar="N", help="stop after N deliveries")
    subscribe.add_argument("--max-wait-s", type=float, metavar="SECONDS",
                           help="stop after this long in all (exit 1 if fewer than --count came)")

    agents = command(sub, "agents", "registered agents")
    agents_sub = agents.add_subparsers(dest="action", required=True)
    agents_list = command(agents_sub, "list", "agents, optionally of one type")
    agents_list.add_argument("--type")
    agents_show = command(agents_sub, "show", "one agent (exit 1: not registered)")
    agents_show.add_argument("id")

    saga = command(sub, "saga", "sagas")
    saga_sub = saga.add_subparsers(dest="action", required=True)
    saga_list = command(saga_sub, "list", "sagas in creation order")
    saga_list.add_argument("--state", help="only sagas in this state (running, completed, compensating...)")
    saga_list.add_argument("--limit", type=_positive, default=1000, help="at most this many (default 1000)")
    saga_show = command(saga_sub, "show", "one saga with its steps (exit 1: unknown)")
    saga_show.add_argument("id")
    saga_cancel = command(saga_sub, "cancel", "stop a running saga and compensate (exit 1: unknown or ended)")
    saga_cancel.add_argument("id")
    saga_cancel.add_argument("--reason")


def _split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """``lock ... -- COMMAND ...``: the arguments before ``--`` and COMMAND.
    Split by hand: argparse lets a trailing ``REMAINDER`` swallow the
    options that follow the lock's name. Only for ``lock``; every other
    command keeps its ``--`` (``kv put -- -key value``)."""
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    head = argv[:split]
    valued = {"--endpoints", "--token-file", "--agent-id", "--agent-key-file", "--tls-ca", "--timeout", "-w",
              "--write-out"}
    skip = False
    for token in head:
        if skip:
            skip = False
        elif token in valued:
            skip = True
        elif not token.startswith("-"):
            return (head, argv[split + 1:]) if token == "lock" else (argv, [])
    return argv, []


def _names_a_token(arg: str) -> bool:
    """``--token``, ``--token=...`` or an abbreviation of it (not ``--token-file``)."""
    name = arg.split("=", 1)[0]
    return (name.startswith("--tok") and "--token".startswith(name)) or name in ("--token", "--admin-token")


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code (see ``exits``). Errors are one line
    on stderr, never a traceback (``COORD_DEBUG=1`` shows one)."""
    argv, run = _split_command(sys.argv[1:] if argv is None else list(argv))
    if any(_names_a_token(arg) for arg in argv):
        # Refused before argparse, whose error would echo the value back.
        _say("there is no --token: a token on the command line shows in ps; give --token-file PATH, "
             "or COORD_TOKEN / COORD_TOKEN_FILE in the environment")
        return exits.REFUSED
    args = _parser().parse_args(argv)
    args.run = run
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "agent-key":
            return _agent_key(args)
        if args.command == "snapshot":
            return cli_snapshot.run(args)
        settings = resolve(args)
        prepare(args)
        run = hold if args.command == "lock" or (args.command == "elect" and args.action == "campaign") \
            else COMMANDS[args.command]
        return asyncio.run(run(args, settings))
    except exits.Failed as exc:
        _say(exc.message)
        return exc.code
    except CoordinatorError as exc:
        _say(exits.message(exc))
        return exits.exit_code(exc)
    except (aiohttp.ClientError, TimeoutError) as exc:  # a stream that kept failing to reconnect
        _say(f"could not reach the cluster: {type(exc).__name__} (the cluster could not answer)")
        return exits.UNAVAILABLE
    except BrokenPipeError:
        # The reader went away (``coordinator kv watch | head -3``): a normal end of a pipeline.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exits.OK
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"{where}{exc.strerror}" if exc.strerror else f"{type(exc).__name__}: {exc}")
        return exits.REFUSED
    except (KeyboardInterrupt, exits.Interrupted):
        return exits.INTERRUPTED
    except Exception as exc:  # a bug: said in one line unless debugging
        if os.environ.get("COORD_DEBUG"):
            raise
        _say(f"unexpected error: {type(exc).__name__}: {exc} (COORD_DEBUG=1 shows the traceback)")
        return exits.UNAVAILABLE


def _say(text: str) -> None:
    print(f"coordinator: {text}", file=sys.stderr)


# The serve flags that are settings of the node (NodeConfig fields, or the files they are read from).
SERVE_SETTINGS = ("node_id", "http", "raft", "http_bind", "raft_bind", "data_dir", "engine", "durability",
                  "log_level", "log_format", "access_log", "secret_file", "accept_secret_file",
                  "compaction_entries", "compaction_bytes",
                  "unsafe_stale_reads",
                  "transport_namespace", "unsafe_test_clock_control", "unsafe_test_power_loss", "tls_cert",
                  "tls_key", "tls_ca", "allow_anonymous", "admin_token_file", "pbft_key_file", "pbft_keyring",
                  "unsafe_pbft_fault", "chaos_dir", "connections_max", "long_requests_per_principal",
                  "long_requests_max", "metrics_token_file", "heartbeat_udp_port")


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
