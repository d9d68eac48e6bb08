#!/usr/bin/env bash
# The whole test suite: bootstraps .venv with the test extras, lints, runs pytest.
# Extra arguments go to pytest (for example: ./scripts/test.sh -k kv -x).
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
coord_venv test
cd "$ROOT"
./scripts/brokers-up.sh  # the transport tests talk to real Redis, RabbitMQ, NATS and Kafka
"$VENV/bin/ruff" check coordinator cluster transports chaos bench scripts tests devcluster
"$VENV/bin/lint-imports"
exec "$VENV/bin/python" -m pytest "$@"
