#!/usr/bin/env bash
# The checks that need a GPU, in one run of about 5-8 minutes on one GPU:
#   1. tests/test_cuda.py (snapshots and rollbacks of device state, checkpoints with pinned
#      staging and CUDA RNG, fp16 + GradScaler, DDP riding on device buckets, the CUDA preflight,
#      a real device-side error becoming HardwareError); NCCL only with 2+ GPUs;
#   2. benchmarks/overhead.py --device cuda: Arc's step overhead against the naive design and
#      the floor (single GPU; 2-rank DDP over NCCL with 2+ GPUs);
#   3. benchmarks/checkpoint.py --device cuda: async-save stall and throughput with the state on
#      the GPU.
# Uses the python3 on PATH (or $PYTHON) with its own torch; needs pytest and pytest-timeout.
# Logs go to $OUT (default /tmp/arc-gpu-check). Exit status: 0 when every part succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/arc-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L 2>&1 | tee "$OUT/gpus.txt"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"gpus", torch.cuda.device_count())' 2>&1 | tee -a "$OUT/gpus.txt"
gpus=$($PY -c 'import torch; print(torch.cuda.device_count())')
[ "${gpus:-0}" -ge 1 ] || { echo "no GPU visible to $PY's torch: nothing to check"; exit 2; }
rc=0
part() {  # part NAME SECONDS CMD...: run one part with a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local st=${PIPESTATUS[0]}
    [ "$st" -eq 0 ] || { echo "== $name FAILED (exit $st)"; rc=1; }
}
part tests 300 $PY -m pytest -q -p no:randomly -p no:cacheprovider tests/test_cuda.py
part overhead 200 $PY benchmarks/overhead.py --device cuda --paired 200 --sizes 25M,80M \
    --batch 1024
part overhead-clip 200 $PY benchmarks/overhead.py --device cuda --paired 200 --sizes 25M,80M \
    --batch 1024 --clip 1.0
if [ "$gpus" -ge 2 ]; then
    part overhead-ddp 240 $PY -m torch.distributed.run --standalone --nproc-per-node 2 \
        benchmarks/overhead.py --device cuda --paired 200 --sizes 25M,80M --batch 1024
fi
part checkpoint 200 $PY benchmarks/checkpoint.py --device cuda --sizes 25M,50M --rounds 5
exit $rc
