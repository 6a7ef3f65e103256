# session 18 run 4: the dispatch with the mid range to M=4096 on weights of >= 2^27 elements (70B
# gate/up and down): the GPU tests of the files that run the op through the dispatch, M=4096 on
# those weights against DEQUANT_PLAN (the dispatch before), and M=1024 8B gate/up (the waves rule
# keeps DEQUANT_PLAN there) against the lag 2 plan
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r4; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 170 python -m pytest -q -n 4 -m gpu tests/test_nf4.py tests/test_gpu_model.py tests/test_nf4_gpu_bnb.py -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -8 > $D/pytest_other.txt
tail -2 $D/pytest_other.txt | cut -c1-300
timeout 110 python bench/nf4_mgpu.py --out $D/m4096.jsonl --ms 4096 --rounds 3 --no-triton \
  --shapes 70b_gate_up,70b_down --plans 128,64,256,2,2+swap+gather+dq+dequant \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m4096.txt
timeout 80 python bench/nf4_mgpu.py --out $D/m1024.jsonl --ms 1024 --rounds 3 --no-triton \
  --shapes 8b_gate_up --plans 256,128,64,4,1,64+swap+ws+gather+lut=16+lag=2 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/m1024.txt
date -u >> $D/info.txt
