#!/bin/bash
# One GPU job: 70B QLoRA at long context, batch 1 (issues 7 and 8). The model is built straight in
# NF4 on the device (bench/random_model.py). Compile-only probes give XLA's device footprint (where
# the memory limit lies), then real steps along SCHEDULE.
#   bash bench/run_70b_context.sh                       # one GPU
#   MESH=fsdp=2 bash bench/run_70b_context.sh           # FSDP over two GPUs (sequence split, heads for attention)
REPO=$(cd "$(dirname "$0")/.." && pwd); cd "$REPO"
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TAG=${TAG:-70b_$(echo "${MESH:-1gpu}" | tr '=,' '__')}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; free -g; date -u; git rev-parse --short HEAD; } 2>&1 | tee "$OUT/info_$TAG.txt"
timeout ${CTX_TIMEOUT:-580} python3 bench/max_context.py --preset 70b --remat offload --remat-group ${GROUP:-2} \
  --mlp-chunk ${MLP_CHUNK:-8192} ${MESH:+--mesh $MESH} --compile-only "${COMPILE_ONLY:-}" --schedule ${SCHEDULE:-102400} \
  --budget ${CTX_BUDGET:-570} --out "$OUT/ctx_$TAG.json" 2>&1 | grep -v -i warning | tee "$OUT/ctx_$TAG.log" | cut -c1-700
echo "=== done $(date -u +%T)"
