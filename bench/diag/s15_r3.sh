# (MgpuPlan.pair was removed after session 15: run at commit 750054b)
# session 15 run 3: the pair plans with one allocation per full barrier (r2: async_store_smem's
# expect_tx on barrier i of an array lands on barrier 2 i); the probe, then, if nothing hung or
# failed, the pair plans' GPU tests and M = 2048 against decoder 2 + lut 16 and the dispatch
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r3; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
python bench/diag/s15_pair_probe.py --timeout 40 2>&1 | tee $D/probe.txt
if grep -q "TIMEOUT\|rc=\|rror" $D/probe.txt || grep "no_remote=False" $D/probe.txt | grep -q "e+0\|e-01\|e-02"; then echo "probe failed: stop"; date -u >> $D/info.txt; exit 0; fi
timeout 150 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and (P1C or P2C)" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -20 > $D/pytest.txt
tail -8 $D/pytest.txt | cut -c1-300
timeout 260 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048 --rounds 3 --shapes 8b_gate_up,70b_gate_up,8b_down --plans 256,128,64,4+decoder=2+lut=16 256,128,64,4+decoder=2+lut=16+pair 256,128,64,4+decoder=2+pair 256,128,64,3+decoder=1+lut=32+pair 256,128,64,4+decoder=2+lut=16+pair+skip_mma 256,128,64,4+decoder=2+lut=16+pair+skip_decode > $D/mgpu.log 2>&1
grep -h '"kind": "check_done' $D/mgpu.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); print('check', r['plan'][:60], 'lut' + r['plan'].split('lut=')[1][:3], 'pair' in r['plan'] and 'pair=True' in r['plan'], r.get('worst'))"
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); i = r['impl']; print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), i[:40], 'd2' if 'decoder=2' in i else '', 'lut' if 'lut=0' not in i else '', 'pair' if 'pair=True' in i else '', 'skip_mma' if 'skip_mma=True' in i else '', 'skip_dec' if 'skip_decode=True' in i else '')"
grep -v '^{' $D/mgpu.log | grep -m 5 -i "error" | cut -c1-300
date -u >> $D/info.txt
