# session 17 run 2: the table decode (plan.lut) in the warp-specialized gather kernel (dispatched
# at M = 256-1024 without it): its GPU tests, then M = 2048 and 512 against the dispatch and the
# gather plan without the table (tile_k 128 as dispatched, and 64 as the lut 32 plan needs)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r2; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 120 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -k "matches_reference_on_gpu and (we0SGL32 or we0SGQL32)" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest.txt
tail -4 $D/pytest.txt | cut -c1-400
timeout 330 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048,512 --rounds 3 --no-triton \
  --shapes 8b_gate_up,70b_gate_up,8b_down --plans 256,128,128,2,1+swap+ws+gather \
  256,128,64,3,1+swap+ws+gather 256,128,64,3,1+swap+ws+gather+lut=32 \
  256,128,64,4,1+swap+ws+gather+lut=16 256,128,128,2,1+swap+ws+gather+lut=16 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/mgpu.txt
date -u >> $D/info.txt
