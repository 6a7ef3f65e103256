# session 13 run 6: the large-M dispatch through nf4_dequantize_mgpu ("ours") against the Pallas
# dequant route it replaced ("triton": the module's own plan) and the bf16 dot, M = 2048 and 4096,
# 5 interleaved rounds; GPU tests of the dispatch (M=1100 on 8192 x 4096 included)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r6; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 90 python -m pytest -q tests/test_nf4_mgpu.py -k "dispatch_with" 2>&1 | tail -12 > $D/pytest.txt
tail -3 $D/pytest.txt
timeout 200 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048,4096 --rounds 5 --shapes 70b_down,70b_gate_up,70b_q_o,8b_gate_up,8b_down --plans > $D/mgpu.log 2>&1
date -u >> $D/info.txt
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), r['impl'])"
