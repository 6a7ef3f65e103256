# session 14 run 3: plan.decoder with the whole [128, 64] tile decoded and stored in one body (no
# reload of the old tile, one barrier pair): GPU tests, ptxas' report, then M = 2048 against the
# dispatch, with the decode alone (+skip_mma) and the skeleton (+skip_decode)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r3; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 100 python -m pytest -q tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and e0P" -p no:cacheprovider 2>&1 | tail -15 > $D/pytest.txt
tail -3 $D/pytest.txt
timeout 60 python bench/diag/mgpu_sass.py --dir $D/ptx --plans 256,128,64,3+decoder > $D/sass.jsonl 2>&1
grep -h "registers\|spill" $D/ptx/*.ptxas
timeout 240 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048 --rounds 3 --shapes 8b_gate_up,70b_gate_up,8b_down --plans 256,128,64,3+decoder 256,128,64,3+decoder+skip_mma 256,128,64,3+decoder+skip_decode > $D/mgpu.log 2>&1
date -u >> $D/info.txt
grep -h '"kind": "check_' $D/mgpu.jsonl | cut -c1-200
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); i = r['impl']; print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), i[:40], 'skip_mma' if 'skip_mma=True' in i else '', 'skip_decode' if 'skip_decode=True' in i else '')"
grep -v '^{' $D/mgpu.log | grep -m 5 -i "error" | cut -c1-300
