# session 12 run 8: plan.gather with plan.lut (x in its own order, no XLA pass; byte q of each code
# word straight through the table; code words 128-byte swizzled) against the dispatch (x permuted),
# M = 1, 4, 16, kernel-only too; GPU tests of the gather lut plans
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r8; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; git log --oneline -1; } > $D/info.txt
timeout 120 python -m pytest -q tests/test_nf4_mgpu.py -k "lut_equals or (on_gpu and (SGQL16 or SGQL32))" 2>&1 | tail -12 > $D/pytest.txt
timeout 330 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 16,4,1 --kernel-only --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o --plans "64,64,256,2,0,64+swap+dq+gather+lut=32@16" "64,64,512,2,0,64+swap+dq+gather+lut=32@16" "64,64,256,2,0,64+swap+dq+lut=32@16" "64,64,512,2,0,64+swap+dq+lut=32@16" > $D/mgpu.log 2>&1
date -u >> $D/info.txt; cat $D/pytest.txt | tail -3
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json, re
for l in sys.stdin:
  r = json.loads(l); p = r['impl']
  if 'MgpuPlan' in p:
    d = dict(re.findall(r'(\w+)=(\w+)', p)); p = ','.join(d[f] for f in ('tile_n','tile_k','stages','split')) + ''.join('+' + f for f in ('gather',) if d.get(f) == 'True') + (' kernel' if p.endswith('kernel') else '')
  print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), p)"
grep -h 'failed' $D/mgpu.jsonl | cut -c1-300
