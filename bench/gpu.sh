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
# 4. `bench sync --quick`: gloo/ray from host memory into weights on cuda:0 (`sync.server_device`),
#    NCCL when two GPUs are present.
# Each step writes OUT_DIR/gpu_NAME.json and its log; a step that fails is recorded in
# OUT_DIR/summary.txt and the others still run. The `gpu_` prefix keeps the records apart from
# the CPU ones (the report copies in notes by file stem, `bench/notes/NAME.md`: none exist for
# gpu_*, so no CPU prose lands under GPU figures). They are rendered into OUT_DIR/GPU_RESULTS.md,
# not bench/RESULTS.md; the script ends by printing how to merge them.
#
# Time: step limits 140 + 70 + 140 + 50 = 400 s, the CUDA probe 30 s, nvidia-smi 10 s and the
# report 20 s: 460 s at worst, under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu}"
mkdir -p "$OUT"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
timeout 30 python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    || { echo "bench/gpu.sh needs a CUDA device" >&2; exit 2; }
timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1 || true

step() {  # step NAME SECONDS COMMAND...: run with a time limit, record the outcome
    local name="$1" limit="$2"; shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
step gpu-tests 140 python -m pytest -q -m gpu tests/ -p no:cacheprovider
step memory 70 python -m bench memory --quick --json "$OUT/gpu_memory.json"
step scoring 140 python -m bench scoring --quick --shape toy --json "$OUT/gpu_scoring.json"
step sync 50 python -m bench sync --quick --json "$OUT/gpu_sync.json"
tail -n 3 "$OUT/gpu-tests.log" | tee -a "$OUT/summary.txt"

shopt -s nullglob
records=("$OUT"/gpu_*.json)
if (( ${#records[@]} )); then
    timeout 20 python -m bench.report --output "$OUT/GPU_RESULTS.md" "${records[@]}"
    echo "To merge into bench/RESULTS.md: cp $OUT/gpu_*.json bench/results/ && python -m bench.report"
else
    echo "no gpu_*.json record was written; nothing to render" | tee -a "$OUT/summary.txt"
fi
