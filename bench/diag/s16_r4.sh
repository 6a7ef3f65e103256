# session 16 run 4: the dispatch with plan.finish at split 2 (from M=9) and the unpadded nested
# absmax: the Mosaic GPU test file's GPU tests, then the dispatch against the bf16 dot at M = 16
# and 1 on the eight Llama weights (medians of 3 interleaved rounds)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r4; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 230 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest.txt
tail -3 $D/pytest.txt | cut -c1-400
timeout 200 python bench/nf4_mgpu.py --out $D/dispatch.jsonl --ms 16,1 --rounds 3 --no-triton --plans \
  --shapes 70b_gate_up,70b_down,70b_q_o,70b_k_v,8b_gate_up,8b_down,8b_q_o,8b_k_v \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/dispatch.txt
date -u >> $D/info.txt
