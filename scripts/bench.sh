#!/usr/bin/env bash
# This project side by side with etcd on this machine: one command, one table, one chart.
# Installs Debian's etcd-server if etcd is missing (needs root or sudo), then runs
# python -m bench.compare, which writes the "Side by side with etcd" section of
# docs/benchmarks.md and docs/bench-etcd.png. Extra arguments go to bench.compare
# (for example: ./scripts/bench.sh --seconds 2 --rounds 1 --concurrency 1,64). The benchmark runs
# its own etcd members on free ports; a distribution etcd service on 2379 is left alone.
# It ends with 10 minutes of steady 64-client writes on each system, counting leader
# changes (--steady-s 0, or COORD_BENCH_STEADY_S=0, skips them).
# The other benchmarks run without etcd: .venv/bin/python -m bench.<name> (bench/__init__.py lists them).
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
coord_venv test  # the test extras carry matplotlib for the chart
if ! command -v etcd >/dev/null 2>&1 && [ -z "${ETCD_BIN:-}" ]; then
    echo "etcd not found: installing Debian's etcd-server" >&2
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    # A machine whose package lists were never fetched knows no etcd-server: update once and retry.
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server >&2 \
        || { "${as_root[@]}" apt-get update >&2 \
             && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server >&2; }
fi
cd "$ROOT"
exec "$VENV/bin/python" -m bench.compare --out docs/benchmarks.md --chart docs/bench-etcd.png \
    --steady-s "${COORD_BENCH_STEADY_S:-600}" "$@"
