# session 14 run 7: plan.mma_decode (decoder 2; the compute warpgroups decode each pass's odd step,
# their own rows, while the pass before's wgmmas run): ptxas' report, M = 2048 against the
# dispatch and the decoder-2 kernel, then the GPU tests of every decoder plan
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r7; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 60 python bench/diag/mgpu_sass.py --dir $D/ptx --plans 256,128,64,4+decoder=2+mma_decode > $D/sass.jsonl 2>&1
grep -h "registers\|spill" $D/ptx/*.ptxas
rm -f $D/ptx/*.mlir-passes.log
timeout 170 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048 --rounds 3 --shapes 8b_gate_up,70b_gate_up --plans 256,128,64,4+decoder=2+mma_decode 256,128,64,4+decoder=2 > $D/mgpu.log 2>&1
grep -h '"kind": "check_' $D/mgpu.jsonl | cut -c1-120
grep -h '"kind": "time"' $D/mgpu.jsonl | python -c "
import sys, json
for l in sys.stdin:
  r = json.loads(l); i = r['impl']; print(r['shape'], r['m'], round(r['vs_bf16'], 3), round(r['ms'] * 1000, 1), i[:40], 'mma_decode' if 'mma_decode=True' in i else '')"
grep -v '^{' $D/mgpu.log | grep -m 5 -i "error" | cut -c1-300
timeout 170 python -m pytest -q tests/test_nf4_mgpu.py -k "matches_reference_on_gpu and e0P" -p no:cacheprovider 2>&1 | tail -15 > $D/pytest.txt
tail -4 $D/pytest.txt
date -u >> $D/info.txt
