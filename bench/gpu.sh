#!/usr/bin/env bash
# Everything this project measures on a GPU, in one run of under 8 minutes on one lent GPU:
#
#   bash bench/gpu.sh [OUT_DIR]        # default: bench/results/gpu
#
# 1. the GPU-marked tests (NCCL groups, the Megatron TE/THD path, backend verl on CUDA, ...);
# 2. `bench memory`: peaks by torch.cuda.max_memory_allocated (the module picks CUDA by itself);
# 3. `bench scoring --quick --shape toy` (the toy only, to fit the budget): bf16 and fp32 on the
#    GPU, against verl's TrainingWorker (plain, and fused-linear on its default `torch` backend)
#    and the two baselines (engines take the GPU when CUDA is present), MFU against the GEMM
#    rate it measures;
# 4. `bench sync --quick`: gloo/ray into GPU-resident weights, NCCL when two GPUs are present.
# Each step writes its JSON (rendered by `python -m bench.report OUT_DIR/*.json`) and its log;
# a step that fails is recorded in OUT_DIR/summary.txt and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu}"
mkdir -p "$OUT"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    || { echo "bench/gpu.sh needs a CUDA device" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true

step() {  # step NAME SECONDS COMMAND...: run with a time limit, record the outcome
    local name="$1" limit="$2"; shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
step gpu-tests 180 python -m pytest -q -m gpu tests/ -p no:cacheprovider
step memory 90 python -m bench memory --quick --json "$OUT/memory.json"
step scoring 150 python -m bench scoring --quick --shape toy --json "$OUT/scoring.json"
step sync 60 python -m bench sync --quick --json "$OUT/sync.json"
tail -n 3 "$OUT/gpu-tests.log" | tee -a "$OUT/summary.txt"
