#!/usr/bin/env bash
# Start a local cluster (three nodes n1 n2 n3 on 127.0.0.1 by default) and wait for a leader.
# HTTP 7001-7003, Raft 7101-7103, data under .cluster/. COORD_BASE_PORT shifts the ports.
# Options: --nodes 3|5, --durability fsync|none, --dir DIR, --proxy (Raft links through the
# chaos fault proxy), --tls (HTTPS with a local CA under DIR/tls; prints its path).
# --engine pbft runs the Byzantine fault tolerant engine instead: four nodes n1-n4 by default
# (--nodes 4|7, it needs 3f+1), keys generated under DIR/pbft; no --proxy yet.
# Running it again reuses the data and the running nodes.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
coord_venv ""
exec "$VENV/bin/python" "$ROOT/scripts/local_cluster.py" up "$@"
