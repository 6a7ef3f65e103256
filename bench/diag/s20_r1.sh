# prepared in session 19, run in session 20 (no device time left to run it): 8B down at M <= 16 runs one program per
# SM (64 tiles of 64 W rows x split 2 = 128 programs; split 4 is refused by dq, K / 64 / 4 = 56 not
# a multiple of 16), and is the small-M weight furthest from the target (0.60 of the bf16 dot in
# s19_r3, against 0.40-0.48 where 1.7-3 programs share an SM). K split in 7 or 14 keeps dq's
# absmax copies aligned (CPU test test_dq_scales_at_a_split_that_is_not_a_power_of_two): its GPU
# tests, then M = 16, 12 and 4 against the dispatch.
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r1; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 80 python -m pytest -q -n 2 tests/test_nf4_mgpu.py -m gpu -k "not_a_power" \
  -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -6 > $D/pytest.txt
tail -2 $D/pytest.txt | cut -c1-300
S=64+swap+dq+lut=32+gather
timeout 140 python bench/nf4_mgpu.py --out $D/m16.jsonl --ms 16,12 --rounds 5 --no-triton \
  --shapes 8b_down --plans 128,64,512,2,2,$S+finish 128,64,512,2,7,$S+reduce \
  128,64,512,2,7,$S+finish 128,64,256,2,7,$S+reduce 128,64,256,2,14,$S+reduce \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m16.txt
S=64+swap+dq+lut=32
timeout 80 python bench/nf4_mgpu.py --out $D/m4.jsonl --ms 4 --rounds 5 --no-triton \
  --shapes 8b_down --plans 128,64,512,2,2,$S@8 128,64,512,2,7,$S@8 128,64,256,2,14,$S@8 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m4.txt
# then, M=16, the dispatched plan of four weights that miss 0.40, with and without its decode
# (skip_decode) and each kernel alone (--kernel-only): how much of the time is the pipeline
# skeleton, the decode and the XLA passes around the kernel
S=64+swap+dq+lut=32+gather
skel() {  # shape, plan
  timeout 45 python bench/nf4_mgpu.py --out $D/skel.jsonl --ms 16 --rounds 5 --no-triton \
    --kernel-only --shapes $1 --plans $2 $2+skip_decode \
    2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee -a $D/skel.txt
}
skel 8b_gate_up 128,64,256,2,1,$S
skel 8b_q_o 128,64,256,2,4,$S+reduce
skel 70b_q_o 128,64,256,2,2,$S+finish
skel 70b_gate_up 128,64,256,2,4,$S+reduce
date -u >> $D/info.txt
