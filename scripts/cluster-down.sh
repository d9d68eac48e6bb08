#!/usr/bin/env bash
# Stop the nodes cluster-up.sh started (by their recorded PIDs). Data stays in .cluster/.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
coord_venv ""
exec "$VENV/bin/python" "$ROOT/scripts/local_cluster.py" down "$@"
