#!/usr/bin/env bash
# Break a local three-node cluster on purpose and get a verdict (see chaos/run.py).
#   ./scripts/chaos-partition.sh [--duration 60] [--nemesis partition-halves|partition-majority-ring|
#                                 isolate-leader|kill|kill-all|pause|bridge|mix] [--seed N]
# Writes history.jsonl, report.txt and latency.png under .chaos/<time>/; exits non-zero on any anomaly.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
coord_venv chaos
cd "$ROOT"
exec "$VENV/bin/python" -m chaos.run "$@"
