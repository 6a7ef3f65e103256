# session 18 run 6: the session's dispatch at M=4096 on the six large weights (lag 2 plan on the
# 70B MLP weights, W decoded to HBM + cuBLAS on the others), 5 interleaved rounds; M=16384 70B
# down, the dispatch (W decoded to HBM) against the lag 2 plan
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r6; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 100 python bench/nf4_mgpu.py --out $D/m4096.jsonl --ms 4096 --rounds 5 --no-triton \
  --shapes 8b_gate_up,8b_down,70b_q_o,70b_gate_up,70b_down,8b_q_o --plans \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m4096.txt
timeout 70 python bench/nf4_mgpu.py --out $D/m16384.jsonl --ms 16384 --rounds 3 --no-triton \
  --shapes 70b_down --plans 256,128,64,4,1,64+swap+ws+gather+lut=16+lag=2 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m16384.txt
date -u >> $D/info.txt
