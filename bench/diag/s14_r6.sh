# session 14 run 6: plan.decoder = 2 (two K steps' tiles decoded per pass: twice the independent
# decode chains, half the per-pass barriers and fences; four W buffers; the output tile through
# x's slots): GPU tests of the decoder plans, then M = 2048 against the dispatch
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r6; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 130 python -m pytest -q tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and e0P" -p no:cacheprovider 2>&1 | tail -15 > $D/pytest.txt
tail -3 $D/pytest.txt
timeout 240 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048 --rounds 3 --shapes 8b_gate_up,70b_gate_up,8b_down --plans 256,128,64,3+decoder 256,128,64,4+decoder=2 256,128,64,4+decoder=2+skip_mma > $D/mgpu.log 2>&1
date -u >> $D/info.txt
grep -h '"kind": "check_' $D/mgpu.jsonl | cut -c1-120
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); i = r['impl']; print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), i[:40], 'stages=4' if 'stages=4' in i else '', 'skip_mma' if 'skip_mma=True' in i else '')"
grep -v '^{' $D/mgpu.log | grep -m 5 -i "error" | cut -c1-300
