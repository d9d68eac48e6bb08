# Sourced by the scripts: create or reuse .venv and install the project.
# Reinstalls only when setup.cfg or pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COORD_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

coord_venv() {
    # A node needs the extras "server" and "brokers" (the distribution alone
    # is the client); "$1" adds more: "", "test" or "chaos".
    local extras="server,brokers${1:+,$1}"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating virtualenv $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.coord-installed-${extras//,/-}"
    local digest
    digest="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        echo "installing the project into $VENV (with [$extras])" >&2
        "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
        # The distribution was called "coordinator" before: a venv made then
        # would keep its egg-link next to the new one.
        "$VENV/bin/python" -m pip uninstall --quiet --yes coordinator >/dev/null 2>&1 || true
        "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$extras]" >&2
        echo "$digest" > "$stamp"
    fi
}
