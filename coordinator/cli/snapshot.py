"""``coordinator snapshot save|status|restore``: backups and new clusters.

- ``save FILE --endpoint URL``: ``GET /v1/snapshot`` (admin token from
  ``--admin-token-file`` or ``COORD_ADMIN_TOKEN``), streamed to ``FILE.tmp``,
  checked (``coordinator.snapshot_file``) and against the node's checksum
  header, fsynced, renamed onto ``FILE`` (never over a file there without
  ``--force``). ``save FILE --from-data-dir D``: offline, from a STOPPED
  node's data directory (its snapshot plus every entry in its journal, replayed
  through the state machine): the way out when a majority is gone.
- ``status FILE``: checks the file and prints its index, term, digest, size
  and what it holds.
- ``restore FILE --data-dir D --node-id ID --http H --raft R --peer ...``:
  offline, writes a fresh data directory that starts a NEW cluster from the
  snapshot (the engine's ``seed_data_dir``). Every member restored from the
  same file with the same members holds the same state.

Output is one JSON object on stdout (``--json``) or a few ``name: value``
lines. Exit codes: 0 done, 2 refused (a bad file, a non-empty directory, an
error from the node), 1 for a checksum that did not match what the node said.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from typing import Any

from coordinator import config as config_module
from coordinator import snapshot_file
from coordinator.cli.settings import DEFAULT_ENDPOINTS, ENV, TOKEN_ENV, read_token_file
from coordinator.errors import CoordinatorError, InvalidInput

CHUNK_BYTES = 1 << 20
SNAPSHOT_MAX_BYTES = 8 << 30  # refuse to write more than this from one response
ENGINES_WITH_RESTORE = ("raft",)


def add_parsers(sub: Any) -> None:
    """Add ``snapshot`` and its actions to the ``coordinator`` command's subparsers."""
    snap = sub.add_parser("snapshot", help="save, check and restore backups (consistent snapshots)")
    actions = snap.add_subparsers(dest="action", required=True)

    save = actions.add_parser("save", help="save a consistent snapshot of the cluster's state to FILE")
    save.add_argument("file", metavar="FILE")
    where = save.add_mutually_exclusive_group()
    where.add_argument("--endpoint", help="HTTP address of any member (the snapshot reflects every write "
                                          "acknowledged before it; default: the first of COORD_ENDPOINTS)")
    where.add_argument("--from-data-dir", dest="from_data_dir", metavar="DIR",
                       help="offline: read a STOPPED node's data directory instead (its snapshot and every "
                            "entry of its journal): for recovering when a majority is lost")
    save.add_argument("--admin-token-file", dest="admin_token_file", metavar="PATH",
                      help="file holding the admin token (else COORD_ADMIN_TOKEN; none for an anonymous node)")
    save.add_argument("--tls-ca", dest="tls_ca", metavar="PATH", help="CA certificate of an HTTPS cluster")
    save.add_argument("--timeout", type=float, default=120.0, help="seconds for the whole download (120)")
    save.add_argument("--force", action="store_true", help="replace FILE if it exists")
    save.add_argument("--json", action="store_true", help="print JSON")

    status = actions.add_parser("status", help="check a snapshot file and print what it holds")
    status.add_argument("file", metavar="FILE")
    status.add_argument("--json", action="store_true", help="print JSON")

    restore = actions.add_parser("restore", help="offline: write a fresh data directory that starts a NEW "
                                                 "cluster from FILE (run it for every member, same --peer set)")
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("--data-dir", dest="data_dir", required=True, help="must not exist or be empty")
    restore.add_argument("--node-id", dest="node_id", required=True)
    restore.add_argument("--http", required=True, help="this member's HTTP address host:port")
    restore.add_argument("--raft", required=True, help="this member's Raft address host:port")
    restore.add_argument("--peer", dest="peers", action="append", default=[],
                         help="another member of the new cluster: ID=RAFT_HOST:PORT,HTTP_HOST:PORT (repeat)")
    restore.add_argument("--engine", default="raft", help="consensus engine (raft)")
    restore.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``coordinator snapshot <action>``; the exit code."""
    try:
        if args.action == "save":
            if args.from_data_dir:
                return _print(args, _save_offline(args))
            return _print(args, _save(args))
        if args.action == "status":
            return _print(args, _status(args.file))
        return _print(args, _restore(args))
    except ChecksumMismatch as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # status, restore and --from-data-dir read the state: the server's modules
        print(f"coordinator: snapshot {args.action} needs the server extra ({exc.name} is missing): "
              "pip install 'agentcoord[server]'", file=sys.stderr)
        return 2
    except CoordinatorError as exc:
        print(f"coordinator: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"coordinator: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2


class ChecksumMismatch(Exception):
    pass


def _print(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def _summary(snap: snapshot_file.SnapshotFile, size: int) -> dict[str, Any]:
    h = snap.header
    return {"index": h["index"], "term": h.get("term"), "digest": h.get("digest", {}).get("value"),
            "size_bytes": size, "sha256": snap.checksum, "node": h.get("node"), "created_ms": h.get("created_ms"),
            "holds": h.get("holds", {}), "members": h.get("members", [])}


# -- save ------------------------------------------------------------------------------------


def _target(path: str, force: bool) -> str:
    if os.path.lexists(path) and not force:
        raise InvalidInput(f"{path} exists (--force replaces it)", field="file")
    return path + ".tmp"


def _admin_token(args: argparse.Namespace) -> str | None:
    """``--admin-token-file``, else the other commands' COORD_TOKEN_FILE or
    COORD_TOKEN, else the node's COORD_ADMIN_TOKEN."""
    if args.admin_token_file:
        try:
            with open(args.admin_token_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise InvalidInput(f"admin_token_file: cannot read it ({exc.strerror})", field="admin_token_file") from None
    if os.environ.get(ENV["token_file"]):
        return read_token_file(os.environ[ENV["token_file"]])
    return os.environ.get(TOKEN_ENV) or os.environ.get("COORD_ADMIN_TOKEN") or None


def _endpoint(args: argparse.Namespace) -> str:
    """``--endpoint``, else the first of COORD_ENDPOINTS, else the default."""
    if args.endpoint:
        return str(args.endpoint)
    return (os.environ.get(ENV["endpoints"]) or DEFAULT_ENDPOINTS).split(",")[0].strip()


def _save(args: argparse.Namespace) -> dict[str, Any]:
    tmp = _target(args.file, args.force)
    try:
        size, said = asyncio.run(_download(args, tmp))
        snap = snapshot_file.read(tmp)
        if said and said != snap.checksum:
            raise ChecksumMismatch(f"the node said sha256 {said}, the file has {snap.checksum}: not saved")
    except BaseException:
        _discard(tmp)
        raise
    _commit(tmp, args.file)
    return {"file": args.file, **_summary(snap, size)}


async def _download(args: argparse.Namespace, tmp: str) -> tuple[int, str]:
    """Stream ``GET /v1/snapshot`` into ``tmp`` (fsynced; file work off the
    loop): the bytes written and the checksum the node announced."""
    import aiohttp  # the client's own dependency

    from coordinator.tls import client_context

    endpoint = _endpoint(args).rstrip("/")
    tls_ca = args.tls_ca or os.environ.get(ENV["tls_ca"]) or None
    scheme = "https" if tls_ca else "http"
    url = f"{endpoint if '://' in endpoint else f'{scheme}://{endpoint}'}/v1/snapshot"
    token = _admin_token(args)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    connector = aiohttp.TCPConnector(ssl=client_context(tls_ca)) if tls_ca else None
    size = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=args.timeout),
                                     connector=connector) as session:
        try:
            async with session.get(url, headers=headers) as response:
                if response.status != 200:
                    raise InvalidInput(f"{endpoint} answered {response.status}: {_error_text(await response.read())}",
                                       field="endpoint")
                said = response.headers.get("X-Coord-Snapshot-Sha256", "")
                out = await asyncio.to_thread(_open_new, tmp)
                try:
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        size += len(chunk)
                        if size > SNAPSHOT_MAX_BYTES:
                            raise InvalidInput(f"the snapshot exceeds {SNAPSHOT_MAX_BYTES} bytes", field="endpoint")
                        await asyncio.to_thread(out.write, chunk)
                    await asyncio.to_thread(_sync, out)
                finally:
                    await asyncio.to_thread(out.close)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise InvalidInput(f"downloading from {endpoint} failed: {type(exc).__name__}", field="endpoint") from None
    return size, said


def _open_new(path: str) -> Any:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return os.fdopen(fd, "wb")


def _sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())


def _error_text(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode("utf-8", "replace")


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _commit(tmp: str, path: str) -> None:
    """Rename ``tmp`` (already fsynced) onto ``path`` and sync the directory."""
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _write_file(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    _commit(tmp, path)


def _save_offline(args: argparse.Namespace) -> dict[str, Any]:
    """The state a stopped node's data directory holds, as a snapshot file:
    its snapshot, then every entry of ours in its journal replayed in order
    (committed or not: the survivor's log is all there is)."""
    from coordinator.main import load_engine_class  # the server extra
    from coordinator.services.applier import Applier

    tmp = _target(args.file, args.force)
    engine = load_engine_class("raft")
    found = engine.read_data_dir(args.from_data_dir)
    applier = Applier()
    if found["fsm"] is not None:
        applier.restore(found["fsm"])
    for index, _term, blob in found["entries"]:
        applier.apply(index, blob)
    m = applier.machine
    body = applier.snapshot()
    header = {
        "index": m.applied_index,
        "term": found["last_term"],
        "digest": {"index": applier.digest.index, "value": applier.digest.value.hex()},
        "node": f"offline:{os.path.abspath(args.from_data_dir)}",
        "created_ms": None,
        "holds": {"keys": len(m.kv), "kv_revision": m.kv.revision, "agents": len(m.registry.agents),
                  "locks": len(m.locks.locks), "topics": len(m.bus.topics),
                  "subscriptions": len(m.bus.subscriptions), "sagas": len(m.sagas.sagas),
                  "stored_events": m.store.events_count, "members": len(m.members.members)},
        "members": sorted(({"id": i, "raft": r.raft, "http": r.http} for i, r in m.members.members.items()),
                          key=lambda r: r["id"]),
        "source": {"snapshot_index": found["snapshot_index"], "last_index": found["last_index"],
                   "saved_commit_index": found["commit_index"], "entries_replayed": len(found["entries"]),
                   "entries_skipped": found["skipped"]},
    }
    data, _ = snapshot_file.encode(header, body)
    _write_file(tmp, data)
    snap = snapshot_file.read(tmp)
    _commit(tmp, args.file)
    result = {"file": args.file, **_summary(snap, len(data)), "source": header["source"]}
    if found["last_index"] > found["commit_index"]:
        result["note"] = (f"entries {found['commit_index'] + 1}..{found['last_index']} were in this node's log "
                          "but maybe not committed by the old cluster (the saved commit index lags by up to a "
                          "second); they are in the snapshot")
    return result


# -- status and restore ---------------------------------------------------------------------


def _status(path: str) -> dict[str, Any]:
    snap = snapshot_file.read(path)
    from coordinator.codec import decode_snapshot  # the server extra (msgpack)

    data = decode_snapshot(snap.body)
    if data.get("applied_index") != snap.index:
        raise InvalidInput(f"snapshot: the state is at index {data.get('applied_index')}, the header says "
                           f"{snap.index}", field="snapshot")
    return {"file": path, **_summary(snap, os.path.getsize(path)), "valid": True}


def _restore(args: argparse.Namespace) -> dict[str, Any]:
    if args.engine not in ENGINES_WITH_RESTORE:
        raise InvalidInput(f"engine: restore supports {', '.join(ENGINES_WITH_RESTORE)}", field="engine")
    snap = snapshot_file.read(args.file)
    peers = [config_module.parse_peer(p) for p in args.peers]
    # The same checks a node runs on its settings (addresses, repeated ids); the
    # secret is not restore's business, a random one passes the secret's checks.
    config_module.NodeConfig(node_id=args.node_id, http=args.http, raft=args.raft, data_dir=args.data_dir,
                             peers=tuple(peers), secret=secrets.token_urlsafe(32), allow_anonymous=True).validate()
    from coordinator.codec import decode_snapshot
    from coordinator.main import load_engine_class

    if decode_snapshot(snap.body).get("applied_index") != snap.index:
        raise InvalidInput("snapshot: the state's index differs from the header's", field="snapshot")
    members = [args.raft, *(p.raft for p in peers)]
    try:
        load_engine_class(args.engine).seed_data_dir(args.data_dir, snap.body, snap.index, members)
    except Exception as exc:  # the engine's own error type: the core may not import it
        if type(exc).__name__ != "EngineError":
            raise
        raise InvalidInput(f"data_dir: {exc}", field="data_dir") from None
    new_ids = {args.node_id, *(p.id for p in peers)}
    stale = [m["id"] for m in snap.header.get("members", []) if m["id"] not in new_ids]
    result = {"data_dir": args.data_dir, "index": snap.index, "sha256": snap.checksum, "members": sorted(members)}
    if stale:
        result["stale_members"] = stale
        result["note"] = ("the state's member table still names " + ", ".join(stale) + ": once the new cluster "
                          "runs, remove each with: coordinator members remove --endpoint URL --id ID")
    return result
