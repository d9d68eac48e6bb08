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
        kill "$pid" && echo "stopping $name ($pid)" >&2
        # Wait (bounded) until it is gone: a broker started again at once would find
        # its data still locked (Kafka's log directory, for one).
        for _ in $(seq 1 60); do [ -d "/proc/$pid" ] || break; sleep 0.5; done
    fi
    rm -f "$pid_file"
done
