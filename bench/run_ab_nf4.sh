#!/bin/bash
# One GPU job: A/B of the NF4 matmul's GEMM output type in the 8B training step (f32 + cast vs
# bf16 written by the GEMM), with per-op-class profiles; the NF4/bitsandbytes GPU tests; the NF4
# matmul table at large M for the 8B shapes with its torch baseline.
REPO=$(cd "$(dirname "$0")/.." && pwd); cd "$REPO"
export PYTHONPATH=$REPO:$REPO/.whl/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/info.txt"
echo "=== make $(date +%T)"; timeout 60 python3 bench/baselines/make_model.py --out /dev/shm/m > "$OUT/make.log" 2>&1
echo "=== ab $(date +%T)"
timeout 170 python3 bench/train_throughput.py --base /dev/shm/m --presets "none/dot=f32,none,full/dot=f32,full" \
  --warmup 3 --steps 10 --profile /tmp/prof > "$OUT/ab.log" 2>&1
grep -E 's_per_step' "$OUT/ab.log" | cut -c1-400
grep -E '"profile' "$OUT/ab.log" | python3 -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line); p = d['profile']
    print(d['preset'], p['busy_ms'], json.dumps(p['by_class_ms']))"
echo "=== nf4 tests $(date +%T)"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 python3 -m pytest -q -rA -m gpu tests/test_nf4_gpu_bnb.py \
  tests/test_nf4.py -p no:cacheprovider > "$OUT/nf4_tests.log" 2>&1; grep -E "PASS|FAIL|ERROR|passed|failed" "$OUT/nf4_tests.log" | tail -30
echo "=== nf4 table $(date +%T)"
timeout 150 python3 bench/nf4_matmul.py --all --sections table,torch --budget 140 --models 8B --ms 2048,4096,16384 \
  --out /tmp/nf4 > "$OUT/nf4_table.log" 2>&1; cp /tmp/nf4/report.md "$OUT/nf4_report.md"; grep -A14 "^### fwd " /tmp/nf4/report.md
echo "=== done $(date +%T)"
