# session 20, r2: the small-M dispatch with every divisor as a split and tile_k 256 on 8B down
# (s20_r1: 0.564 vs 0.597 at M=16). GPU tests of the non-power-of-two splits (bitwise dq vs the
# pre-pass with XLA's partial sum; the TMA-reduced form against the reference) and of the
# dispatch on 8B down at M = 1 and 13; then the new dispatch ("ours") against the plan it
# replaces at M = 1-16, on 8B down and the Llama 3.2 shapes whose split or tile_k changed
# (3B gate/up split 1 -> 3, 3B down tile_k 512 -> 256 and split 4 -> 8, 1B down tile_k 512 -> 256).
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r2; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 90 python -m pytest -q -n 2 tests/test_nf4_mgpu.py -m gpu \
  -k "not_a_power or (dispatch_with_the_swap and 14336)" -p no:cacheprovider --tb=short -rf 2>&1 \
  | grep -v Warn > $D/pytest.txt; tail -3 $D/pytest.txt | cut -c1-300
old() {  # shape, plan at M <= 8, plan at M >= 9
  timeout 55 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 1,4,8 --rounds 5 --no-triton \
    --shapes $1 --plans $2 2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee -a $D/small.txt
  timeout 45 python bench/nf4_mgpu.py --out $D/small.jsonl --ms 12,16 --rounds 5 --no-triton \
    --shapes $1 --plans $3 2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee -a $D/small.txt
}
S=64+swap+dq+lut=32
old 8b_down 128,64,512,2,2,$S 128,64,512,2,2,$S+gather+finish
old 3b_gate_up 128,64,256,2,1,$S 128,64,256,2,1,$S+gather
old 3b_down 128,64,512,2,4,$S 128,64,512,2,4,$S+gather+reduce
old 1b_down 128,64,512,2,8,$S 128,64,512,2,8,$S+gather+reduce
date -u >> $D/info.txt
