# Sourced by launch/demo.sh and launch/test.sh: create or reuse ./.venv and install
# arc-dist with the extras named in $ARC_EXTRAS. torch is installed first, pinned; a torch already
# in the venv that meets the pin is kept (install the CPU build first on a machine without a GPU:
# see README.md), so pip never resolves a newer CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ARC_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
STAMP="$VENV/.arc-installed-$(cat "$ROOT/pyproject.toml" "$ROOT/launch/constraints.txt" | cksum | cut -d' ' -f1)-${ARC_EXTRAS:-none}"
if [ ! -f "$STAMP" ]; then
  "${PIP[@]}" -c "$ROOT/launch/constraints.txt" torch
  "${PIP[@]}" -c "$ROOT/launch/constraints.txt" -e "$ROOT${ARC_EXTRAS:+[$ARC_EXTRAS]}"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
