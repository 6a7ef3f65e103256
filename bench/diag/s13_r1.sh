# session 13 run 1: plan.reduce without stream (the split-K partials added by TMA into one zeroed
# f32 y.T: no XLA sum of [split, N, M] partials), with and without gather (no x permute), and
# tile_k 128 (smem for 4 programs per SM instead of 3), against the dispatch, M = 16, 4, 1; GPU
# tests of the new plans and of the stream plans (refactored after session 12's last GPU run)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r1; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; git log --oneline -1; } > $D/info.txt
timeout 150 python -m pytest -q tests/test_nf4_mgpu.py -k "lut_equals or (on_gpu and (SQRL32 or SGQRL32 or x128s0c64e0SQL32 or T2 or T3))" 2>&1 | tail -12 > $D/pytest.txt
timeout 380 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 16,4,1 --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o --plans "64,64,128,2,0,64+swap+dq+lut=32@16" "64,64,256,2,0,64+swap+dq+lut=32+reduce@16" "64,64,256,2,0,64+swap+dq+gather+lut=32+reduce@16" "64,64,128,2,0,64+swap+dq+lut=32+reduce@16" > $D/mgpu.log 2>&1
date -u >> $D/info.txt; cat $D/pytest.txt | tail -3
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json, re
for l in sys.stdin:
  r = json.loads(l); p = r['impl']
  if 'MgpuPlan' in p:
    d = dict(re.findall(r'(\w+)=(\w+)', p)); p = ','.join(d[f] for f in ('tile_n','tile_k','stages','split')) + ''.join('+' + f for f in ('gather','reduce') if d.get(f) == 'True')
  print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), p)"
grep -h 'failed' $D/mgpu.jsonl | cut -c1-300
