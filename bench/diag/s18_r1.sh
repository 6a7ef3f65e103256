# session 18 run 1: 32-column chunks in the warp-specialized gather kernel (each half of a code
# block decoded while the other half's wgmma runs; x swizzled by 64 bytes): GPU tests of the new
# plans, then against the dispatched 64-column plans and the 256-row plan without its decode
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r1; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 150 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -k "c32" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest.txt
tail -3 $D/pytest.txt | cut -c1-400
timeout 230 python bench/nf4_mgpu.py --out $D/wide.jsonl --ms 2048,1024 --rounds 3 --no-triton \
  --shapes 8b_gate_up,8b_down,70b_q_o,70b_gate_up --plans 256,128,64,4,1,64+swap+ws+gather+lut=16 \
  256,128,64,4,1,32+swap+ws+gather+lut=16 256,128,64,4,1,64+swap+ws+gather+lut=16+skip_decode \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/wide.txt
timeout 100 python bench/nf4_mgpu.py --out $D/narrow.jsonl --ms 256,512 --rounds 3 --no-triton \
  --shapes 8b_down,8b_q_o --plans 128,128,128,3,0,64+swap+ws+gather+lut=32 128,128,128,3,0,32+swap+ws+gather+lut=32 \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/narrow.txt
date -u >> $D/info.txt
