# session 14 run 1: the decoder-warpgroup kernel (plan.decoder) at large M: GPU tests of its plans,
# then M = 2048 and 4096 against the dispatch (W decoded to HBM + cuBLAS) and the bf16 dot
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r1; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 150 python -m pytest -q tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and e0P" -p no:cacheprovider 2>&1 | tail -15 > $D/pytest.txt
tail -3 $D/pytest.txt
timeout 300 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048,4096 --rounds 3 --shapes 8b_gate_up,70b_gate_up,8b_down --plans 256,128,64,3+decoder 256,128,64,2+decoder 128,128,64,2+decoder 256,128,64,3+decoder+skip_decode > $D/mgpu.log 2>&1
date -u >> $D/info.txt
grep -h '"kind": "check_' $D/mgpu.jsonl | cut -c1-300
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), r['impl'])"
tail -5 $D/mgpu.log
