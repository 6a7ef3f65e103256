# session 13 run 2: the NaN of s13_r1 (dq + lut at M=40) probed; the warp-specialized swap kernel
# with 2-4 compute warpgroups sharing the table (plan.wgs, plan.lut with ws: one program per SM,
# 16 compute warps instead of 3 programs' 12), checked and timed at M = 16, 4, 1
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r2; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 100 python bench/diag/s13_nan_probe.py 40 576 1024 > $D/probe.txt 2>&1
timeout 60 python bench/diag/s13_nan_probe.py 16 576 1024 >> $D/probe.txt 2>&1
cat $D/probe.txt | cut -c1-200
timeout 120 python -m pytest -q tests/test_nf4_mgpu.py -k "on_gpu and (W4 or W3 or 128x128x128s0c64we0SL32)" 2>&1 | tail -12 > $D/pytest.txt
tail -3 $D/pytest.txt
timeout 300 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 16,4,1 --shapes 70b_gate_up,70b_down,70b_q_o,8b_gate_up,8b_down,8b_q_o --plans "64,256,256,3,0,64+swap+ws+dq+lut=32+wgs=4@16" "64,256,256,3,0,64+swap+ws+dq+gather+lut=32+wgs=4@16" "64,128,256,4,0,64+swap+ws+dq+lut=32@16" "64,192,256,3,0,64+swap+ws+dq+lut=32+wgs=3@16" "64,64,256,2,0,64+swap+dq+gather+lut=32+reduce@16" > $D/mgpu.log 2>&1
date -u >> $D/info.txt
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json, re
for l in sys.stdin:
  r = json.loads(l); p = r['impl']
  if 'MgpuPlan' in p:
    d = dict(re.findall(r'(\w+)=(\w+)', p)); p = ','.join(d[f] for f in ('tile_n','tile_k','stages','split')) + ''.join('+' + f for f in ('ws','gather','reduce') if d.get(f) == 'True') + ('+wgs' + d['wgs'] if d.get('ws') == 'True' else '')
  print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), p)"
grep -h 'failed' $D/mgpu.jsonl | cut -c1-300
