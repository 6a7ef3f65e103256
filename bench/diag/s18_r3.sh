# session 18 run 3: the dispatch with plan.lag 2 in the 256-row mid-M plan and the mid range to
# M=2048 on every weight: the GPU tests of the Mosaic GPU file, then M=2048 (dispatch against W
# decoded to HBM + cuBLAS, DEQUANT_PLAN, the dispatch before on gate/up), M=4096 (dispatch,
# DEQUANT_PLAN, against the lag 2 plan), M=1024 8B gate/up (waves rule: DEQUANT_PLAN, against lag 2)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r3; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 190 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest_mgpu.txt
tail -3 $D/pytest_mgpu.txt | cut -c1-300
W=256,128,64,4,1,64+swap+ws+gather+lut=16+lag=2
DQ=128,64,256,2,2+swap+gather+dq+dequant
timeout 150 python bench/nf4_mgpu.py --out $D/m2048.jsonl --ms 2048 --rounds 3 --no-triton \
  --shapes 8b_gate_up,8b_down,70b_q_o,70b_gate_up,70b_down,8b_q_o --plans $DQ \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m2048.txt
timeout 130 python bench/nf4_mgpu.py --out $D/m4096.jsonl --ms 4096 --rounds 3 --no-triton \
  --shapes 8b_gate_up,8b_down,70b_q_o,70b_gate_up,70b_down --plans $W \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m4096.txt
timeout 40 python bench/nf4_mgpu.py --out $D/m1024.jsonl --ms 1024 --rounds 3 --no-triton \
  --shapes 8b_gate_up --plans $W \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m1024.txt
date -u >> $D/info.txt
