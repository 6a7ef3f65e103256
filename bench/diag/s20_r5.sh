# session 20, r5: M = 1, 4 and 8 (the dispatch runs the swap kernel without gather there, x
# permuted and the f32 partials summed by XLA; session 13 found gather + reduce level or slower at
# M=1 and mixed at 4, before plan.finish and the unpadded nested absmax of session 16): the M=16
# plan (x unpermuted, the partials added in the kernel) at M <= 8 on the weights that miss 0.40
# there, against the dispatch ("ours": at M=1 the GEMV on 8B gate/up and q/o)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r5; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
S=64+swap+dq+lut=32+gather
one() {  # shape, plan
  timeout 60 python bench/nf4_mgpu.py --out $D/m8.jsonl --ms 1,4,8 --rounds 5 --no-triton \
    --shapes $1 --plans $2 2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee -a $D/m8.txt
}
one 70b_q_o 128,64,256,2,2,$S+finish
one 8b_down 128,64,256,2,14,$S+reduce
one 8b_gate_up 128,64,256,2,1,$S
one 8b_q_o 128,64,256,2,4,$S+reduce
date -u >> $D/info.txt
