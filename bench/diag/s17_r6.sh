# session 17 run 6: plan.lag in the mid-M gather kernel with the table (each step's last wgmma
# left running while the next step decodes; buffers released a step late): its GPU tests, then
# M=2048 and 512 against the same plan without it and the dispatch
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r6; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 70 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -k "matches_reference_on_gpu and L16A" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -8 > $D/pytest.txt
tail -3 $D/pytest.txt | cut -c1-400
timeout 140 python bench/nf4_mgpu.py --out $D/lag.jsonl --ms 2048,512 --rounds 3 --no-triton \
  --shapes 8b_down,70b_q_o,8b_gate_up --plans 256,128,64,4,1+swap+ws+gather+lut=16+lag \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/lag.txt
date -u >> $D/info.txt
