#!/usr/bin/env bash
# Stop the brokers scripts/brokers-up.sh started (by recorded PID; a broker
# that was already running before it is not touched).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.brokers"
for name in redis nats rabbitmq kafka; do
    pid_file="$STATE/$name.pid"
    [ -f "$pid_file" ] || continue
    pid="$(cat "$pid_file")"
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "$name"; then
        kill "$pid" && echo "stopped $name ($pid)" >&2
    fi
    rm -f "$pid_file"
done
