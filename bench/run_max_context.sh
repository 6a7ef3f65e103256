#!/bin/bash
# One GPU job: the longest context of one 8B QLoRA training step (issue 7), ours, batch 1:
# compile-only footprints at 64K/400K/512K, real steps at 128K and 256K, then the plot.
# LONG=1: instead, one step at 401,408 tokens (session 4; the whole job takes ~590 s).
REPO=$(cd "$(dirname "$0")/.." && pwd); cd "$REPO"
export PYTHONPATH=$REPO:$REPO/.whl/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/info.txt"
free -g | tee -a "$OUT/info.txt"
if [ -n "$LONG" ]; then  # session 4: one step at 401,408 tokens (~528 s), the model built in NF4 on the device
  echo "=== long $(date +%T)"
  timeout 590 python3 bench/max_context.py --preset 8b --random-nf4 --remat offload --remat-group 2 \
    --mlp-chunk 8192 --schedule ${LONG_SEQ:-401408} --budget 100000 --out "$OUT/ctx400k.json" 2>&1 \
    | grep -v Warning | tee "$OUT/ctx400k.log" | cut -c1-700
  echo "=== done $(date +%T)"; exit 0
fi
echo "=== make $(date +%T)"; timeout 60 python3 bench/baselines/make_model.py --out /dev/shm/m > "$OUT/make.log" 2>&1
echo "=== ctx $(date +%T)"
timeout ${CTX_TIMEOUT:-510} python3 bench/max_context.py --base /dev/shm/m --remat offload --remat-group 2 \
  --mlp-chunk 8192 --compile-only ${COMPILE_ONLY:-65536,409600,524288} --schedule ${SCHEDULE:-131072,262144} \
  --budget ${CTX_BUDGET:-495} --out "$OUT/ours_ctx.json" 2>&1 | grep -v Warning | tee "$OUT/ctx.log" | cut -c1-600
python3 bench/plot_context.py --ours "$OUT/ours_ctx.json" --ref "Unsloth max tried, other job=229376" \
  --ref "Unsloth published=342733" --ref "HF+bnb lean, other job=36864" --ref "target=400000" \
  --out "$OUT/memory_vs_context.png"
echo "=== done $(date +%T)"
