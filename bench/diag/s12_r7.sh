# session 12 run 7: the new small-M dispatch (swap kernel, dq + lut, tile_k 512 where K > N, from
# 4096 x 4096 up; M=1 on >= 2^26 or K > N >= 2^25) checked and timed against session 11's swap
# plan and the Triton/GEMV plans at M = 1, 4, 16 on the eight weights; fwd and fwd+bwd table
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r7; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; git log --oneline -1; } > $D/info.txt
timeout 150 python -m pytest -q tests/test_nf4_mgpu.py -k "dispatch_with or lut_equals or (on_gpu and (L32 or L16))" 2>&1 | tail -12 > $D/pytest.txt
timeout 260 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 1,4,16 --shapes 70b_gate_up,70b_down,70b_q_o,70b_k_v,8b_gate_up,8b_down,8b_q_o,8b_k_v --plans "64,64,512,2,0,64+swap+dq@16" > $D/mgpu.log 2>&1
timeout 150 python bench/nf4_matmul.py --out $D/table --sections table --ms 1,16 --impls bf16,ours --budget 140 > $D/table_log.txt 2>&1
date -u >> $D/info.txt; cat $D/pytest.txt | tail -3
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json, re
for l in sys.stdin:
  r = json.loads(l); p = r['impl']
  if 'MgpuPlan' in p: p = 's11 swap dq'
  print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), p)"
grep -h 'failed' $D/mgpu.jsonl | cut -c1-300
ls $D/table
