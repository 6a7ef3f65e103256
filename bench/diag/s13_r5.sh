# session 13 run 5: nf4_dequantize_mgpu (the swap kernels' decode, W written to HBM in bf16) + the
# cuBLAS dot against the large-M dispatch (the Pallas dequant kernel + the same dot) and the bf16
# dot at M = 2048 and 4096; the decodes to HBM alone too; GPU tests of the dequant kernel
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r5; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 100 python -m pytest -q tests/test_nf4_mgpu.py -k "dequantize_mgpu or (on_gpu and (SGD or SGQD or SGQL32D))" 2>&1 | tail -12 > $D/pytest.txt
tail -3 $D/pytest.txt
timeout 430 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048,4096 --dequant-only --shapes 8b_gate_up,8b_down,8b_q_o,70b_gate_up,70b_q_o --plans "64,64,256,2,2,64+swap+gather+dq+dequant" "64,64,256,2,1,64+swap+gather+dq+dequant" "64,64,256,2,1,64+swap+gather+dq+lut=32+dequant" > $D/mgpu.log 2>&1
date -u >> $D/info.txt
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json, re
for l in sys.stdin:
  r = json.loads(l); p = r['impl']
  if 'MgpuPlan' in p:
    d = dict(re.findall(r'(\w+)=(\w+)', p)); p = ','.join(d[f] for f in ('tile_k','stages','split')) + ''.join('+' + f for f in ('lut',) if d.get(f) != '0') + (' dequant only' if p.endswith('dequant') else '')
  print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), p)"
grep -h 'failed' $D/mgpu.jsonl | cut -c1-300
