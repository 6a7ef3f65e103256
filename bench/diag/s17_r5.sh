# session 17 run 5: the gate/up weights at M=2048, where runs r2 and r3 disagreed: the gather
# kernel with the table against the dispatch (W decoded to HBM + cuBLAS), 5 interleaved rounds
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r5; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 200 python bench/nf4_mgpu.py --out $D/gate_up.jsonl --ms 2048 --rounds 5 --no-triton \
  --shapes 8b_gate_up,70b_gate_up --plans 256,128,64,4,1+swap+ws+gather+lut=16 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/gate_up.txt
date -u >> $D/info.txt
