# session 12 run 5: plan.lut (each code byte's bf16 pair from a per-lane shared-memory table,
# 4 instructions per 2 weights) at M=16 and M=1; GPU tests of the lut plans (bitwise against the
# byte-permute decode)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r5; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt 2>&1
timeout 150 python -m pytest -q tests/test_nf4_mgpu.py -k "(on_gpu and L]) or lut_equals" 2>&1 | tail -8 > $D/pytest.txt
timeout 330 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 16 --kernel-only --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o --plans \
  "64,64,256,2,0,64+swap+dq+lut@16" "64,64,128,2,0,64+swap+dq+lut@16" "64,64,128,3,0,64+swap+dq+lut@16" \
  "64,64,512,2,0,64+swap+dq+lut@16" "64,64,256,2,0,64+swap+dq+gather+lut@16" > $D/small.log 2>&1
timeout 90 python bench/nf4_mgpu.py --out $D/m1.jsonl --ms 1 --shapes 70b_down,70b_gate_up,70b_q_o,8b_down --plans \
  "64,64,256,2,0,64+swap+lut@1" "64,64,256,2,0,64+swap+dq+lut@1" > $D/m1.log 2>&1
date -u >> $D/info.txt; cat $D/pytest.txt
cat $D/small.jsonl $D/m1.jsonl | grep -h '"kind": "time"' | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); p = r['impl']
  if 'MgpuPlan' in p:
    import re; d = dict(re.findall(r'(\w+)=(\w+)', p)); p = ','.join(d[f] for f in ('tile_n','tile_k','stages','split')) + ''.join('+' + f for f in ('dq','gather','lut','stream') if d.get(f) not in ('False', '0')) + (' kernel' if p.endswith('kernel') else '')
  print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), p)"
grep -h 'failed' $D/small.jsonl $D/m1.jsonl | cut -c1-300
