# session 17 run 1: two decoding warpgroups (plan.decoders 2; the wgmma warpgroups split x's rows,
# tile_n 64): their GPU tests, then M = 2048 against the dispatch, session 14's best decoder plan,
# and the new kernel without its wgmma (decode alone) and without its decode (skeleton)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r1; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 150 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -k "matches_reference_on_gpu and W2" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest.txt
tail -4 $D/pytest.txt | cut -c1-400
timeout 280 python bench/nf4_mgpu.py --out $D/mgpu.jsonl --ms 2048 --rounds 3 --no-triton \
  --shapes 8b_gate_up,70b_gate_up,8b_down --plans 256,128,64,4+decoder=2+lut=16 \
  256,64,64,4+decoder=2+decoders=2 256,64,64,4+decoder=2+decoders=2+lut=32 \
  256,64,64,4+decoder=2+decoders=2+lut=32+skip_mma 256,64,64,4+decoder=2+decoders=2+skip_decode \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/mgpu.txt
date -u >> $D/info.txt
