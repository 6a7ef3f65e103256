# session 12 run 1: plan.stream (several W tiles per program in one pipeline, x's K range resident)
# with and without reduce (TMA add into one f32 y.T), gather, dq; M=16; GPU tests of the stream
# plans and of the dispatch through nf4_matmul with dq (not run since session 11's change)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r1; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 170 python -m pytest -q tests/test_nf4_mgpu.py -k "(matches_reference_on_gpu and (ST2 or GT3 or QT2R)) or dispatch_with" 2>&1 | tail -25 > $D/pytest.txt
F="+swap+dq+gather"
timeout 380 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 16 --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o --plans \
  "128,64,512,3,8,64$F+stream=14+reduce@16" "128,64,512,3,8,64$F+stream=4+reduce@16" \
  "128,64,512,3,28,64$F+stream=16+reduce@16" "128,64,512,3,4,64$F+stream=4+reduce@16" \
  "128,64,512,3,14,64$F+stream=4+reduce@16" "128,64,512,3,4,64$F+stream=1+reduce@16" \
  "128,64,512,3,8,64$F+stream=14@16" "128,64,512,3,8,64+swap+dq+stream=14+reduce@16" \
  "128,64,256,6,8,64$F+stream=14+reduce@16" > $D/small.log 2>&1
date -u >> $D/info.txt; tail -n 3 $D/pytest.txt
grep -h '"kind": "time"' $D/small.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); print(r['shape'], r['m'], round(r['vs_bf16'], 3), r['impl'][:160])"
grep -h 'failed' $D/small.jsonl | cut -c1-400
