# session 16 run 3: plan.finish with the grid's "s" axis first (a tile's waiting program launched a
# grid slice after the programs it waits for): its GPU tests, then M = 16 forward times against the
# dispatch (gather + reduce; the nested absmax unpadded since r2)
export PYTHONPATH=$PWD:$PWD/.whl/site XLA_PYTHON_CLIENT_PREALLOCATE=false
D=$OUT/r3; mkdir -p $D; { nvidia-smi --query-gpu=name,driver_version --format=csv; date -u; } > $D/info.txt
timeout 100 python -m pytest -q -n 4 tests/test_nf4_mgpu.py -m gpu -k "matches_reference_on_gpu and (L32F or SGF)" -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warn | tail -12 > $D/pytest.txt
tail -2 $D/pytest.txt | cut -c1-400
timeout 240 python bench/nf4_mgpu.py --out $D/finish.jsonl --ms 16 --rounds 5 --no-triton \
  --shapes 70b_gate_up,70b_down,70b_q_o,8b_down,8b_q_o \
  --plans "128,64,256,2,0,64+swap+gather+dq+lut=32+finish" "128,64,512,2,0,64+swap+gather+dq+lut=32+finish" \
  2>&1 | grep -v Warn | python bench/diag/s16_fmt.py | tee $D/finish.txt
date -u >> $D/info.txt
