# Sourced by the scripts: create or reuse .venv and install the project.
# Reinstalls only when setup.cfg or pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COORD_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

coord_venv() {
    local extras="$1"  # "" or "test"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating virtualenv $VENV" >&2
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.coord-installed-${extras:-base}"
    local digest
    digest="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
        echo "installing the project into $VENV${extras:+ (with [$extras])}" >&2
        "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
        if [ -n "$extras" ]; then
            "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$extras]" >&2
        else
            "$VENV/bin/python" -m pip install --quiet -e "$ROOT" >&2
        fi
        echo "$digest" > "$stamp"
    fi
}
