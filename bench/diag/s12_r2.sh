# session 12 run 2: plan.stream at 2 programs per SM (split 8 / 28, dq copies in pieces of 256
# rows), with and without reduce / gather, kernel-only times too; the fixed dispatch GPU test
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r2; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; which ncu nsys nvdisasm cuobjdump; ls /usr/local/cuda/bin 2>&1 | head -40; } > $D/info.txt 2>&1
timeout 100 python -m pytest -q tests/test_nf4_mgpu.py -k "dispatch_with or (on_gpu and QT2R)" 2>&1 | tail -5 > $D/pytest.txt
F="+swap+dq+gather"
timeout 420 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 16 --kernel-only --shapes 70b_gate_up,70b_q_o,70b_down --plans \
  "64,64,512,2,0,64+swap+dq@16" \
  "128,64,512,3,8,64$F+stream=14+reduce@16" "128,64,256,6,8,64$F+stream=14+reduce@16" \
  "128,64,512,3,8,64$F+stream=14@16" "128,64,512,3,8,64+swap+dq+stream=14+reduce@16" \
  "128,64,256,3,8,64$F+stream=7+reduce@16" "128,64,512,3,8,64$F+stream=4+reduce@16" \
  "128,64,512,3,28,64$F+stream=16+reduce@16" > $D/small.log 2>&1
date -u >> $D/info.txt; cat $D/pytest.txt
grep -h '"kind": "time"' $D/small.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), r['impl'][-90:])"
grep -h 'failed' $D/small.jsonl | cut -c1-300
