# session 19, r4: M=16, the dispatched swap plan (dq, 32-copy table, gather; split as dispatched)
# with 3 and 4 pipeline stages instead of 2, the split held fixed (session 12 measured 3 stages
# only with the 16-copy table and the split left to the wave model). Where programs are <= 1 per
# SM (8B down: 128) more stages cost no occupancy; elsewhere 2 programs per SM still fit.
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r4; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
S=64+swap+dq+lut=32+gather
one() {  # shape, tile_k, split, finishing flag
  timeout 60 python bench/nf4_mgpu.py --out $D/m16.jsonl --ms 16 --rounds 5 --no-triton \
    --shapes $1 --plans 128,64,$2,2,$3,$S$4 128,64,$2,3,$3,$S$4 128,64,$2,4,$3,$S$4 \
    2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee -a $D/m16.txt
}
one 8b_down 512 2 +finish
one 70b_q_o 256 2 +finish
one 8b_gate_up 256 1 ""
one 70b_gate_up 256 4 +reduce
one 8b_q_o 256 4 +reduce
date -u >> $D/info.txt
