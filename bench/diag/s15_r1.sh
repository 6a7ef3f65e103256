# (MgpuPlan.pair was removed after session 15: run at commit 750054b)
# session 15 run 1: the GPU tests of the pair plans (two programs of a cluster share the decode)
# and of session 14's table decoder plans (4 workers), then M = 2048 against decoder 2 + lut 16
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r1; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 150 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and (P1C or P2C or L32P1 or L16P2)" -p no:cacheprovider 2>&1 | tail -15 > $D/pytest.txt
tail -4 $D/pytest.txt
timeout 230 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048 --rounds 3 --shapes 8b_gate_up,70b_gate_up,8b_down --plans 256,128,64,4+decoder=2+lut=16 256,128,64,4+decoder=2+lut=16+pair 256,128,64,4+decoder=2+pair 256,128,64,4+decoder=2+lut=16+pair+skip_mma 256,128,64,4+decoder=2+lut=16+pair+skip_decode > $D/mgpu.log 2>&1
grep -h '"kind": "check_' $D/mgpu.jsonl | cut -c1-120
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); i = r['impl']; print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), i[:40], 'd2' if 'decoder=2' in i else '', 'lut' if 'lut=0' not in i else '', 'pair' if 'pair=True' in i else '', 'skip_mma' if 'skip_mma=True' in i else '', 'skip_dec' if 'skip_decode=True' in i else '')"
grep -v '^{' $D/mgpu.log | grep -m 5 -i "error" | cut -c1-300
date -u >> $D/info.txt
