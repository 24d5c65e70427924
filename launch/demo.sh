#!/usr/bin/env bash
# The main job: a 2-rank torchrun DDP demo on CPU that survives injected faults.
# Creates or reuses ./.venv (torch pinned, see launch/constraints.txt).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
# Without this, torchrun restarts often fail to reconnect (see docs/elastic.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --standalone --nproc-per-node "${NPROC:-2}" --log-dir "$LOGS" \
  "$ROOT/examples/demo.py" "$@"
