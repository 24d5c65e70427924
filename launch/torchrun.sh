#!/usr/bin/env bash
# Thin wrapper: `launch/torchrun.sh [launcher flags] train.py [script args]` is
# `python -m arc_dist.launch ...` with the project's venv when there is one (else $PYTHON or
# python3). Flags, ARC_* environment defaults and exit codes: docs/elastic.md, or --help.
#
#   launch/torchrun.sh --nproc-per-node=2 --max-restarts=3 examples/train_ddp.py --steps 200
#   ARC_NNODES=1:4 ARC_RDZV_ENDPOINT=head:29400 ARC_RDZV_ID=job-7 launch/torchrun.sh train.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
# exec: the launcher becomes this process, so a scheduler's SIGTERM reaches it directly
exec "$PYTHON" -m arc_dist.launch "$@"
