# session 14 run 8: the GPU tests of every decoder plan (4 workers), then the table decode in the
# decoder warpgroup (plan.lut, code words row-major): M = 2048 against the dispatch and decoder 2
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r8; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 140 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and e0P" -p no:cacheprovider 2>&1 | tail -15 > $D/pytest.txt
tail -4 $D/pytest.txt
timeout 175 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048 --rounds 3 --shapes 8b_gate_up,70b_gate_up,8b_down --plans 256,128,64,4+decoder=2 256,128,64,3+decoder+lut=32 256,128,64,4+decoder=2+lut=16 256,128,64,4+decoder=2+lut=16+skip_mma > $D/mgpu.log 2>&1
grep -h '"kind": "check_' $D/mgpu.jsonl | cut -c1-120
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); i = r['impl']; print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), i[:40], 'd2' if 'decoder=2' in i else '', 'lut' if 'lut=0' not in i else '', 'skip_mma' if 'skip_mma=True' in i else '')"
grep -v '^{' $D/mgpu.log | grep -m 5 -i "error" | cut -c1-300
date -u >> $D/info.txt
