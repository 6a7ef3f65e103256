# session 13 run 4: the whole GPU test suite (-m gpu, 4 pytest workers) with the new dispatch
# (gather + reduce from M=9), then the dispatch against the plan it replaced at M = 16 and 12
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r4; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 380 python -m pytest -q -m gpu tests/ -p no:cacheprovider -n 4 --durations=15 2>&1 | tail -40 > $D/pytest_gpu.txt
date -u >> $D/info.txt; tail -3 $D/pytest_gpu.txt
timeout 190 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 16,12 --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o --plans "64,64,256,2,0,64+swap+dq+lut=32@16" "64,64,512,2,0,64+swap+dq+lut=32@16" > $D/mgpu.log 2>&1
date -u >> $D/info.txt
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json, re
for l in sys.stdin:
  r = json.loads(l); p = r['impl']
  if 'MgpuPlan' in p:
    d = dict(re.findall(r'(\w+)=(\w+)', p)); p = 'old ' + ','.join(d[f] for f in ('tile_n','tile_k','stages','split'))
  print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), p)"
grep -h 'failed' $D/mgpu.jsonl | cut -c1-300
