#!/bin/bash
# One GPU job (session 2's third run): where the 8B training step's time goes (profile), the GPU
# model tests, the NF4 matmul benchmark and the RoPE / cross-entropy kernel benchmarks.
# Carry .whl/site. Every part is bounded by its own timeout (total < 570 s).
REPO=$(cd "$(dirname "$0")/.." && pwd); cd "$REPO"
export PYTHONPATH=$REPO:$REPO/.whl/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/info.txt"
t() { echo "=== $1 $(date +%T)"; }
t make; timeout 60 python3 bench/baselines/make_model.py --out /dev/shm/m > "$OUT/make.log" 2>&1
t profile; timeout 110 python3 bench/train_throughput.py --base /dev/shm/m --presets none,full --warmup 2 --steps 3 \
  --profile "$OUT/prof" > "$OUT/prof.log" 2>&1; grep -E '"profile|s_per_step' "$OUT/prof.log" | cut -c1-2500
t gpu_tests; XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 70 python3 -m pytest -q -m gpu tests/test_gpu_model.py \
  -p no:cacheprovider 2>&1 | tail -5
t nf4; timeout 215 python3 bench/nf4_matmul.py --all --sections pytest,sweep,table,torch --budget 205 \
  --shares pytest=0.2,sweep=0.2 --ms 1,16,2048,4096,16384 --out "$OUT/nf4" > "$OUT/nf4.log" 2>&1
tail -45 "$OUT/nf4/report.md"
t kernels; timeout 85 python3 bench/kernels.py jax --ops rope,ce --budget 70 --out "$OUT/k" > "$OUT/k_jax.log" 2>&1
timeout 45 python3 bench/kernels.py torch --ops rope --budget 35 --out "$OUT/k" > "$OUT/k_torch.log" 2>&1
python3 bench/kernels.py report --out "$OUT/k" > "$OUT/k_report.md" 2>&1; tail -30 "$OUT/k_report.md"
t done
