"""From a node's configuration to a ``PbftEngine``'s arguments, and dev keys.

``engine_kwargs(config)`` reads a ``coordinator.config.NodeConfig`` (duck
typed: this package never imports the coordinator's config) and returns
every keyword argument of ``PbftEngine`` but ``fsm``:

- **Members.** This node plus ``config.peers``, ordered by node id: replica
  ``i`` is the i-th id in that order, the same on every node whatever the
  order of its ``--peer`` flags. Each replica's address is its ``raft``
  address: the consensus port, which carries PBFT frames under this engine.
  n must be 3f+1 with f >= 1 (4, 7, 10, ...). A peer reached through a
  ``dial`` address (the chaos proxy) is refused: the PBFT node dials the
  configured addresses only.
- **Keys.** ``pbft_key_file`` is this node's ``AgentKeys`` file. It signs
  both the replica's protocol messages and the engine's client requests:
  ``messages.SIGNING_CONTEXT`` and ``REQUEST_CONTEXT`` prefix what is signed,
  so a signature of one kind never verifies as the other. ``pbft_keyring``
  is a JSON object ``{"<node id>": "<public key, base64>", ...}`` with
  exactly one key per member (the same file on every node); this node's
  entry must be its own key's public key. Errors are ``InvalidInput``
  naming ``peers``, ``pbft_key_file`` or ``pbft_keyring``, and never show
  key material.
- **Timings.** ``request_timeout_ms`` is the proposal timeout,
  ``view_change_timeout_ms`` the upper election timeout; the other engine
  settings keep ``PbftEngine``'s defaults.

Both functions do blocking file I/O: call them at startup, or from a
thread, not from a running event loop.

``write_dev_keys`` (and ``python -m cluster.pbft.wiring dev-keys DIR ID...``,
which ``devcluster.cluster`` runs because the core may not import this
package) makes the keys of a local dev cluster. The private keys sit
unencrypted next to the data: local clusters only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator.crypto import PUBLIC_KEY_BYTES, AgentKeys, SealError
from coordinator.errors import InvalidInput

KEYRING_FILE = "keyring.json"
MAX_KEYRING_BYTES = 1 << 20  # about 20000 members: far beyond any PBFT cluster


def faults_tolerated(n: int) -> int:
    """f for ``n`` replicas when ``n`` is 3f+1 with f >= 1, else 0."""
    return (n - 1) // 3 if n >= 4 and (n - 1) % 3 == 0 else 0


def members(config: Any) -> list[tuple[str, str]]:
    """``(node id, raft address)`` of every member, ordered by node id.
    Raises ``InvalidInput`` (field ``peers``) for a peer with ``dial`` set
    or a member count that is not 3f+1."""
    for peer in config.peers:
        if peer.dial is not None:
            raise InvalidInput(f"peers: {peer.id} is reached through {peer.dial}; PBFT links cannot go through "
                               "the chaos proxy yet (drop the @DIAL part)", field="peers")
    found = sorted([(config.node_id, config.raft), *((p.id, p.raft) for p in config.peers)])
    if not faults_tolerated(len(found)):
        raise InvalidInput(f"peers: PBFT needs 3f+1 nodes with f >= 1 (4, 7, 10, ...), this cluster has "
                           f"{len(found)} (this node and {len(found) - 1} peers)", field="peers")
    return found


def engine_kwargs(config: Any) -> dict[str, Any]:
    """The keyword arguments of ``PbftEngine`` but ``fsm``, from a ``NodeConfig``.
    See the module docstring. Raises ``InvalidInput``. Blocking."""
    ordered = members(config)
    ids = [node_id for node_id, _ in ordered]
    keys = load_key_file(config.pbft_key_file)
    keyring = load_keyring(config.pbft_keyring, ids)
    if keyring[config.node_id] != keys.public_key:
        raise InvalidInput(f"pbft_keyring: the key listed for {config.node_id} (this node) is not the public key "
                           "of pbft_key_file", field="pbft_keyring")
    public_keys = [keyring[node_id] for node_id in ids]
    return {
        "replica_id": ids.index(config.node_id),
        "addresses": [address for _, address in ordered],
        "keys": keys,
        "public_keys": public_keys,
        "client_keys": keys,
        "client_public_keys": list(public_keys),
        # The proposer gives up at proposal_timeout_s; the engine frees the
        # session at the same time instead of holding it for a caller gone.
        "request_timeout_ms": round(config.proposal_timeout_s * 1000),
        "queue_timeout_ms": round(config.proposal_timeout_s * 1000),
        "view_change_timeout_ms": round(config.election_timeout_max_s * 1000),
        "fault": config.unsafe_pbft_fault or None,
        "data_dir": config.data_dir,
        "durability": config.durability,
        "power_loss": config.unsafe_test_power_loss,
    }


def load_key_file(path: str) -> AgentKeys:
    """This node's ``AgentKeys``; ``InvalidInput`` (field ``pbft_key_file``) if unusable. Blocking."""
    if not path:
        raise InvalidInput("pbft_key_file: is required with engine pbft", field="pbft_key_file")
    try:
        return AgentKeys.load(path)
    except SealError as exc:  # its messages name the problem, never the key
        raise InvalidInput(f"pbft_key_file: {exc.message}", field="pbft_key_file") from None
    except OSError as exc:
        raise InvalidInput(f"pbft_key_file: cannot read {path} ({exc.strerror})", field="pbft_key_file") from None


def load_keyring(path: str, member_ids: Sequence[str]) -> dict[str, str]:
    """``{node id: public key}`` for exactly ``member_ids``, read from ``path``.
    Raises ``InvalidInput`` (field ``pbft_keyring``). Blocking."""

    def refuse(reason: str) -> InvalidInput:
        return InvalidInput(f"pbft_keyring: {path}: {reason}", field="pbft_keyring")

    if not path:
        raise InvalidInput("pbft_keyring: is required with engine pbft", field="pbft_keyring")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEYRING_BYTES + 1)
    except OSError as exc:
        raise refuse(f"cannot read it ({exc.strerror})") from None
    if len(data) > MAX_KEYRING_BYTES:
        raise refuse(f"larger than {MAX_KEYRING_BYTES} bytes")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise refuse("not JSON") from None
    if not isinstance(document, dict):
        raise refuse('must be a JSON object {"<node id>": "<public key>", ...}')
    unknown = sorted(set(document) - set(member_ids))
    if unknown:
        raise refuse(f"{_short(unknown[0])} is not a member (members: {', '.join(sorted(member_ids))})")
    missing = [node_id for node_id in member_ids if node_id not in document]
    if missing:
        raise refuse(f"no key for member {missing[0]}")
    owners: dict[str, str] = {}
    for node_id in sorted(member_ids):
        key = document[node_id]
        if not _is_public_key(key):
            raise refuse(f"the key of {node_id} is not a base64 Ed25519 public key ({PUBLIC_KEY_BYTES} bytes)")
        if key in owners:
            # One key for two replicas would let either sign as the other: two faults for the price of one.
            raise refuse(f"{owners[key]} and {node_id} have the same key")
        owners[key] = node_id
    return {node_id: document[node_id] for node_id in member_ids}


def _is_public_key(value: Any) -> bool:
    """Canonical padded standard base64 of ``PUBLIC_KEY_BYTES`` bytes (as ``AgentKeys.public_key`` gives)."""
    if not isinstance(value, str) or len(value) > 4 * ((PUBLIC_KEY_BYTES + 2) // 3):
        return False
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == PUBLIC_KEY_BYTES and base64.b64encode(raw).decode("ascii") == value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- dev keys --------------------------------------------------------------------------------------------


def write_dev_keys(directory: Path, node_ids: list[str]) -> None:
    """Make ``<directory>/<id>.key`` for each id that has none (``AgentKeys``,
    mode 600; existing keys are kept) and write ``<directory>/keyring.json``
    for exactly ``node_ids`` (atomically, replacing any earlier one).
    Raises ``ValueError`` for an id that is not a plain file name, and
    ``OSError``/``SealError`` for an unwritable directory or a broken key file.
    Blocking."""
    if not node_ids:
        raise ValueError("no node ids")
    for node_id in node_ids:
        if not node_id or node_id != Path(node_id).name or node_id.startswith("."):
            raise ValueError(f"node id {node_id!r} is not a plain file name")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    keyring: dict[str, str] = {}
    for node_id in node_ids:
        path = directory / f"{node_id}.key"
        if not path.exists():
            AgentKeys.generate().save(path)
        keyring[node_id] = AgentKeys.load(path).public_key
    data = (json.dumps(keyring, indent=1, sort_keys=True) + "\n").encode("ascii")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".keyring-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # public keys only: readable by whoever runs a node
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / KEYRING_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    """``dev-keys DIR ID...``: ``write_dev_keys(DIR, [ID...])``. Exit 0, or 2 with a message."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[0] != "dev-keys":
        print("usage: python -m cluster.pbft.wiring dev-keys DIR ID...", file=sys.stderr)
        return 2
    try:
        write_dev_keys(Path(args[1]), args[2:])
    except (OSError, ValueError, SealError) as exc:
        print(f"cluster.pbft.wiring: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
