# session 13 run 3: plan.reduce fixed at split 1 (it TMA-added y into an unzeroed buffer); the
# swap kernel with gather + reduce (no XLA pass on x, no XLA sum of partials) against the
# dispatch at M = 16, 4, 1 on the eight weights (k/v included); GPU tests of the reduce plans and
# of the dispatch
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r3; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 150 python -m pytest -q tests/test_nf4_mgpu.py -k "(on_gpu and (SQRL32 or SGQRL32 or x128s0c64e0SQL32)) or dispatch_with" 2>&1 | tail -12 > $D/pytest.txt
tail -3 $D/pytest.txt
timeout 420 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 16,4,1 --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o,70b_k_v,8b_k_v --plans "64,64,256,2,0,64+swap+dq+gather+lut=32+reduce@16" "64,64,512,2,0,64+swap+dq+gather+lut=32+reduce@16" "64,64,256,2,0,64+swap+dq+lut=32+reduce@16" > $D/mgpu.log 2>&1
date -u >> $D/info.txt
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json, re
for l in sys.stdin:
  r = json.loads(l); p = r['impl']
  if 'MgpuPlan' in p:
    d = dict(re.findall(r'(\w+)=(\w+)', p)); p = ','.join(d[f] for f in ('tile_n','tile_k','stages','split')) + ''.join('+' + f for f in ('gather','reduce') if d.get(f) == 'True')
  print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), p)"
grep -h 'failed' $D/mgpu.jsonl | cut -c1-300
