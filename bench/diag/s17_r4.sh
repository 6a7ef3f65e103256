# session 17 run 4: the dispatch with the table in the mid-M gather kernel (and that kernel up to
# M=2048 where N <= K): the GPU tests of the Mosaic GPU file and of the other files through the
# dispatch, then M=2048 on the N <= K weights against W decoded to HBM + cuBLAS (DEQUANT_PLAN, the
# dispatch before) and the Triton/XLA route
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r4; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 175 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest_mgpu.txt
tail -3 $D/pytest_mgpu.txt | cut -c1-400
timeout 150 python bench/nf4_mgpu.py --out $D/m2048.jsonl --ms 2048 --rounds 3 \
  --shapes 70b_down,8b_down,70b_q_o,8b_q_o --plans 128,64,256,2,2+swap+gather+dq+dequant \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m2048.txt
timeout 200 python -m pytest -q -n 4 -m gpu tests/test_nf4.py tests/test_gpu_model.py tests/test_nf4_gpu_bnb.py -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest_other.txt
tail -3 $D/pytest_other.txt | cut -c1-400
date -u >> $D/info.txt
