#!/usr/bin/env bash
# The test suite. Creates or reuses ./.venv with the dev extras, then runs pytest.
ARC_EXTRAS="${ARC_EXTRAS:-dev}"
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
